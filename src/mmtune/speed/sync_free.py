"""Sync-free forward (adaptor over :func:`mmtune.model.precompute.enable_sync_free_forward`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .result import Applied, Declined

NAME = "sync-free"
SWITCH = "sync_free_forward"
SUMMARY = "a forward without host syncs (inputs built in the collator)"


def apply(model: Any, cfg: Any, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    from mmtune.model.precompute import enable_sync_free_forward

    pre = enable_sync_free_forward(model)
    if pre is not None:
        return Applied(True, state=pre)
    return Declined("the model's tower inputs cannot be built in the collator")
