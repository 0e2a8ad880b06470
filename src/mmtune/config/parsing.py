"""Arguments from one YAML file plus ``key=value`` overrides.

The YAML is flat (LLaMA-Factory style): each key belongs to exactly one of ModelArguments,
DataArguments, FinetuningArguments, MMTrainingArguments or transformers' TrainingArguments.
Every value is converted to its field's type and checked here, before anything loads: a run that
would stop on a typo, a value of the wrong type or a missing logger stops at once, in one line
that names the key and the file (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from dataclasses import dataclass
from typing import Any

from .aliases import ALIASES, UNSUPPORTED, resolve_alias
from .data import DataArguments
from .finetuning import PREFERENCE_STAGES, FinetuningArguments, check_contradictions
from .model import ModelArguments
from .predict import PredictArguments
from .training import MMTrainingArguments
from .values import (
    ConfigError,
    convert_field,
    did_you_mean,
    field_hints,
    load_yaml_file,
    parse_override,
    short_type,
)

logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "describe_options", "option_groups", "parse_config", "parse_predict_config"]


#: the option groups in the order ``mmtune options`` prints them
GROUP_TITLES = ("model", "data", "finetuning", "mmtune training", "transformers TrainingArguments")
#: where a value set by keyword (``parse_config(extra=...)``) came from, in messages
EXTRA_SOURCE = "config"
COMMAND_LINE = "command line"
#: TrainingArguments defaults mmtune changes (``remove_unused_columns``: the collator reads the
#: media columns; ``logging_nan_inf_filter``: the filter reads every step's loss on the host, a GPU
#: sync per step, so mmtune logs a NaN loss as it is)
TRAINING_DEFAULTS: dict[str, Any] = {"output_dir": "outputs/run", "remove_unused_columns": False, "report_to": "none",
                                     "logging_nan_inf_filter": False}
#: defaults that follow the device, as ``mmtune options`` states them
_DEVICE_DEFAULTS = {"bf16": "true where the GPU computes in bf16, else false",
                    "dataloader_pin_memory": "true with a GPU, false on a CPU",
                    "accelerator_config": "{'non_blocking': True} when training on CUDA with pinned memory"}


def option_groups() -> list[tuple[str, type]]:
    """(title, dataclass) for every group of keys, mmtune's first, then transformers' TrainingArguments."""
    from transformers import TrainingArguments

    classes = (ModelArguments, DataArguments, FinetuningArguments, MMTrainingArguments, TrainingArguments)
    return list(zip(GROUP_TITLES, classes))


@dataclass(frozen=True)
class _Option:
    group: int
    field: dataclasses.Field
    hint: Any


def _options() -> dict[str, _Option]:
    """Every key by name; a name in two groups belongs to the first (mmtune's own)."""
    options: dict[str, _Option] = {}
    for index, (_, cls) in enumerate(option_groups()):
        hints = field_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                options.setdefault(f.name, _Option(index, f, hints[f.name]))
    return options


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_available() -> bool:
    """What transformers' TrainingArguments itself checks before it accepts ``bf16: true`` off the CPU."""
    from transformers.utils import is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available()


def _any_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


def _device_defaults(training: dict[str, Any], model: dict[str, Any], given: set[str], *, cuda: bool,
                     bf16: bool, accelerator: bool) -> None:
    """Precision and host-to-device settings from what the device supports.

    ``bf16`` (mixed precision), when neither it nor ``fp16`` was set: on where the device computes in
    bf16. ``bf16: true`` on a device without it (a CPU without ``use_cpu: true``) would stop the run
    in transformers; it is turned off with one warning, so a GPU config runs on a CPU in fp32.
    ``torch_dtype: auto`` follows: fp32 where bf16 is not available (a CPU run), else the checkpoint's.
    Pinned memory and non-blocking copies only where there is a device to copy to."""
    use_cpu = bool(training.get("use_cpu"))
    bf16_ok = bf16 and not use_cpu
    if "bf16" not in given and "fp16" not in given:
        if bf16_ok and str(model.get("torch_dtype", "auto")) not in ("fp16", "float16"):
            training["bf16"] = True
    elif training.get("bf16") and not use_cpu and not bf16:
        logger.warning("bf16: true, but this machine has no GPU that computes in bf16: training in fp32 "
                       "(set use_cpu: true for bf16 autocast on the CPU)")
        training["bf16"] = False
    if str(model.get("torch_dtype", "auto")) == "auto" and not bf16_ok:
        model["torch_dtype"] = "fp32"
        logger.info("torch_dtype auto: fp32 (no bf16 on %s)", "the CPU" if use_cpu or not cuda else "this GPU")
    if not accelerator or use_cpu:
        training.setdefault("dataloader_pin_memory", False)  # nothing to pin for: torch would warn every run
    if cuda and not use_cpu:
        _default_non_blocking(training)


def _default_non_blocking(training: dict[str, Any]) -> None:
    """Pinned batches go to the GPU without blocking the host: accelerate places every batch with
    ``non_blocking=False`` unless told otherwise, and a blocking copy waits for all the GPU work
    queued before it (a host sync at every step). Kept as the user set it; off with pageable batches.
    Called only when training on CUDA (on a CPU there is no copy, and transformers would warn)."""
    if not training.get("dataloader_pin_memory", True):
        return
    config = training.get("accelerator_config")
    if config is None:
        training["accelerator_config"] = {"non_blocking": True}
    elif isinstance(config, dict):
        config.setdefault("non_blocking", True)


def _check_report_to(value: Any, where: str) -> Any:
    """``report_to`` as a list of integrations that are installed, checked before anything loads;
    ``none`` and ``all`` as transformers reads them."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        names = [str(name).strip() for name in value]
    else:
        names = [part.strip() for part in str(value).split(",") if part.strip()]
    if not names or names in (["none"], ["all"]):
        return names[0] if names else "none"
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"{where}: report_to: {name!r} is not one of none, all, "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}{did_you_mean(name, INTEGRATION_TO_CALLBACK)}")
        if name not in available:
            install = f"pip install 'mmtune[{name}]'" if name in ("tensorboard", "wandb") else f"pip install {name}"
            extra = " (or tensorboardX)" if name == "tensorboard" else ""
            raise ConfigError(f"{where}: report_to: {name} needs `{install}`{extra}")
    return names


def _check_registries(data: dict[str, Any], mm: dict[str, Any], sources: dict[str, str]) -> None:
    """A template or plugin named by the user exists (the families fill the registries at ``import mmtune``)."""
    from mmtune.plugins import PLUGINS
    from mmtune.templates import TEMPLATES

    template = data.get("template")
    plugin = mm.get("plugin")
    if "template" in sources and isinstance(template, str) and template not in ("", "auto"):
        if template not in TEMPLATES:
            raise ConfigError(f"{sources['template']}: template: {template!r} is not a template"
                              f"{did_you_mean(template, TEMPLATES)} (known: {', '.join(sorted(TEMPLATES))})")
    if "plugin" in sources and plugin:
        if plugin not in PLUGINS:
            raise ConfigError(f"{sources['plugin']}: plugin: {plugin!r} is not a multimodal plugin"
                              f"{did_you_mean(plugin, PLUGINS)} (known: {', '.join(sorted(PLUGINS))})")


def _entries(path: str | None, overrides: list[str] | None, extra: dict[str, Any] | None) -> list[tuple[str, Any, str]]:
    """(key, value, where) in the order they apply: the file, ``extra``, then the command line."""
    entries: list[tuple[str, Any, str]] = []
    if path:
        entries += [(str(k), v, path) for k, v in load_yaml_file(path).items()]
    entries += [(k, v, EXTRA_SOURCE) for k, v in (extra or {}).items()]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{COMMAND_LINE}: {item!r} is not key=value (e.g. learning_rate=2e-4)")
        key, text = item.split("=", 1)
        entries.append((key.strip(), parse_override(text), COMMAND_LINE))
    return entries


def parse_config(path: str | None, overrides: list[str] | None = None, extra: dict[str, Any] | None = None) -> tuple:
    """(model_args, data_args, finetuning_args, mm_args, training_args) from YAML + overrides.

    ``extra`` (a dict, as scripts and tests pass) applies after the file and before the
    ``key=value`` overrides. Aliases (``dtype``, ``flash_attn``, ``torch_compile``, ...) map to
    mmtune's keys; every value is converted to its field's type; a key, value, template, plugin or
    ``report_to`` logger that cannot work, or finetuning keys the user set that contradict each
    other (:func:`~mmtune.config.finetuning.check_contradictions`), is a ConfigError here, before
    any model or data loads."""
    from transformers import TrainingArguments

    options = _options()
    known = set(options) | set(ALIASES) | set(UNSUPPORTED)
    groups: list[dict[str, Any]] = [{} for _ in GROUP_TITLES]
    sources: dict[str, str] = {}  # every key the user set, by mmtune's name: where it was set
    spelled: dict[str, str] = {}  # ... and the name the user typed (an alias)
    for key, value, where in _entries(path, overrides, extra):
        if key not in known:
            raise ConfigError(f"{where}: unknown option {key!r}{did_you_mean(key, known)} "
                              f"(`mmtune options` lists every key)")
        name, value = resolve_alias(key, value, where)
        if name is None:
            continue
        if name not in options:  # an alias of a key this transformers version does not have
            raise ConfigError(f"{where}: {key} is {name}, which this transformers version does not have")
        option = options[name]
        if name == "report_to":
            value = _check_report_to(value, where)
        else:
            value = convert_field(name, value, option.hint, option.field.metadata, where,
                                  hint_may_be_narrow=option.group == len(GROUP_TITLES) - 1)
        groups[option.group][name] = value
        sources[name] = where
        spelled[name] = key
    model, data, finetuning, mm, training = groups
    check_contradictions(finetuning, spelled, sources)
    if finetuning.get("stage") in PREFERENCE_STAGES and data.get("packing"):
        where = sources.get("packing") or sources.get("stage")
        raise ConfigError(f"{where}: stage: {finetuning['stage']} contradicts packing: true (preference pairs are "
                          "padded, not packed); remove one of them")
    for name, default in TRAINING_DEFAULTS.items():
        training.setdefault(name, default)
    _device_defaults(training, model, set(sources), cuda=_cuda_available(), bf16=_bf16_available(),
                     accelerator=_any_accelerator())
    _check_registries(data, mm, sources)
    where = path or EXTRA_SOURCE
    classes = [cls for _, cls in option_groups()]
    try:
        parsed = [cls(**values) for cls, values in zip(classes[:4], groups[:4])]
        return (*parsed, TrainingArguments(**training))
    except ValueError as exc:  # a combination the dataclasses refuse (their __post_init__)
        raise ConfigError(f"{where}: {' '.join(str(exc).split())}") from None


#: the option groups ``mmtune predict`` reads, in the order a key is looked up
PREDICT_GROUPS = (("model", ModelArguments), ("data", DataArguments), ("predict", PredictArguments))


def parse_predict_config(path: str | None, overrides: list[str] | None = None,
                         extra: dict[str, Any] | None = None) -> tuple[ModelArguments, DataArguments, PredictArguments]:
    """(model_args, data_args, predict_args) of ``mmtune predict`` from YAML + overrides, as
    :func:`parse_config` reads them (aliases, conversion, one-line errors). A training config
    works as it is: its training-only keys (learning rate, LoRA, ...) are ignored (listed in one
    info line), so ``mmtune predict train.yaml model_name_or_path=OUT output_dir=OUT/predict``
    predicts on the data that run held out (``val_size``)."""
    groups = [{} for _ in PREDICT_GROUPS]
    options: dict[str, tuple[int, dataclasses.Field, Any]] = {}
    for index, (_, cls) in enumerate(PREDICT_GROUPS):
        hints = field_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                options.setdefault(f.name, (index, f, hints[f.name]))
    training_keys = set(_options())
    known = set(options) | training_keys | set(ALIASES) | set(UNSUPPORTED)
    ignored: list[str] = []
    for key, value, where in _entries(path, overrides, extra):
        if key not in known:
            raise ConfigError(f"{where}: unknown option {key!r}{did_you_mean(key, known)} "
                              f"(`mmtune options` lists every key)")
        name, value = resolve_alias(key, value, where)
        if name is None:
            continue
        if name not in options:  # a training key: no meaning for prediction
            ignored.append(key)
            continue
        group, option, hint = options[name]
        groups[group][name] = convert_field(name, value, hint, option.metadata, where)
    if ignored:
        logger.info("predict: training keys ignored: %s", ", ".join(ignored))
    model, data, predict = groups
    if str(model.get("torch_dtype", "auto")) == "auto" and not _bf16_available():
        model["torch_dtype"] = "fp32"  # as training on a CPU: no bf16 weights where nothing computes in bf16
    _check_registries(data, {}, {"template": path or EXTRA_SOURCE} if "template" in data else {})
    try:
        return ModelArguments(**model), DataArguments(**data), PredictArguments(**predict)
    except ValueError as exc:
        raise ConfigError(f"{path or EXTRA_SOURCE}: {' '.join(str(exc).split())}") from None


def _default_text(f: dataclasses.Field, training: bool = True) -> str:
    """``f``'s default as ``mmtune options`` states it (``training``: mmtune's changes to the
    training defaults apply; not to ``mmtune predict``'s keys of the same names)."""
    if training and f.name in _DEVICE_DEFAULTS:
        return _DEVICE_DEFAULTS[f.name]
    if training and f.name in TRAINING_DEFAULTS:
        value = TRAINING_DEFAULTS[f.name]
        return repr(value) if isinstance(value, str) else str(value)
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    value = getattr(value, "value", value)  # an enum member as its word
    return repr(value) if isinstance(value, str) else str(value)


def describe_options(substring: str | None = None, width: int = 100) -> str:
    """Every key, grouped, with its type, default and help (what ``mmtune options`` prints);
    ``substring`` keeps the keys whose name or help contains it (any case). Empty when none does."""
    needle = (substring or "").lower()
    lines: list[str] = []
    for title, cls in [*option_groups(), ("mmtune predict", PredictArguments)]:
        hints = field_hints(cls)
        rows: list[str] = []
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            if needle and needle not in f.name.lower() and needle not in help_text.lower():
                continue
            kind = short_type(hints[f.name])
            if f.metadata.get("choices"):
                kind += "; one of " + ", ".join(str(c) for c in f.metadata["choices"])
                if f.metadata.get("choices_hint"):
                    kind += ", " + f.metadata["choices_hint"]
            rows.append(f"  {f.name} ({kind}; default {_default_text(f, cls is not PredictArguments)})")
            if help_text:
                rows += textwrap.wrap(help_text, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        if rows:
            lines += [f"{title} ({cls.__name__})", *rows, ""]
    aliases = [f"  {name} -> {alias.key or '(nothing)'}  ({alias.origin}{'; ' + alias.note if alias.note else ''})"
               for name, alias in sorted(ALIASES.items())
               if not needle or needle in name.lower() or needle in (alias.key or "")]
    if aliases:
        lines += ["aliases (names from LLaMA-Factory, transformers, peft, TRL and LLaVA)", *aliases, ""]
    return "\n".join(lines).rstrip("\n")
