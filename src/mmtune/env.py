"""``mmtune env [MODEL_OR_CONFIG]``: the versions, the device and, for a model folder or a YAML
config, the speed levers a training run would get there (what a bug report needs, as
``llamafactory-cli env`` gives).

The levers are not guessed from a list of rules kept here: the model is built from its config
with its parameters on the meta device (no weights are read or allocated), the fine-tuning method is applied and
:func:`mmtune.speed.levers.apply_levers` decides, through :func:`mmtune.model.loader.load_model`,
exactly as ``mmtune train`` does on this machine; what it applied and what it logged are
reported. Checks that need a real forward (the fused cross-entropy's comparison with the
model's logits) happen on the first training step and are named as such.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

from mmtune.versions import TESTED_RANGES, in_tested_range, installed_version

#: the libraries every run uses, in the order they are printed
CORE_PACKAGES: tuple[str, ...] = ("torch", "torchvision", "transformers", "peft", "accelerate", "datasets",
                                  "tokenizers")
#: libraries some features use (QLoRA, DeepSpeed, flash attention, Liger kernels, video, audio, and the kernels
#: transformers runs linear-attention layers (Qwen3.5's Gated DeltaNet) with on CUDA when they are installed)
OPTIONAL_PACKAGES: tuple[str, ...] = ("bitsandbytes", "deepspeed", "flash_attn", "liger_kernel", "av", "soundfile",
                                      "flash-linear-attention", "causal-conv1d")


#: the modules whose log lines say what the levers did (the rest of loading is not reported)
LEVER_PACKAGE = "mmtune.speed"


@dataclass
class Package:
    """One library: its installed version (None: not installed) and tested range (None: none declared)."""

    name: str
    version: str | None
    tested: str | None
    inside: bool | None

    @classmethod
    def find(cls, name: str) -> Package:
        version = installed_version(name)
        return cls(name, version, TESTED_RANGES.get(name), in_tested_range(name, version))

    def line(self) -> str:
        version = self.version or "not installed"
        if self.tested is None:
            return f"{self.name:<14}{version}" if len(self.name) < 14 else f"{self.name} {version}"
        verdict = {True: "inside", False: "OUTSIDE", None: "not judged"}[self.inside]
        return f"{self.name:<14}{version:<16}tested {self.tested}: {verdict}"


def packages(names: tuple[str, ...]) -> list[Package]:
    return [Package.find(name) for name in names]


def device_lines() -> list[str]:
    """The device a run trains on: CUDA cards (name, count, bf16) or the CPU."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        return [f"cuda          {count} x {', '.join(names)} (CUDA {torch.version.cuda}), bf16: "
                f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"]
    return [f"cpu           no CUDA device; {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"]


@dataclass
class LeverReport:
    """What ``mmtune train`` would apply for ``target`` on this machine."""

    target: str
    model_type: str
    architecture: str
    finetuning_type: str
    device_type: str
    model_args: Any = None
    #: the speed levers' report (:class:`mmtune.speed.levers.LeverReport`)
    applied: Any = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(LEVER_PACKAGE + "."):
            self.lines.append(record.getMessage())


def _run_args(target: str) -> tuple[Any, Any, Any, Any, bool]:
    """(model_args, data_args, finetuning_args, training_args, from_yaml) for a YAML config or a
    model folder / Hub id (the defaults of ``mmtune train`` for the rest)."""
    from mmtune.config import parse_config

    from_yaml = os.path.isfile(target) and target.lower().endswith((".yaml", ".yml"))
    if from_yaml:
        model_args, data_args, finetuning_args, _, training_args = parse_config(target)
    else:
        model_args, data_args, finetuning_args, _, training_args = parse_config(
            None, extra={"model_name_or_path": target})
    return model_args, data_args, finetuning_args, training_args, from_yaml


