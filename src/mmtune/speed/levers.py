"""The one ordered list of speed levers (:data:`LEVERS`) and :func:`apply_levers`, which loading,
``mmtune env``, the tests and the benchmarks all use.

Each lever is a module with ``NAME`` (``benchmarks/train_speed.py --without NAME``), ``SWITCH``
(its :class:`~mmtune.speed.config.SpeedConfig` field, also the key of its result), ``SUMMARY``
and ``apply(model, cfg, earlier) -> Applied | Declined``. The order is the dependency order, and
a lever that needs another's result reads it from ``earlier`` (the results so far):
checkpointing reads whether the fused loss is on, block graphs read the towers that run without
autograd, and block graphs run before regional compile, which then compiles the graphed blocks."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch.nn as nn

from . import (block_graphs, checkpointing, compile, fused_loss, liger, sync_free, tower_no_grad,
               vision_varlen)
from .config import SpeedConfig
from .result import Applied, Declined

logger = logging.getLogger(__name__)

#: every lever, in the order it is applied
LEVERS: tuple[ModuleType, ...] = (liger, fused_loss, tower_no_grad, vision_varlen, checkpointing, block_graphs,
                                  compile, sync_free)

#: ``--without NAME`` -> the switch it turns off: every lever, and the settings of regional compile
WITHOUT: dict[str, str] = {**{lever.NAME: lever.SWITCH for lever in LEVERS}, **compile.SETTINGS}

#: every switch a report has a line for, in order: the levers' and regional compile's settings
SWITCHES: tuple[str, ...] = tuple(s for lever in LEVERS for s in (lever.SWITCH, *getattr(lever, "SETTINGS", {}).values()))


@dataclass(frozen=True)
class LeverReport(Mapping[str, Applied | Declined]):
    """What :func:`apply_levers` did, keyed by each lever's ``SWITCH``: ``Applied`` or
    ``Declined``; ``switched_off`` holds the keys whose switch was off (not tried)."""

    config: SpeedConfig
    results: dict[str, Applied | Declined] = field(default_factory=dict)
    switched_off: frozenset[str] = frozenset()

    def __getitem__(self, key: str) -> Applied | Declined:
        return self.results[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def summary(self) -> str:
        parts = []
        for key, result in self.results.items():
            if key in self.switched_off:
                parts.append(f"{key} off")
            elif result:
                parts.append(f"{key} on")
            else:
                parts.append(f"{key} declined ({result.reason})")
        return "speed levers: " + ", ".join(parts)


def _off_reason(lever: ModuleType, cfg: SpeedConfig) -> str:
    if lever.SWITCH in cfg.from_default:
        return f"off (its default on {cfg.device_type})"
    return f"off ({lever.SWITCH}: false)"


def apply_levers(model: nn.Module, cfg: SpeedConfig, levers: tuple[Any, ...] = LEVERS) -> LeverReport:
    """Apply every lever whose switch is on in ``cfg`` to a model ready to train, in order; a
    lever that declines says why in one line, and the whole report is logged once."""
    results: dict[str, Applied | Declined] = {}
    off = set()
    for lever in levers:
        enabled = lever.enabled(cfg) if hasattr(lever, "enabled") else bool(getattr(cfg, lever.SWITCH))
        if not enabled:
            results[lever.SWITCH] = Declined(_off_reason(lever, cfg))
            off.add(lever.SWITCH)
            continue
        result = lever.apply(model, cfg, results)
        if not result:
            logger.info("%s declined: %s", lever.SWITCH, result.reason)
        results[lever.SWITCH] = result
    report = LeverReport(cfg, results, frozenset(off))
    logger.info("%s", report.summary())
    return report
