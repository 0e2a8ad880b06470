"""Arguments that say what trains: LoRA / freeze / full, and which composite parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .values import ConfigError

#: keys only LoRA reads: set by the user in a ``full`` or ``freeze`` run they would do nothing
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora", "adapter_fp32")
#: keys only ``finetuning_type: freeze`` reads
FREEZE_KEYS = ("freeze_trainable_layers",)
#: the preference stages, and the keys only they read (by stage)
PREFERENCE_STAGES = ("dpo", "kto")
PREFERENCE_KEYS = {"pref_loss": ("dpo",), "pref_beta": ("dpo", "kto"), "pref_ftx": ("dpo", "kto"),
                   "pref_label_smoothing": ("dpo",), "simpo_gamma": ("dpo",), "kto_desirable_weight": ("kto",),
                   "kto_undesirable_weight": ("kto",), "pref_reference": ("dpo", "kto")}
#: the pairwise losses of ``stage: dpo``; orpo and simpo need no reference model
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


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
    train_mm_proj_only: bool = field(default=False, metadata={
        "help": "Train the projector alone (LLaVA stage 1): the tower and the language model stay frozen; a freeze_* "
                "switch set otherwise beside it is an error."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA's rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "Defaults to 2 x rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on LoRA's input."})
    lora_target: str = field(default="all", metadata={"help": "'all' or comma-separated names (q_proj,v_proj)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA, through peft)."})
    adapter_fp32: bool = field(
        default=False,
        metadata={"help": "Keep LoRA weights in fp32 (peft's default; slower steps on GPU). Off: compute dtype."},
    )
    freeze_trainable_layers: int = field(default=2, metadata={"help": "freeze: train the last N LM layers."})
    stage: Literal["sft", "pretrain", "finetune", "dpo", "kto"] = field(
        default="sft",
        metadata={"help": "LLaVA recipe: pretrain = projector alone (tower, LM frozen); finetune = projector + LM "
                          "(tower frozen unless freeze_vision_tower=false); sft = as the freeze_* flags say. A "
                          "freeze_* or train_mm_proj_only value set beside it that the stage overrides is an error. "
                          "Preference training: dpo = pairs (chosen / rejected answers, pref_loss), kto = unpaired "
                          "answers marked good or bad; both train what the freeze_* flags say, as sft."},
    )
    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = field(default="sigmoid", metadata={
        "help": "stage dpo: sigmoid (DPO), ipo, hinge (SLiC), orpo (odds ratio, with its SFT term; no reference), "
                "simpo (length-normalised, margin simpo_gamma; no reference)."})
    pref_beta: float = field(default=0.1, metadata={
        "help": "stage dpo / kto: beta, the strength of the pull to the reference (ORPO: lambda, the odds-ratio "
                "weight)."})
    pref_ftx: float = field(default=0.0, metadata={
        "help": "stage dpo / kto: weight of an SFT term (mean NLL of the chosen / desirable answers' tokens) added "
                "to the loss (orpo has its own SFT term)."})
    pref_label_smoothing: float = field(default=0.0, metadata={
        "help": "stage dpo, sigmoid / simpo: the share of pairs assumed flipped (conservative DPO), in [0, 0.5)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "stage dpo, simpo: the target reward margin gamma."})
    kto_desirable_weight: float = field(default=1.0, metadata={"help": "stage kto: weight of the desirable answers."})
    kto_undesirable_weight: float = field(default=1.0, metadata={
        "help": "stage kto: weight of the undesirable answers."})
    pref_reference: Literal["auto", "adapter", "cached"] = field(default="auto", metadata={
        "help": "stage dpo / kto: where the reference log-probabilities come from. adapter: the same weights with "
                "the LoRA adapter disabled (LoRA only); cached: computed once before training with the initial "
                "weights and kept beside the samples; auto: adapter for LoRA, cached otherwise. No second copy of "
                "the model is ever held."})

    def __post_init__(self) -> None:
        if self.finetuning_type not in ("lora", "freeze", "full"):
            raise ValueError(f"finetuning_type must be lora, freeze or full, not {self.finetuning_type!r}")
        if self.stage not in ("sft", "pretrain", "finetune", *PREFERENCE_STAGES):
            raise ValueError(f"stage must be sft, pretrain, finetune, dpo or kto, not {self.stage!r}")
        if self.pref_loss not in PREF_LOSSES:
            raise ValueError(f"pref_loss must be one of {', '.join(PREF_LOSSES)}, not {self.pref_loss!r}")
        if self.pref_beta <= 0:
            raise ValueError(f"pref_beta must be > 0, not {self.pref_beta}")
        if not 0 <= self.pref_label_smoothing < 0.5:
            raise ValueError(f"pref_label_smoothing must be in [0, 0.5), not {self.pref_label_smoothing}")
        if self.pref_reference not in ("auto", "adapter", "cached"):
            raise ValueError(f"pref_reference must be auto, adapter or cached, not {self.pref_reference!r}")
        if self.pref_reference == "adapter" and self.finetuning_type != "lora":
            raise ValueError(f"pref_reference: adapter needs finetuning_type lora (a {self.finetuning_type} run has "
                             "no adapter to disable); use cached")
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
    def preference(self) -> bool:
        """A preference stage (dpo, kto)."""
        return self.stage in PREFERENCE_STAGES

    @property
    def preference_data(self) -> str | None:
        """The rows the stage reads: ``pairs`` (dpo), ``kto``, or None (plain conversations)."""
        return {"dpo": "pairs", "kto": "kto"}.get(self.stage)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probabilities (every preference loss but orpo, simpo)."""
        return self.preference and not (self.stage == "dpo" and self.pref_loss in REFERENCE_FREE)

    @property
    def reference(self) -> str | None:
        """adapter or cached (``pref_reference: auto`` resolved), None when no reference is read."""
        if not self.needs_reference:
            return None
        if self.pref_reference != "auto":
            return self.pref_reference
        return "adapter" if self.finetuning_type == "lora" else "cached"

    @property
    def lora_targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target.split(",") if t.strip()]


