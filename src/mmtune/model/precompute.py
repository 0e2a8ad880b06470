"""A forward without host syncs: what the model would derive from GPU tensors, with a host
sync each time, is derived in the collator from the CPU batch instead (``sync_free_forward``).

A Qwen2-VL LoRA step on the GPU made 12 host syncs (``torch.cuda.set_sync_debug_mode``, H200):
the vision tower's rotary positions (a ``tolist``), its ``cu_seqlens`` (``repeat_interleave``
with tensor repeats) and ``max_seqlen`` (``.item()``), the split of its output per image (a
``tolist``), the placeholder-count check, the all-ones attention mask test, the fused loss's
labelled rows (``nonzero``), and one of torch's own; with this lever, that one is left. Each
stops the host until the GPU has caught up, so the host can never queue the next step's
forward while the GPU runs this step's backward.

- **Vision tower inputs.** transformers' vision towers build these through the functions of
  ``transformers.vision_utils`` (and ``get_max_seqlen``), each of which returns a tensor the
  caller passes in ``kwargs`` instead of computing it. :class:`ForwardPrecompute` reads the
  tower's ``forward`` (its syntax tree, never executing it), finds those calls, and runs the
  very same functions on the CPU grid in the collator (with the tower's own attributes as
  arguments); the keys each function would take from ``kwargs`` are learnt by asking it.
- **The grid on the host.** Where the tower's forward uses ``grid_thw`` only in those calls,
  the model gets the CPU copy of the grid, so ``get_image_features``' split sizes cost
  nothing.
- **Placeholder counts** are checked in the collator (tokens against features, per modality);
  the model's own check, a host sync, is skipped.
- **Attention mask**: a batch without padding passes no mask, as transformers itself does
  once it has tested the mask on the GPU.
- **Loss rows**: the labelled positions (after the shift) go to the fused cross-entropy.
- **Media features that train** (a trained projector or tower): ``masked_scatter``'s backward
  reads its mask's count back (``masked_select``). The merge gets them detached, and the
  language model's input gets ``scatter(live - live.detach())`` at the placeholder positions
  (from the model's own mask on the CPU ids): the same values, and the same gradients through
  an ``index_select``.

Everything reaches the model through two batch entries that its forward wrapper takes out
before transformers sees them: ``mmtune_precomputed`` (tensors, moved to the device with the batch)
and ``mmtune_host`` (a :class:`HostSide`, which batch placement leaves on the host). The
forward is wrapped as an instance attribute, as the fused cross-entropy's is: peft's tuner
calls ``model.forward`` itself, so a forward hook would miss it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from mmtune.constants import IGNORE_INDEX

from .speed import next_token_targets, unwrap_model  # speed imports this module only inside a function

logger = logging.getLogger(__name__)

PRECOMPUTED_KEY = "mmtune_precomputed"
HOST_KEY = "mmtune_host"
MODALITIES = ("image", "video")


@dataclass
class HostSide:
    """Batch values that stay on the host: accelerate's ``send_to_device``, the Trainer's
    ``_prepare_input`` and the DataLoader's pinning leave an object without ``.to`` as it is."""

    values: dict[str, Any] = field(default_factory=dict)


class _AskedKeys(dict):
    """A ``kwargs`` stand-in that records which keys a ``vision_utils`` function pops from it
    (none is there, so the function computes)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def pop(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.asked.append(key)
        return default


@dataclass
class _Call:
    """One ``name(s) = fn(..., kwargs=kwargs)`` statement of a tower's forward."""

    targets: list[str]
    func: Any
    args: list[ast.expr]
    keywords: dict[str, ast.expr]


class _Unsupported(Exception):
    pass


def _forward_tree(cls: type) -> ast.FunctionDef | None:
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, ast.FunctionDef) else None


def _is_kwargs_passthrough(call: ast.Call) -> bool:
    return any(k.arg == "kwargs" and isinstance(k.value, ast.Name) and k.value.id == "kwargs" for k in call.keywords)


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple) and all(isinstance(e, ast.Name) for e in target.elts):
        return [e.id for e in target.elts]  # type: ignore[union-attr]
    raise _Unsupported("assignment to something other than names")


