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
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from mmtune.errors import ModelFolderError, OutputFolderError

logger = logging.getLogger(__name__)

MMTUNE_CONFIG_NAME = "mmtune_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: a LoRA adapter's files, as peft saves them
ADAPTER_FILES = re.compile(r"adapter_(config\.json|model\.safetensors|model\.bin)")
#: a whole model's weights, as transformers saves them (one file or shards and their index)
FULL_WEIGHT_FILES = re.compile(r"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                               r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json)")
#: what an mmtune run writes into its output folder and nobody else does: the weights, the
#: Trainer's checkpoints (and staged ones under a temporary name), state, metrics, logs, the loss
#: plot, mmtune's record, the skipped-samples report, a stage-1 projector and tensorboard's ``runs``
RUN_FILES = re.compile(ADAPTER_FILES.pattern + "|" + FULL_WEIGHT_FILES.pattern
                       + r"|(tmp-)?checkpoint-\d+.*|trainer_state\.json|training_args\.bin"
                         r"|(all|train|eval)_results\.json|trainer_log\.jsonl|training_loss\.png"
                         r"|mmtune_config\.json|skipped_samples\.jsonl|mm_projector\.safetensors|runs")
#: what ``save_pretrained`` writes beside the weights (model config, processor, tokenizer): an
#: earlier run's where the folder holds mmtune's record, anyone's otherwise
MODEL_FILES = re.compile(r"config\.json|generation_config\.json|(processor|preprocessor|video_preprocessor)_config"
                         r"\.json|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json"
                         r"|added_tokens\.json|vocab\.json|merges\.txt|chat_template\.(jinja|json)")


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
    ``adapter_path`` into base, adapter, mmtune's record and model type. A folder holding both a
    LoRA adapter and full weights is read as what its own run produced (:func:`saved_product`)."""
    if adapter_path is None and os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG_NAME)) \
            and saved_product(model_path) == "adapter":
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


def _names(folder: str, pattern: re.Pattern) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if pattern.fullmatch(n))
    except OSError:
        return []


def saved_product(folder: str) -> str:
    """What ``folder``'s own run produced: ``"adapter"`` (load its base, then the adapter) or
    ``"full"`` (load the folder as a model). A folder with an ``adapter_config.json`` and no full
    weights is an adapter; with both, its ``mmtune_config.json`` decides (``finetuning_type``),
    since a folder written into twice may hold an earlier run's files. Without a record saying
    which, it is an error naming both files rather than a guess. A full fine-tune's folder that
    still holds an earlier run's adapter is an error too: transformers loads any adapter it finds
    beside full weights on top of them, which would silently change the model."""
    adapter = _names(folder, ADAPTER_FILES)
    if ADAPTER_CONFIG_NAME not in adapter:
        return "full"
    weights = _names(folder, FULL_WEIGHT_FILES)
    finetuning = read_mmtune_config(folder).get("finetuning_type")
    if finetuning == "lora":
        if weights:
            logger.info("%s: its run trained a LoRA adapter (%s): loading the adapter, not %s", folder,
                        MMTUNE_CONFIG_NAME, ", ".join(weights))
        return "adapter"
    if not weights:
        if finetuning in ("full", "freeze"):
            raise ModelFolderError(f"{folder}: its {MMTUNE_CONFIG_NAME} records a {finetuning} fine-tune, but the "
                                   f"folder holds no full weights, only a LoRA adapter ({', '.join(adapter)}) left by "
                                   f"another run: point at the folder that holds that run's model, or open the "
                                   f"adapter as --adapter {folder} with its base as MODEL")
        return "adapter"
    stale = ", ".join(adapter)
    if finetuning in ("full", "freeze"):
        raise ModelFolderError(f"{folder}: its run saved a full model ({weights[0]}; {MMTUNE_CONFIG_NAME}: "
                               f"finetuning_type {finetuning}), but a LoRA adapter left by an earlier run sits beside "
                               f"it ({stale}), which transformers would load on top of the model: move {stale} out "
                               f"of the folder")
    raise ModelFolderError(f"{folder} holds both a LoRA adapter ({stale}) and full weights ({', '.join(weights)}), "
                           f"and no {MMTUNE_CONFIG_NAME} says which its run produced: move the one you do not want "
                           f"out of the folder")


def folder_entries(folder: str) -> list[str]:
    """The names in ``folder``, sorted; ``[]`` when it is empty or does not exist."""
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def run_entries(folder: str) -> tuple[list[str], list[str]]:
    """(``folder``'s entries an mmtune run or export wrote, the others). The model, processor and
    tokenizer files count as a run's only where the folder holds mmtune's record (a folder of the
    user's own with a ``config.json`` keeps it); peft's model card ``README.md`` likewise."""
    entries = folder_entries(folder)
    recorded = MMTUNE_CONFIG_NAME in entries
    ours = [n for n in entries if RUN_FILES.fullmatch(n)
            or recorded and (MODEL_FILES.fullmatch(n) or n == "README.md" and _is_peft_card(os.path.join(folder, n)))]
    return ours, [n for n in entries if n not in ours]


def _is_peft_card(path: str) -> bool:
    """Whether ``path`` is the model card peft writes beside an adapter (its front matter says so)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(2048)
    except OSError:
        return False
    return head.startswith("---") and "library_name: peft" in head.split("\n---", 1)[0]


def short_list(names: list[str], limit: int = 6) -> str:
    """``a, b, c and 4 more``: a folder's entries in one line of a message."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def clear_run_files(folder: str, option: str) -> list[str]:
    """Remove what an earlier run or export wrote into ``folder`` (:func:`run_entries`), so the
    folder ends up holding one run's files: no stale adapter beside a full model, no old
    checkpoints to resume from, no log appended to. Everything else stays, listed in a warning.
    ``option`` names the switch that asked for it, in the log. Returns the names removed."""
    ours, others = run_entries(folder)
    for name in ours:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if ours:
        logger.info("%s: removed %d file(s) of an earlier run from %s: %s", option, len(ours), folder,
                    short_list(ours))
    if others:
        logger.warning("%s: kept %d file(s) in %s that mmtune did not write: %s", option, len(others), folder,
                       short_list(others))
    return ours


def path_relation(path: str, other: str) -> str | None:
    """How ``path`` lies to the existing local path ``other``: ``"is"``, ``"is inside"``,
    ``"contains"``, or None (apart, or ``other`` is no local path, e.g. a Hub id)."""
    if not other or not os.path.exists(other):
        return None
    mine, theirs = os.path.realpath(path), os.path.realpath(other)
    if mine == theirs:
        return "is"
    common = os.path.commonpath([mine, theirs])
    if common == theirs:
        return "is inside"
    if common == mine:
        return "contains"
    return None


def check_apart(output_dir: str, inputs: list[tuple[str, str, str | None]], what: str) -> None:
    """An :class:`OutputFolderError` when ``output_dir`` is, lies inside or contains one of
    ``inputs`` ((what it is, where it was named, path)): writing there would overwrite or delete
    the weights a run or an export reads (a base model, an adapter, the checkpoint a run starts
    from). No option allows it. Paths that are not local (Hub ids) are apart. An ``output_dir``
    that is a file is an error too."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputFolderError(f"{what} {output_dir} is a file, not a folder: pick another {what}")
    for noun, key, path in inputs:
        relation = path_relation(output_dir, path) if path else None
        if relation is None:
            continue
        where = "" if relation == "is" else f" {path}"
        raise OutputFolderError(f"{what} {output_dir} {relation} the {noun}{where} ({key}): writing there would "
                                f"overwrite or delete its files; pick another {what} (no option allows this)")


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
    from mmtune.config import ConfigError

    what = f"model type {model_type!r}" if model_type else "a model without config.json"
    why = f"no {MMTUNE_CONFIG_NAME}, and no family declares one" if record is not None else "no family declares one"
    raise ConfigError(f"{where + ': ' if where else ''}no chat template known for {what} ({why}); pass {option} "
                      f"NAME (known: {', '.join(sorted(TEMPLATES))})")
