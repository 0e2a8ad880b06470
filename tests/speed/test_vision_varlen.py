"""Packed vision attention (mmtune.speed.vision_varlen): one kernel call over every image, the same
losses and gradients, declined for families that declare no varlen attention."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mmtune.speed import compile as regional
from mmtune.speed import vision_varlen
from mmtune.speed.result import Declined

from ..helpers import tiny_configs, tiny_model

from ..helpers import assert_same as _assert_same
from ..helpers import make_batch as _batch
from ..helpers import make_model as _model
from ..helpers import train_steps as _train


# ------------------------------------------------------------------ packed vision attention (varlen)
def _block_diagonal_attention(q, k, v, cu, scale):
    """Reference: full attention under a block-diagonal mask (tokens, heads, dim)."""
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    mask = seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.transpose(0, 1)


def test_segment_attention_equals_a_block_diagonal_mask():
    torch.manual_seed(0)
    cu = torch.tensor([0, 16, 32, 48, 72, 72, 80, 96, 112], dtype=torch.int32)  # runs of equal sizes, an empty one
    q, k, v = (torch.randn(112, 4, 8, dtype=torch.float64) for _ in range(3))
    ours = vision_varlen.segment_attention(q, k, v, cu, 0.3)
    assert torch.allclose(ours, _block_diagonal_attention(q, k, v, cu, 0.3), atol=1e-10)


def test_varlen_attention_calls_the_kernel_once_and_falls_back_to_sdpa(monkeypatch):
    calls = []

    def fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        calls.append((tuple(q.shape), cu_q.dtype, max_q))
        return vision_varlen.segment_attention(q, k, v, cu_q, scale)

    monkeypatch.setattr(vision_varlen, "varlen_kernel_for", lambda q, aten=False: fake_kernel)
    torch.manual_seed(0)
    cu = torch.tensor([0, 16, 40], dtype=torch.int64)
    q, k, v = (torch.randn(1, 4, 40, 8) for _ in range(3))  # as transformers hands them: (1, heads, tokens, dim)
    out, _ = vision_varlen.varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.5, cu_seq_lens_q=cu,
                                            cu_seq_lens_k=cu, max_length_q=24, max_length_k=24, is_causal=False)
    assert calls == [((40, 4, 8), torch.int32, 24)] and out.shape == (1, 40, 4, 8)
    ref = _block_diagonal_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 0.5)
    assert torch.allclose(out[0], ref, atol=1e-6)
    # a causal or masked call is not ours: transformers' sdpa, the kernel untouched
    module = torch.nn.Module()
    module.is_causal = True
    causal, _ = vision_varlen.varlen_attention_forward(module, q, k, v, None, scaling=0.5, is_causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    assert len(calls) == 1 and torch.allclose(causal, expected, atol=1e-6)


def test_aten_varlen_kernel_is_chosen_where_the_cpp_wrapper_runs_the_block(monkeypatch):
    """``compile_cpp_wrapper: all``: the varlen kernel as the aten op (C shim, autograd), picked
    per attention module; its plumbing checked on meta tensors (the kernel itself is CUDA's)."""
    import types

    q = torch.empty(100, 4, 64, device="meta", dtype=torch.bfloat16)
    cu = torch.tensor([0, 40, 100], dtype=torch.int32, device="meta")
    assert vision_varlen.aten_flash_varlen(q, q, q, cu, cu, 60, 60, scale=0.125).shape == (100, 4, 64)
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert vision_varlen.varlen_kernel_for(cuda_like, aten=True) is vision_varlen.aten_flash_varlen
    assert vision_varlen.varlen_kernel_for(cuda_like) is vision_varlen.torch_varlen_attn()
    assert vision_varlen.varlen_kernel_for(types.SimpleNamespace(is_cuda=True, dtype=torch.float32), aten=True) is None
    assert vision_varlen.varlen_kernel_for(torch.zeros(2, 2, dtype=torch.bfloat16), aten=True) is None  # CPU: reference
    seen = []
    monkeypatch.setattr(vision_varlen, "varlen_kernel_for", lambda q, aten=False: seen.append(aten))
    from transformers import AttentionInterface

    vision_varlen.register_attention()
    aten_forward = AttentionInterface()[vision_varlen.VARLEN_ATTENTION_ATEN]  # what a C++-wrapped block calls
    x = torch.randn(1, 2, 10, 4)
    cu = torch.tensor([0, 4, 10])
    aten_forward(torch.nn.Module(), x, x, x, None, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    vision_varlen.varlen_attention_forward(torch.nn.Module(), x, x, x, None, scaling=0.5, cu_seq_lens_q=cu,
                                           cu_seq_lens_k=cu)
    assert seen == [True, False]


def test_cpp_wrapper_all_takes_the_vision_blocks_and_their_attention(monkeypatch):
    model = _model("qwen2_vl")
    assert vision_varlen.enable_vision_varlen_attention(model)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    flagged = lambda: sorted({c._attn_implementation == vision_varlen.VARLEN_ATTENTION_ATEN  # noqa: E731
                              for c in vision_varlen.varlen_configs(model)})
    assert regional.compile_repeated_blocks(model, cpp_wrapper="all") == 4
    assert all(kw["options"] == {"cpp_wrapper": True} for kw in seen) and flagged() == [True]
    seen.clear()
    assert regional.compile_repeated_blocks(model, cpp_wrapper=True) == 4
    assert sum("options" in kw for kw in seen) == 2 and flagged() == [False]  # decoder layers only
    with pytest.raises(ValueError, match="compile_cpp_wrapper"):
        regional.compile_repeated_blocks(model, cpp_wrapper="vision")


def _varlen_types():
    from mmtune.testing import FIXTURES

    return [t for t in ("glm4v", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm46v", "qwen3_omni_moe_thinker") if t in tiny_configs() and t in FIXTURES]


@pytest.mark.parametrize("model_type", _varlen_types())
def test_vision_varlen_attention_keeps_losses_and_grads(model_type, monkeypatch):
    """The tower trains here (gradients flow through the attention), images of different sizes."""
    calls = []

    def counting_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        calls.append(max_q)
        return vision_varlen.segment_attention(q, k, v, cu_q, scale)

    monkeypatch.setattr(vision_varlen, "varlen_kernel_for", lambda q, aten=False: counting_kernel)

    def build(lever):
        model = _model(model_type, "full", freeze_vision_tower=False)
        if lever:
            assert vision_varlen.enable_vision_varlen_attention(model)
        return model

    batches = [_batch(model_type, seed=s) for s in (0, 1)]
    ref = _train(build(False), batches)
    assert not calls
    _assert_same(ref, _train(build(True), batches))
    assert calls and all(isinstance(m, int) for m in calls)


def test_vision_varlen_attention_declines_towers_it_does_not_fit():
    for model_type in ("llava", "gemma3", "qwen2_audio"):
        if model_type in tiny_configs():
            assert isinstance(vision_varlen.enable_vision_varlen_attention(_model(model_type)), Declined)


def test_vision_varlen_attention_is_not_saved_with_the_model(tmp_path):
    """A checkpoint saved from a model with the lever on loads anywhere: the registered
    attention name stays out of config.json."""
    model = copy.deepcopy(tiny_model("qwen2_vl"))
    assert vision_varlen.enable_vision_varlen_attention(model)
    model.save_pretrained(tmp_path)
    text = open(tmp_path / "config.json").read()
    assert vision_varlen.VARLEN_ATTENTION not in text and vision_varlen.VARLEN_ATTENTION_ATEN not in text


def test_a_family_that_declares_no_varlen_attention_is_declined_in_one_line(monkeypatch):
    """The lever reads the family's declaration (SpeedCapabilities.varlen_attention_classes), not
    the attention class's source: a family that declares none gets one reason."""
    import dataclasses

    from mmtune.model.composite import get_composite_model
    from mmtune.speed.capabilities import SpeedCapabilities

    undeclared = dataclasses.replace(get_composite_model("qwen2_vl"), speed=SpeedCapabilities(fusable_head=True))
    monkeypatch.setattr(vision_varlen, "get_composite_model", lambda model_type: undeclared)
    model = _model("qwen2_vl")
    result = vision_varlen.enable_vision_varlen_attention(model)
    assert isinstance(result, Declined) and "declares no tower attention" in result.reason
    assert not vision_varlen.varlen_configs(model)