def _tower_calls(tower: nn.Module) -> tuple[list[_Call], bool] | None:
    """The precomputable calls of ``tower.forward`` and whether ``grid_thw`` is used only in
    them; None when the forward has none or one mmtune cannot evaluate."""
    tree = _forward_tree(type(tower))
    if tree is None or "grid_thw" not in [a.arg for a in tree.args.args]:
        return None
    module = inspect.getmodule(type(tower))
    calls: list[_Call] = []
    inside: set[int] = set()
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) and _is_kwargs_passthrough(stmt.value)):
            continue
        call = stmt.value
        if not isinstance(call.func, ast.Name):
            return None
        func = getattr(module, call.func.id, None)
        home = getattr(func, "__module__", "") or ""
        if not (home.startswith("transformers.") and (home.endswith("vision_utils") or call.func.id == "get_max_seqlen")):
            return None  # a kwargs-taking call mmtune does not know
        try:
            targets = [n for t in stmt.targets for n in _target_names(t)]
        except _Unsupported:
            return None
        calls.append(_Call(targets, func, list(call.args),
                           {k.arg: k.value for k in call.keywords if k.arg and k.arg != "kwargs"}))
        inside.update(id(n) for n in ast.walk(call))
    if not calls:
        return None
    grid_uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "grid_thw"]
    grid_only_in_calls = all(id(n) in inside for n in grid_uses)
    return calls, grid_only_in_calls


