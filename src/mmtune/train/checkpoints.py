"""Checkpoint folders: which ones are complete, and which one ``resume_from_checkpoint`` takes.

A ``checkpoint-N`` is complete when it holds ``trainer_state.json`` (the Trainer writes it after the
weights, the optimizer, the scheduler and the RNG states) and the model's weights (every shard an
index names). mmtune writes each checkpoint under ``tmp-checkpoint-N/`` and renames it to
``checkpoint-N`` once complete (``MMTrainer._save_checkpoint``), so a run killed during a save leaves
a ``tmp-checkpoint-N`` that no resume picks; folders written by other tools, or by older mmtune,
are still checked file by file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from mmtune.errors import ModelFolderError

logger = logging.getLogger(__name__)

#: the name the Trainer gives a checkpoint (transformers' PREFIX_CHECKPOINT_DIR + "-N")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: where a checkpoint is written before it is complete
STAGING_PREFIX = "tmp-checkpoint-"
TRAINER_STATE = "trainer_state.json"
#: weight files, one of which a checkpoint holds (full model, LoRA adapter; safetensors or pickle)
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: folders that hold the weights of distributed checkpoints: FSDP (sharded, DCP) and DeepSpeed
WEIGHT_FOLDER_PREFIXES = ("pytorch_model_fsdp_", "global_step")


def staging_folder(run_dir: str, step: int) -> str:
    """The folder a checkpoint of ``step`` is written under before it is renamed into ``run_dir``."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{step}")


def checkpoint_problem(folder: str) -> str | None:
    """What keeps ``folder`` from being a checkpoint to resume from, or None when it is complete."""
    if not os.path.isdir(folder):
        return "does not exist" if not os.path.exists(folder) else "is not a folder"
    state = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"has no {TRAINER_STATE} (its save did not finish)"
    try:
        with open(state, encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError) as exc:
        return f"has an unreadable {TRAINER_STATE} ({exc.__class__.__name__})"
    return _weights_problem(folder)


def _weights_problem(folder: str) -> str | None:
    entries = os.listdir(folder)
    for index in WEIGHT_INDEXES:
        if index in entries:
            try:
                with open(os.path.join(folder, index), encoding="utf-8") as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                return f"has an unreadable {index} ({exc.__class__.__name__})"
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                return f"misses {len(missing)} of the {len(shards)} weight shards its {index} names (e.g. {missing[0]})"
            return None
    if any(name in entries for name in WEIGHT_FILES):
        return None
    for name in entries:
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        if name.startswith(WEIGHT_FOLDER_PREFIXES) and os.listdir(path):
            return None
        if any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):  # peft: one folder per adapter
            return None
    return "has no model or adapter weights (its save did not finish)"


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (highest N). Newer ones that are
    incomplete, and every ``tmp-checkpoint-N`` (a save that did not finish), are skipped, each with
    a warning that names it and what it lacks. None when no complete checkpoint exists."""
    if not os.path.isdir(output_dir):
        return None
    found: list[tuple[int, str]] = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
            logger.warning("resume: skipping %s: a checkpoint whose save did not finish", path)
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("resume: skipping %s: it %s", path, problem)
    return None


def _as_flag(value: Any) -> bool | None:
    """``resume_from_checkpoint`` as a yes/no when it is one (true, yes, on, 1 / false, no, off, 0,
    any case), else None (a path)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or os.path.exists(value):
        return None
    from mmtune.config.values import is_true

    try:
        return is_true(value)
    except ValueError:
        return None


def resolve_resume(value: Any, output_dir: str) -> str | None:
    """The checkpoint folder a run resumes from, checked before anything loads; None to start anew.

    ``value`` is ``resume_from_checkpoint`` as configured: empty, None or false starts anew; true
    takes :func:`latest_complete_checkpoint` of ``output_dir`` (the Trainer's own choice would be the
    highest N whether or not its save finished); a path must be a complete checkpoint. Either
    failing is a :class:`~mmtune.errors.ModelFolderError` that says what is wrong and what to do."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    flag = _as_flag(value)
    if flag is False:
        return None
    if flag is True:
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            raise ModelFolderError(
                f"resume_from_checkpoint: true, but output_dir {output_dir} holds no complete checkpoint-N "
                "(incomplete ones are listed above): name a checkpoint folder, or drop resume_from_checkpoint "
                "to start anew")
        logger.info("resume: from %s (the newest complete checkpoint of %s)", path, output_dir)
        return path
    path = str(value)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ModelFolderError(
            f"resume_from_checkpoint: {path} {problem}: name a complete checkpoint-N folder, or give "
            "resume_from_checkpoint: true to take the newest complete one of output_dir")
    return path


def publish_checkpoint(staged: str, final: str) -> None:
    """Rename the complete checkpoint ``staged`` to ``final``. A ``final`` that exists already (a
    resumed run saving the same step again) is moved aside first and removed after the rename, so
    ``final`` is at every moment either the old or the new complete checkpoint, or absent (while
    the two renames run: a resume then takes the previous checkpoint)."""
    import shutil

    old = None
    if os.path.lexists(final):
        old = os.path.join(os.path.dirname(final), f"tmp-{os.path.basename(final)}-replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
