"""Arguments that say what trains: LoRA / freeze / full, and which composite parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class FinetuningArguments:
    """What trains: the method, the parts of a composite model, and LoRA's shape."""

    finetuning_type: Literal["lora", "freeze", "full"] = field(
        default="lora", metadata={"help": "lora: adapters on the language model (a training projector in full); "
                                          "freeze: the last freeze_trainable_layers LM layers in full; full: every "
                                          "part the freeze_* switches leave unfrozen, in full."})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision/audio tower frozen."})
    freeze_multi_modal_projector: bool = field(default=True, metadata={"help": "Keep the projector frozen."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Keep the language model frozen."})
    train_mm_proj_only: bool = field(default=False, metadata={"help": "Train the projector alone (LLaVA stage 1)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA's rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "Defaults to 2 x rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on LoRA's input."})
    lora_target: str = field(default="all", metadata={"help": "'all' or comma-separated names (q_proj,v_proj)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA, through peft)."})
    adapter_fp32: bool = field(
        default=False,
        metadata={"help": "Keep LoRA weights in fp32 (peft's default; ~1.5x slower steps on GPU). Off: compute dtype."},
    )
    freeze_trainable_layers: int = field(default=2, metadata={"help": "freeze: train the last N LM layers."})
    stage: Literal["sft", "pretrain", "finetune"] = field(
        default="sft",
        metadata={"help": "LLaVA recipe: pretrain = projector alone (tower, LM frozen); finetune = projector + LM "
                          "(tower frozen unless freeze_vision_tower=false); sft = as the freeze_* flags say."},
    )

    def __post_init__(self) -> None:
        if self.finetuning_type not in ("lora", "freeze", "full"):
            raise ValueError(f"finetuning_type must be lora, freeze or full, not {self.finetuning_type!r}")
        if self.stage not in ("sft", "pretrain", "finetune"):
            raise ValueError(f"stage must be sft, pretrain or finetune, not {self.stage!r}")
        if self.stage == "pretrain":
            self.train_mm_proj_only = True
        elif self.stage == "finetune":
            self.freeze_multi_modal_projector = False
            self.freeze_language_model = False
        if self.train_mm_proj_only:
            self.freeze_vision_tower = True
            self.freeze_language_model = True
            self.freeze_multi_modal_projector = False
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank

    @property
    def lora_targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target.split(",") if t.strip()]
