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

    rows = [json.loads(line) for line in open(path)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="." if key == "eval_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out = os.path.join(output_dir, "training_loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
