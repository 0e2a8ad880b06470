"""Composite VLMs: which modules are the vision tower, the projector and the language model.

Each family file registers a :class:`CompositeModel` per transformers ``model_type``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch.nn as nn

from mmtune.speed.capabilities import NONE as NO_SPEED_CAPABILITIES
from mmtune.speed.capabilities import SpeedCapabilities

#: the packing layouts a family may declare (see ``CompositeModel.packing``)
PackingLayout = Literal["mrope", "causal"]


@dataclass(frozen=True)
class CompositeModel:
    """Module-name prefixes of one VLM architecture (as in ``model.named_modules()``)."""

    model_type: str
    projector_key: str
    vision_model_keys: list[str] = field(default_factory=list)
    language_model_keys: list[str] = field(default_factory=list)
    lora_conflict_keys: list[str] = field(default_factory=list)
    # the transformers class (a name in the ``transformers`` namespace) that builds this model
    # type, for one its Auto classes do not reach (an audio model behind no image-text Auto
    # class); None: the loader's choice, AutoModelForImageTextToText where transformers maps the
    # type there, else AutoModelForCausalLM
    model_class: str | None = None
    # how samples of this model type pack into one row exactly (mmtune.data.packing):
    # "mrope": M-RoPE text model reading packed text positions from row 0 of 4-row position
    # ids; "causal": a plain causal language model behind a per-image tower (2D position ids);
    # None: not checked to pack exactly, so packing stays off
    packing: PackingLayout | None = None
    # why packed rows are known not to be exact for this type (shown when packing is asked for);
    # None: the generic reason (not checked)
    no_packing: str | None = None
    # the chat template a model of this type speaks when nothing else names one (no
    # ``template`` in the training config, no mmtune_config.json beside the weights, no
    # ``--template``); None: there is no safe default and the user must name one
    template: str | None = None
    # what the speed levers may assume about this architecture (mmtune.speed.capabilities)
    speed: SpeedCapabilities = NO_SPEED_CAPABILITIES
    # (sub-config key, attention implementation) for parts that run only that one, whatever the
    # rest of the model is asked to use (Gemma 4's audio tower has no sdpa: ("audio_config", "eager"))
    fixed_attention: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.packing is not None and self.packing not in get_args(PackingLayout):
            raise ValueError(f"{self.model_type}: packing {self.packing!r} is none of {get_args(PackingLayout)}")

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
    """The entry for ``model_type``; ``None`` if unknown (the table is complete once ``mmtune``
    is imported: every family registers itself then)."""
    return COMPOSITE_MODELS.get(model_type)


def packing_layout(model_type: str) -> PackingLayout | None:
    """The packing layout the family of ``model_type`` declares; None for an unknown type or a
    family that declares none."""
    entry = COMPOSITE_MODELS.get(model_type)
    return entry.packing if entry is not None else None


def no_packing_reason(model_type: str) -> str | None:
    """The reason the family of ``model_type`` gives for not packing, or None."""
    entry = COMPOSITE_MODELS.get(model_type)
    return entry.no_packing if entry is not None else None


def packable_model_types() -> frozenset[str]:
    """The model types whose families declare a packing layout."""
    return frozenset(t for t, entry in COMPOSITE_MODELS.items() if entry.packing is not None)


def attention_implementation(config: Any, requested: str) -> str | dict[str, str]:
    """``requested`` for the whole model, or, where the family fixes some parts'
    implementation (``CompositeModel.fixed_attention``), the per-sub-config mapping transformers
    takes (``""``: the top-level config) with those parts fixed."""
    entry = get_composite_model(getattr(config, "model_type", ""))
    if entry is None or not entry.fixed_attention or not isinstance(requested, str):
        return requested
    parts = {key: requested for key in getattr(config, "sub_configs", {}) if getattr(config, key, None) is not None}
    fixed = {key: impl for key, impl in entry.fixed_attention if key in parts}
    return {"": requested, **parts, **fixed} if fixed else requested


def declared_template(model_type: str) -> str | None:
    """The chat template the family of ``model_type`` declares as its default, or None
    (an unknown model type, or a family with no single template for it)."""
    entry = get_composite_model(model_type)
    return entry.template if entry is not None else None


# ---------------------------------------------------------------- what trains
PEFT_PREFIX = "base_model.model."


def _strip_peft(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def has_prefix(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or lies under one (module-path semantics, not substring)."""
    name = _strip_peft(name)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def get_forbidden_modules(config: Any, finetuning_args: Any) -> set[str]:
    """Module prefixes that must not train (nor carry LoRA) under the flags.

    ``train_mm_proj_only`` trains the projector alone; otherwise each ``freeze_*`` flag
    forbids its component. Unknown model types forbid nothing (plain LMs).
    """
    entry = get_composite_model(getattr(config, "model_type", ""))
    if entry is None:
        return set()
    forbidden: set[str] = set()
    if finetuning_args.train_mm_proj_only:
        return set(entry.vision_model_keys) | set(entry.language_model_keys)
    if finetuning_args.freeze_vision_tower:
        forbidden.update(entry.vision_model_keys)
    if finetuning_args.freeze_multi_modal_projector:
        forbidden.add(entry.projector_key)
    if finetuning_args.freeze_language_model:
        forbidden.update(entry.language_model_keys)
    return forbidden


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def patch_target_modules(model: nn.Module, finetuning_args: Any, target_modules: Sequence[str] | str) -> list[str]:
    """Fully qualified names of the linear modules LoRA may wrap.

    ``target_modules`` is ``"all"`` (every linear of the trainable parts except the output
    head) or names that end a module's path, as peft matches them (``q_proj``,
    ``self_attn.q_proj``); forbidden components and the family's LoRA-conflict modules (e.g.
    a conv patch embedding) are never returned.
    """
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    config = getattr(model, "config", None)
    entry = get_composite_model(getattr(config, "model_type", "")) if config is not None else None
    forbidden = get_forbidden_modules(config, finetuning_args) if config is not None else set()
    conflicts = list(entry.lora_conflict_keys) if entry else []
    output_names = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    use_all = any(t == "all" for t in target_modules)
    names = []
    for name, module in model.named_modules():
        if not name or not _is_linear(module):
            continue
        if head is not None and module is head:
            output_names.add(name)
            continue
        if has_prefix(name, forbidden) or any(c in name.split(".") or name.endswith(c) or f".{c}." in f".{name}." for c in conflicts):
            continue
        if use_all or any(names_module(name, t) for t in target_modules):
            names.append(name)
    return names


