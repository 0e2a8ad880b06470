"""The output folder of a training run: checked before anything loads, so a run never writes over
a finished run, a base model or a folder of someone's files without being asked to.

- ``output_dir`` that is, lies inside or contains the model, the adapter, the vision tower or
  the stage-1 projector the run reads: always an error (the run would overwrite or, with
  ``overwrite_output_dir``, delete the weights it trains from).
- a non-empty ``output_dir`` (a finished run, an interrupted run's checkpoints, tensorboard's
  ``runs``, anything at all): an error naming what it holds and the ways out, unless the run
  resumes from a checkpoint in that folder (``resume_from_checkpoint``: the folder then holds
  the run being continued) or ``overwrite_output_dir: true``.
- with ``overwrite_output_dir: true``, the earlier run's files are removed before training (a
  run's files are its own: a full fine-tune never ends beside a stale adapter, a log is never
  appended to), and files that no mmtune run writes are kept and listed in a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mmtune.errors import OutputFolderError
from mmtune.model.saved import (
    ADAPTER_FILES,
    FULL_WEIGHT_FILES,
    MMTUNE_CONFIG_NAME,
    check_apart,
    clear_run_files,
    folder_entries,
    path_relation,
    run_entries,
    short_list,
)

logger = logging.getLogger(__name__)

OPTION = "overwrite_output_dir"


def training_inputs(model_args: Any) -> list[tuple[str, str, str | None]]:
    """The local paths a run reads weights from, as :func:`~mmtune.model.saved.check_apart` takes them."""
    return [("model folder", "model_name_or_path", model_args.model_name_or_path),
            ("adapter folder", "adapter_name_or_path", model_args.adapter_name_or_path),
            ("vision tower", "vision_tower", model_args.vision_tower),
            ("stage-1 projector", "pretrain_mm_mlp_adapter", model_args.pretrain_mm_mlp_adapter)]


def resumes_in(resume_from_checkpoint: Any, output_dir: str) -> bool:
    """Whether the run continues from a checkpoint inside ``output_dir``: ``true`` (the newest
    there) or a path within it. A checkpoint elsewhere starts a new folder."""
    if resume_from_checkpoint in (None, False, ""):
        return False
    if resume_from_checkpoint is True or str(resume_from_checkpoint).strip().lower() in ("true", "yes", "on", "1"):
        return True
    if str(resume_from_checkpoint).strip().lower() in ("false", "no", "off", "0", "none"):
        return False
    return path_relation(str(resume_from_checkpoint), output_dir) in ("is", "is inside")


def describe_contents(folder: str) -> str:
    """What ``folder`` holds, for the error: a finished run, an unfinished one, or other files."""
    entries = folder_entries(folder)
    ours, _ = run_entries(folder)
    listing = short_list(entries)
    finished = MMTUNE_CONFIG_NAME in entries or any(ADAPTER_FILES.fullmatch(n) or FULL_WEIGHT_FILES.fullmatch(n)
                                                     for n in entries)
    if finished:
        return f"holds a finished run ({listing})"
    if any(n.startswith("checkpoint-") for n in ours):
        return f"holds an unfinished run's checkpoints ({listing}; resume_from_checkpoint: true continues it)"
    if ours:
        return f"holds an earlier run's files ({listing})"
    return f"is not empty ({listing})"


def prepare_output_dir(model_args: Any, mm_args: Any, training_args: Any) -> list[str]:
    """Check ``training_args.output_dir`` before anything loads (see the module's docstring), and
    with ``overwrite_output_dir: true`` remove the earlier run's files (on the saving process,
    before the other ranks go on). Returns the names removed."""
    output_dir = training_args.output_dir
    check_apart(output_dir, training_inputs(model_args), "output_dir")
    if not folder_entries(output_dir):
        return []
    overwrite = mm_args.overwrite_output_dir
    if resumes_in(training_args.resume_from_checkpoint, output_dir):
        if overwrite:
            logger.warning("%s: ignored, the run resumes from a checkpoint in %s (its files are kept)", OPTION,
                           output_dir)
        return []
    if not overwrite:
        raise OutputFolderError(f"output_dir {output_dir} {describe_contents(output_dir)}: pick another output_dir, "
                                f"or set {OPTION}: true to replace the run there (files mmtune did not write are "
                                f"kept)")
    removed: list[str] = []
    with training_args.main_process_first(desc="clearing output_dir"):
        if training_args.should_save and os.path.isdir(output_dir):
            removed = clear_run_files(output_dir, OPTION)
    return removed
