"""The one definition of a model's repeated blocks: the transformers model under a peft wrapper,
the language model's decoder layers, and every list of repeated blocks (decoder layers, vision
blocks). Speed levers, LoRA targeting and the sync-free forward all read them from here, so
"which modules are the layers" has one answer."""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from .composite import get_composite_model, has_prefix

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layer_names(model: nn.Module, language_keys: list[str]) -> list[str]:
    """Names of the language model's repeated blocks: the longest ModuleList under
    ``language_keys`` (anywhere when none are given), in order."""
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (not language_keys or has_prefix(name, language_keys)):
            if len(module) > len(best):
                best = [f"{name}.{i}" for i in range(len(module))]
    return best


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers, first to last (peft wrappers looked through)."""
    base = unwrap_model(model)
    entry = get_composite_model(getattr(base.config, "model_type", ""))
    keys = [k for k in (entry.language_model_keys if entry else []) if k != "lm_head"]
    return [base.get_submodule(name) for name in decoder_layer_names(base, keys)]


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The members of every ModuleList of two or more blocks with parameters (decoder layers,
    vision blocks), outermost lists only, named as in the unwrapped model."""
    found: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, module in unwrap_model(model).named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and all(
                any(True for _ in child.parameters()) for child in module):
            found.extend((f"{name}.{i}", child) for i, child in enumerate(module))
            taken.append(name)
    return found


def tower_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The family's vision/audio tower modules (``vision_model_keys``) present in ``model``."""
    base = unwrap_model(model)
    entry = get_composite_model(getattr(getattr(base, "config", None), "model_type", ""))
    found = []
    for key in (entry.vision_model_keys if entry else []):
        try:
            found.append((key, base.get_submodule(key)))
        except AttributeError:
            continue
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module) -> Any:
    """Put ``new`` where ``name`` is in ``root`` (a submodule swap, as peft installs its layers);
    returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = parent.get_submodule(child)
    setattr(parent, child, new)
    return old


def enable_gradient_checkpointing(model: Any) -> None:
    """Checkpointing that still back-propagates when the first modules are frozen: the input
    embeddings' output is made to require grad, so recomputed blocks have a graph to join."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    logger.info("gradient checkpointing on (non-reentrant)")
