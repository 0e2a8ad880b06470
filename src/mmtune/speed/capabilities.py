"""What a model family declares about itself for the speed levers (a leaf module: it imports
nothing of mmtune, so family files and levers can both import it).

A lever reads these declarations instead of inspecting transformers' code: a family that
declares nothing gets no lever that needs a declaration, and the lever says so in one line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpeedCapabilities:
    """A family's declarations for the speed levers (one per ``CompositeModel``).

    - ``fusable_head``: the model's training loss is transformers' causal-LM loss on its LM
      head's output (a plain ``nn.Linear``, optionally with the config's logit scale and final
      soft-cap), so the fused linear cross-entropy computes the same loss without full logits.
    - ``varlen_attention_classes``: class names of the tower modules (under the family's
      ``vision_model_keys``) whose forward hands ``cu_seqlens`` to transformers' attention
      function, so one varlen kernel can attend over all images of a batch at once.
    - ``tower_inputs``: ``fn(tower, grid_thw_cpu) -> dict`` of the keyword tensors the vision
      tower would otherwise derive from its grid on the device (rotary positions, ``cu_seqlens``,
      ...), computed on the host in the collator; None: the tower's inputs are not precomputed.
    - ``grid_on_host``: the tower uses its grid only through ``tower_inputs``, so the model may
      get the grid's host copy (its per-image split sizes then cost no device sync).
    """

    fusable_head: bool = False
    varlen_attention_classes: tuple[str, ...] = ()
    tower_inputs: Callable[[Any, Any], dict[str, Any]] | None = None
    grid_on_host: bool = False


NONE = SpeedCapabilities()
