"""Packed vision attention: the vision tower's attention over all images of a batch in one varlen
kernel (torch's flash varlen) instead of one sdpa call, and one host sync, per image and block.

Which tower modules hand ``cu_seqlens`` to transformers' attention function is declared by the
family (``SpeedCapabilities.varlen_attention_classes``); their config's attention
implementation is set to a name registered with transformers' ``AttentionInterface``
(:data:`VARLEN_ATTENTION`), so the attention call goes through :func:`varlen_attention_forward`.
A family that declares none runs its tower's attention as before, with one line saying so."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtune.model.composite import get_composite_model
from mmtune.model.layers import tower_modules, unwrap_model

from .result import Applied, Declined

if TYPE_CHECKING:
    from .config import SpeedConfig

logger = logging.getLogger(__name__)

NAME = "vision-varlen"
SWITCH = "vision_varlen_attention"
SUMMARY = "the vision tower's attention over all images in one varlen kernel"

VARLEN_ATTENTION = "mmtune_flash_varlen"  # "flash" in the name routes transformers' vision blocks to varlen
#: the same, calling the kernel as an aten op: for blocks that run through inductor's C++ wrapper
VARLEN_ATTENTION_ATEN = "mmtune_flash_varlen_aten"
_VARLEN_KERNEL: list[Any] = []  # [kernel or None] once looked up (a plain global: compiled code reads it cheaply)


def torch_varlen_attn() -> Any:
    """torch's flash varlen attention (torch >= 2.9, CUDA), or None."""
    if not _VARLEN_KERNEL:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        _VARLEN_KERNEL.append(varlen_attn)
    return _VARLEN_KERNEL[0]


def aten_flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                      cu_seq_k: torch.Tensor, max_q: int, max_k: int, scale: float | None = None) -> torch.Tensor:
    """The flash varlen kernel called as the aten op ``_flash_attention_forward`` (differentiable,
    and with a C shim, so inductor's C++ wrapper can launch it), with ``varlen_attn``'s
    arguments; no dropout, not causal. Returns (tokens, heads, dim)."""
    return torch.ops.aten._flash_attention_forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, False,
                                                   False, scale=scale)[0]


def varlen_kernel_for(query: torch.Tensor, aten: bool = False) -> Any:
    """The varlen kernel for ``query``'s device and dtype, or None (CPU, fp32: the reference).
    ``aten``: the aten op (:func:`aten_flash_varlen`) instead of torch's ``varlen_attn``."""
    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)):
        return None
    if aten:
        return aten_flash_varlen
    return _VARLEN_KERNEL[0] if _VARLEN_KERNEL else torch_varlen_attn()


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Reference for the varlen kernel: attention within each segment of ``cu_seqlens`` only.
    ``query``/``key``/``value`` are (tokens, heads, dim); runs of equal-length segments go
    through one batched sdpa call. Returns (tokens, heads, dim)."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    out, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n, size = j - i, lengths[i]
        if size:
            span = slice(start, start + n * size)
            q, k, v = (t[span].unflatten(0, (n, size)).transpose(1, 2) for t in (query, key, value))
            out.append(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).flatten(0, 1))
        start, i = start + n * size, j
    return torch.cat(out) if out else query.new_empty(query.shape)


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             max_length_q: int | None = None, max_length_k: int | None = None,
                             is_causal: bool | None = None, aten: bool = False,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function for packed, non-causal vision attention: one kernel
    over every image instead of one sdpa call (and one host sync) per image and block.
    Anything else (a mask, causal, no ``cu_seq_lens``) goes to transformers' sdpa. Segments
    are self-attention: queries and keys share ``cu_seq_lens_q``, as vision blocks pass them.
    ``aten``: the kernel as the aten op (:data:`VARLEN_ATTENTION_ATEN`)."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      is_causal=is_causal, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, heads, tokens, dim) -> (tokens, heads, dim)
    kernel = varlen_kernel_for(q, aten=aten)
    if kernel is not None:
        if max_length_q is None:
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        cu = cu_seq_lens_q.to(torch.int32)
        out = kernel(q, k, v, cu, cu, max_length_q, max_length_q, scale=scaling)
    else:
        out = segment_attention(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


aten_varlen_attention_forward = functools.partial(varlen_attention_forward, aten=True)


def register_attention() -> None:
    """Register both attention names with transformers' ``AttentionInterface`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionInterface.register(VARLEN_ATTENTION_ATEN, aten_varlen_attention_forward)


def varlen_configs(module: nn.Module) -> list[Any]:
    """The distinct configs under ``module`` whose attention runs through this lever."""
    found: dict[int, Any] = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "_attn_implementation", None) in (VARLEN_ATTENTION, VARLEN_ATTENTION_ATEN):
            found[id(config)] = config
    return list(found.values())


def enable_vision_varlen_attention(model: nn.Module) -> Applied | Declined:
    """Route the vision tower's packed attention through :func:`varlen_attention_forward`.
    Applied: the tower keys changed (``detail``) and their configs (``state``); Declined when the
    family declares no varlen attention class, the tower holds none, or it already uses flash
    attention."""
    base = unwrap_model(model)
    entry = get_composite_model(getattr(base.config, "model_type", ""))
    classes = set(entry.speed.varlen_attention_classes) if entry is not None else set()
    if not classes:
        return Declined(f"{type(base).__name__}'s family declares no tower attention that takes cu_seqlens")
    register_attention()
    changed, configs_changed = [], []
    for key, tower in tower_modules(model):
        configs = {}
        for module in tower.modules():
            config = getattr(module, "config", None)
            if type(module).__name__ in classes and hasattr(config, "_attn_implementation"):
                configs[id(config)] = config
        if not configs or any("flash" in str(c._attn_implementation) for c in configs.values()):
            continue
        for config in configs.values():
            config._attn_implementation = VARLEN_ATTENTION
        changed.append(key)
        configs_changed.extend(configs.values())
    if not changed:
        return Declined("the tower holds none of the declared attention classes, or already uses flash attention")
    kernel = "torch varlen flash kernel" if torch_varlen_attn() is not None else "batched sdpa per image size"
    logger.info("vision attention packed (%s): %s", kernel, ", ".join(changed))
    return Applied(changed, state=tuple(configs_changed))


def apply(model: nn.Module, cfg: SpeedConfig, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    return enable_vision_varlen_attention(model)
