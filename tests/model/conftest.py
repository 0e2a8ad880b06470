"""Tiny random instances of every registered composite model type (built once per session)."""

import functools

import pytest
import torch

from mmtune.model.composite import COMPOSITE_MODELS
from mmtune.testing import FIXTURES


def _configs_by_type():
    out = {}
    for fixture in FIXTURES.values():
        builders = [fixture.tiny_config] + [v for k, v in fixture.extra.items() if k.endswith("_config")]
        for build in builders:
            if build is None:
                continue
            config = build()
            out.setdefault(config.model_type, config)
    return out


@functools.cache
def tiny_configs():
    return _configs_by_type()


@functools.cache
def tiny_model(model_type):
    from mmtune.compat import apply_mends
    from mmtune.model.loader import model_class_for

    config = tiny_configs()[model_type]
    torch.manual_seed(0)
    cls = model_class_for(config)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    apply_mends(model_type, model)  # built without the loader: the mends this transformers needs, as it applies them
    return model


@pytest.fixture(scope="session")
def configs():
    return tiny_configs()
