"""CUDA graphs of frozen blocks: the repeated blocks of a tower that runs without autograd are
replayed from CUDA graphs, one per input signature seen twice.

A frozen vision tower's forward is a long run of small kernels, each block call also paying
Dynamo's cache lookup and the compiled wrapper's Python, so the GPU waits on the host for the
whole tower. Replayed from a CUDA graph, a block costs a few copies and one graph launch.

How it works (:class:`BlockGraphs`, one per block):
- each block is replaced in its list (a submodule swap, as peft installs its layers) by an
  instance of a subclass of its own class (:class:`GraphedBlock`) that shares the block's
  parameters, buffers, submodules and hooks, so state-dict keys do not change; its ``__call__``
  (a class method, nothing is assigned on an instance) goes through :meth:`BlockGraphs.run`,
  which replays a graph or calls the block as usual (its compiled call when regional compile
  is on: block graphs run before compile, which then compiles the replacement);
- a call is *graphable* when autograd is off (or the block's forward turns it off: a frozen
  tower's), every tensor argument is on CUDA and needs no gradient, nothing is being captured
  or compiled, and no dropout is active; any other call runs the block as usual;
- calls are grouped by *signature*: the argument structure, each tensor's shape, stride and
  dtype, every non-tensor argument's value (``max_seqlen``, flags) and the autocast state, so a
  graph is only replayed on inputs its kernels were launched for;
- a signature is captured on its second call (data whose shapes never repeat, such as packed
  rows of variable-size images, is not captured at all), at most ``max_signatures`` of them for
  the model (:class:`GraphShare`); later signatures run as usual, and so does a block whose
  capture failed (one that syncs with the host, say: a warning names it);
- the graphs of one model share a memory pool and, per block class and signature, their
  static input and output buffers: the tensors of a call are copied into the inputs (the ones
  every block receives alike, such as rotary tables and ``cu_seqlens``, only when they change),
  the graph is replayed, and the caller gets copies of the outputs, so nothing it holds is
  overwritten by a later replay.

The replay runs the very kernels the capture recorded, on the same inputs: the same results.
A block that changed one of its input tensors in place would change the static copy instead of
the caller's tensor; transformers' blocks do not, and a frozen tower's blocks have no reason to.

Quantised blocks (QLoRA: bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``) are not graphed at
all (:func:`quantisation`): their kernels fail to capture with a PyTorch internal assert.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from mmtune.model.composite import has_prefix
from mmtune.model.layers import replace_module, repeated_blocks, unwrap_model

from . import tower_no_grad
from .result import Applied, Declined

if TYPE_CHECKING:
    from .config import SpeedConfig

logger = logging.getLogger(__name__)

NAME = "block-graphs"
SWITCH = "frozen_block_cuda_graphs"
SUMMARY = "CUDA graphs of a frozen tower's blocks"

_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _rng_modules(block: nn.Module) -> list[nn.Module]:
    """The parts of ``block`` that draw random numbers while training: dropout modules with
    p > 0, and attention modules whose ``attention_dropout`` is above 0."""
    found = []
    for module in block.modules():
        rate = getattr(module, "p", 0.0) if isinstance(module, nn.modules.dropout._DropoutNd) else \
            getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, (int, float)) and rate > 0:
            found.append(module)
    return found


#: module classes whose kernels do not capture into CUDA graphs: bitsandbytes' quantised linears
#: (peft's LoRA layers over them carry the same class names)
QUANTISED_MODULES = frozenset({"Linear4bit", "Linear8bitLt"})


def quantisation(model: nn.Module | None, blocks: list[nn.Module] = ()) -> str | None:
    """Why ``model`` (a peft wrapper looked through) or one of ``blocks`` holds quantised
    weights, in words; None when nothing is quantised. ``model`` counts as quantised the way
    transformers marks one loaded with a ``quantization_config`` (its ``hf_quantizer``,
    ``is_quantized``, ``is_loaded_in_4bit`` / ``_8bit``, the config's ``quantization_config``);
    a block by a module of a bitsandbytes class (:data:`QUANTISED_MODULES`, or any class that
    bitsandbytes defines)."""
    if model is not None:
        base = unwrap_model(model)
        for flag in ("hf_quantizer", "is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(base, flag, None):
                return f"the model is quantised ({flag})"
        config = getattr(base, "config", None)
        if getattr(config, "quantization_config", None) or getattr(config, "_is_quantized", False):
            return "the model is quantised (its config's quantization_config)"
    for block in blocks:
        for module in block.modules():
            kind = type(module)
            if kind.__name__ in QUANTISED_MODULES or kind.__module__.split(".")[0] == "bitsandbytes":
                return f"{type(block).__name__} holds a quantised {kind.__name__}"
    return None


def _spec_key(spec: Any) -> Any:
    try:
        hash(spec)
    except TypeError:  # an older TreeSpec with a list context
        return str(spec)
    return spec


def signature(leaves: list[Any], spec: Any, device_type: str = "cuda") -> tuple | None:
    """The key a graph is replayed under (``leaves`` and ``spec`` from flattening a call's
    ``(args, kwargs)``), or None when the call cannot be graphed: a tensor off ``device_type``
    or needing gradients, an argument that is neither a tensor nor a plain scalar."""
    parts: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != device_type or leaf.requires_grad:
                return None
            parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        elif isinstance(leaf, _SCALARS):
            parts.append(("value", type(leaf), leaf))
        else:
            return None
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return (_spec_key(spec), tuple(parts), autocast)


class CudaGraphs:
    """Capture and replay on CUDA (the backend of :class:`GraphShare`)."""

    device_type = "cuda"

    def __init__(self) -> None:
        self._pool: Any = None
        self._side: Any = None  # one warm-up stream for every capture (a stream's freed blocks serve only it)

    def ready(self) -> bool:
        return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()

    def warm_up(self, run: Callable[[], Any]) -> Any:
        """``run()`` on a side stream (lazy initialisation, a first compile stay out of the capture)."""
        if self._side is None:
            self._side = torch.cuda.Stream()
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = run()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, run: Callable[[], None]) -> Any:
        """A graph of ``run()``, in the pool every graph of the share uses; ``.replay()`` runs it."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the dataloader's pinning thread may call into CUDA meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            run()
        return graph


@dataclass
class _Buffers:
    """A signature's static tensors, shared by every block's graph of that signature."""

    inputs: list[torch.Tensor]
    sources: list[Any]  # per input: (weakref to the tensor last copied in, its version), or None
    outputs: list[Any] | None = None  # the output leaves: static tensors, and non-tensor values as returned
    out_spec: Any = None


@dataclass
class GraphShare:
    """What the graphed blocks of one model share: the backend (its memory pool), the buffers
    per signature, the cap on signatures, and counters (``captures``, ``replays``)."""

    max_signatures: int = 8
    capture_on_call: int = 2
    backend: Any = field(default_factory=CudaGraphs)
    buffers: dict[tuple, _Buffers] = field(default_factory=dict)
    graphs_per_signature: dict[tuple, int] = field(default_factory=dict)
    captures: int = 0
    replays: int = 0
    failed_captures: int = 0
    _warned_full: bool = False

    def buffers_for(self, sig: tuple, tensors: list[torch.Tensor]) -> _Buffers | None:
        found = self.buffers.get(sig)
        if found is None:
            if len(self.buffers) >= self.max_signatures:
                if not self._warned_full:
                    logger.info("CUDA graphs of frozen blocks: %d input signatures captured, the cap; blocks run "
                                "as usual on new ones", self.max_signatures)
                    self._warned_full = True
                return None
            found = _Buffers([t.clone() for t in tensors], [None] * len(tensors))
            self.buffers[sig] = found
        return found

    def release(self, sig: tuple) -> None:
        """Drop a signature's buffers that no graph reads (its only capture failed)."""
        if not self.graphs_per_signature.get(sig):
            self.buffers.pop(sig, None)


def _load_inputs(buffers: _Buffers, tensors: list[torch.Tensor]) -> None:
    """Copy the call's tensors into the static inputs, skipping a tensor already copied there
    and unchanged since (the rotary tables and ``cu_seqlens`` every block of a forward gets)."""
    for i, (static, tensor) in enumerate(zip(buffers.inputs, tensors)):
        source = buffers.sources[i]
        if source is not None and source[0]() is tensor and source[1] == tensor._version:
            continue
        static.copy_(tensor)
        buffers.sources[i] = (weakref.ref(tensor), tensor._version)


class BlockGraphs:
    """A block's calls, replayed from graphs where the call is graphable (module docstring);
    any other call runs the block as it would run unreplaced (its compiled call, if any)."""

    def __init__(self, block: nn.Module, share: GraphShare, runs_without_grad: bool = False,
                 kind: type | None = None) -> None:
        self.block_ref = weakref.ref(block)
        self.share = share
        self.runs_without_grad = runs_without_grad  # its forward turns autograd off itself (a frozen tower's)
        self.rng_modules = _rng_modules(block)
        self.kind = kind or type(block)  # buffers are shared between blocks of one class only (same outputs)
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, Any] = {}
        self.failed = False  # a capture failed (the block syncs with the host, say): run as usual from then on
        self.enabled = True  # False: every call runs as usual (a comparison with the graphs off)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The block's own call: its class's ``__call__`` (hooks, gradient checkpointing, and the
        compiled call where ``Module.compile()`` set one)."""
        return super(GraphedBlock, self.block_ref()).__call__(*args, **kwargs)

    def graphable(self) -> bool:
        block = self.block_ref()
        return (block is not None and self.enabled and not self.failed and (self.runs_without_grad or not torch.is_grad_enabled())
                and not torch.compiler.is_compiling()
                and not (self.rng_modules and block.training) and self.share.backend.ready())

    def run(self, args: tuple, kwargs: dict) -> Any:
        if not self.graphable():
            return self.call(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        sig = signature(leaves, spec, self.share.backend.device_type)
        if sig is None:
            return self.call(*args, **kwargs)
        sig = (self.kind, sig)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        graph = self.graphs.get(sig)
        if graph is None:
            self.seen[sig] = self.seen.get(sig, 0) + 1
            buffers = self.share.buffers_for(sig, tensors) if self.seen[sig] >= self.share.capture_on_call else None
            if buffers is None:
                return self.call(*args, **kwargs)
            _load_inputs(buffers, tensors)
            graph = self._capture(sig, buffers, leaves, spec)
            if graph is None:
                return self.call(*args, **kwargs)
        else:
            buffers = self.share.buffers[sig]
            _load_inputs(buffers, tensors)
        graph.replay()
        self.share.replays += 1
        outputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in buffers.outputs]
        return tree_unflatten(outputs, buffers.out_spec)

    def _capture(self, sig: tuple, buffers: _Buffers, leaves: list[Any], spec: Any) -> Any:
        statics = iter(buffers.inputs)
        args, kwargs = tree_unflatten([next(statics) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        warm = self.share.backend.warm_up(lambda: self.call(*args, **kwargs))
        if buffers.outputs is None:
            out_leaves, buffers.out_spec = tree_flatten(warm)
            buffers.outputs = [torch.empty_like(x) if isinstance(x, torch.Tensor) else x for x in out_leaves]
        del warm

        def run() -> None:  # the block on the static inputs, its outputs copied into the shared ones
            result = tree_flatten(self.call(*args, **kwargs))[0]
            for static, value in zip(buffers.outputs, result):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
            # the result's own memory goes back to the pool here: only the shared outputs live on

        try:
            graph = self.share.backend.capture(run)
        except Exception as err:  # noqa: BLE001 (whatever the capture met, the block still runs as usual)
            self.failed = True
            self.share.release(sig)
            self.share.failed_captures += 1
            # one warning for the model: the other blocks of a tower usually fail alike
            log = logger.warning if self.share.failed_captures == 1 else logger.debug
            log("CUDA graphs of frozen blocks: capturing a %s failed (%s: %s); it runs as usual%s",
                self.kind.__name__, type(err).__name__, err,
                ", and so does any other block whose capture fails" if self.share.failed_captures == 1 else "")
            return None
        self.graphs[sig] = graph
        self.share.graphs_per_signature[sig] = self.share.graphs_per_signature.get(sig, 0) + 1
        self.share.captures += 1
        return graph


class GraphedBlock(nn.Module):
    """Mixed in before a block's own class (:func:`graphed_class`): the block's calls go through
    its :class:`BlockGraphs` (``block_graphs``); everything else is the block's class."""

    block_graphs: BlockGraphs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.block_graphs.run(args, kwargs)


