"""mmtune's own training options, beside transformers' TrainingArguments."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MMTrainingArguments:
    """mmtune's own training options (beside transformers' TrainingArguments)."""

    plugin: str | None = field(default=None, metadata={"help": "Multimodal plugin; default: the template's."})
    projector_lr: float | None = field(default=None, metadata={"help": "Learning rate of the projector."})
    plot_loss: bool = field(default=True, metadata={"help": "Save training_loss.png in output_dir after training."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into an output_dir that is not empty: the earlier run's files there "
                                         "(weights, adapter, checkpoints, logs, mmtune_config.json, runs/) are removed "
                                         "first, other files are kept. Off: a non-empty output_dir is an error before "
                                         "anything loads, unless the run resumes from a checkpoint in it. An "
                                         "output_dir that is or holds the model or adapter trained from is always an "
                                         "error."})
    build_rope_in_collator: bool = field(
        default=True, metadata={"help": "Build M-RoPE position ids in the collator (dataloader workers) instead of "
                                        "in the model's forward; packing needs it."})
    fake_media_for_text_only: bool | None = field(
        default=None, metadata={"help": "Dummy image in text-only batches; default: on when training on several ranks."}
    )
    host_threads: int | None = field(
        default=None, metadata={"help": "torch's intra-op CPU threads in the training process; default: 1 when "
                                        "training on CUDA with dataloader workers (the host then only launches GPU "
                                        "work), torch's own count otherwise."})
