"""``SpeedConfig``: every speed switch of a run with its default resolved for the device the run
trains on, built once (:func:`resolve_speed_config`) and logged once. The levers read only this
object, so a switch's default is stated in one place (here) and a report of the run's levers
shows what was decided, not what was asked."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: ``checkpoint_layers`` values that are not a count: every decoder layer, or the fewest that fit
#: the memory estimate (CUDA, with a known batch size; decided on the model by the lever)
ALL_LAYERS = "all"
FIT_MEMORY = "memory"

_CPP_WRAPPER_WORDS = ("layers", "all")


@dataclass(frozen=True)
class SpeedConfig:
    """The speed switches of one run, resolved (no "auto" or None left, except where noted).

    ``from_default`` names the switches whose value is this device's default rather than the
    user's word (``mmtune env`` says "its default on cpu" for those that are off)."""

    device_type: str = "cpu"
    liger_kernels: bool = False
    fused_cross_entropy: bool = True
    frozen_tower_no_grad: bool = True
    vision_varlen_attention: bool = False
    #: a count, :data:`ALL_LAYERS` or :data:`FIT_MEMORY`
    gradient_checkpointing_layers: int | str = 0
    #: the user asked for gradient checkpointing (the Trainer's flag)
    gradient_checkpointing: bool = False
    #: batch size x longest sequence, for the memory estimate (None: unknown)
    batch_tokens: int | None = None
    memory_budget_gib: float | None = None
    compile: bool = False
    compile_dynamic: bool | None = True
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    #: False, True (the decoder layers), or "all" (the vision blocks too)
    compile_cpp_wrapper: bool | str = False
    compile_lean_guards: bool = False
    sync_free_forward: bool = True
    frozen_block_cuda_graphs: bool = False
    from_default: frozenset[str] = field(default=frozenset(), compare=False)

    def summary(self) -> str:
        """One line: every switch and its value."""
        skip = {"from_default", "device_type"}
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.name not in skip]
        return f"speed config ({self.device_type}): " + ", ".join(parts)


def _cuda_default(value: Any, device_type: str) -> tuple[bool, bool]:
    """(value, whether it is the default): None means on when training on CUDA."""
    if value is None:
        return device_type == "cuda", True
    return bool(value), False


def _cpp_wrapper(value: Any, device_type: str) -> tuple[bool | str, bool]:
    """``compile_cpp_wrapper``: None is the decoder layers on CUDA, off elsewhere; true is the
    decoder layers; ``layers`` / ``all`` as written (case aside); anything else is refused."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "false"):
            return word == "true", False
        if word not in _CPP_WRAPPER_WORDS:
            raise ValueError(f"compile_cpp_wrapper must be true, false, 'layers' or 'all', not {value!r}")
        return (True if word == "layers" else word), False
    return _cuda_default(value, device_type)


def _checkpoint_layers(spec: Any, *, device_type: str, gradient_checkpointing: bool,
                       batch_tokens: int | None) -> tuple[int | str, bool]:
    """An integer as given; ``auto`` on CUDA with a batch size: fit the memory estimate; ``auto``
    elsewhere: every layer or none, per ``gradient_checkpointing``."""
    if isinstance(spec, str) and spec.strip().lower() != "auto":
        spec = int(spec)
    if isinstance(spec, str):
        if device_type == "cuda" and batch_tokens:
            return FIT_MEMORY, True
        return (ALL_LAYERS if gradient_checkpointing else 0), True
    if isinstance(spec, bool):  # false: none (benchmarks switch it off this way)
        return (ALL_LAYERS if spec else 0), False
    if spec < 0:
        raise ValueError(f"gradient_checkpointing_layers must be >= 0 or 'auto', not {spec}")
    return int(spec), False


def resolve_speed_config(model_args: Any, *, device_type: str, gradient_checkpointing: bool = False,
                         batch_tokens: int | None = None, log: bool = True) -> SpeedConfig:
    """The run's :class:`SpeedConfig` from ``model_args`` (its speed fields) for ``device_type``;
    logged once (``log=False`` for a caller that logs it itself)."""
    from .vision_varlen import torch_varlen_attn

    defaults: set[str] = set()

    def note(name: str, resolved: tuple[Any, bool]) -> Any:
        value, defaulted = resolved
        if defaulted:
            defaults.add(name)
        return value

    varlen = model_args.vision_varlen_attention
    varlen_value = (note("vision_varlen_attention", (device_type == "cuda" and torch_varlen_attn() is not None, True))
                    if varlen is None else bool(varlen))
    graphs = note("frozen_block_cuda_graphs", _cuda_default(model_args.frozen_block_cuda_graphs, device_type))
    mode = model_args.compile_mode
    if mode is not None and "reduce-overhead" in mode:
        raise ValueError("compile_mode reduce-overhead (CUDA graphs) does not fit regional compile: identical blocks "
                         "share one graph, whose replays overwrite each other's outputs; use the default mode or "
                         "max-autotune-no-cudagraphs")
    cfg = SpeedConfig(
        device_type=device_type,
        liger_kernels=note("liger_kernels", _cuda_default(model_args.liger_kernels, device_type)),
        fused_cross_entropy=bool(model_args.fused_cross_entropy),
        frozen_tower_no_grad=bool(model_args.frozen_tower_no_grad),
        vision_varlen_attention=varlen_value,
        gradient_checkpointing_layers=note("gradient_checkpointing_layers", _checkpoint_layers(
            model_args.gradient_checkpointing_layers, device_type=device_type,
            gradient_checkpointing=gradient_checkpointing, batch_tokens=batch_tokens)),
        gradient_checkpointing=bool(gradient_checkpointing),
        batch_tokens=batch_tokens,
        memory_budget_gib=model_args.memory_budget_gib,
        compile=note("compile", _cuda_default(model_args.compile, device_type)),
        compile_dynamic=model_args.compile_dynamic,
        compile_backend=model_args.compile_backend,
        compile_mode=None if mode in (None, "default") else mode,
        compile_cpp_wrapper=note("compile_cpp_wrapper", _cpp_wrapper(model_args.compile_cpp_wrapper, device_type)),
        compile_lean_guards=note("compile_lean_guards", _cuda_default(model_args.compile_lean_guards, device_type)),
        sync_free_forward=bool(model_args.sync_free_forward),
        # CUDA graphs capture CUDA kernels: off elsewhere whatever the switch says
        frozen_block_cuda_graphs=bool(graphs) and device_type == "cuda",
        from_default=frozenset(defaults),
    )
    if log:
        logger.info("%s", cfg.summary())
    return cfg