_GRAPHED_CLASSES: dict[type, type] = {}


def graphed_class(cls: type) -> type:
    """``GraphedBlock`` + ``cls``, made once per block class."""
    found = _GRAPHED_CLASSES.get(cls)
    if found is None:
        found = type(f"Graphed{cls.__name__}", (GraphedBlock, cls), {"__module__": __name__})
        _GRAPHED_CLASSES[cls] = found
    return found


def graphed(block: nn.Module, share: GraphShare, runs_without_grad: bool = False) -> nn.Module:
    """The replacement of ``block`` whose calls replay graphs: an instance of
    :func:`graphed_class` sharing ``block``'s parameters, buffers, submodules, hooks and flags
    (the same dicts), so state-dict keys and saved weights do not change. ``block`` itself is
    left as it was; the caller puts the replacement in its place. A graphed block comes back
    as it is."""
    if isinstance(block, GraphedBlock):
        return block
    kind = type(block)
    new = graphed_class(kind).__new__(graphed_class(kind))
    new.__dict__.update(block.__dict__)
    new.block_graphs = BlockGraphs(new, share, runs_without_grad, kind=kind)
    return new


def graph_blocks(model: nn.Module, names: list[str], share: GraphShare | None = None,
                 runs_without_grad: bool = False) -> GraphShare:
    """Replace each block ``names`` names in ``model`` (peft wrappers looked through) by its
    :func:`graphed` version. ``runs_without_grad``: the blocks' forwards turn autograd off
    themselves (a frozen tower's, :mod:`mmtune.speed.tower_no_grad`), so their calls are
    graphable whatever the caller's grad mode."""
    share = share or GraphShare()
    base = unwrap_model(model)
    for name in names:
        block = base.get_submodule(name)
        if not isinstance(block, GraphedBlock):
            replace_module(base, name, graphed(block, share, runs_without_grad))
    return share