def _evaluate(node: ast.expr, scope: dict[str, Any], tower: nn.Module) -> Any:
    """The value of an argument: a constant, a name from ``scope``, or an attribute chain on
    ``self`` (the tower). Anything else is refused."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id == "self":
            return tower
        if node.id in scope:
            return scope[node.id]
        raise _Unsupported(f"name {node.id}")
    if isinstance(node, ast.Attribute):
        return getattr(_evaluate(node.value, scope, tower), node.attr)
    raise _Unsupported(ast.dump(node))


def _run_calls(tower: nn.Module, calls: list[_Call], grid: torch.Tensor) -> dict[str, Any]:
    """Run ``calls`` on the CPU ``grid``; returns {the kwargs key each value replaces: value}."""
    scope: dict[str, Any] = {"grid_thw": grid}
    out: dict[str, Any] = {}
    for call in calls:
        asked = _AskedKeys()
        args = [_evaluate(a, scope, tower) for a in call.args]
        kwargs = {k: _evaluate(v, scope, tower) for k, v in call.keywords.items()}
        value = call.func(*args, **kwargs, kwargs=asked)
        values = list(value) if len(call.targets) > 1 else [value]
        if len(values) != len(call.targets) or len(asked.asked) != len(values):
            raise _Unsupported(f"{call.func.__name__} asks for {asked.asked} and returns {len(values)} values")
        scope.update(zip(call.targets, values))
        out.update(zip(asked.asked, values))
    return out


def _owner_of_merge(base: nn.Module) -> nn.Module | None:
    """The module whose forward merges media features into the text (calls
    ``self.get_placeholder_mask(``), e.g. ``Qwen2VLModel``."""
    for module in base.modules():
        cls = type(module)
        if not (callable(getattr(cls, "get_placeholder_mask", None)) and callable(getattr(cls, "get_image_features", None))):
            continue
        tree = _forward_tree(cls)
        if tree is not None and "self.get_placeholder_mask(" in ast.unparse(tree):
            return module
    return None


class ForwardPrecompute:
    """Built from a model; called by the collator on each CPU batch (see the module's doc).
    Holds no GPU state: dataloader workers use it through the collator."""

    def __init__(self, owner: nn.Module, tower: nn.Module, calls: list[_Call], grid_on_host: bool, merge: int) -> None:
        self.owner, self.tower, self.calls, self.grid_on_host, self.merge = owner, tower, calls, grid_on_host, merge

    @classmethod
    def from_model(cls, model: nn.Module) -> ForwardPrecompute | None:
        base = unwrap_model(model)
        owner = _owner_of_merge(base)
        tower = getattr(owner, "visual", None) if owner is not None else None
        if owner is None or not isinstance(tower, nn.Module):
            return None
        found = _tower_calls(tower)
        if found is None:
            return None
        calls, grid_on_host = found
        merge = getattr(tower, "spatial_merge_size", None)
        if not isinstance(merge, int):
            return None
        self = cls(owner, tower, calls, grid_on_host, merge)
        try:  # one tiny grid through the calls: refuse now what would fail in a worker later
            self.tower_inputs(torch.tensor([[1, 2 * merge, 2 * merge]]))
        except (_Unsupported, AttributeError, TypeError, ValueError) as err:
            logger.info("sync-free forward not applied: %s's forward: %s", type(tower).__name__, err)
            return None
        return self

    def tower_inputs(self, grid: torch.Tensor) -> dict[str, Any]:
        """What the tower's forward would compute from ``grid`` (CPU), by kwargs key."""
        return _run_calls(self.tower, self.calls, grid)

    def placeholder_positions(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Flat positions of each modality's placeholder tokens, in the order the model fills
        them, by the model's own ``get_placeholder_mask`` (its class method, not the wrapper)
        on the CPU ids, with one-wide stand-ins for the embeddings and features. Its check of
        tokens against features runs here, so the one on the GPU is skipped."""
        features = {}
        for modality in MODALITIES:
            grid = batch.get(f"{modality}_grid_thw")
            if grid is not None:
                features[f"{modality}_features"] = torch.empty((int(grid.prod(-1).sum()) // self.merge**2, 1))
        if not features:
            return {}
        ids = batch["input_ids"]
        try:
            masks = type(self.owner).get_placeholder_mask(self.owner, ids, inputs_embeds=torch.empty((*ids.shape, 1)),
                                                          **features)
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
class _ForwardState:
    """What the model's forward wrapper took out of one call's kwargs, for the wrapped methods."""

    precomputed: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    depth: int = 0  # feature methods calling each other (Qwen3-VL's video through its image one)
    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    #: features that need a gradient, by modality, held back from the merge (see _install_index_merge)
    live: dict[str, torch.Tensor] = field(default_factory=dict)
    merges_by_index: bool = False  # the language model's pre-hook is installed


def _wrap_features(owner: nn.Module, modality: str, state: _ForwardState) -> None:
    name = f"get_{modality}_features"
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def features(*args: Any, **kwargs: Any) -> Any:
        extra = state.precomputed.get(modality) if state.depth == 0 else None
        if extra:
            kwargs = {**kwargs, **extra}  # unprefixed: the tower's vision_utils calls pop them
            grid = state.host.get(f"{modality}_grid_thw")
            if grid is not None:  # (pixel_values, grid, ...) by position, or the grid by its name
                if len(args) >= 2:
                    args = (args[0], grid, *args[2:])
                else:
                    kwargs[f"{modality}_grid_thw"] = grid
        state.depth += 1
        try:
            out = original(*args, **kwargs)
        finally:
            state.depth -= 1
        if extra and state.merges_by_index and modality in state.positions:
            _hold_back_gradient(out, modality, state)
        return out

    setattr(owner, name, features)


def _hold_back_gradient(out: Any, modality: str, state: _ForwardState) -> None:
    """Hand the merge detached features and keep the live ones for the language model's
    pre-hook: ``masked_scatter``'s backward to its source runs ``masked_select``, a host sync
    (its output size) late in every backward where the projector or the tower trains."""
    pooled = getattr(out, "pooler_output", None)
    parts = list(pooled) if isinstance(pooled, (tuple, list)) else [pooled]
    if not parts or not all(torch.is_tensor(p) for p in parts) or not any(p.requires_grad for p in parts):
        return
    state.live[modality] = torch.cat(parts) if len(parts) > 1 else parts[0]
    detached = [p.detach() for p in parts]
    out.pooler_output = type(pooled)(detached) if isinstance(pooled, (tuple, list)) else detached[0]


def _install_index_merge(language_model: nn.Module, state: _ForwardState) -> None:
    """Give back the held-back features' gradient path at the language model's input: add
    ``scatter(live - live.detach())`` at their placeholder positions, which is exactly zero in
    value and whose backward is an ``index_select`` (no host sync), the gradient
    ``masked_scatter`` would have given them."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not state.live:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("sync-free forward: the language model got no inputs_embeds keyword, so the media "
                               "features' gradients cannot be restored; set sync_free_forward: false")
        flat = embeds.reshape(-1, embeds.shape[-1])
        delta = torch.zeros_like(flat)
        for modality, live in state.live.items():
            positions = state.positions[modality].to(flat.device)
            if positions.numel() != live.shape[0]:
                raise RuntimeError(f"sync-free forward: {live.shape[0]} {modality} features for "
                                   f"{positions.numel()} placeholder positions")
            live = live.to(flat.dtype)
            delta = delta.index_add(0, positions, live - live.detach())
        state.live = {}
        kwargs["inputs_embeds"] = embeds + delta.view_as(embeds)
        return args, kwargs

    language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    state.merges_by_index = True


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


def _wrap_placeholder_mask(owner: nn.Module, state: _ForwardState) -> None:
    original = owner.get_placeholder_mask

    @functools.wraps(original)
    def placeholder_mask(input_ids: Any, inputs_embeds: Any = None, image_features: Any = None,
                         video_features: Any = None, **kwargs: Any) -> Any:
        if state.precomputed:  # counts checked in the collator: the masks without the GPU check
            return original(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        return original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features,
                        video_features=video_features, **kwargs)

    owner.get_placeholder_mask = placeholder_mask


def _wrap_forward(base: nn.Module, state: _ForwardState) -> None:
    """Take the two batch entries out of every call of ``base``'s forward (an instance
    attribute: peft's tuner calls ``model.forward`` itself, which a forward hook would miss)."""
    original = base.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        precomputed = kwargs.pop(PRECOMPUTED_KEY, None)
        host = kwargs.pop(HOST_KEY, None)
        state.precomputed = dict(precomputed or {})
        state.host = dict(host.values) if isinstance(host, HostSide) else {}
        state.positions = state.precomputed.pop("positions", None) or {}
        state.live = {}
        head = getattr(base, "_mmtune_fused_head", None)
        rows = state.precomputed.pop("loss_rows", None)
        if head is not None:
            head.loss_rows, head.loss_rows_shape = rows, state.host.get("labels_shape")
        if state.host.get("drop_attention_mask") and kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = None  # no padding: what transformers does after testing it on the GPU
        try:
            out = original(*args, **kwargs)
            if state.live:
                raise RuntimeError(f"sync-free forward: {sorted(state.live)} features never reached the language "
                                   "model, so their gradients were not restored; set sync_free_forward: false")
            return out
        finally:
            state.precomputed, state.host, state.positions, state.live = {}, {}, {}, {}
            if head is not None:
                head.loss_rows = head.loss_rows_shape = None

    base.forward = forward


def enable_sync_free_forward(model: nn.Module) -> ForwardPrecompute | None:
    """Wrap ``model``'s forward and its feature and placeholder methods; returns the
    collator's :class:`ForwardPrecompute` (also kept as ``model._mmtune_precompute``), or
    None when the model has no tower mmtune can precompute for (batches are then left as
    they are). Apply after the fused cross-entropy, whose head receives the loss rows."""
    base = unwrap_model(model)
    existing = getattr(base, "_mmtune_precompute", None)
    if existing is not None:
        return existing
    precompute = ForwardPrecompute.from_model(base)
    if precompute is None:
        return None
    state = _ForwardState()
    owner = precompute.owner
    for modality in MODALITIES:
        _wrap_features(owner, modality, state)
    _wrap_placeholder_mask(owner, state)
    language_model = _language_model_of(owner)
    if language_model is not None:
        _install_index_merge(language_model, state)
    _wrap_forward(base, state)
    base._mmtune_precompute = precompute
    logger.info("sync-free forward on: %s inputs (%s) built in the collator%s", type(precompute.tower).__name__,
                ", ".join(c.func.__name__ for c in precompute.calls),
                "; the grid stays on the host" if precompute.grid_on_host else "")
    return precompute


def find_precompute(model: Any) -> ForwardPrecompute | None:
    """The model's :class:`ForwardPrecompute` when the lever is on, else None."""
    return getattr(unwrap_model(model), "_mmtune_precompute", None) if model is not None else None
