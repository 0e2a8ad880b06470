"""Progress records: ``trainer_log.jsonl`` line per log step, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class JsonlLogCallback(TrainerCallback):
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(os.path.join(args.output_dir, "trainer_log.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")


def plot_loss(output_dir: str) -> str | None:
    """Training (and eval) loss against step, from ``trainer_log.jsonl``; returns the PNG path."""
    path = os.path.join(output_dir, "trainer_log.jsonl")
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as fh:
        rows = [json.loads(line) for line in fh]
    series = {label: [(r["step"], r[key]) for r in rows if key in r]
              for key, label in (("loss", "train"), ("eval_loss", "eval"))}
    series = {label: points for label, points in series.items() if points}
    if not series:  # a run shorter than logging_steps: an empty plot would only draw axes
        logger.info("no loss was logged in %s (fewer steps than logging_steps): no loss plot", output_dir)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        ax.plot(*zip(*points), label=label, marker="." if label == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out = os.path.join(output_dir, "training_loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


class MmtuneConfigCallback(TrainerCallback):
    """Writes mmtune's config (``mmtune_config.json``: template, plugin, media settings,
    fine-tuning type, model type, base model) into every ``checkpoint-N`` the Trainer saves,
    and into the output folder before any push to the Hub, so ``mmtune chat``, ``export`` and
    resume reopen any of them with the template and plugin the run used. The processor is
    saved there by the Trainer itself (``processing_class``).

    ``model_config``, when given, is saved beside each checkpoint's weights too: a LoRA
    adapter of a LLaVA assembled around a plain LM needs the assembled config to be rebuilt."""

    def __init__(self, record: dict[str, Any], model_config: Any = None) -> None:
        self.record = dict(record)
        self.model_config = model_config

    def write(self, folder: str) -> None:
        from mmtune.model.saved import write_mmtune_config

        write_mmtune_config(folder, self.record)
        if self.model_config is not None:
            self.model_config.save_pretrained(folder)

    def _checkpoint(self, args: Any, state: Any) -> str:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def write_checkpoint(self, args: Any, state: Any, folder: str) -> None:
        """Called by ``MMTrainer`` on a checkpoint it has staged, before the rename that completes
        it: a ``checkpoint-N`` holds the config from the moment it exists."""
        if args.should_save:
            self.write(folder)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The checkpoint under its final name, where no staging wrote the config (a plain
        Trainer, or a run that pushes to the Hub and saves in place)."""
        from mmtune.model.saved import MMTUNE_CONFIG_NAME

        folder = self._checkpoint(args, state)
        if args.should_save and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, MMTUNE_CONFIG_NAME)):
            self.write(folder)

    def on_push_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A push uploads the output folder (and, with ``hub_strategy: checkpoint``, the
        checkpoint just saved, before ``on_save`` runs): both get the config first."""
        if not args.should_save:
            return
        self.write(args.output_dir)
        folder = self._checkpoint(args, state)
        if os.path.isdir(folder):
            self.write(folder)
