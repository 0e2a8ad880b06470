"""Training speed levers, each behind a switch in :class:`~mmtune.hparams.ModelArguments`.

A lever is on by default only where it changes no result (numerical noise aside); each one
logs when it is applied and each has a CPU test comparing losses with the lever off.

- **fused linear cross-entropy** (``fused_cross_entropy``): the LM head's logits are never
  materialised whole (:mod:`mmtune.speed.fused_loss`; the training forward of
  :mod:`mmtune.speed.forward` computes the loss).
- **regional compile** (``compile``): each repeated block (decoder layers, vision blocks) is
  ``module.compile()``-d with dynamic shapes, so identical blocks share one graph and new
  batch lengths do not recompile.
- **frozen towers without autograd** (``frozen_tower_no_grad``): a fully frozen vision/audio
  tower runs under ``torch.no_grad`` (otherwise the input-require-grads hook that
  checkpointing needs makes it record a graph it never uses).
- **selective activation checkpointing** (``gradient_checkpointing_layers``): checkpoint only
  N decoder layers, N chosen from a memory estimate by default.
- **packed vision attention** (``vision_varlen_attention``): the vision tower's attention over
  all images of a batch in one varlen kernel (torch's flash varlen) instead of one sdpa call
  and one host sync per image and block.
- **sync-free forward** (``sync_free_forward``): what the forward would derive on the GPU with
  host syncs (the vision tower's inputs, the split per image, the placeholder check, an all-ones
  mask, the loss rows) is built in the collator (:mod:`mmtune.speed.sync_free`).
- **Liger kernels** (``liger_kernels``): RMSNorm / SwiGLU / rotary via liger-kernel, if installed.
- **CUDA graphs of frozen blocks** (``frozen_block_cuda_graphs``, on with CUDA): the repeated
  blocks of a tower that runs without autograd are replayed from CUDA graphs, one per input
  signature seen twice (:mod:`mmtune.model.graphs`): a few copies and one launch a block
  instead of the compiled block's host work. Bit-identical on the GPU; the tower's forward
  alone -20% on an H200, peak memory +0.1 GiB in LoRA training (its share of a training step
  is not isolated: benchmarks/README.md, session 5).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtune.speed.result import Declined

from .composite import get_composite_model, has_prefix

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# =============================================================== frozen towers without autograd
def _no_grad_forward(module: nn.Module) -> None:
    original = module.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return original(*args, **kwargs)

    module.forward = forward


def run_frozen_towers_without_grad(model: nn.Module) -> list[str]:
    """Run every module of a fully frozen vision/audio tower under ``torch.no_grad``; returns
    the tower keys it wrapped ([] when the tower trains, even in part, or there is none)."""
    base = unwrap_model(model)
    entry = get_composite_model(getattr(base.config, "model_type", ""))
    if entry is None or not entry.vision_model_keys:
        return []
    towers = []
    for key in entry.vision_model_keys:
        try:
            towers.append((key, base.get_submodule(key)))
        except AttributeError:
            continue
    params = [p for _, m in towers for p in m.parameters()]
    if not params:
        return []
    if any(p.requires_grad for p in params):
        logger.info("frozen tower without autograd not applied: part of the tower trains")
        return []
    for _, module in towers:
        for part in (list(module) if isinstance(module, nn.ModuleList) else [module]):
            _no_grad_forward(part)
    keys = [k for k, _ in towers]
    logger.info("frozen tower runs without autograd: %s", ", ".join(keys))
    return keys


# =============================================================== vision attention: one varlen kernel
VARLEN_ATTENTION = "mmtune_flash_varlen"  # "flash" in the name routes transformers' vision blocks to varlen


ATEN_VARLEN_FLAG = "mmtune_aten_varlen"  # set on attention modules whose block runs through the C++ wrapper
_VARLEN_KERNEL: list[Any] = []  # [kernel or None] once looked up (a plain global: compiled code reads it cheaply)


def _torch_varlen_attn() -> Any:
    """torch's flash varlen attention (torch >= 2.9, CUDA), or None."""
    if not _VARLEN_KERNEL:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        _VARLEN_KERNEL.append(varlen_attn)
    return _VARLEN_KERNEL[0]


def aten_flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                      cu_seq_k: torch.Tensor, max_q: int, max_k: int, scale: float | None = None) -> torch.Tensor:
    """The flash varlen kernel called as the aten op ``_flash_attention_forward`` (differentiable,
    and with a C shim, so inductor's C++ wrapper can launch it), with ``varlen_attn``'s
    arguments; no dropout, not causal. Returns (tokens, heads, dim)."""
    return torch.ops.aten._flash_attention_forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, False,
                                                   False, scale=scale)[0]


