"""The sync-free forward lever (``sync_free_forward``): what the model would derive from GPU
tensors, with a host sync each time, is derived in the collator from the CPU batch instead.

Each host sync stops the host until the GPU has caught up, so the host can never queue the next
step's forward while the GPU runs this step's backward. What moves to the collator:

- **Vision tower inputs** (rotary positions, ``cu_seqlens``, ``max_seqlen``, window indices,
  ...): the family declares them (``SpeedCapabilities.tower_inputs``, which calls transformers'
  own ``vision_utils`` functions on the CPU grid); each of those functions takes a precomputed
  value from the tower's keyword arguments instead of computing it. A forward pre-hook on the
  tower hands them in.
- **The grid on the host**: where the family declares ``grid_on_host``, the tower gets the
  grid's CPU copy and, where the collator built the text positions, so does the module that
  merges the media (``get_image_features``' per-image split sizes then cost nothing).
- **The merge of media features into the text**: the model's own merge checks the placeholder
  count against the features on the GPU (a host sync) and scatters them with ``masked_scatter``
  (whose backward reads the mask's count back where the features train). Where the collator
  built the text positions and checked the counts, a forward pre-hook on that module (e.g.
  ``Qwen2VLModel``) builds its ``inputs_embeds`` through its public methods
  (``get_input_embeddings``, ``get_image_features`` / ``get_video_features``) and puts the
  features at the collator's placeholder positions with ``index_copy`` (its backward an
  ``index_select``); the module then gets ``inputs_embeds`` and no pixels. Deepstack features (Qwen3-VL) reach the language model
  as its ``visual_pos_masks`` / ``deepstack_visual_embeds`` arguments, built from the same
  positions.
- **Attention mask**: a batch without padding passes no mask to that module, as transformers
  itself does once it has tested the mask on the GPU.
- **Loss rows**: the labelled positions (after the shift) go to the fused cross-entropy.
- **Media features that train, without collator positions** (the model merges them itself):
  a forward hook on the tower hands the merge detached features, and a pre-hook on the
  language model adds ``scatter(live - live.detach())`` at the placeholder positions (from the
  model's own mask on the CPU ids): the same values, and the same gradients through an
  ``index_select``, instead of ``masked_scatter``'s backward.

The collator's part is :class:`ForwardPrecompute`; it adds two batch entries,
``mmtune_precomputed`` (tensors, moved to the device with the batch) and ``mmtune_host`` (a
:class:`HostSide`, which batch placement leaves on the host). The training forward
(:class:`mmtune.speed.forward.TrainingForward`) takes them out (:meth:`SyncFree.take`) and
serves one model call with them (:meth:`SyncFree.serving`); the hooks do nothing outside it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from mmtune.constants import IGNORE_INDEX
from mmtune.model.composite import get_composite_model
from mmtune.model.layers import unwrap_model

from .fused_loss import next_token_targets
from .result import Applied, Declined

logger = logging.getLogger(__name__)

NAME = "sync-free"
SWITCH = "sync_free_forward"
SUMMARY = "a forward without host syncs (inputs built in the collator)"

PRECOMPUTED_KEY = "mmtune_precomputed"
HOST_KEY = "mmtune_host"
MODALITIES = ("image", "video")
#: batch entries of media the training forward does not merge itself (the model's own path then)
_OTHER_MEDIA = ("input_features", "pixel_values_audios")
#: the language model's arguments for deepstack features (Qwen3-VL)
_DEEPSTACK_ARGS = ("visual_pos_masks", "deepstack_visual_embeds")


class SyncFreeError(RuntimeError):
    """The sync-free forward cannot serve a call as the model ran it (a bug to report, not a
    model the fused loss does not fit)."""


@dataclass
class HostSide:
    """Batch values that stay on the host: accelerate's ``send_to_device``, the Trainer's
    ``_prepare_input`` and the DataLoader's pinning leave an object without ``.to`` as it is."""

    values: dict[str, Any] = field(default_factory=dict)


