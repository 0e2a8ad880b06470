"""Selective activation checkpointing: checkpoint only N decoder layers, N chosen from a memory
estimate on CUDA by default (the fewest that let the activations fit), every layer or none
elsewhere per ``gradient_checkpointing``. Reads from ``earlier`` whether the fused loss is on
(it changes how much memory the loss takes)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from mmtune.model.layers import decoder_layers, enable_gradient_checkpointing, unwrap_model

from . import fused_loss
from .config import ALL_LAYERS, FIT_MEMORY, _checkpoint_layers
from .result import Applied, Declined

if TYPE_CHECKING:
    from .config import SpeedConfig

logger = logging.getLogger(__name__)

NAME = "checkpointing"
SWITCH = "gradient_checkpointing_layers"
SUMMARY = "activation checkpointing of N decoder layers"


def activation_bytes_per_token(config: Any, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes a decoder layer keeps for backward per token, bytes it keeps when checkpointed).

    A llama-style layer with sdpa/flash attention keeps ~10 hidden-sized tensors (norm inputs,
    q/k/v, attention output, residuals) and 4 intermediate-sized ones (gate, up, activation,
    product) per token; a checkpointed one keeps its input.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    return dtype_bytes * (10 * hidden + 4 * inter), dtype_bytes * hidden


def choose_checkpoint_layers(num_layers: int, layer_bytes: float, checkpointed_bytes: float, available: float) -> int:
    """Fewest layers to checkpoint so ``(L - n) * layer_bytes + n * checkpointed_bytes``
    fits in ``available``; all of them when even that does not fit."""
    if num_layers <= 0 or layer_bytes <= 0:
        return 0
    if num_layers * layer_bytes <= available:
        return 0
    saved = layer_bytes - checkpointed_bytes
    if saved <= 0:
        return num_layers
    return int(min(num_layers, max(0, math.ceil((num_layers * layer_bytes - available) / saved))))


def _memory_available(model: nn.Module, budget_gib: float | None, fused_ce: bool, tokens: int) -> float:
    """Bytes left on the current CUDA device for decoder activations once the model, its
    gradients and Adam states, the loss and a safety margin are counted."""
    free, total = torch.cuda.mem_get_info()
    params = list(model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    on_gpu = any(p.is_cuda for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    available = free - (0 if on_gpu else model_bytes)
    planned = total
    if budget_gib is not None:
        used = torch.cuda.memory_allocated() + (0 if on_gpu else model_bytes)
        available = min(available, budget_gib * 2**30 - used)
        planned = min(total, budget_gib * 2**30)
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", 0) or 0
    loss_bytes = tokens * vocab * 12 if not fused_ce else 2**30  # full logits + fp32 copies, or one chunk
    margin = max(2**30, 0.05 * planned)
    return available - 3 * trainable - loss_bytes - margin


def resolve_checkpoint_layers(spec: int | str, model: nn.Module, *, gradient_checkpointing: bool, device_type: str,
                              batch_tokens: int | None, budget_gib: float | None = None, fused_ce: bool = True) -> int:
    """How many decoder layers to checkpoint. An integer is taken as given; ``auto`` on CUDA
    picks the fewest that fit the memory estimate (the user flag does not matter there);
    ``auto`` elsewhere, or without a batch size, is all-or-none per ``gradient_checkpointing``."""
    plan, _ = _checkpoint_layers(spec, device_type=device_type, gradient_checkpointing=gradient_checkpointing,
                                 batch_tokens=batch_tokens)
    return checkpoint_count(plan, model, budget_gib=budget_gib, fused_ce=fused_ce, batch_tokens=batch_tokens)


def checkpoint_count(plan: int | str, model: nn.Module, *, budget_gib: float | None, fused_ce: bool,
                     batch_tokens: int | None) -> int:
    """The number of layers a resolved plan (a count, ``all``, or ``memory``) gives on ``model``."""
    layers = decoder_layers(model)
    if plan == ALL_LAYERS:
        return len(layers)
    if plan != FIT_MEMORY:
        return min(int(plan), len(layers))
    if not torch.cuda.is_available() or not batch_tokens or not layers:
        return len(layers)
    dtype_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 2)
    per_token, ckpt_per_token = activation_bytes_per_token(unwrap_model(model).config, dtype_bytes)
    available = _memory_available(model, budget_gib, fused_ce, batch_tokens)
    n = choose_checkpoint_layers(len(layers), per_token * batch_tokens, ckpt_per_token * batch_tokens, available)
    logger.info("activation checkpointing auto: %.1f GiB for activations, %.2f GiB per layer (%d tokens): "
                "checkpointing %d of %d decoder layers", available / 2**30, per_token * batch_tokens / 2**30,
                batch_tokens, n, len(layers))
    return n


def set_checkpointed_layers(model: nn.Module, n: int) -> int:
    """Checkpoint the first ``n`` decoder layers and no other (enabling non-reentrant
    checkpointing when it is off); other modules keep their flags. Returns ``n``."""
    layers = decoder_layers(model)
    n = min(n, len(layers))
    if n > 0 and not any(getattr(m, "gradient_checkpointing", False) for m in layers):
        enable_gradient_checkpointing(unwrap_model(model))
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i < n
    if layers:
        logger.info("activation checkpointing: %d of %d decoder layers", n, len(layers))
    return n


def enabled(cfg: SpeedConfig) -> bool:
    """On when any layer is to be checkpointed, or the user asked for checkpointing (then a
    count of 0 switches the loader's checkpointing off again)."""
    return cfg.gradient_checkpointing_layers != 0 or cfg.gradient_checkpointing


def apply(model: nn.Module, cfg: SpeedConfig, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    fused = bool(earlier.get(fused_loss.SWITCH))
    n = checkpoint_count(cfg.gradient_checkpointing_layers, model, budget_gib=cfg.memory_budget_gib, fused_ce=fused,
                         batch_tokens=cfg.batch_tokens)
    if not n and not cfg.gradient_checkpointing:
        return Declined("no decoder layer to checkpoint")
    return Applied(set_checkpointed_layers(model, n))