def _word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _forced(values: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(setting key, forced key, forced value) for what ``stage`` and ``train_mm_proj_only`` set
    in :meth:`FinetuningArguments.__post_init__`, from the values the user gave."""
    stage = values.get("stage", "sft")
    rules: list[tuple[str, str, bool]] = []
    if stage == "pretrain":
        rules.append(("stage", "train_mm_proj_only", True))
    elif stage == "finetune":
        rules += [("stage", "freeze_multi_modal_projector", False), ("stage", "freeze_language_model", False)]
    if stage == "pretrain" or values.get("train_mm_proj_only"):
        setter = "stage" if stage == "pretrain" else "train_mm_proj_only"
        rules += [(setter, "freeze_vision_tower", True), (setter, "freeze_language_model", True),
                  (setter, "freeze_multi_modal_projector", False)]
    return rules


def check_contradictions(values: dict[str, Any], spelled: dict[str, str] | None = None,
                         sources: dict[str, str] | None = None) -> None:
    """Refuse, in one line naming both keys, finetuning settings the user gave that cannot all hold.

    ``values`` holds only what the user set (file, keyword or command line), by mmtune's key;
    ``spelled`` maps a key to the name the user typed (an alias), ``sources`` to where it was set.
    A default never contradicts: ``stage: pretrain`` alone freezes the tower and the language model
    as before, but beside an explicit ``freeze_language_model: false`` it is an error, as is a
    LoRA-only key (``lora_rank``, ...) in a ``full`` or ``freeze`` run, or ``freeze_trainable_layers``
    outside ``freeze``: such a value would otherwise be dropped without a word."""
    spelled = spelled or {}
    sources = sources or {}

    def name(key: str) -> str:
        typed = spelled.get(key, key)
        return typed if typed == key else f"{typed} ({key})"

    def fail(first: str, first_value: Any, second: str, second_value: Any, why: str) -> None:
        where = sources.get(second) or sources.get(first)
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{name(first)}: {_word(first_value)} contradicts {name(second)}: "
                          f"{_word(second_value)} ({why}); remove one of them")

    forced: dict[str, tuple[str, bool]] = {}
    for setter, key, value in _forced(values):
        if key in values and values[key] != value:
            fail(setter, values[setter], key, values[key],
                 f"{setter} {_word(values[setter])} sets {key} to {_word(value)}")
        earlier = forced.get(key)
        if earlier is not None and earlier[0] != setter and earlier[1] != value:
            fail(earlier[0], values[earlier[0]], setter, values[setter],
                 f"they set {key} to {_word(earlier[1])} and {_word(value)}")
        forced.setdefault(key, (setter, value))
    method = values.get("finetuning_type", "lora")
    if method != "lora":
        for key in LORA_KEYS:
            if key in values:
                fail("finetuning_type", method, key, values[key], f"only finetuning_type lora reads {key}")
    if method != "freeze":
        for key in FREEZE_KEYS:
            if key in values:
                fail("finetuning_type", method, key, values[key], f"only finetuning_type freeze reads {key}")
    stage = values.get("stage", "sft")
    for key, stages in PREFERENCE_KEYS.items():
        if key in values and stage not in stages:
            fail("stage", stage, key, values[key], f"only stage {' or '.join(stages)} reads {key}")
    loss = values.get("pref_loss", "sigmoid")
    if stage == "dpo" and "simpo_gamma" in values and loss != "simpo":
        fail("pref_loss", loss, "simpo_gamma", values["simpo_gamma"], "only pref_loss simpo reads simpo_gamma")
    if stage == "dpo" and "pref_label_smoothing" in values and loss not in ("sigmoid", "simpo"):
        fail("pref_loss", loss, "pref_label_smoothing", values["pref_label_smoothing"],
             "only pref_loss sigmoid and simpo read pref_label_smoothing")
    if stage == "dpo" and "pref_reference" in values and loss in REFERENCE_FREE:
        fail("pref_loss", loss, "pref_reference", values["pref_reference"], f"{loss} reads no reference")
