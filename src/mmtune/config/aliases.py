"""Names users bring from LLaMA-Factory, transformers, peft, TRL and the original LLaVA code.

A name with an exact mmtune equivalent is an alias: its value goes to mmtune's key (translated
where the two spell values differently) with one info line. A name without one is refused with a
message naming mmtune's nearest key, rather than "unknown option" or a silent no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .values import ConfigError

logger = logging.getLogger(__name__)


def _flash_attn(value: Any) -> Any:
    """LLaMA-Factory's ``flash_attn`` words as transformers' ``attn_implementation`` names
    (``auto`` lets transformers pick, which is sdpa, mmtune's default)."""
    words = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "eager": "eager", "fa2": "flash_attention_2",
             "fa3": "flash_attention_3"}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ValueError(f"{value!r} is not one of {', '.join(words)}")


def _comma_list(value: Any) -> Any:
    """peft's ``target_modules`` list as mmtune's comma-separated ``lora_target``."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def _warmup_ratio(value: Any) -> Any:
    """A ratio of the total steps: transformers 5 reads a ``warmup_steps`` below 1 as exactly that."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number in [0, 1)") from None
    if not 0 <= ratio < 1:
        raise ValueError(f"{value!r} is not a ratio in [0, 1); give warmup_steps (a step count) instead")
    return ratio


@dataclass(frozen=True)
class Alias:
    """``key``: mmtune's name (None: the setting is mmtune's behaviour already, and is dropped);
    ``origin``: where users know the name from; ``value``: translates the value (raises ValueError);
    ``note``: what ``mmtune options`` says beside it."""

    key: str | None
    origin: str
    value: Callable[[Any], Any] | None = None
    note: str = ""


ALIASES: dict[str, Alias] = {
    "dtype": Alias("torch_dtype", "transformers' from_pretrained"),
    "enable_liger_kernel": Alias("liger_kernels", "LLaMA-Factory"),
    "use_liger_kernel": Alias("liger_kernels", "transformers' TrainingArguments", None,
                              "RMSNorm, SwiGLU and rotary; the cross-entropy stays mmtune's fused one"),
    "torch_compile": Alias("compile", "transformers' TrainingArguments", None,
                           "mmtune compiles each repeated block, not the whole model"),
    "torch_compile_backend": Alias("compile_backend", "transformers' TrainingArguments"),
    "torch_compile_mode": Alias("compile_mode", "transformers' TrainingArguments"),
    "flash_attn": Alias("attn_implementation", "LLaMA-Factory", _flash_attn,
                        "auto -> sdpa, disabled -> eager, fa2 -> flash_attention_2, fa3 -> flash_attention_3"),
    "model_revision": Alias("revision", "LLaMA-Factory"),
    "interleave_probs": Alias("dataset_ratios", "LLaMA-Factory"),
    "neat_packing": Alias("packing", "LLaMA-Factory"),  # mmtune's packing keeps attention inside each sample
    "lora_r": Alias("lora_rank", "peft / LLaVA"),
    "target_modules": Alias("lora_target", "peft", _comma_list, "a list becomes comma-separated"),
    "lora_target_modules": Alias("lora_target", "peft", _comma_list, "a list becomes comma-separated"),
    "warmup_ratio": Alias("warmup_steps", "transformers 4", _warmup_ratio,
                          "transformers 5 reads a warmup_steps below 1 as a ratio"),
    "evaluation_strategy": Alias("eval_strategy", "transformers 4"),
    "no_cuda": Alias("use_cpu", "transformers 4"),
    "max_seq_length": Alias("cutoff_len", "TRL"),
    "model_max_length": Alias("cutoff_len", "LLaVA"),
    "tune_mm_mlp_adapter": Alias("train_mm_proj_only", "LLaVA"),
    "freeze_backbone": Alias("freeze_language_model", "LLaVA"),
    "mm_projector_lr": Alias("projector_lr", "LLaVA"),
    "data_path": Alias("dataset", "LLaVA"),
    "image_folder": Alias("media_dir", "LLaVA"),
}

#: names with no exact mmtune equivalent: (where users know them from, mmtune's nearest key and how)
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "dataset_dir": ("LLaMA-Factory", "name the files in `dataset` (comma-separated paths); relative media paths "
                                     "resolve against `media_dir`"),
    "disable_gradient_checkpointing": ("LLaMA-Factory", "use `gradient_checkpointing` and "
                                                        "`gradient_checkpointing_layers`"),
    "use_reentrant_gc": ("LLaMA-Factory", "mmtune checkpoints without reentrancy (`gradient_checkpointing_layers`)"),
    "infer_dtype": ("LLaMA-Factory", "use `torch_dtype` (`mmtune chat` and `export` take --dtype)"),
    "use_unsloth": ("LLaMA-Factory", "mmtune's own kernels are `compile`, `liger_kernels` and `fused_cross_entropy`"),
    "use_unsloth_gc": ("LLaMA-Factory", "use `gradient_checkpointing_layers`"),
    "quantization_method": ("LLaMA-Factory", "`quantization_bit: 4` or `8` quantises with bitsandbytes"),
    "double_quantization": ("LLaMA-Factory", "`quantization_bit: 4` quantises with bitsandbytes"),
    "additional_target": ("LLaMA-Factory", "`freeze_multi_modal_projector: false` or `freeze_vision_tower: false` "
                                           "train that part in full beside LoRA"),
    "use_rslora": ("LLaMA-Factory", "set `lora_alpha`"),
    "freeze_trainable_modules": ("LLaMA-Factory", "use `freeze_trainable_layers` and the `freeze_*` switches"),
    "freeze_extra_modules": ("LLaMA-Factory", "use `freeze_trainable_layers` and the `freeze_*` switches"),
    "tokenized_path": ("LLaMA-Factory", "tokenised data is cached on disk already (`overwrite_cache` redoes it)"),
    "streaming": ("LLaMA-Factory", "`max_samples` caps the samples read"),
    "eval_dataset": ("LLaMA-Factory", "`val_size` holds out part of `dataset`"),
    "include_effective_tokens_per_second": ("LLaMA-Factory", "use `include_num_input_tokens_seen`"),
    "print_param_status": ("LLaMA-Factory", "`mmtune train` logs the trainable parameters per component on every run"),
    "upcast_layernorm": ("LLaMA-Factory", "use `torch_dtype`"),
    "image_resolution": ("LLaMA-Factory", "use `image_max_pixels`"),
    "video_resolution": ("LLaMA-Factory", "use `video_max_pixels`"),
    "lora_enable": ("LLaVA", "use `finetuning_type: lora`"),
    "bits": ("LLaVA", "use `quantization_bit`"),
}


def resolve_alias(key: str, value: Any, where: str) -> tuple[str | None, Any]:
    """(mmtune's key, value) for ``key``; the key itself when it is no alias. A name without an
    mmtune equivalent is a ConfigError naming the nearest key."""
    if key in UNSUPPORTED:
        origin, hint = UNSUPPORTED[key]
        raise ConfigError(f"{where}: {key} ({origin}) has no mmtune equivalent: {hint}")
    alias = ALIASES.get(key)
    if alias is None:
        return key, value
    if alias.value is not None:
        try:
            value = alias.value(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    if alias.key is None:
        logger.info("%s: %s (%s) is what mmtune does already: ignored", where, key, alias.origin)
    else:
        logger.info("%s: %s (%s) is mmtune's %s: %s", where, key, alias.origin, alias.key, value)
    return alias.key, value
