"""Regional compile: each repeated block (decoder layers, vision blocks) is ``Module.compile()``-d
(torch's own API) with dynamic shapes, so identical blocks share one graph and new batch lengths
do not recompile; state-dict keys do not change.

Dynamo's recompile limits must hold a few variants per block type (checkpointed or not, train /
eval). They are raised only while the compiled model runs: a forward pre-hook on the model enters
:class:`DynamoLimits` and a forward hook registered with ``always_call=True`` leaves it, so the
process's other compiled code keeps its own limits."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from mmtune.model.layers import decoder_layers, repeated_blocks, unwrap_model

from .result import Applied, Declined
from .vision_varlen import VARLEN_ATTENTION, VARLEN_ATTENTION_ATEN, varlen_configs

if TYPE_CHECKING:
    from .config import SpeedConfig

logger = logging.getLogger(__name__)

NAME = "compile"
SWITCH = "compile"
SUMMARY = "regional torch.compile of the repeated blocks"
#: settings of this lever that ``benchmarks/train_speed.py --without NAME`` switches off (name -> switch)
SETTINGS = {"cpp-wrapper": "compile_cpp_wrapper", "lean-guards": "compile_lean_guards"}

#: recompile limit while the compiled model runs (a few variants per block type)
RECOMPILE_LIMIT = 64


@dataclass
class DynamoLimits:
    """Dynamo's recompile limits raised to at least ``limit`` (the accumulated one to 4x) while
    entered, restored on leaving; re-entrant (a stack of patches)."""

    limit: int = RECOMPILE_LIMIT
    _stack: list[Any] = field(default_factory=list)

    def values(self) -> dict[str, int]:
        import torch._dynamo

        config = torch._dynamo.config
        out = {}
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                out[name] = max(getattr(config, name), self.limit)
                break
        if hasattr(config, "accumulated_recompile_limit"):
            out["accumulated_recompile_limit"] = max(config.accumulated_recompile_limit, 4 * self.limit)
        elif hasattr(config, "accumulated_cache_size_limit"):
            out["accumulated_cache_size_limit"] = max(config.accumulated_cache_size_limit, 4 * self.limit)
        return out

    def __enter__(self) -> DynamoLimits:
        import torch._dynamo

        patch = torch._dynamo.config.patch(**self.values())
        patch.__enter__()
        self._stack.append(patch)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack:
            self._stack.pop().__exit__(*exc)

    def enter_hook(self, module: nn.Module, args: Any) -> None:
        self.__enter__()

    def exit_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.__exit__(None, None, None)

    def install(self, module: nn.Module) -> list[Any]:
        """Scope the limits to ``module``'s forward."""
        return [module.register_forward_pre_hook(self.enter_hook),
                module.register_forward_hook(self.exit_hook, always_call=True)]


def lean_guards(entries: list[Any]) -> list[bool]:
    """Dynamo guard filter: drop the guards on module attributes (parameters' metadata, hook
    dicts, flags), keep every ``training`` flag, tensor input and global-state guard. Nothing a
    training run does changes the dropped ones (they are checked on every call of every compiled
    block); ``model.train()`` / ``eval()`` still recompile. Not for code that edits module
    attributes between calls."""
    return [not (e.orig_guard.source.is_unspecialized_nn_module() and not e.name.endswith(".training"))
            for e in entries]


def cpp_compiler_available() -> bool:
    """Whether inductor finds the C++ compiler its C++ wrapper is built with."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler, or an import fails
        return False
    return True


def _compile_options(mode: str | None, cpp_wrapper: bool, guard_filter: Any) -> dict[str, Any]:
    """``block.compile`` keywords: ``mode`` alone, or (torch.compile takes one of the two) the
    mode's inductor options merged with the C++ wrapper and the guard filter."""
    if not cpp_wrapper and guard_filter is None:
        return {"mode": mode} if mode else {}
    options: dict[str, Any] = {}
    if mode:
        import torch._inductor

        options.update(torch._inductor.list_mode_options(mode))
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    if guard_filter is not None:
        options["guard_filter_fn"] = guard_filter
    return {"options": options}


def compile_repeated_blocks(model: nn.Module, dynamic: bool | None = True, backend: str = "inductor",
                            mode: str | None = None, cpp_wrapper: bool | str = False,
                            lean_guard_checks: bool = False) -> int:
    """``module.compile()`` each repeated block: identical blocks share one compiled graph
    (parameters are graph inputs), dynamic shapes spare recompiles across batch lengths, and
    the state-dict keys do not change. Returns the number of blocks compiled.

    ``cpp_wrapper`` (inductor backend): the language model's decoder layers launch their
    kernels from inductor's C++ wrapper instead of generated Python, forward and backward: less
    host time a launch, where a small model's step is host-bound. Vision blocks keep the Python
    wrapper (the C++ one does not take the varlen attention op's list arguments), unless
    ``cpp_wrapper == "all"``: then every block takes it, and the vision attention that runs
    through the varlen lever calls the kernel as an aten op
    (:data:`~mmtune.speed.vision_varlen.VARLEN_ATTENTION_ATEN`). ``lean_guard_checks``:
    :func:`lean_guards` on every block."""
    if cpp_wrapper not in (False, True, "layers", "all"):
        raise ValueError(f"compile_cpp_wrapper must be true, false, 'layers' or 'all', not {cpp_wrapper!r}")
    if mode is not None and "reduce-overhead" in mode:
        raise ValueError("compile_mode reduce-overhead (CUDA graphs) does not fit regional compile: identical blocks "
                         "share one graph, whose replays overwrite each other's outputs; use the default mode or "
                         "max-autotune-no-cudagraphs")
    blocks = repeated_blocks(model)
    if not blocks:
        logger.info("regional compile not applied: no repeated blocks found")
        return 0
    cpp_wrapper = cpp_wrapper if backend == "inductor" else False
    if cpp_wrapper and not cpp_compiler_available():
        logger.warning("compile_cpp_wrapper: no C++ compiler found (set CXX); blocks keep inductor's Python wrapper")
        cpp_wrapper = False
    if cpp_wrapper == "all":
        wrapped = {id(block) for _, block in blocks}
    else:
        wrapped = {id(m) for m in decoder_layers(model)} if cpp_wrapper else set()
    guard_filter = lean_guards if lean_guard_checks else None
    for name, block in blocks:
        block.compile(dynamic=dynamic, backend=backend, **_compile_options(mode, id(block) in wrapped, guard_filter))
        for config in varlen_configs(block):  # varlen vision attention: the aten op where the C++ wrapper runs
            config._attn_implementation = VARLEN_ATTENTION_ATEN if id(block) in wrapped else VARLEN_ATTENTION
    kinds = sorted({type(b).__name__ for _, b in blocks})
    logger.info("regional compile on: %d blocks (%s), backend %s, dynamic=%s, mode %s, C++ wrapper on %d of them, "
                "%s guards", len(blocks), ", ".join(kinds), backend, dynamic, mode or "default", len(wrapped),
                "lean" if lean_guard_checks else "all")
    return len(blocks)


def apply(model: nn.Module, cfg: SpeedConfig, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    n = compile_repeated_blocks(model, dynamic=cfg.compile_dynamic, backend=cfg.compile_backend, mode=cfg.compile_mode,
                                cpp_wrapper=cfg.compile_cpp_wrapper, lean_guard_checks=cfg.compile_lean_guards)
    if not n:
        return Declined("no repeated blocks found")
    limits = DynamoLimits()
    limits.install(unwrap_model(model))
    return Applied(n, state=limits)