def _varlen_kernel_for(query: torch.Tensor, aten: bool = False) -> Any:
    """The varlen kernel for ``query``'s device and dtype, or None (CPU, fp32: the reference).
    ``aten``: the aten op (:func:`aten_flash_varlen`) instead of torch's ``varlen_attn``."""
    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)):
        return None
    if aten:
        return aten_flash_varlen
    return _VARLEN_KERNEL[0] if _VARLEN_KERNEL else _torch_varlen_attn()


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Reference for the varlen kernel: attention within each segment of ``cu_seqlens`` only.
    ``query``/``key``/``value`` are (tokens, heads, dim); runs of equal-length segments go
    through one batched sdpa call. Returns (tokens, heads, dim)."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    out, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n, size = j - i, lengths[i]
        if size:
            span = slice(start, start + n * size)
            q, k, v = (t[span].unflatten(0, (n, size)).transpose(1, 2) for t in (query, key, value))
            out.append(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).flatten(0, 1))
        start, i = start + n * size, j
    return torch.cat(out) if out else query.new_empty(query.shape)


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             max_length_q: int | None = None, max_length_k: int | None = None,
                             is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function for packed, non-causal vision attention: one kernel
    over every image instead of one sdpa call (and one host sync) per image and block.
    Anything else (a mask, causal, no ``cu_seq_lens``) goes to transformers' sdpa. Segments
    are self-attention: queries and keys share ``cu_seq_lens_q``, as vision blocks pass them."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      is_causal=is_causal, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, heads, tokens, dim) -> (tokens, heads, dim)
    kernel = _varlen_kernel_for(q, aten=getattr(module, ATEN_VARLEN_FLAG, False))
    if kernel is not None:
        if max_length_q is None:
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        cu = cu_seq_lens_q.to(torch.int32)
        out = kernel(q, k, v, cu, cu, max_length_q, max_length_q, scale=scaling)
    else:
        out = segment_attention(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


def _vision_attention_takes_varlen(attention: nn.Module) -> bool:
    """Whether a vision attention module hands ``cu_seq_lens_q`` to flash-type attention
    functions (transformers' Qwen2-VL-style vision blocks)."""
    import inspect

    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False
    return "cu_seq_lens_q=" in source and "is_flash_attention_requested(" in source


def enable_vision_varlen_attention(model: nn.Module) -> list[str]:
    """Route the vision tower's packed attention through :func:`varlen_attention_forward`;
    returns the tower keys changed ([] when the tower's attention does not fit or already
    uses flash attention)."""
    from transformers import AttentionInterface

    base = unwrap_model(model)
    entry = get_composite_model(getattr(base.config, "model_type", ""))
    if entry is None:
        return []
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    changed = []
    for key in entry.vision_model_keys:
        try:
            tower = base.get_submodule(key)
        except AttributeError:
            continue
        configs, fits = {}, {}
        for module in tower.modules():
            config = getattr(module, "config", None)
            if config is None or not hasattr(config, "_attn_implementation"):
                continue
            if type(module) not in fits:  # one source read a class, not one a block
                fits[type(module)] = _vision_attention_takes_varlen(module)
            if fits[type(module)]:
                configs[id(config)] = config
        if not configs or any("flash" in str(c._attn_implementation) for c in configs.values()):
            continue
        for config in configs.values():
            config._attn_implementation = VARLEN_ATTENTION
        changed.append(key)
    if changed:
        kernel = "torch varlen flash kernel" if _torch_varlen_attn() is not None else "batched sdpa per image size"
        logger.info("vision attention packed (%s): %s", kernel, ", ".join(changed))
    return changed


# =============================================================== regional torch.compile
def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The members of every ModuleList of two or more blocks with parameters (decoder layers,
    vision blocks), outermost lists only."""
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


def lean_guards(entries: list[Any]) -> list[bool]:
    """Dynamo guard filter: drop the guards on module attributes (parameters' metadata, hook
    dicts, flags), keep every ``training`` flag, tensor input and global-state guard. Nothing a
    training run does changes the dropped ones (they are checked on every call of every
    compiled block: ~100 µs a call on a 28-layer model); ``model.train()`` / ``eval()`` still
    recompile. Not for code that edits module attributes between calls."""
    return [not (e.orig_guard.source.is_unspecialized_nn_module() and not e.name.endswith(".training"))
            for e in entries]


def cpp_compiler_available() -> bool:
    """Whether inductor finds the C++ compiler its C++ wrapper is built with."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler, or an import fails
        return False
    return True


def _compile_options(mode: str | None, cpp_wrapper: bool, guard_filter: Any) -> dict[str, Any]:
    """``block.compile`` keywords: ``mode`` alone, or (torch.compile takes one of the two) the
    mode's inductor options merged with the C++ wrapper and the guard filter."""
    if not cpp_wrapper and guard_filter is None:
        return {"mode": mode} if mode else {}
    options: dict[str, Any] = {}
    if mode:
        import torch._inductor

        options.update(torch._inductor.list_mode_options(mode))
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    if guard_filter is not None:
        options["guard_filter_fn"] = guard_filter
    return {"options": options}


def compile_repeated_blocks(model: nn.Module, dynamic: bool | None = True, backend: str = "inductor",
                            mode: str | None = None, cpp_wrapper: bool | str = False,
                            lean_guard_checks: bool = False) -> int:
    """``module.compile()`` each repeated block: identical blocks share one compiled graph
    (parameters are graph inputs), dynamic shapes spare recompiles across batch lengths, and
    the state-dict keys do not change. Returns the number of blocks compiled.

    ``cpp_wrapper`` (inductor backend): the language model's decoder layers launch their
    kernels from inductor's C++ wrapper instead of generated Python, forward and backward: less
    host time a launch, where a small model's step is host-bound. Vision blocks keep the Python
    wrapper (the C++ one does not take the varlen attention op's list arguments), unless
    ``cpp_wrapper == "all"``: then every block takes it, and the vision attention that runs
    through :func:`varlen_attention_forward` calls the kernel as an aten op
    (:func:`aten_flash_varlen`). ``lean_guard_checks``: :func:`lean_guards` on every block."""
    if cpp_wrapper not in (False, True, "layers", "all"):
        raise ValueError(f"compile_cpp_wrapper must be true, false, 'layers' or 'all', not {cpp_wrapper!r}")
    if mode is not None and "reduce-overhead" in mode:
        raise ValueError("compile_mode reduce-overhead (CUDA graphs) does not fit regional compile: identical blocks "
                         "share one graph, whose replays overwrite each other's outputs; use the default mode or "
                         "max-autotune-no-cudagraphs")
    blocks = repeated_blocks(model)
    if not blocks:
        logger.info("regional compile not applied: no repeated blocks found")
        return 0
    import torch._dynamo

    # a few variants per block type (checkpointed or not, train / eval) must fit the cache
    limit = max(getattr(torch._dynamo.config, "cache_size_limit", 8), 64)
    torch._dynamo.config.cache_size_limit = limit
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit,
                                                                 4 * limit)
    cpp_wrapper = cpp_wrapper if backend == "inductor" else False
    if cpp_wrapper and not cpp_compiler_available():
        logger.warning("compile_cpp_wrapper: no C++ compiler found (set CXX); blocks keep inductor's Python wrapper")
        cpp_wrapper = False
    if cpp_wrapper == "all":
        wrapped = {id(block) for _, block in blocks}
    else:
        wrapped = {id(m) for m in decoder_layers(model)} if cpp_wrapper else set()
    guard_filter = lean_guards if lean_guard_checks else None
    for name, block in blocks:
        block.compile(dynamic=dynamic, backend=backend, **_compile_options(mode, id(block) in wrapped, guard_filter))
        for module in block.modules():  # varlen vision attention: the kernel as an aten op where the C++ wrapper runs
            config = getattr(module, "config", None)
            if getattr(config, "_attn_implementation", None) == VARLEN_ATTENTION:
                setattr(module, ATEN_VARLEN_FLAG, id(block) in wrapped)
    kinds = sorted({type(b).__name__ for _, b in blocks})
    logger.info("regional compile on: %d blocks (%s), backend %s, dynamic=%s, mode %s, C++ wrapper on %d of them, "
                "%s guards", len(blocks), ", ".join(kinds), backend, dynamic, mode or "default", len(wrapped),
                "lean" if lean_guard_checks else "all")
    return len(blocks)


