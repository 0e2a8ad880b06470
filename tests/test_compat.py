"""Upstream mends (mmtune.compat): each applies only on the transformers releases that need it,
says so in one line, changes nothing the second time, and the Yi-VL projector does not leak
out of the build."""

import copy
import logging

import pytest
import torch

from mmtune.compat import (
    MENDS,
    LlavaMultiModalProjectorForYiVL,
    _give_image_outputs,
    apply_mends,
    transformers_version,
    yi_vl_projector,
)
from mmtune.testing import get_fixture

LLAMA4_MEND = "llama4_image_outputs"


@pytest.fixture(scope="module")
def llama4_config():
    return get_fixture("llama4").tiny_config()


def _llama4(config):
    from transformers import Llama4ForConditionalGeneration

    torch.manual_seed(0)
    return Llama4ForConditionalGeneration(copy.deepcopy(config)).eval()


def _language_models(model):
    from transformers.models.llama4.modeling_llama4 import Llama4ForCausalLM

    return [m for m in model.modules() if isinstance(m, Llama4ForCausalLM)]


def _mend_records(caplog):
    return [r for r in caplog.records if r.name == "mmtune.compat" and LLAMA4_MEND in r.getMessage()]


def test_the_llama4_mend_logs_once_and_is_idempotent(llama4_config, caplog):
    model = _llama4(llama4_config)
    (language_model,) = _language_models(model)
    hooks_before = len(language_model._forward_hooks)
    with caplog.at_level(logging.INFO, logger="mmtune.compat"):
        assert apply_mends("llama4", model, version="5.24.0") == [LLAMA4_MEND]
        assert apply_mends("llama4", model, version="5.24.0") == []  # already mended: nothing, no line
        assert apply_mends("llama4", model, version="5.24.2") == []
    assert len(_mend_records(caplog)) == 1
    assert "5.24.0" in _mend_records(caplog)[0].getMessage()
    assert len(language_model._forward_hooks) == hooks_before + 1


@pytest.mark.parametrize("version", ["5.17.0", "5.23.1", "5.25.0", "5.26.0"])
def test_the_llama4_mend_is_not_applied_where_not_needed(llama4_config, version, caplog):
    model = _llama4(llama4_config)
    (language_model,) = _language_models(model)
    hooks_before = len(language_model._forward_hooks)
    with caplog.at_level(logging.INFO, logger="mmtune.compat"):
        assert apply_mends("llama4", model, version=version) == []
    assert not _mend_records(caplog)
    assert len(language_model._forward_hooks) == hooks_before


def test_a_mend_applies_only_to_its_model_types(llama4_config):
    model = _llama4(llama4_config)
    assert apply_mends("llava", model, version="5.24.0") == []
    assert {m.name for m in MENDS if m.needed("llama4", "5.24.1")} == {LLAMA4_MEND}
    assert not [m.name for m in MENDS if m.needed("llava", "5.24.1")]


def test_the_installed_release_decides_by_default(llama4_config):
    from packaging.version import Version

    model = _llama4(llama4_config)
    needed = Version(transformers_version()).release[:2] == (5, 24)
    assert apply_mends("llama4", model) == ([LLAMA4_MEND] if needed else [])


def test_the_llama4_hook_gives_the_missing_field_and_changes_nothing_else():
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast  # Llama 4's language model's, no such field

    logits = torch.randn(1, 3, 5)
    out = _give_image_outputs(torch.nn.Identity(), (), MoeCausalLMOutputWithPast(logits=logits))
    assert out.image_outputs is None and out.logits is logits
    assert _give_image_outputs(torch.nn.Identity(), (), (logits,)) == (logits,)  # tuples are left alone


def test_a_mended_llama4_gives_the_same_logits(llama4_config):
    """The hook adds a field and nothing else: logits with and without it are equal."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    plain = _llama4(llama4_config)
    mended = _llama4(llama4_config)
    apply_mends("llama4", mended, version="5.24.0")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, mended(input_ids=ids).logits)


def _tiny_llava_config():
    return get_fixture("llava").tiny_config()


def test_the_yi_vl_projector_does_not_leak_out_of_the_build(caplog):
    from transformers.models.llava import modeling_llava

    from mmtune.config import FinetuningArguments, ModelArguments
    from mmtune.model.composite import COMPOSITE_MODELS
    from mmtune.model.loader import load_model

    original = modeling_llava.LlavaMultiModalProjector
    config = _tiny_llava_config()
    config.is_yi_vl_derived_model = True
    with caplog.at_level(logging.INFO, logger="mmtune.compat"):
        yi = load_model(ModelArguments(torch_dtype="fp32"), FinetuningArguments(finetuning_type="full"), config=config)
    assert isinstance(COMPOSITE_MODELS["llava"].get_projector(yi), LlavaMultiModalProjectorForYiVL)
    assert sum("Yi-VL" in r.getMessage() for r in caplog.records) == 1
    assert modeling_llava.LlavaMultiModalProjector is original
    plain = load_model(ModelArguments(torch_dtype="fp32"), FinetuningArguments(finetuning_type="full"),
                       config=_tiny_llava_config())
    assert type(COMPOSITE_MODELS["llava"].get_projector(plain)) is original
    assert not hasattr(yi.config, "mmtune_projector")  # no state rides on the config


def test_the_yi_vl_projector_is_restored_when_the_build_fails():
    from transformers.models.llava import modeling_llava

    original = modeling_llava.LlavaMultiModalProjector
    config = _tiny_llava_config()
    config.is_yi_vl_derived_model = True
    with pytest.raises(RuntimeError, match="build failed"), yi_vl_projector(config):
        assert modeling_llava.LlavaMultiModalProjector is LlavaMultiModalProjectorForYiVL
        raise RuntimeError("build failed")
    assert modeling_llava.LlavaMultiModalProjector is original
    with yi_vl_projector(_tiny_llava_config()):  # not Yi-VL: nothing changes
        assert modeling_llava.LlavaMultiModalProjector is original
