"""Frozen towers without autograd: a fully frozen vision/audio tower runs under no-grad mode.

Otherwise the input-require-grads hook that activation checkpointing needs makes the tower record
a graph it never uses. The mode is switched by module hooks on each tower module (each block of a
tower that is a ModuleList): a forward pre-hook turns autograd off and remembers the caller's
mode, a forward hook registered with ``always_call=True`` gives it back, also when the forward
raises."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from mmtune.model.layers import tower_modules

from .result import Applied, Declined

if TYPE_CHECKING:
    from .config import SpeedConfig

logger = logging.getLogger(__name__)

NAME = "tower-no-grad"
SWITCH = "frozen_tower_no_grad"
SUMMARY = "frozen towers run without autograd"


@dataclass
class NoGradHooks:
    """The pair of hooks that runs one module without autograd; ``modes`` is the stack of the
    callers' grad modes (a module may be re-entered, e.g. by checkpoint recomputation)."""

    modes: list[bool] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def enter(self, module: nn.Module, args: Any) -> None:
        self.modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.modes:
            torch.set_grad_enabled(self.modes.pop())

    def install(self, module: nn.Module) -> None:
        self.handles.append(module.register_forward_pre_hook(self.enter))
        self.handles.append(module.register_forward_hook(self.exit, always_call=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def run_frozen_towers_without_grad(model: nn.Module) -> Applied | Declined:
    """Run every module of a fully frozen vision/audio tower without autograd. Applied: the
    tower keys (``detail``) and the hooks (``state``); Declined when the tower trains, even in
    part, or there is none."""
    towers = tower_modules(model)
    params = [p for _, m in towers for p in m.parameters()]
    if not params:
        return Declined("the model has no vision/audio tower with parameters")
    if any(p.requires_grad for p in params):
        logger.info("frozen tower without autograd not applied: part of the tower trains")
        return Declined("part of the tower trains")
    hooks = []
    for _, module in towers:
        for part in (list(module) if isinstance(module, nn.ModuleList) else [module]):
            pair = NoGradHooks()
            pair.install(part)
            hooks.append(pair)
    keys = [k for k, _ in towers]
    logger.info("frozen tower runs without autograd: %s", ", ".join(keys))
    return Applied(keys, state=tuple(hooks))


def apply(model: nn.Module, cfg: SpeedConfig, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    return run_frozen_towers_without_grad(model)
