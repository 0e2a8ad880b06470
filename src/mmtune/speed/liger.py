"""Liger kernels: RMSNorm and SwiGLU MLP modules of the language model replaced by liger-kernel's
module classes (a submodule swap, as peft installs its layers), keeping the weights and their
state-dict keys. Only module classes whose computation liger's class reproduces are replaced
(:data:`RMS_NORMS`, :data:`SWIGLU_MLPS`); rotary embeddings are not (liger applies them by
rebinding the model's functions, which mmtune does not do). The cross-entropy is mmtune's own
lever. liger-kernel is optional: without it the lever declines with one line."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from mmtune.model.layers import replace_module, unwrap_model

from .result import Applied, Declined

if TYPE_CHECKING:
    from .config import SpeedConfig

logger = logging.getLogger(__name__)

NAME = "liger"
SWITCH = "liger_kernels"
SUMMARY = "Liger kernels: RMSNorm, SwiGLU (liger-kernel)"

#: transformers RMSNorm classes -> (offset, casting mode) of liger's RMSNorm that computes the same:
#: Llama-style norms scale by ``weight`` after an fp32 norm, Gemma-style ones by ``1 + weight`` in fp32
RMS_NORMS: dict[str, tuple[float, str]] = {
    **{name: (0.0, "llama") for name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen2VLRMSNorm",
                                         "Qwen2_5_VLRMSNorm", "Qwen3RMSNorm", "Qwen3VLTextRMSNorm")},
    **{name: (1.0, "gemma") for name in ("GemmaRMSNorm", "Gemma3RMSNorm")},
}
#: transformers MLP classes computing ``down(act(gate(x)) * up(x))``; replaced when their act is SiLU
SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
ROTARY_REASON = "rotary embeddings stay unfused: liger applies them by rebinding the model's functions"


def _liger_classes() -> tuple[Any, Any] | None:
    try:
        from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP
    except ImportError:
        return None
    return LigerRMSNorm, LigerSwiGLUMLP


def _liger_norm(cls: Any, old: nn.Module, offset: float, casting: str) -> nn.Module:
    eps = getattr(old, "variance_epsilon", None) or getattr(old, "eps", 1e-6)
    with torch.device("meta"):
        new = cls(old.weight.shape[0], eps=eps, offset=offset, casting_mode=casting, in_place=False)
    new.weight = old.weight
    return new


def _liger_mlp(cls: Any, old: nn.Module) -> nn.Module:
    with torch.device("meta"):
        new = cls(old.config)
    for part in ("gate_proj", "up_proj", "down_proj"):
        setattr(new, part, getattr(old, part))  # the model's own (LoRA-wrapped) projections
    return new


def _is_swiglu(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (type(module).__name__ in SWIGLU_MLPS and getattr(config, "hidden_act", None) in ("silu", "swish")
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")))


def apply_liger_kernels(model: nn.Module, classes: tuple[Any, Any] | None = None) -> Applied | Declined:
    """Replace the language model's known RMSNorm and SwiGLU MLP modules by liger's. Applied:
    ``{"rms_norm": n, "swiglu": m}``; Declined when liger-kernel is not installed or nothing
    matches."""
    classes = classes or _liger_classes()
    if classes is None:
        logger.info("liger-kernel not installed: RMSNorm, SwiGLU and rotary run unfused (pip install liger-kernel)")
        return Declined("liger-kernel not installed")
    norm_cls, mlp_cls = classes
    base = unwrap_model(model)
    norms, mlps = [], []
    for name, module in base.named_modules():
        kind = type(module).__name__
        if kind in RMS_NORMS and isinstance(getattr(module, "weight", None), torch.Tensor):
            norms.append((name, module, *RMS_NORMS[kind]))
        elif _is_swiglu(module):
            mlps.append((name, module))
    if not norms and not mlps:
        return Declined(f"{type(base).__name__} has no RMSNorm or SwiGLU module liger's classes reproduce")
    for name, module, offset, casting in norms:
        replace_module(base, name, _liger_norm(norm_cls, module, offset, casting))
    for name, module in mlps:
        replace_module(base, name, _liger_mlp(mlp_cls, module))
    logger.info("liger kernels on: %d RMSNorm, %d SwiGLU modules; %s", len(norms), len(mlps), ROTARY_REASON)
    return Applied({"rms_norm": len(norms), "swiglu": len(mlps)})


def apply(model: nn.Module, cfg: SpeedConfig, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    return apply_liger_kernels(model)