def names_module(name: str, target: str) -> bool:
    """Whether the ``lora_target`` entry ``target`` names the module at path ``name``: the whole
    path or its end at a dot (``q_proj`` and ``self_attn.q_proj`` name ``...self_attn.q_proj``)."""
    return name == target or name.endswith("." + target)


def autocast_projector_dtype(model: nn.Module, model_args: Any) -> Any:
    """Cast the projector's output to the compute dtype (quantised towers emit fp32/fp16 that
    would otherwise meet bf16 embeddings). Returns the hook handle, or None when not needed."""
    if getattr(model_args, "quantization_bit", None) is None:
        return None
    entry = get_composite_model(getattr(model.config, "model_type", ""))
    if entry is None:
        return None
    dtype = model_args.compute_dtype(getattr(model.config, "dtype", None))

    def _cast(module: nn.Module, args: tuple, output: Any) -> Any:
        return output.to(dtype) if hasattr(output, "to") else output

    return entry.get_projector(model).register_forward_hook(_cast)


def configure_visual_model(config: Any) -> Any:
    """Config patches needed before a VLM is instantiated: a composite config exposes the
    ``hidden_size`` of its text model (DeepSpeed and the trainer read ``config.hidden_size``).
    A Yi-VL checkpoint (``is_yi_vl_derived_model``) needs nothing here: the loader builds it
    inside :func:`mmtune.compat.yi_vl_projector`, which gives it
    :class:`mmtune.compat.LlavaMultiModalProjectorForYiVL`."""
    text = getattr(config, "text_config", None)
    if text is not None and getattr(config, "hidden_size", None) is None and getattr(text, "hidden_size", None):
        try:
            config.hidden_size = text.hidden_size
        except AttributeError:  # some configs expose hidden_size as a read-only property
            pass
    return config