def without_precomputed(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` without the two entries the collator adds (for the model's own forward)."""
    return {k: v for k, v in inputs.items() if k not in (PRECOMPUTED_KEY, HOST_KEY)}


def _merge_owner(base: nn.Module) -> nn.Module | None:
    """The module that merges media features into the text: it holds the vision tower as
    ``visual`` and has the feature and placeholder-mask methods (e.g. ``Qwen2VLModel``)."""
    for module in base.modules():
        cls = type(module)
        if (callable(getattr(cls, "get_placeholder_mask", None)) and callable(getattr(cls, "get_image_features", None))
                and "visual" in dict(module.named_children())):
            return module
    return None


def _language_model_of(owner: nn.Module) -> nn.Module | None:
    """The text model the owner hands ``inputs_embeds`` to (``language_model``, or Omni's ``model``)."""
    for name in ("language_model", "model"):
        module = getattr(owner, name, None)
        if isinstance(module, nn.Module):
            try:
                if "inputs_embeds" in inspect.signature(module.forward).parameters:
                    return module
            except (TypeError, ValueError):
                continue
    return None


class ForwardPrecompute:
    """The collator's part: called on each CPU batch, adds what the forward would otherwise
    derive on the GPU (see the module's doc). Holds no GPU state: dataloader workers use it
    through the collator."""

    def __init__(self, owner: nn.Module, tower: nn.Module, tower_inputs: Any, grid_on_host: bool, merge: int) -> None:
        self.owner, self.tower, self._tower_inputs = owner, tower, tower_inputs
        self.grid_on_host, self.merge = grid_on_host, merge

    def tower_inputs(self, grid: torch.Tensor) -> dict[str, Any]:
        """What the tower's forward would compute from ``grid`` (CPU), by its keyword name."""
        return {k: v for k, v in self._tower_inputs(self.tower, grid).items() if v is not None}

    def placeholder_positions(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Flat positions of each modality's placeholder tokens, in the order the model fills
        them, by the model's own ``get_placeholder_mask`` on the CPU ids, with one-wide
        stand-ins for the embeddings and features. Its check of tokens against features runs
        here, so the one on the GPU is skipped."""
        features = {}
        for modality in MODALITIES:
            grid = batch.get(f"{modality}_grid_thw")
            if grid is not None:
                features[f"{modality}_features"] = torch.empty((int(grid.prod(-1).sum()) // self.merge**2, 1))
        if not features:
            return {}
        ids = batch["input_ids"]
        try:
            masks = self.owner.get_placeholder_mask(ids, inputs_embeds=torch.empty((*ids.shape, 1)), **features)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"a batch of {ids.shape[0]} samples: its media tokens and media do not match: {err}") from err
        if not (isinstance(masks, tuple) and len(masks) == len(MODALITIES)):
            return {}
        return {modality: mask[..., 0].reshape(-1).nonzero().squeeze(1)
                for modality, mask in zip(MODALITIES, masks) if f"{modality}_features" in features}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add the precomputed entries to a collated CPU batch (in place; returns it)."""
        precomputed: dict[str, Any] = {"positions": self.placeholder_positions(batch)}
        host: dict[str, Any] = {}
        for modality in MODALITIES:
            grid = batch.get(f"{modality}_grid_thw")
            if grid is None:
                continue
            precomputed[modality] = self.tower_inputs(grid)
            if self.grid_on_host:
                host[f"{modality}_grid_thw"] = grid.clone()
        mask = batch.get("attention_mask")
        position_ids = batch.get("position_ids")
        # a 4-row M-RoPE tensor carries text positions that mark packed rows: leave those masks alone
        packed = position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4
        if mask is not None and position_ids is not None and not packed and bool(mask.all()):
            host["drop_attention_mask"] = True
        labels = batch.get("labels")
        if labels is not None:
            targets = next_token_targets(labels)
            precomputed["loss_rows"] = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
            host["labels_shape"] = tuple(labels.shape)
        batch[PRECOMPUTED_KEY] = precomputed
        batch[HOST_KEY] = HostSide(host)
        return batch


@dataclass
class ForwardCall:
    """What one batch brought for one model call (taken out of the batch by :meth:`SyncFree.take`)."""

    #: the tower's keyword inputs by modality
    tower: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the grid tensors the model is given, by their id: which modality a tower call serves
    grids: dict[int, str] = field(default_factory=dict)
    host_grids: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_rows: torch.Tensor | None = None
    labels_shape: tuple[int, ...] | None = None
    #: this call's progress: the modalities whose tower ran, the features held back from the merge
    served: list[str] = field(default_factory=list)
    live: dict[str, torch.Tensor] = field(default_factory=dict)
    #: arguments for the language model's call (deepstack features of the training forward's merge)
    language: dict[str, Any] = field(default_factory=dict)
    drop_attention_mask: bool = False
    merged: bool = False  # the features were merged by index (no hold-back needed)
    owner_served: bool = False

    def rows_for(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The collator's loss rows, when they were built from labels of this shape."""
        if labels is None or self.loss_rows is None or self.labels_shape != tuple(labels.shape):
            return None
        return self.loss_rows


class SyncFree:
    """The lever's state: the collator's :class:`ForwardPrecompute` and the hooks that serve one
    model call at a time (:meth:`serving`) with what the collator built."""

    def __init__(self, precompute: ForwardPrecompute, language_model: nn.Module | None) -> None:
        self.precompute = precompute
        self.owner, self.tower = precompute.owner, precompute.tower
        self.language_model = language_model
        self.deepstack = False
        if language_model is not None:
            try:
                params = inspect.signature(language_model.forward).parameters
            except (TypeError, ValueError):
                params = {}
            self.deepstack = all(name in params for name in _DEEPSTACK_ARGS)
        self.current: ForwardCall | None = None
        self.handles = [self.owner.register_forward_pre_hook(self._owner_pre_hook, with_kwargs=True),
                        self.tower.register_forward_pre_hook(self._tower_pre_hook, with_kwargs=True),
                        self.tower.register_forward_hook(self._tower_hook, with_kwargs=True)]
        if language_model is not None:
            self.handles.append(language_model.register_forward_pre_hook(self._language_pre_hook, with_kwargs=True))

    # ---------------------------------------------------------------- the batch
    def take(self, inputs: dict[str, Any]) -> ForwardCall | None:
        """Take the collator's entries out of ``inputs`` (in place; the rest is left as it is,
        for the model's outer forward); None when the batch has none (a collator without the
        precompute)."""
        precomputed = inputs.pop(PRECOMPUTED_KEY, None)
        host = inputs.pop(HOST_KEY, None)
        if precomputed is None:
            return None
        precomputed = dict(precomputed)
        host_values = dict(host.values) if isinstance(host, HostSide) else {}
        call = ForwardCall(positions=precomputed.pop("positions", None) or {},
                           loss_rows=precomputed.pop("loss_rows", None), labels_shape=host_values.get("labels_shape"),
                           drop_attention_mask=bool(host_values.get("drop_attention_mask")))
        for modality in MODALITIES:
            if modality in precomputed:
                call.tower[modality] = dict(precomputed[modality])
            grid = host_values.get(f"{modality}_grid_thw")
            if grid is not None:
                call.host_grids[modality] = grid
        return call

    @contextlib.contextmanager
    def serving(self, call: ForwardCall) -> Iterator[None]:
        """Serve one model call with ``call``'s inputs (the hooks act only inside). Raises when held-back features never reached the language model (their
        gradients would be lost silently)."""
        call.served, call.live, call.language, call.merged, call.owner_served = [], {}, {}, False, False
        call.grids = {}
        previous, self.current = self.current, call
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self.current = previous
            live, call.live, call.language = call.live, {}, {}
            if live and not failed:
                raise SyncFreeError(f"sync-free forward: {sorted(live)} features never reached the language model, so "
                                   "their gradients were not restored; set sync_free_forward: false")

    def merges(self, inputs: Mapping[str, Any], call: ForwardCall) -> bool:
        """Whether the media are merged by index: the collator checked the placeholder counts
        and built the text positions, and the call has no other media."""
        return (bool(call.positions) and inputs.get("position_ids") is not None and inputs.get("input_ids") is not None
                and inputs.get("inputs_embeds") is None and not any(inputs.get(k) is not None for k in _OTHER_MEDIA))

    def _owner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The merge owner's call (inside the model's forward, so under DDP / FSDP as the rest):
        the host grid where the collator built the positions, no all-ones mask, and the media
        merged by index into ``inputs_embeds`` (see the module's doc)."""
        call = self.current
        if call is None or call.owner_served or args:
            return None
        call.owner_served = True
        kwargs = dict(kwargs)
        if kwargs.get("position_ids") is not None:  # the grid then feeds only the tower and the splits
            for modality, grid in call.host_grids.items():
                if kwargs.get(f"{modality}_grid_thw") is not None:
                    kwargs[f"{modality}_grid_thw"] = grid
        for modality in MODALITIES:
            grid = kwargs.get(f"{modality}_grid_thw")
            if grid is not None:
                call.grids[id(grid)] = modality
        if call.drop_attention_mask and kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = None  # no padding: what transformers does after testing it on the GPU
        if self.merges(kwargs, call):
            kwargs = self._merged(module, kwargs, call)
        return args, kwargs

    def _merged(self, owner: nn.Module, kwargs: dict[str, Any], call: ForwardCall) -> dict[str, Any]:
        """``kwargs`` with ``inputs_embeds`` built through the owner's public methods, the
        features put at the collator's placeholder positions, in place of the ids and pixels."""
        call.merged = True  # the features keep their gradient path: the tower's hook holds nothing back
        ids = kwargs["input_ids"]
        embeds = owner.get_input_embeddings()(ids)
        flat = embeds.reshape(-1, embeds.shape[-1])
        deepstack: dict[str, list[torch.Tensor]] = {}
        for modality, pixels_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            pixels = kwargs.get(pixels_key)
            if pixels is None:
                continue
            if modality not in call.positions:
                raise SyncFreeError(f"sync-free forward: {modality} pixels without their placeholder positions")
            out = getattr(owner, f"get_{modality}_features")(pixels, kwargs.get(f"{modality}_grid_thw"))
            pooled = out.pooler_output
            features = torch.cat(list(pooled)) if isinstance(pooled, (tuple, list)) else pooled
            positions = call.positions[modality].to(flat.device)
            if positions.numel() != features.shape[0]:
                raise SyncFreeError(f"sync-free forward: {features.shape[0]} {modality} features for "
                                    f"{positions.numel()} placeholder positions")
            flat = flat.index_copy(0, positions, features.to(flat.device, flat.dtype))
            layers = getattr(out, "deepstack_features", None)
            if layers:
                deepstack[modality] = [torch.cat(list(x)) if isinstance(x, (tuple, list)) else x for x in layers]
        if deepstack:
            call.language = self._deepstack_arguments(deepstack, call, ids.shape, flat.device)
        return {**kwargs, "inputs_embeds": flat.view_as(embeds), "input_ids": None, "pixel_values": None,
                "pixel_values_videos": None}

    def _deepstack_arguments(self, deepstack: dict[str, list[torch.Tensor]], call: ForwardCall,
                             shape: torch.Size, device: torch.device) -> dict[str, Any]:
        """What the model's own merge hands its language model for deepstack features: the mask
        of all media positions and, per layer, the features in that mask's order."""
        if not self.deepstack:
            raise SyncFreeError("sync-free forward: deepstack features, and a language model that takes no "
                                "visual_pos_masks / deepstack_visual_embeds; set sync_free_forward: false")
        positions = {m: call.positions[m].to(device) for m in deepstack}
        union = torch.cat(list(positions.values())).sort().values
        mask = torch.zeros(shape.numel(), dtype=torch.bool, device=device).index_fill(0, union, True).view(shape)
        if len(deepstack) == 1:
            embeds = next(iter(deepstack.values()))
        else:  # each modality's rows at its positions' ranks among all media positions
            ranks = {m: torch.searchsorted(union, p) for m, p in positions.items()}
            embeds = []
            for layer in zip(*deepstack.values()):
                joint = layer[0].new_zeros(union.numel(), layer[0].shape[-1])
                for modality, features in zip(deepstack, layer):
                    joint = joint.index_copy(0, ranks[modality], features.to(joint.dtype))
                embeds.append(joint)
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": embeds}

    # ---------------------------------------------------------------- the hooks
    def _modality(self, call: ForwardCall, grid: Any) -> str | None:
        modality = call.grids.get(id(grid)) if grid is not None else None
        if modality is None or modality in call.served:  # not the tensor the model was given: the next in order
            modality = next((m for m in MODALITIES if m in call.tower and m not in call.served), None)
        return modality

    def _tower_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        call = self.current
        if call is None:
            return None
        grid = args[1] if len(args) >= 2 else kwargs.get("grid_thw")
        modality = self._modality(call, grid)
        if modality is None or modality not in call.tower:
            return None
        call.served.append(modality)
        kwargs = {**kwargs, **call.tower[modality]}  # the tower's vision_utils calls take them from its kwargs
        host = call.host_grids.get(modality)
        if host is not None:  # the family declares the tower reads its grid only through those inputs
            if len(args) >= 2:
                args = (args[0], host, *args[2:])
            else:
                kwargs["grid_thw"] = host
        return args, kwargs

    def _tower_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Hand the merge detached features and keep the live ones for the language model's
        pre-hook: ``masked_scatter``'s backward to its source runs ``masked_select``, a host sync
        (its output size) late in every backward where the projector or the tower trains."""
        call = self.current
        if call is None or self.language_model is None or not call.served or call.merged:
            return None
        modality = call.served[-1]
        pooled = getattr(output, "pooler_output", None)
        if modality not in call.positions or not torch.is_tensor(pooled) or not pooled.requires_grad:
            return None
        call.live[modality] = pooled
        output.pooler_output = pooled.detach()
        return output

    def _language_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Give back the held-back features' gradient path at the language model's input: add
        ``scatter(live - live.detach())`` at their placeholder positions, which is exactly zero
        in value and whose backward is an ``index_select`` (no host sync), the gradient
        ``masked_scatter`` would have given them."""
        call = self.current
        if call is None or not (call.live or call.language):
            return None
        if call.language:
            kwargs.update(call.language)
            call.language = {}
            if not call.live:
                return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise SyncFreeError("sync-free forward: the language model got no inputs_embeds keyword, so the media "
                               "features' gradients cannot be restored; set sync_free_forward: false")
        flat = embeds.reshape(-1, embeds.shape[-1])
        delta = torch.zeros_like(flat)
        for modality, live in call.live.items():
            positions = call.positions[modality].to(flat.device)
            if positions.numel() != live.shape[0]:
                raise SyncFreeError(f"sync-free forward: {live.shape[0]} {modality} features for "
                                   f"{positions.numel()} placeholder positions")
            live = live.to(flat.dtype)
            delta = delta.index_add(0, positions, live - live.detach())
        call.live = {}
        kwargs["inputs_embeds"] = embeds + delta.view_as(embeds)
        return args, kwargs

    def remove(self) -> None:
        """Take the hooks off (the model is then as before the lever)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


_PROBE_ERRORS = (ImportError, AttributeError, TypeError, ValueError, RuntimeError)


def apply(model: nn.Module, cfg: Any, earlier: Mapping[str, Any] | None = None) -> Applied | Declined:
    """Hook the tower (and the language model's input) of ``model`` for the sync-free forward;
    ``Applied.state`` is the :class:`SyncFree` (its ``precompute`` goes to the collator).

    Declined when switched off, for a family that declares no ``tower_inputs``, a model without
    a vision tower merged through ``get_placeholder_mask``, or a tower whose declared inputs
    fail on a tiny grid (a transformers release without ``vision_utils``). ``earlier`` is not
    read: the loss rows reach the fused loss through the training forward, whatever the order."""
    if not getattr(cfg, SWITCH, False):
        return Declined(f"switched off ({SWITCH}: false)")
    base = unwrap_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", "")
    entry = get_composite_model(model_type)
    caps = entry.speed if entry is not None else None
    if caps is None or caps.tower_inputs is None:
        return Declined(f"{type(base).__name__} ({model_type or 'no model type'}): its family declares no "
                        "precomputable tower inputs")
    owner = _merge_owner(base)
    if owner is None:
        return Declined(f"{type(base).__name__} has no vision tower merged through get_placeholder_mask")
    tower = owner.visual
    merge = getattr(tower, "spatial_merge_size", None)
    if not isinstance(merge, int):
        return Declined(f"{type(tower).__name__} has no integer spatial_merge_size")
    precompute = ForwardPrecompute(owner, tower, caps.tower_inputs, caps.grid_on_host, merge)
    try:  # one tiny grid through the declared inputs: refuse now what would fail in a worker later
        names = sorted(precompute.tower_inputs(torch.tensor([[1, 2 * merge, 2 * merge]])))
    except _PROBE_ERRORS as err:
        return Declined(f"{type(tower).__name__}'s inputs cannot be built on the host: {type(err).__name__}: {err}")
    state = SyncFree(precompute, _language_model_of(owner))
    logger.info("sync-free forward on: %s inputs (%s) built in the collator%s", type(tower).__name__,
                ", ".join(names), "; the grid stays on the host" if precompute.grid_on_host else "")
    return Applied(detail=True, state=state)