def lever_report(target: str) -> LeverReport:
    """Build ``target``'s model (parameters on the meta device) the way ``mmtune train`` builds it (its config,
    fine-tuning method, switches and this machine's device) and report the levers applied.
    A quantised run (``quantization_bit``) is marked on the config as transformers marks a
    quantised load, so the levers that decline for one decline here too."""
    from accelerate import init_empty_weights

    from mmtune.model.loader import load_config, load_model

    model_args, data_args, finetuning_args, training_args, from_yaml = _run_args(target)
    device_type = training_args.device.type
    config = load_config(model_args)
    report = LeverReport(target=target, model_type=getattr(config, "model_type", "?"),
                         architecture=", ".join(getattr(config, "architectures", None) or []) or "?",
                         finetuning_type=finetuning_args.finetuning_type, device_type=device_type,
                         model_args=model_args)
    if model_args.quantization_bit:
        config.quantization_config = {"quant_method": "bitsandbytes",
                                      f"load_in_{model_args.quantization_bit}bit": True}
    batch_tokens = None
    if from_yaml:  # the longest a batch can be: the data is not read here
        batch_tokens = training_args.per_device_train_batch_size * max(data_args.cutoff_len,
                                                                       data_args.packing_max_len or 0)
    collect = _Collect()
    root = logging.getLogger("mmtune")
    level, propagate = root.level, root.propagate
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    root.propagate = False  # reported below, not printed twice
    try:
        with init_empty_weights():  # parameters on the meta device; buffers and the levers' probes stay real
            model = load_model(dataclasses.replace(model_args, model_name_or_path=""), finetuning_args,
                               is_trainable=True, gradient_checkpointing=training_args.gradient_checkpointing,
                               config=config, device_type=device_type, batch_tokens=batch_tokens,
                               speed_levers=False)
            from mmtune.model.loader import speed_config
            from mmtune.speed.levers import apply_levers

            report.applied = apply_levers(model, speed_config(
                model_args, device_type=device_type, gradient_checkpointing=training_args.gradient_checkpointing,
                batch_tokens=batch_tokens))
    except Exception as exc:  # noqa: BLE001 (the report still gives versions and device)
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
        root.propagate = propagate
    report.notes = collect.lines
    return report


def _lever_state(switch: str, report: LeverReport) -> str:
    """One lever's (or regional compile setting's) line from the levers' report."""
    from mmtune.speed import fused_loss
    from mmtune.speed.compile import SETTINGS

    applied = report.applied
    if switch in SETTINGS.values():  # a setting of regional compile
        if not applied.get("compile"):
            return "-"
        return str(getattr(applied.config, switch)).lower()
    result = applied[switch]
    if switch in applied.switched_off:
        return result.reason
    if not result:
        return f"declined: {result.reason}"
    value = result.detail
    if switch == fused_loss.SWITCH:
        return "on (checked against the model's own logits on the first training step)"
    if isinstance(value, bool):
        return "on"
    if isinstance(value, (list, tuple)):
        return f"on: {', '.join(map(str, value))}" if value else "nothing to apply"
    if isinstance(value, dict):
        return "on: " + ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, int):
        return f"on: {value}" if value else "nothing to apply (0)"
    return str(value)


def _lever_lines(target: str) -> list[str]:
    """The speed-lever section of the report for ``target``."""
    from mmtune.config import ConfigError
    from mmtune.speed.levers import SWITCHES

    try:
        report = lever_report(target)
    except ConfigError:
        raise  # a config mistake: the CLI's one-line error
    except (OSError, ValueError) as exc:  # no model there: the versions and device still help
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [f"speed levers for {target}: cannot read its model config ({first})"]
    lines = [f"speed levers for {report.target} ({report.model_type}: {report.architecture}; "
             f"{report.finetuning_type}; training on {report.device_type}):"]
    if report.error:
        lines.append(f"  could not build the model to decide: {report.error}")
    else:
        width = max(len(switch) for switch in SWITCHES)
        lines += [f"  {switch:<{width}}  {_lever_state(switch, report)}" for switch in SWITCHES]
    if report.notes:
        lines += ["", "what the run would log about them:"] + [f"  {note}" for note in report.notes]
    return lines


def format_report(target: str | None = None) -> str:
    """The text ``mmtune env`` prints."""
    import mmtune

    lines = [f"mmtune        {mmtune.__version__}",
             f"python        {platform.python_version()} ({sys.executable})",
             f"platform      {platform.platform()}", ""]
    core = packages(CORE_PACKAGES)
    lines += [p.line() for p in core]
    lines += ["", "optional:"] + ["  " + p.line() for p in packages(OPTIONAL_PACKAGES)]
    lines += ["", "device:"] + ["  " + line for line in device_lines()]
    if target is not None:
        lines += [""] + _lever_lines(target)
    outside = [p for p in core if p.inside is False]
    if outside:
        lines += ["", "outside the tested range: " + ", ".join(f"{p.name} {p.version}" for p in outside)
                  + " (README, Versions)"]
    return "\n".join(lines)