def graph_frozen_blocks(model: nn.Module, tower_keys: list[str], share: GraphShare | None = None) -> int:
    """Replay the repeated blocks under ``tower_keys`` (towers that run without autograd) from
    CUDA graphs. Returns the number of blocks graphed: none for a quantised model or tower
    (QLoRA), whose kernels do not capture (one info line)."""
    found = [(name, block) for name, block in repeated_blocks(model) if has_prefix(name, tower_keys)]
    reason = quantisation(model, [b for _, b in found]) if found else None
    if reason:
        logger.info("CUDA graphs of frozen blocks skipped: %s, and quantised kernels do not capture into graphs",
                    reason)
        return 0
    if found:
        graph_blocks(model, [name for name, _ in found], share or GraphShare(), runs_without_grad=True)
        logger.info("CUDA graphs for %d frozen blocks (%s): captured per input signature on its second call",
                    len(found), ", ".join(sorted({type(b).__name__ for _, b in found})))
    return len(found)


def apply(model: nn.Module, cfg: SpeedConfig, earlier: Mapping[str, Applied | Declined]) -> Applied | Declined:
    towers = earlier.get(tower_no_grad.SWITCH)
    if not towers:
        return Declined("no tower runs without autograd (frozen_tower_no_grad)")
    n = graph_frozen_blocks(model, list(towers.detail))
    if not n:
        return Declined("no repeated blocks to graph in the frozen tower, or it is quantised")
    return Applied(n)
