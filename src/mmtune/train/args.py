"""Arguments from one YAML file plus ``key=value`` overrides.

The YAML is flat (LLaMA-Factory style): each key belongs to exactly one of ModelArguments,
DataArguments, FinetuningArguments, MMTrainingArguments or transformers' TrainingArguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from mmtune.data.loader import DataArguments
from mmtune.hparams import FinetuningArguments, ModelArguments


@dataclass
class MMTrainingArguments:
    """mmtune's own training options (beside transformers' TrainingArguments)."""

    plugin: str | None = field(default=None, metadata={"help": "Multimodal plugin; default: the template's."})
    projector_lr: float | None = field(default=None, metadata={"help": "Learning rate of the projector."})
    plot_loss: bool = True
    build_rope_in_collator: bool = True
    fake_media_for_text_only: bool | None = field(
        default=None, metadata={"help": "Dummy image in text-only batches; default: on when training on several ranks."}
    )
    host_threads: int | None = field(
        default=None, metadata={"help": "torch's intra-op CPU threads in the training process; default: 1 when "
                                        "training on CUDA with dataloader workers (the host then only launches GPU "
                                        "work), torch's own count otherwise."})
    config_dict: dict[str, Any] | None = None  # for a model built from a config (tests, benchmarks, demo)


def _coerce(value: str) -> Any:
    """YAML scalars, except that YAML 1.1's yes/no/on/off stay strings (``save_strategy=no``);
    booleans are written true / false."""
    if value.strip().lower() in ("yes", "no", "on", "off", "y", "n"):
        return value.strip()
    return yaml.safe_load(value)


def _default_non_blocking(training: dict[str, Any]) -> None:
    """Pinned batches go to the GPU without blocking the host: accelerate places every batch with
    ``non_blocking=False`` unless told otherwise, and a blocking copy waits for all the GPU work
    queued before it (a host sync at every step). Kept as the user set it; off with pageable batches."""
    if not training.get("dataloader_pin_memory", True):
        return
    config = training.get("accelerator_config")
    if config is None:
        training["accelerator_config"] = {"non_blocking": True}
    elif isinstance(config, dict):
        config.setdefault("non_blocking", True)


def parse_config(path: str | None, overrides: list[str] | None = None, extra: dict[str, Any] | None = None) -> tuple:
    """(model_args, data_args, finetuning_args, mm_args, training_args) from YAML + overrides."""
    from transformers import TrainingArguments

    raw: dict[str, Any] = {}
    if path:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    raw.update(extra or {})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        raw[key.strip()] = _coerce(value)
    groups = [ModelArguments, DataArguments, FinetuningArguments, MMTrainingArguments]
    values: list[dict[str, Any]] = [{} for _ in groups]
    training: dict[str, Any] = {}
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key, value in raw.items():
        for i, cls in enumerate(groups):
            if key in {f.name for f in dataclasses.fields(cls)}:
                values[i][key] = value
                break
        else:
            if key not in training_fields:
                raise ValueError(f"unknown option {key!r} in {path or 'overrides'}")
            training[key] = value
    training.setdefault("output_dir", "outputs/run")
    training.setdefault("remove_unused_columns", False)
    training.setdefault("report_to", "none")
    # the filter tests every step's loss for NaN/inf on the host: a GPU sync per step; mmtune logs
    # a NaN loss as it is instead (set logging_nan_inf_filter: true for the Trainer's filtering)
    training.setdefault("logging_nan_inf_filter", False)
    _default_non_blocking(training)
    parsed = [cls(**v) for cls, v in zip(groups, values)]
    return (*parsed, TrainingArguments(**training))
