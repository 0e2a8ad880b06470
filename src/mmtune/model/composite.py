"""Composite VLMs: which modules are the vision tower, the projector and the language model.

Each family file registers a :class:`CompositeModel` per transformers ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class CompositeModel:
    """Module-name prefixes of one VLM architecture (as in ``model.named_modules()``)."""

    model_type: str
    projector_key: str
    vision_model_keys: list[str] = field(default_factory=list)
    language_model_keys: list[str] = field(default_factory=list)
    lora_conflict_keys: list[str] = field(default_factory=list)

    def get_projector(self, module: nn.Module) -> nn.Module:
        """The projector submodule of ``module`` (a PEFT wrapper is looked through)."""
        for prefix in ("", "base_model.model."):
            try:
                return module.get_submodule(prefix + self.projector_key)
            except AttributeError:
                continue
        raise ValueError(f"{self.model_type}: no module {self.projector_key!r} in {type(module).__name__}")


COMPOSITE_MODELS: dict[str, CompositeModel] = {}


def register_composite_model(entry: CompositeModel) -> CompositeModel:
    """Register ``entry`` under its model_type (idempotent for an equal entry)."""
    old = COMPOSITE_MODELS.get(entry.model_type)
    if old is not None and old != entry:
        raise ValueError(f"composite model {entry.model_type!r} is already registered differently")
    COMPOSITE_MODELS[entry.model_type] = entry
    return entry


def get_composite_model(model_type: str) -> CompositeModel | None:
    """The entry for ``model_type``, loading the families on a miss; ``None`` if unknown."""
    if model_type not in COMPOSITE_MODELS:
        from mmtune.families import load_families

        load_families()
    return COMPOSITE_MODELS.get(model_type)
