"""Upstream mends: where a transformers release needs help to build or run a family, the help
is a named function here, applied by the loader through :func:`apply_mends` (or, for a change
to what is built, :func:`yi_vl_projector` around the build).

Each mend

* says which model types and which transformers releases it is for (a version range, never a
  look at transformers' source text), and does nothing anywhere else;
* attaches through a documented seam (a forward hook on the model it is given, a scoped class
  choice while building), never by rebinding a method of a class or an instance;
* is idempotent (a second application to the same model changes nothing) and says in one
  info line that it was applied.

Reading a mend tells which release it is for, so it can go once the tested range
(:data:`mmtune.versions.TESTED_RANGES`) no longer holds that release.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

logger = logging.getLogger(__name__)


def transformers_version() -> str:
    """The installed transformers release (the version mends are judged against)."""
    import transformers

    return str(transformers.__version__)


@dataclass(frozen=True)
class Mend:
    """One upstream mend: ``apply(model)`` attaches it to a built model of one of
    ``model_types`` when the installed transformers lies in ``versions`` (PEP 440 specifiers);
    ``reason`` (what upstream gets wrong) goes into the line that says it was applied."""

    name: str
    model_types: tuple[str, ...]
    versions: str
    apply: Callable[[nn.Module], bool]
    reason: str

    def needed(self, model_type: str, version: str | None = None) -> bool:
        """Whether this mend is for ``model_type`` under transformers ``version`` (default: the
        installed one)."""
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        if model_type not in self.model_types:
            return False
        return SpecifierSet(self.versions).contains(Version(version or transformers_version()), prereleases=True)


# ---------------------------------------------------------------- Llama 4: image_outputs
_LLAMA4_MENDED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _give_image_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the language model's output gets an empty ``image_outputs`` when it has none."""
    if not isinstance(output, tuple) and not hasattr(output, "image_outputs"):
        output.image_outputs = None
    return output


def mend_llama4_image_outputs(model: nn.Module) -> bool:
    """transformers 5.24's ``Llama4ForConditionalGeneration.forward`` ends by reading
    ``outputs.image_outputs`` from its language model's output, a ``MoeCausalLMOutputWithPast``
    that has no such field, so every forward raises ``AttributeError``. A forward hook on each
    ``Llama4ForCausalLM`` inside ``model`` gives that output the attribute (``None``: the
    result's ``image_outputs`` stays empty; logits and loss are untouched). Returns whether it
    attached a hook (False: nothing to mend in ``model``, or already mended)."""
    from transformers.models.llama4 import modeling_llama4

    attached = False
    for module in model.modules():
        if isinstance(module, modeling_llama4.Llama4ForCausalLM) and module not in _LLAMA4_MENDED:
            module.register_forward_hook(_give_image_outputs)
            _LLAMA4_MENDED.add(module)
            attached = True
    return attached


#: every mend, in the order they apply
MENDS: tuple[Mend, ...] = (
    Mend(name="llama4_image_outputs", model_types=("llama4",), versions=">=5.24,<5.25",
         apply=mend_llama4_image_outputs,
         reason="Llama4ForConditionalGeneration reads image_outputs its language model does not return"),
)


def apply_mends(model_type: str, model: nn.Module, version: str | None = None) -> list[str]:
    """Apply to ``model`` (a built model of ``model_type``) the mends the installed transformers
    (or ``version``) needs; returns the names of those applied now (an already mended model
    gives none, and no log line)."""
    applied = []
    for mend in MENDS:
        if mend.needed(model_type, version) and mend.apply(model):
            logger.info("transformers %s: mend %s applied to %s (%s)", version or transformers_version(), mend.name,
                        model_type, mend.reason)
            applied.append(mend.name)
    return applied


# ---------------------------------------------------------------- Yi-VL's projector
class LlavaMultiModalProjectorForYiVL(nn.Module):
    """Yi-VL's projector: Linear -> LayerNorm -> GELU -> Linear -> LayerNorm (module names as
    in Yi-VL checkpoints converted to transformers' llava layout)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision, text, bias=True)
        self.linear_2 = nn.LayerNorm(text, bias=True)
        self.linear_3 = nn.Linear(text, text, bias=True)
        self.linear_4 = nn.LayerNorm(text, bias=True)
        self.act = nn.GELU()

    def forward(self, image_features: Any) -> Any:
        hidden = self.linear_2(self.linear_1(image_features))
        return self.linear_4(self.linear_3(self.act(hidden)))


def is_yi_vl(config: Any) -> bool:
    """A llava config converted from Yi-VL (its checkpoints mark themselves
    ``is_yi_vl_derived_model``)."""
    return bool(getattr(config, "is_yi_vl_derived_model", False))


@contextlib.contextmanager
def yi_vl_projector(config: Any) -> Iterator[None]:
    """While a model of ``config`` is built: for a Yi-VL config, transformers' llava projector
    class is :class:`LlavaMultiModalProjectorForYiVL` (the llava model builds its projector
    by that module-level name, and no constructor argument chooses it); the original is
    restored on leaving, error or not, so nothing built afterwards sees Yi-VL's. Any other
    config: nothing changes."""
    if not is_yi_vl(config):
        yield
        return
    from transformers.models.llava import modeling_llava

    original = modeling_llava.LlavaMultiModalProjector
    modeling_llava.LlavaMultiModalProjector = LlavaMultiModalProjectorForYiVL  # type: ignore[misc]
    logger.info("Yi-VL checkpoint: its projector (Linear, LayerNorm, GELU, Linear, LayerNorm) is built in place of "
                "llava's")
    try:
        yield
    finally:
        modeling_llava.LlavaMultiModalProjector = original  # type: ignore[misc]