# =============================================================== selective activation checkpointing
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's repeated blocks, first to last."""
    from .adapters import _decoder_layers

    base = unwrap_model(model)
    entry = get_composite_model(getattr(base.config, "model_type", ""))
    keys = [k for k in (entry.language_model_keys if entry else []) if k != "lm_head"]
    return [base.get_submodule(name) for name in _decoder_layers(base, keys)]


def activation_bytes_per_token(config: Any, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes a decoder layer keeps for backward per token, bytes it keeps when checkpointed).

    A llama-style layer with sdpa/flash attention keeps ~10 hidden-sized tensors (norm inputs,
    q/k/v, attention output, residuals) and 4 intermediate-sized ones (gate, up, activation,
    product) per token; a checkpointed one keeps its input. Measured on an H100 (Qwen2-VL-2B
    sizes, LoRA, bf16): 94 KB a token a layer, this gives 100 KB.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    return dtype_bytes * (10 * hidden + 4 * inter), dtype_bytes * hidden


def choose_checkpoint_layers(num_layers: int, layer_bytes: float, checkpointed_bytes: float, available: float) -> int:
    """Fewest layers to checkpoint so ``(L - n) * layer_bytes + n * checkpointed_bytes``
    fits in ``available``; all of them when even that does not fit."""
    if num_layers <= 0 or layer_bytes <= 0:
        return 0
    if num_layers * layer_bytes <= available:
        return 0
    saved = layer_bytes - checkpointed_bytes
    if saved <= 0:
        return num_layers
    return int(min(num_layers, max(0, math.ceil((num_layers * layer_bytes - available) / saved))))


