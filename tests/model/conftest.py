"""Tiny random instances of every registered composite model type (built once per session)."""

import pytest

from ..helpers import tiny_configs, tiny_model  # noqa: F401 (imported by this folder's tests)


@pytest.fixture(scope="session")
def configs():
    return tiny_configs()
