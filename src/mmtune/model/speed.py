"""Training speed levers, each behind a switch in :class:`~mmtune.config.ModelArguments`.

A lever is on by default only where it changes no result (numerical noise aside); each one
logs when it is applied and each has a CPU test comparing losses with the lever off.

- **fused linear cross-entropy** (``fused_cross_entropy``): the LM head's logits are never
  materialised whole. The head's input is captured, the model's own forward is left to do
  everything else (label expansion, token types, ...), and the loss and its gradients wrt
  the hidden states and the head weight are computed chunk by chunk over the labelled
  tokens only (Liger-kernel's kernel when installed, our PyTorch one otherwise). A config's
  logit scale and soft-cap are reproduced; a model whose logits it does not reproduce makes it
  decline on the first training call (one warning), and the run goes on with the model's loss.
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
  host syncs (the vision tower's rotary positions, ``cu_seqlens``, ``max_seqlen``, the split
  per image, the placeholder check, an all-ones mask, the loss rows) is built in the collator
  (:mod:`mmtune.model.precompute`), so the host can queue work ahead of the GPU.
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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtune.constants import IGNORE_INDEX

from .composite import get_composite_model, has_prefix

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# =============================================================== fused linear cross-entropy
def default_chunk_size(vocab_size: int, budget_bytes: int = 2**29) -> int:
    """Rows per chunk so one chunk's fp32 logits stay near ``budget_bytes`` (512 MiB: 512 rows
    of a 152k vocabulary), a power of two in [32, 8192]."""
    rows = max(1, budget_bytes // max(1, 4 * vocab_size))
    return int(min(8192, max(32, 2 ** int(math.log2(rows)))))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight.T + bias`` over rows whose target is
    valid, divided by ``denom``. The gradients are computed in the forward, chunk by chunk,
    and handed out in the backward (Liger-kernel's scheme), so at most one chunk of logits
    lives at a time."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, denom: torch.Tensor, softcap: float | None, chunk_size: int) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        denom = denom.to(acc)
        log_denom = denom.log()
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = target[start:start + chunk_size]
            logits = F.linear(h, weight, bias).to(acc)
            if softcap:
                tanh = torch.tanh(logits / softcap)
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(loss / denom) / d logits = (softmax - onehot) / denom, built in place
            g = logits.sub_((lse + log_denom)[:, None]).exp_()
            g[torch.arange(t.shape[0], device=t.device), t] -= torch.exp(-log_denom)
            if softcap:
                g.mul_(1.0 - tanh * tanh)
            if need_b:
                grad_b += g.sum(0)
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[start:start + chunk_size] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).to(acc)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss / denom

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grad_h, grad_w, grad_b = ctx.grads  # kept (not mutated) so a retained graph can run backward again
        w_dtype, b_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(w_dtype, copy=True).mul_(grad_out)
        if grad_b is not None:
            grad_b = grad_b.to(b_dtype, copy=True).mul_(grad_out)
        return grad_h, grad_w, grad_b, None, None, None, None


def next_token_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels`` shifted left by one (each position's target is the next token), the last
    position ignored: what transformers' causal-LM loss compares the logits with."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


@functools.cache
def _liger_flce() -> Any:
    """Liger-kernel's fused linear cross-entropy, or None when liger-kernel is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    logger.info("fused cross-entropy: using liger-kernel's kernel")
    return liger_fused_linear_cross_entropy


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Any = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    use_liger: bool = True,
    rows: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """``cross_entropy(softcap(logit_scale * (hidden @ weight.T + bias)), target)`` without the full logits.

    ``target`` is aligned with ``hidden`` (already shifted). Reduction follows transformers'
    ``ForCausalLMLoss``: the sum over valid targets divided by ``num_items_in_batch`` when
    given (gradient accumulation), their mean otherwise. Only rows with a valid target are
    projected (prompt and image tokens cost nothing); a batch without any gives a zero loss
    (transformers' mean gives NaN there). ``rows``: the flat indices of the valid targets when
    the caller knows them (built on the CPU: no host sync here). ``logit_scale`` (Cohere's
    ``logit_scale``) multiplies the selected hidden rows and the bias, not the weight: the same
    logits without a scaled copy of the vocabulary-sized matrix.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1).to(hidden.device)
    if rows is None:
        rows = (target != ignore_index).nonzero().squeeze(1)
    rows = rows.to(hidden.device)
    count = rows.numel()
    if count == 0:
        return hidden.sum() * 0.0
    if torch.is_tensor(num_items_in_batch):
        denom = num_items_in_batch.to(hidden.device, torch.float32)
    else:  # a fill, not a copy from host memory (which would sync)
        denom = torch.full((), count if num_items_in_batch is None else num_items_in_batch, dtype=torch.float32,
                           device=hidden.device)
    dtype = _compute_dtype(weight)
    h = hidden.index_select(0, rows).to(dtype)
    t = target.index_select(0, rows)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    if logit_scale is not None and logit_scale != 1:
        h = h * logit_scale
        b = b * logit_scale if b is not None else None
    liger = _liger_flce() if use_liger else None
    if liger is not None:
        return liger(h, w, t, bias=b, reduction="sum", softcap=softcap) / denom
    with torch.autocast(weight.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(h, w, b, t, denom, softcap, chunk_size or default_chunk_size(w.shape[0]))


def _logit_scale(config: Any) -> float | None:
    """The factor a config declares for the LM head's logits: Cohere's ``logit_scale``
    (multiplied) or Granite's ``logits_scaling`` (divided by); None when it declares none.
    Whether the model's forward really applies it is checked on the first training call."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (text, config):
        scale = getattr(cfg, "logit_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale not in (0, 1):
            return float(scale)
        scaling = getattr(cfg, "logits_scaling", None)
        if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling not in (0, 1):
            return 1.0 / float(scaling)
    return None


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The host and CUDA generators' states, for a forward that is run again from the same draws."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    host, cuda = state
    torch.set_rng_state(host)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class _FusedHead:
    """State shared by the forward wrapper, the LM head's pre-hook and the loss function."""

    head: nn.Linear
    softcap: float | None
    logit_scale: float | None = None
    active: bool = False
    called: bool = False
    verified: bool = False
    #: the first training call found logits the fused loss does not reproduce: the lever is off
    declined: bool = False
    model_name: str = "the model"
    hidden: torch.Tensor | None = None
    handles: list[Any] = field(default_factory=list)
    #: the labelled rows of this call's labels and their shape, from the collator (sync-free forward)
    loss_rows: torch.Tensor | None = None
    loss_rows_shape: tuple[int, ...] | None = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Keep the head's input; let it project only the last position (for the check below)."""
        if not self.active:
            return None
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("input"), ()
        self.hidden = hidden
        last = hidden[..., -1:, :] if hidden.dim() >= 3 else hidden[-1:]
        return (last, *rest), kwargs

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
             num_items_in_batch: Any = None, ignore_index: int = IGNORE_INDEX,
             shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if not self.active or self.hidden is None:
            from transformers.loss.loss_utils import ForCausalLMLoss

            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                   ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        hidden, self.hidden, self.called = self.hidden, None, True
        if not self.verified and not self._verify(hidden, logits):
            self.declined = True  # the forward wrapper runs this call again with the lever off
            return logits.float().sum() * 0.0
        rows = None
        if shift_labels is None:
            shift_labels = next_token_targets(labels, ignore_index)
            if self.loss_rows is not None and self.loss_rows_shape == tuple(labels.shape) and ignore_index == IGNORE_INDEX:
                rows = self.loss_rows  # the same labels, shifted the same way, on the CPU
        return fused_linear_cross_entropy(hidden, self.head.weight, shift_labels, self.head.bias,
                                          ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                          softcap=self.softcap, rows=rows, logit_scale=self.logit_scale)

    def decline(self, reason: str) -> None:
        """Turn the lever off for the rest of the run, with one warning."""
        self.declined, self.active, self.hidden = True, False, None
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        logger.warning("fused cross-entropy declined for %s: %s. Training goes on with the model's own loss "
                       "(full logits); set fused_cross_entropy: false to skip this check.", self.model_name, reason)

    @torch.no_grad()
    def _verify(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        """Once: the model's logits for the last position must be what the fused loss computes
        from the head's input, with the logit scale and soft-cap the config declares or without
        them (whichever is closest; transformers releases differ in which they apply). False
        (the lever then declines, see :meth:`decline`) on post-processing mmtune does not reproduce."""
        last = hidden[..., -1:, :] if hidden.dim() >= 3 else hidden[-1:]
        raw = F.linear(last, self.head.weight, self.head.bias).float()
        theirs = logits.float()
        if theirs.shape != raw.shape:
            self.decline(f"its logits have shape {tuple(theirs.shape)}, not {tuple(raw.shape)} (it does not project "
                         "the LM head's input directly)")
            return False
        tol = 2e-2 * max(1.0, theirs.abs().max().item())
        best: tuple[float, float | None, float | None] | None = None
        for scale in dict.fromkeys([self.logit_scale, None]):
            for softcap in dict.fromkeys([self.softcap, None]):
                ours = raw * scale if scale is not None else raw
                ours = torch.tanh(ours / softcap) * softcap if softcap else ours
                if not torch.allclose(ours, theirs, rtol=2e-2, atol=tol):
                    continue
                diff = (ours - theirs).abs().max().item()
                if best is None or diff < best[0]:
                    best = (diff, scale, softcap)
        if best is None:
            ours = raw * self.logit_scale if self.logit_scale is not None else raw
            ours = torch.tanh(ours / self.softcap) * self.softcap if self.softcap else ours
            self.decline("its logits are post-processed in a way mmtune does not reproduce (max difference %.3g)"
                         % (ours - theirs).abs().max().item())
            return False
        _, scale, softcap = best
        if softcap != self.softcap:
            logger.info("fused cross-entropy: this model applies no final logit soft-capping")
        if scale != self.logit_scale:
            logger.info("fused cross-entropy: this model does not apply its config's logit scale %s", self.logit_scale)
        self.softcap, self.logit_scale, self.verified = softcap, scale, True
        return True


def _forward_calls_loss_function(cls: type) -> bool:
    """Whether ``cls.forward`` computes its loss through ``self.loss_function`` (following
    ``super().forward`` calls); some families (Qwen2-Audio) build their own loss instead."""
    import inspect

    for klass in cls.__mro__:
        if "forward" not in vars(klass):
            continue
        try:
            source = inspect.getsource(vars(klass)["forward"])
        except (OSError, TypeError):
            return False
        if "self.loss_function(" in source:
            return True
        if "super().forward(" not in source and "super(" not in source:
            return False
    return False


def enable_fused_cross_entropy(model: nn.Module) -> bool:
    """Hook the fused loss into ``model`` (peft wrappers looked through); False (logged) when
    the model does not fit: its head is not a plain Linear or it has its own loss.

    The first training call checks the model's own logits for one position against the fused
    head's (with the config's logit scale and soft-cap); a model that post-processes its logits
    otherwise, or computes its loss another way, makes the lever decline there with one warning:
    that call runs again without it (same random draws) and the run goes on with the lever off."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = unwrap_model(model)
    if getattr(base, "_mmtune_fused_head", None) is not None:
        return True
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        is_deepspeed_zero3_enabled = lambda: False  # noqa: E731
    if is_deepspeed_zero3_enabled():
        logger.info("fused cross-entropy not applied: DeepSpeed ZeRO-3 frees the head's weight after its forward")
        return False
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        logger.info("fused cross-entropy not applied: the output head is %s, not a plain Linear", type(head).__name__)
        return False
    if (getattr(base, "_loss_function", None) is not None or getattr(base, "loss_function", None) is not ForCausalLMLoss
            or not _forward_calls_loss_function(type(base))):
        logger.info("fused cross-entropy not applied: %s does not compute its loss with transformers' causal-LM "
                    "loss function", type(base).__name__)
        return False
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)
    state = _FusedHead(head=head, softcap=softcap, logit_scale=_logit_scale(config), model_name=type(base).__name__)
    state.handles.append(head.register_forward_pre_hook(state.pre_hook, with_kwargs=True))
    base.loss_function = state.loss
    original = base.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if state.declined or not (base.training and torch.is_grad_enabled() and kwargs.get("labels") is not None):
            return original(*args, **kwargs)
        rng = None if state.verified else _rng_state()  # a declined first call runs again from the same draws
        state.active, state.called, state.hidden = True, False, None
        out = None
        try:
            out = original(*args, **kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            # a model that takes the head's output for its own loss meets one position, not all
            if state.verified or state.called or isinstance(exc, torch.OutOfMemoryError):
                raise
            state.decline(f"{type(base).__name__}'s forward failed with the fused head "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        finally:
            state.active, state.hidden = False, None
        if not state.called and not state.declined:
            state.decline(f"{type(base).__name__} computed its loss without self.loss_function")
        if state.declined:  # this call's loss is not the model's: the same call again, as with the lever off
            del out
            if rng is not None:
                _set_rng_state(rng)
            return original(*args, **kwargs)
        if "logits" in out:
            out["logits"] = None  # one row per sample, kept only for the check
        return out

    base.forward = forward
    base._mmtune_fused_head = state
    logger.info("fused linear cross-entropy on (%s, vocabulary %d%s%s): logits are never materialised whole",
                "liger-kernel" if _liger_flce() is not None else "chunked PyTorch", head.out_features,
                f", soft-cap {softcap}" if softcap else "",
                f", logit scale {state.logit_scale}" if state.logit_scale is not None else "")
    return True


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


def apply_speed_levers(model: nn.Module, model_args: Any, *, gradient_checkpointing: bool = False,
                       device_type: str | None = None, batch_tokens: int | None = None) -> dict[str, Any]:
    """Apply the switched-on levers to a model ready to train; returns what was applied (keys:
    :data:`LEVERS`' ``applied``; ``mmtune env`` reports it)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    applied: dict[str, Any] = {}
    if _default_on(model_args, "liger_kernels", device_type):
        applied["liger_kernels"] = apply_liger_kernels(model)
    fused = getattr(model_args, "fused_cross_entropy", True)
    if fused:
        applied["fused_cross_entropy"] = enable_fused_cross_entropy(model)
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
    if getattr(model_args, "sync_free_forward", True):
        from .precompute import enable_sync_free_forward

        applied["sync_free_forward"] = enable_sync_free_forward(model) is not None
    frozen = applied.get("frozen_tower_no_grad") or []
    if frozen and device_type == "cuda" and _default_on(model_args, "frozen_block_cuda_graphs", device_type):
        applied["graphed_blocks"] = graph_frozen_blocks(model, frozen)
    return applied
