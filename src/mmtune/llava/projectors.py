"""Projectors from vision features to the language model's embedding space."""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def build_vision_projector(config: Any) -> nn.Module:
    """``linear``, ``mlp{N}x_gelu`` (N linear layers with GELU between) or ``identity``.

    Module names match LLaVA's checkpoints (``mm_projector.0`` / ``.2`` ...), so stage-1
    projector files of the original codebase load as they are.
    """
    kind = getattr(config, "mm_projector_type", "linear") or "linear"
    mm_hidden, hidden = config.mm_hidden_size, config.hidden_size
    if mm_hidden is None:
        raise ValueError("config.mm_hidden_size is not set: build the vision tower first")
    if kind == "linear":
        return nn.Linear(mm_hidden, hidden)
    match = _MLP.match(kind)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"mm_projector_type {kind!r}: depth must be >= 1")
        layers: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*layers)
    if kind == "identity":
        if mm_hidden != hidden:
            raise ValueError(f"identity projector needs mm_hidden_size == hidden_size ({mm_hidden} != {hidden})")
        return nn.Identity()
    raise ValueError(f"unknown mm_projector_type {kind!r} (linear, mlp<N>x_gelu or identity)")
