"""Fused linear cross-entropy (adaptor over :func:`mmtune.model.speed.enable_fused_cross_entropy`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .result import Applied, Declined

NAME = "fused-ce"
SWITCH = "fused_cross_entropy"
SUMMARY = "fused linear cross-entropy: no full logits"


def apply(model: Any, cfg: Any, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    from mmtune.model.speed import enable_fused_cross_entropy

    if enable_fused_cross_entropy(model):
        return Applied(True)
    return Declined("the model does not fit the fused loss (the line above says why)")