def _memory_available(model: nn.Module, budget_gib: float | None, fused_ce: bool, tokens: int) -> float:
    """Bytes left on the current CUDA device for decoder activations once the model, its
    gradients and Adam states, the loss and a safety margin are counted."""
    free, total = torch.cuda.mem_get_info()
    params = list(model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    on_gpu = any(p.is_cuda for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    available = free - (0 if on_gpu else model_bytes)
    planned = total
    if budget_gib is not None:
        used = torch.cuda.memory_allocated() + (0 if on_gpu else model_bytes)
        available = min(available, budget_gib * 2**30 - used)
        planned = min(total, budget_gib * 2**30)
    head = unwrap_model(model).get_output_embeddings() if hasattr(unwrap_model(model), "get_output_embeddings") else None
    vocab = getattr(head, "out_features", 0) or 0
    loss_bytes = tokens * vocab * 12 if not fused_ce else 2**30  # full logits + fp32 copies, or one chunk
    margin = max(2**30, 0.05 * planned)
    return available - 3 * trainable - loss_bytes - margin


def resolve_checkpoint_layers(spec: int | str, model: nn.Module, *, gradient_checkpointing: bool, device_type: str,
                              batch_tokens: int | None, budget_gib: float | None = None, fused_ce: bool = True) -> int:
    """How many decoder layers to checkpoint. An integer is taken as given; ``auto`` on CUDA
    picks the fewest that fit the memory estimate (the user flag does not matter there);
    ``auto`` elsewhere, or without a batch size, is all-or-none per ``gradient_checkpointing``."""
    layers = decoder_layers(model)
    if isinstance(spec, str) and spec.strip().lower() != "auto":
        spec = int(spec)
    if not isinstance(spec, str):
        if spec < 0:
            raise ValueError(f"gradient_checkpointing_layers must be >= 0 or 'auto', not {spec}")
        return min(int(spec), len(layers))
    if device_type != "cuda" or not torch.cuda.is_available() or not batch_tokens or not layers:
        return len(layers) if gradient_checkpointing else 0
    dtype_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 2)
    per_token, ckpt_per_token = activation_bytes_per_token(unwrap_model(model).config, dtype_bytes)
    available = _memory_available(model, budget_gib, fused_ce, batch_tokens)
    n = choose_checkpoint_layers(len(layers), per_token * batch_tokens, ckpt_per_token * batch_tokens, available)
    logger.info("activation checkpointing auto: %.1f GiB for activations, %.2f GiB per layer (%d tokens): "
                "checkpointing %d of %d decoder layers", available / 2**30, per_token * batch_tokens / 2**30,
                batch_tokens, n, len(layers))
    return n


def set_checkpointed_layers(model: nn.Module, n: int) -> int:
    """Checkpoint the first ``n`` decoder layers and no other (enabling non-reentrant
    checkpointing when it is off); other modules keep their flags. Returns ``n``."""
    layers = decoder_layers(model)
    n = min(n, len(layers))
    if n > 0 and not any(getattr(m, "gradient_checkpointing", False) for m in layers):
        from .loader import enable_gradient_checkpointing

        enable_gradient_checkpointing(unwrap_model(model))
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i < n
    if layers:
        logger.info("activation checkpointing: %d of %d decoder layers", n, len(layers))
    return n


# =============================================================== Liger kernels
def apply_liger_kernels(model: nn.Module) -> bool:
    """Liger's RMSNorm / SwiGLU / rotary kernels on ``model`` (cross-entropy is ours)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        logger.info("liger-kernel not installed: RMSNorm, SwiGLU and rotary run unfused (pip install liger-kernel)")
        return False
    try:
        _apply_liger_kernel_to_instance(model=unwrap_model(model), rms_norm=True, swiglu=True, rope=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as exc:  # a model type or transformers version liger does not support
        logger.warning("liger kernels not applied: %s", exc)
        return False
    logger.info("liger kernels on: RMSNorm, SwiGLU, rotary")
    return True


# =============================================================== CUDA graphs of frozen blocks
def graph_frozen_blocks(model: nn.Module, tower_keys: list[str], share: Any = None) -> int:
    """Replay the repeated blocks under ``tower_keys`` (towers that run without autograd) from
    CUDA graphs (:func:`mmtune.model.graphs.graph_blocks`, after regional compile: it wraps
    the compiled call). Returns the number of blocks graphed: none for a quantised model or
    tower (QLoRA), whose kernels do not capture (one info line)."""
    from .graphs import GraphShare, graph_blocks, quantisation

    blocks = [block for name, block in repeated_blocks(model) if has_prefix(name, tower_keys)]
    reason = quantisation(model, blocks) if blocks else None
    if reason:
        logger.info("CUDA graphs of frozen blocks skipped: %s, and quantised kernels do not capture into graphs",
                    reason)
        return 0
    if blocks:
        graph_blocks(blocks, share or GraphShare(), runs_without_grad=True)  # their forwards are no-grad
        logger.info("CUDA graphs for %d frozen blocks (%s): captured per input signature on its second call",
                    len(blocks), ", ".join(sorted({type(b).__name__ for b in blocks})))
    return len(blocks)


# =============================================================== all levers
@dataclass(frozen=True)
class Lever:
    """One lever :func:`apply_speed_levers` decides: its switch (a ``ModelArguments`` field), the
    key it is reported under in the returned dict (None: a setting of another lever), its short
    name (``benchmarks/train_speed.py --without NAME``; None: not switched off there) and what it does."""

    switch: str
    applied: str | None
    name: str | None
    summary: str


#: every lever :func:`apply_speed_levers` decides, in the order it applies them (``mmtune env``
#: and the benchmark's ``--without`` read this list)
LEVERS: tuple[Lever, ...] = (
    Lever("liger_kernels", "liger_kernels", "liger", "Liger kernels: RMSNorm, SwiGLU, rotary (liger-kernel)"),
    Lever("fused_cross_entropy", "fused_cross_entropy", "fused-ce", "fused linear cross-entropy: no full logits"),
    Lever("frozen_tower_no_grad", "frozen_tower_no_grad", "tower-no-grad", "frozen towers run without autograd"),
    Lever("vision_varlen_attention", "vision_varlen_attention", "vision-varlen",
          "the vision tower's attention over all images in one varlen kernel"),
    Lever("gradient_checkpointing_layers", "checkpointed_layers", None, "activation checkpointing of N decoder layers"),
    Lever("compile", "compiled_blocks", "compile", "regional torch.compile of the repeated blocks"),
    Lever("compile_cpp_wrapper", None, "cpp-wrapper", "inductor's C++ wrapper for the compiled decoder layers"),
    Lever("compile_lean_guards", None, "lean-guards", "lean Dynamo guard checks on the compiled blocks"),
    Lever("sync_free_forward", "sync_free_forward", "sync-free", "a forward without host syncs (inputs built in "
          "the collator)"),
    Lever("frozen_block_cuda_graphs", "graphed_blocks", "block-graphs", "CUDA graphs of a frozen tower's blocks"),
)


def _default_on(model_args: Any, name: str, device_type: str) -> bool:
    """A switch whose default (None) means: on when training on CUDA."""
    value = getattr(model_args, name, None)
    return device_type == "cuda" if value is None else bool(value)


def _cpp_wrapper_setting(model_args: Any, device_type: str) -> bool | str:
    """``compile_cpp_wrapper``: None (the default) is the decoder layers on CUDA, off elsewhere;
    true is the decoder layers; a word (``layers``, ``all``) goes on as written, for
    :func:`compile_repeated_blocks` to take or refuse."""
    value = getattr(model_args, "compile_cpp_wrapper", None)
    if isinstance(value, str):
        return value.strip().lower()
    return _default_on(model_args, "compile_cpp_wrapper", device_type)


def compile_settings(model_args: Any, device_type: str) -> dict[str, Any]:
    """The settings regional compile runs with on ``device_type`` (defaults resolved), keyed by
    their switches: ``compile_cpp_wrapper`` and ``compile_lean_guards``."""
    return {"compile_cpp_wrapper": _cpp_wrapper_setting(model_args, device_type),
            "compile_lean_guards": _default_on(model_args, "compile_lean_guards", device_type)}


@dataclass(frozen=True)
class _LeverSwitches:
    """The switches the fused-loss and sync-free levers read (``mmtune.speed``'s ``cfg``)."""

    fused_cross_entropy: bool
    sync_free_forward: bool
    device_type: str


def _run(lever: Any, model: nn.Module, cfg: _LeverSwitches, earlier: dict[str, Any]) -> Any:
    """``lever.apply``; a decline is logged in one line."""
    result = lever.apply(model, cfg, earlier)
    if isinstance(result, Declined):
        logger.info("%s (%s) not applied: %s", lever.NAME, lever.SWITCH, result.reason)
    return result


def apply_speed_levers(model: nn.Module, model_args: Any, *, gradient_checkpointing: bool = False,
                       device_type: str | None = None, batch_tokens: int | None = None) -> dict[str, Any]:
    """Apply the switched-on levers to a model ready to train; returns what was applied (keys:
    :data:`LEVERS`' ``applied``; ``mmtune env`` reports it). The fused loss and the sync-free
    forward give :class:`~mmtune.speed.result.Applied` / :class:`~mmtune.speed.result.Declined`;
    :meth:`mmtune.speed.forward.TrainingForward.from_levers` builds the training forward from them."""
    from mmtune.speed import fused_loss, sync_free

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    levers = _LeverSwitches(fused_cross_entropy=bool(getattr(model_args, "fused_cross_entropy", True)),
                            sync_free_forward=bool(getattr(model_args, "sync_free_forward", True)),
                            device_type=device_type)
    applied: dict[str, Any] = {}
    if _default_on(model_args, "liger_kernels", device_type):
        applied["liger_kernels"] = apply_liger_kernels(model)
    if levers.fused_cross_entropy:
        applied["fused_cross_entropy"] = _run(fused_loss, model, levers, applied)
    if getattr(model_args, "frozen_tower_no_grad", True):
        applied["frozen_tower_no_grad"] = run_frozen_towers_without_grad(model)
    varlen = getattr(model_args, "vision_varlen_attention", None)
    if varlen is None:
        varlen = device_type == "cuda" and _torch_varlen_attn() is not None
    if varlen:
        applied["vision_varlen_attention"] = enable_vision_varlen_attention(model)
    spec = getattr(model_args, "gradient_checkpointing_layers", "auto")
    n = resolve_checkpoint_layers(spec, model, gradient_checkpointing=gradient_checkpointing, device_type=device_type,
                                  batch_tokens=batch_tokens, budget_gib=getattr(model_args, "memory_budget_gib", None),
                                  fused_ce=bool(applied.get("fused_cross_entropy")))
    if n or gradient_checkpointing:
        applied["checkpointed_layers"] = set_checkpointed_layers(model, n)
    if _default_on(model_args, "compile", device_type):
        settings = compile_settings(model_args, device_type)
        applied["compiled_blocks"] = compile_repeated_blocks(model, dynamic=getattr(model_args, "compile_dynamic", True),
                                                             backend=getattr(model_args, "compile_backend", "inductor"),
                                                             mode=getattr(model_args, "compile_mode", None),
                                                             cpp_wrapper=settings["compile_cpp_wrapper"],
                                                             lean_guard_checks=settings["compile_lean_guards"])
    if levers.sync_free_forward:
        applied["sync_free_forward"] = _run(sync_free, model, levers, applied)
    frozen = applied.get("frozen_tower_no_grad") or []
    if frozen and device_type == "cuda" and _default_on(model_args, "frozen_block_cuda_graphs", device_type):
        applied["graphed_blocks"] = graph_frozen_blocks(model, frozen)
    return applied
