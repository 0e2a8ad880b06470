"""What mmtune writes beside saved weights, and how a saved folder is read back.

Every folder mmtune writes (each ``checkpoint-N``, the final output folder, an export) carries
``mmtune_config.json``: the chat template, the multimodal plugin and its media settings, the
fine-tuning type, the model type and the base model. ``mmtune chat`` and ``mmtune export`` read
it so that a folder reopens with the template it was trained with, whatever the family; where a
folder has none (a model downloaded from the Hub), the family's declared template for the
model's ``model_type`` is used, and where no family declares one the user must name it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MMTUNE_CONFIG_NAME = "mmtune_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"


def read_mmtune_config(folder: str | None) -> dict[str, Any]:
    """``folder``'s ``mmtune_config.json`` as a dict; ``{}`` when there is none."""
    if not folder:
        return {}
    path = os.path.join(folder, MMTUNE_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); delete it or write it again") from exc


def write_mmtune_config(folder: str, record: dict[str, Any]) -> str:
    """Write ``record`` as ``folder``'s ``mmtune_config.json``; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MMTUNE_CONFIG_NAME)
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
    return path


def config_model_type(path: str | None) -> str | None:
    """``model_type`` of the ``config.json`` in ``path`` (a folder or a Hub id) without building
    the config class (remote or mmtune-registered types need no import); None when there is
    no config."""
    if not path:
        return None
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError):
        return None
    return config.get("model_type")


@dataclass
class SavedFolder:
    """A folder to chat with or export, resolved: for a LoRA adapter folder (its
    ``adapter_config.json`` names the base), ``model_path`` is the base and ``adapter_path``
    the folder; ``files`` is the folder that carries the processor and mmtune's config."""

    model_path: str
    adapter_path: str | None
    record: dict[str, Any] = field(default_factory=dict)
    model_type: str | None = None

    @property
    def files(self) -> str:
        return self.adapter_path or self.model_path

    def processor_fallbacks(self) -> list[str]:
        """Folders to take the processor from when :attr:`files` has none (a folder saved
        before checkpoints carried it): the adapter's base, or the recorded base model."""
        out = [p for p in (self.model_path if self.adapter_path else None, self.record.get("model_name_or_path"))
               if p and p != self.files]
        return list(dict.fromkeys(out))


def inspect_folder(model_path: str, adapter_path: str | None = None) -> SavedFolder:
    """Resolve ``model_path`` (a full model folder or Hub id, or an adapter folder alone) and
    ``adapter_path`` into base, adapter, mmtune's record and model type."""
    if adapter_path is None and os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG_NAME)):
        with open(os.path.join(model_path, ADAPTER_CONFIG_NAME)) as fh:
            base = json.load(fh).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{model_path}/{ADAPTER_CONFIG_NAME} names no base_model_name_or_path; pass the base "
                             f"model as MODEL and this folder as --adapter")
        adapter_path, model_path = model_path, base
    record = (read_mmtune_config(adapter_path) if adapter_path else {}) or read_mmtune_config(model_path)
    # an adapter folder may hold the assembled model's config (a LoRA of a LLaVA built around a plain LM)
    model_type = (config_model_type(adapter_path) if adapter_path else None) or config_model_type(model_path) \
        or record.get("model_type")
    return SavedFolder(model_path=model_path, adapter_path=adapter_path, record=record, model_type=model_type)


def resolve_template(requested: str | None, model_type: str | None, record: dict[str, Any] | None = None,
                     where: str = "", option: str = "--template") -> tuple[str, str]:
    """The chat template to use and why: ``requested`` (a name the user gave), else the one
    recorded in mmtune_config.json, else the one the family of ``model_type`` declares.
    Never a silent fallback: with none of these, a one-line error naming ``option``. ``record``
    is None where there is no folder to have one (training)."""
    from mmtune.model.composite import declared_template
    from mmtune.templates import TEMPLATES

    if requested not in (None, "", "auto"):
        return str(requested), "given"
    if record and record.get("template"):
        return str(record["template"]), MMTUNE_CONFIG_NAME
    name = declared_template(model_type) if model_type else None
    if name:
        return name, f"the default of model type {model_type!r}"
    from mmtune.families import load_families
    from mmtune.hparams import ConfigError

    load_families()  # the known names, for the message
    what = f"model type {model_type!r}" if model_type else "a model without config.json"
    why = f"no {MMTUNE_CONFIG_NAME}, and no family declares one" if record is not None else "no family declares one"
    raise ConfigError(f"{where + ': ' if where else ''}no chat template known for {what} ({why}); pass {option} "
                      f"NAME (known: {', '.join(sorted(TEMPLATES))})")


def load_saved_processor(folder: SavedFolder) -> tuple[Any, Any | None]:
    """The tokenizer and processor saved in ``folder.files``. A multimodal model's folder
    without a processor (one written before checkpoints carried it) takes its base's, with a
    warning; with no base to take it from it is an error naming the folder, rather than a
    model that cannot read an image."""
    from mmtune.hparams import ModelArguments
    from mmtune.model.composite import get_composite_model
    from mmtune.model.loader import load_tokenizer_and_processor

    tokenizer, processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=folder.files))
    if processor is not None or not folder.model_type or get_composite_model(folder.model_type) is None:
        return tokenizer, processor
    for other in folder.processor_fallbacks():
        _, processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=other))
        if processor is not None:
            logger.warning("%s has no processor (processor_config.json / preprocessor_config.json): using the one "
                           "of %s", folder.files, other)
            return tokenizer, processor
    raise ValueError(f"{folder.files} has no multimodal processor for its {folder.model_type} model "
                     f"(no processor_config.json / preprocessor_config.json); copy the base model's processor files "
                     f"into it")
