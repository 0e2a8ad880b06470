"""LoRA / freeze / full fine-tuning that respects the composite layout of a VLM."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from .composite import (
    _is_linear,
    get_composite_model,
    get_forbidden_modules,
    has_prefix,
    names_module,
    patch_target_modules,
)
from .layers import decoder_layer_names

logger = logging.getLogger(__name__)

#: each component's name in messages, and the switch that freezes it
_PARTS = {"vision": ("vision tower", "freeze_vision_tower"), "projector": ("multi-modal projector",
                                                                       "freeze_multi_modal_projector"),
          "language": ("language model", "freeze_language_model")}


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
        layers = decoder_layer_names(model, language_keys)
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
        model = _init_lora(model, model_args, finetuning_args)
    log_trainable_parameters(model)
    return model


def _why_not_lora(name: str, module: nn.Module, model: nn.Module, entry: Any, forbidden: set[str]) -> str:
    """Why the linear module ``name`` cannot carry LoRA (it is not among the "all" targets)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and module is head:
        return "the output head, which mmtune never wraps with LoRA"
    if has_prefix(name, forbidden):
        part, switch = _PARTS[_component(name, entry)]
        return f"the frozen {part} ({switch}: true)"
    return f"a module that conflicts with LoRA in {getattr(model.config, 'model_type', 'this model')}"


def _short_names(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _unmatched(name: str, model: nn.Module, wrappable: list[str], entry: Any, forbidden: set[str]) -> str:
    """The one-line error for a ``lora_target`` entry that names no module LoRA may wrap
    (``wrappable``: the modules it can)."""
    import difflib

    choices = _short_names(wrappable)
    listed = ", ".join(choices[:24]) + (", ..." if len(choices) > 24 else "")
    can = f"LoRA can wrap {listed} (or all)" if choices else "no linear layer may carry LoRA under these settings"
    linear = [(n, m) for n, m in model.named_modules() if n and _is_linear(m) and names_module(n, name)]
    if linear:  # it exists, but in a part LoRA may not touch
        reasons = sorted({_why_not_lora(n, m, model, entry, forbidden) for n, m in linear})
        return f"lora_target: {name!r} names only {' and '.join(reasons)} (e.g. {linear[0][0]}); {can}"
    other = [(n, m) for n, m in model.named_modules() if n and names_module(n, name)]
    if other:
        kind = type(other[0][1]).__name__
        return f"lora_target: {name!r} names {kind} modules (e.g. {other[0][0]}), not linear layers; {can}"
    model_type = getattr(model.config, "model_type", "this")
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], choices, n=3, cutoff=0.6)
    nearest = f" (nearest: {', '.join(close)})" if close else ""
    return f"lora_target: no module named {name!r} in the {model_type} model{nearest}; {can}"


def lora_plan(model: nn.Module, finetuning_args: Any) -> tuple[list[str], list[str] | None]:
    """The modules LoRA wraps on ``model`` (fully qualified names) and the ones that train in
    full beside it (``modules_to_save``: a training projector), from ``lora_target`` and the
    ``freeze_*`` switches. A one-line :class:`~mmtune.config.ConfigError` where they disagree,
    so that a LoRA run never trains something other than what was asked:

    * every name in ``lora_target`` must name at least one linear layer outside the frozen
      parts (peft would skip the others without a word): the error says what the name is
      instead (missing, with the nearest existing names; only in a frozen part, with its
      switch; the output head; not a linear layer) and what LoRA can wrap;
    * LoRA must wrap something: names that reach only the training projector, or settings
      that freeze everything, are errors rather than a run that trains the projector alone
      and saves a whole model instead of an adapter. Only where the settings ask for the
      projector alone is LoRA's target empty (``([], [projector])``): ``train_mm_proj_only``
      (LLaVA's stage 1; ``lora_target`` is not read), or ``lora_target: all`` with both the
      tower and the language model frozen (a warning says that a whole model is saved).
    """
    from mmtune.config import ConfigError

    config = model.config
    entry = get_composite_model(getattr(config, "model_type", ""))
    forbidden = get_forbidden_modules(config, finetuning_args)
    projector_trains = entry is not None and entry.projector_key not in forbidden
    modules_to_save = [entry.projector_key] if projector_trains else None
    if finetuning_args.train_mm_proj_only and projector_trains:
        logger.info("lora: train_mm_proj_only: the projector trains alone, in full, without adapters (lora_target "
                    "is not used)")
        return [], modules_to_save
    names = finetuning_args.lora_targets
    if not names:
        raise ConfigError("lora_target is empty: give all, or comma-separated module names (e.g. q_proj,v_proj)")
    allowed = patch_target_modules(model, finetuning_args, "all")
    # what LoRA itself can wrap: a training projector trains in full instead
    others = [t for t in allowed if not (projector_trains and has_prefix(t, [entry.projector_key]))]
    for name in names:
        if name != "all" and not any(names_module(n, name) for n in allowed):
            raise ConfigError(_unmatched(name, model, others, entry, forbidden))
    targets = patch_target_modules(model, finetuning_args, names)
    in_projector = [t for t in targets if projector_trains and has_prefix(t, [entry.projector_key])]
    targets = [t for t in targets if t not in in_projector]
    if targets:
        return targets, modules_to_save
    if projector_trains and "all" in names and not others:
        logger.warning("lora: the freeze_* switches leave LoRA nothing to wrap (vision tower and language model "
                       "frozen): the projector trains alone, in full, and the run saves a whole model, not an "
                       "adapter (train_mm_proj_only: true says so explicitly)")
        return [], modules_to_save
    if in_projector:
        raise ConfigError(f"lora_target: {finetuning_args.lora_target} names only layers of the multi-modal projector, "
                          f"which trains in full (freeze_multi_modal_projector: false), so LoRA would wrap nothing "
                          f"and the run would save a whole model: name layers of the parts LoRA can wrap too "
                          f"({', '.join(_short_names(others)[:24]) or 'none'}), or set train_mm_proj_only: true to "
                          f"train the projector alone")
    switches = ", ".join(f"{switch}: {str(bool(getattr(finetuning_args, switch))).lower()}"
                         for _, switch in _PARTS.values())
    raise ConfigError(f"lora_target: {finetuning_args.lora_target} leaves LoRA nothing to wrap and nothing else "
                      f"trains ({switches}): unfreeze a part, e.g. freeze_language_model: false")


def _init_lora(model: nn.Module, model_args: Any, finetuning_args: Any) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    model.requires_grad_(False)
    if model_args.adapter_name_or_path:
        model = PeftModel.from_pretrained(model, model_args.adapter_name_or_path, is_trainable=True)
    else:
        targets, modules_to_save = lora_plan(model, finetuning_args)
        if not targets:  # the settings ask for the projector alone (see lora_plan)
            for name, param in model.named_parameters():
                param.requires_grad_(has_prefix(name, modules_to_save or []))
            return model
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
