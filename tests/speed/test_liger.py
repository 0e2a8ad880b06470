"""Liger kernels (mmtune.speed.liger): module replacement with liger's classes (a stand-in class
here: liger-kernel is not installed), keys and results unchanged; its absence is one line."""

import pytest
import torch

from mmtune.model.layers import unwrap_model
from mmtune.speed import liger

from ..helpers import FakeLigerRMSNorm, FakeLigerSwiGLUMLP
from ..helpers import assert_same as _assert_same
from ..helpers import make_batch as _batch
from ..helpers import make_model as _model
from ..helpers import train_steps as _train


def test_liger_absence_is_logged(caplog, monkeypatch):
    import logging
    import sys

    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when not installed
    with caplog.at_level(logging.INFO, logger="mmtune.speed"):
        result = liger.apply_liger_kernels(_model("qwen2_vl"))
    assert not result and result.reason == "liger-kernel not installed"
    assert "liger-kernel not installed" in caplog.text




@pytest.mark.parametrize("method", ["lora", "full"])
def test_liger_modules_replace_norms_and_mlps_keeping_keys_and_results(fake_liger, method):
    """Module replacement (no method assigned on an instance): the same state-dict keys and
    parameters, the same losses and gradients, rotary declined in the log line."""
    batches = [_batch("qwen2_vl", seed=s) for s in (0, 1)]
    ref = _model("qwen2_vl", method)
    model = _model("qwen2_vl", method)
    keys = list(model.state_dict())
    weights = {n: p for n, p in model.named_parameters()}
    result = liger.apply_liger_kernels(model)
    assert result and result.detail["rms_norm"] > 0 and result.detail["swiglu"] == 2
    base = unwrap_model(model)
    assert isinstance(base.model.language_model.layers[0].mlp, FakeLigerSwiGLUMLP)
    assert isinstance(base.model.language_model.norm, FakeLigerRMSNorm)
    assert list(model.state_dict()) == keys
    assert all(p is weights[n] for n, p in model.named_parameters())  # the very parameters, not copies
    _assert_same(_train(ref, batches), _train(model, batches))
    for module in base.modules():
        assert "forward" not in vars(module)


def test_liger_norm_of_a_gemma_family_uses_its_offset(fake_liger):
    """Gemma-style norms scale by 1 + weight in fp32: liger's class gets offset 1 and gemma casting;
    Gemma's GELU MLP is not a SwiGLU and stays."""
    from ..helpers import tiny_configs

    if "gemma3" not in tiny_configs():
        pytest.fail("gemma3's tiny config is missing")
    model = _model("gemma3")
    result = liger.apply_liger_kernels(model)
    assert result and result.detail["swiglu"] == 0 and set(FakeLigerRMSNorm.built) == {"gemma"}


def test_liger_declines_a_model_without_known_modules(fake_liger):
    result = liger.apply_liger_kernels(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert not result and "RMSNorm or SwiGLU" in result.reason
