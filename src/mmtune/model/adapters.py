"""LoRA / freeze / full fine-tuning that respects the composite layout of a VLM."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from .composite import get_composite_model, get_forbidden_modules, has_prefix, patch_target_modules

logger = logging.getLogger(__name__)


def _component(name: str, entry: Any) -> str:
    if entry is None:
        return "language"
    if has_prefix(name, [entry.projector_key]):
        return "projector"
    if has_prefix(name, entry.vision_model_keys):
        return "vision"
    return "language"


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable / total parameters per component (vision, projector, language, all)."""
    entry = get_composite_model(getattr(getattr(model, "config", None), "model_type", ""))
    stats = {k: {"trainable": 0, "total": 0} for k in ("vision", "projector", "language", "all")}
    for name, param in model.named_parameters():
        part = _component(name, entry)
        for key in (part, "all"):
            stats[key]["total"] += param.numel()
            if param.requires_grad:
                stats[key]["trainable"] += param.numel()
    return stats


def log_trainable_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    stats = count_parameters(model)
    for part, s in stats.items():
        pct = 100.0 * s["trainable"] / s["total"] if s["total"] else 0.0
        logger.info("trainable %-9s %13s / %13s (%.4f%%)", part, f"{s['trainable']:,}", f"{s['total']:,}", pct)
    return stats


def _decoder_layers(model: nn.Module, language_keys: list[str]) -> list[str]:
    """Names of the language model's repeated blocks (the longest ModuleList under it)."""
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (not language_keys or has_prefix(name, language_keys)):
            if len(module) > len(best):
                best = [f"{name}.{i}" for i in range(len(module))]
    return best


def init_adapter(model: nn.Module, model_args: Any, finetuning_args: Any, is_trainable: bool = True) -> nn.Module:
    """Apply the fine-tuning method; returns the (possibly peft-wrapped) model."""
    config = model.config
    entry = get_composite_model(getattr(config, "model_type", ""))
    forbidden = get_forbidden_modules(config, finetuning_args)
    if not is_trainable:
        if model_args.adapter_name_or_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_args.adapter_name_or_path, is_trainable=False)
        model.requires_grad_(False)
        return model

    method = finetuning_args.finetuning_type
    if method == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(not has_prefix(name, forbidden))
    elif method == "freeze":
        language_keys = entry.language_model_keys if entry else []
        layers = _decoder_layers(model, language_keys)
        keep = layers[-finetuning_args.freeze_trainable_layers:] if finetuning_args.freeze_trainable_layers > 0 else []
        trainable_prefixes = list(keep) if not finetuning_args.freeze_language_model else []
        if entry is not None:
            if not finetuning_args.freeze_multi_modal_projector:
                trainable_prefixes.append(entry.projector_key)
            if not finetuning_args.freeze_vision_tower:
                trainable_prefixes.extend(entry.vision_model_keys)
        for name, param in model.named_parameters():
            param.requires_grad_(has_prefix(name, trainable_prefixes) and not has_prefix(name, forbidden))
    elif method == "lora":
        model = _init_lora(model, model_args, finetuning_args, entry, forbidden)
    log_trainable_parameters(model)
    return model


def _init_lora(model: nn.Module, model_args: Any, finetuning_args: Any, entry: Any, forbidden: set[str]) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    model.requires_grad_(False)
    if model_args.adapter_name_or_path:
        model = PeftModel.from_pretrained(model, model_args.adapter_name_or_path, is_trainable=True)
    else:
        targets = patch_target_modules(model, finetuning_args, finetuning_args.lora_targets)
        modules_to_save = None
        projector_trains = entry is not None and entry.projector_key not in forbidden
        if projector_trains:
            modules_to_save = [entry.projector_key]
            targets = [t for t in targets if not has_prefix(t, [entry.projector_key])]
        if not targets and projector_trains:
            # e.g. train_mm_proj_only: nothing is left for LoRA; the projector trains in full
            logger.info("lora: every LoRA target is frozen; training the projector alone, without adapters")
            for name, param in model.named_parameters():
                param.requires_grad_(has_prefix(name, [entry.projector_key]))
            return model
        if not targets:
            raise ValueError(f"no linear module matches lora_target={finetuning_args.lora_target!r} outside frozen parts")
        lora = LoraConfig(
            r=finetuning_args.lora_rank,
            lora_alpha=finetuning_args.lora_alpha,
            lora_dropout=finetuning_args.lora_dropout,
            target_modules=targets,
            use_dora=finetuning_args.use_dora,
            modules_to_save=modules_to_save,
            task_type=None,
        )
        model = get_peft_model(model, lora)
    if not finetuning_args.adapter_fp32:
        dtype = next((p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point()), None)
        if dtype is not None and dtype != torch.float32:
            for name, param in model.named_parameters():
                if param.requires_grad and param.dtype != dtype:
                    param.data = param.data.to(dtype)
    return model


def prepare_quantization(model_args: Any) -> dict[str, Any]:
    """``from_pretrained`` kwargs for QLoRA; bitsandbytes and a GPU are required."""
    if model_args.quantization_bit is None:
        return {}
    if model_args.quantization_bit not in (4, 8):
        raise ValueError(f"quantization_bit must be 4 or 8, not {model_args.quantization_bit}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("QLoRA needs bitsandbytes (pip install 'mmtune[bnb]') and a CUDA GPU") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA (quantization_bit) needs a CUDA GPU")
    from transformers import BitsAndBytesConfig

    dtype = model_args.compute_dtype()
    if model_args.quantization_bit == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                                   bnb_4bit_quant_type="nf4")
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}
