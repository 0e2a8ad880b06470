"""The fused linear cross-entropy lever (``fused_cross_entropy``): the LM head's logits are
never materialised whole.

The lever registers a forward pre-hook on the LM head (a plain ``nn.Linear``, for a family that
declares ``fusable_head``). :class:`mmtune.speed.forward.TrainingForward` calls the model
without labels while the hook keeps the head's input and lets the head project only the last
position; the loss and its gradients wrt the hidden states and the head weight are then
computed chunk by chunk over the labelled tokens only (Liger-kernel's kernel when installed,
the PyTorch one here otherwise). Everything else the model does (label-independent inputs,
token types, media merge) stays the model's own forward.

A config's logit scale and soft-cap are reproduced. The first training call checks the
model's last-position logits against the fused head's; a model whose logits it does not
reproduce, or one that carries its own loss function, makes the lever decline there with one
warning: that call runs again with the labels through the model's own loss, from the same
random draws, and the run goes on with the lever off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtune.constants import IGNORE_INDEX
from mmtune.model.composite import get_composite_model
from mmtune.model.layers import unwrap_model

from .result import Applied, Declined

logger = logging.getLogger(__name__)

NAME = "fused-ce"
SWITCH = "fused_cross_entropy"
SUMMARY = "fused linear cross-entropy: no full logits"


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


def random_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The host and CUDA generators' states, for a forward that is run again from the same draws."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_random_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    host, cuda = state
    torch.set_rng_state(host)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)




@dataclass(eq=False)
class FusedHead:
    """The lever's state: the LM head, how its logits are post-processed, and the pre-hook
    that keeps the head's input while :meth:`capture` is open (outside it the head runs as
    it always does: evaluation and generation see the full logits)."""

    head: nn.Linear
    softcap: float | None
    logit_scale: float | None = None
    model: nn.Module | None = None
    model_name: str = "the model"
    verified: bool = False
    #: the first training call found a loss the fused head does not reproduce: the lever is off
    declined: bool = False
    capturing: bool = False
    hidden: torch.Tensor | None = None
    handle: Any = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Keep the head's input; let it project only the last position (for :meth:`verify`)."""
        if not self.capturing:
            return None
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("input"), ()
        self.hidden = hidden
        last = hidden[..., -1:, :] if hidden.dim() >= 3 else hidden[-1:]
        return (last, *rest), kwargs

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """While open, the head's input is kept and the head projects one position."""
        self.capturing, self.hidden = True, None
        try:
            yield
        finally:
            self.capturing = False

    def take_hidden(self) -> torch.Tensor | None:
        hidden, self.hidden = self.hidden, None
        return hidden

    def own_loss_reason(self) -> str | None:
        """Why the model's loss is not transformers' causal-LM loss of this head, if it is not:
        a loss function set on the model (transformers' ``loss_function`` setter)."""
        if self.model is not None and getattr(self.model, "_loss_function", None) is not None:
            return f"{self.model_name} carries its own loss function (set through loss_function)"
        return None

    def decline(self, reason: str) -> None:
        """Turn the lever off for the rest of the run, with one warning."""
        self.declined, self.capturing, self.hidden = True, False, None
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        logger.warning("fused cross-entropy declined for %s: %s. Training goes on with the model's own loss "
                       "(full logits); set fused_cross_entropy: false to skip this check.", self.model_name, reason)

    @torch.no_grad()
    def verify(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        """Once: the model's logits for the last position must be what the fused loss computes
        from the head's input, with the logit scale and soft-cap the config declares or without
        them (whichever is closest; transformers releases differ in which they apply). False
        (after :meth:`decline`) on post-processing this module does not reproduce."""
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

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, *,
             shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
             rows: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """transformers' causal-LM loss of this head on ``hidden`` (``labels`` shifted here, or
        ``shift_labels`` already aligned). ``rows``: the flat indices of the labelled targets of
        exactly these labels, when the collator built them (no host sync)."""
        if shift_labels is None:
            if labels is None:
                raise ValueError("the fused loss needs labels or shift_labels")
            shift_labels = next_token_targets(labels, ignore_index)
        else:
            rows = None
        return fused_linear_cross_entropy(hidden, self.head.weight, shift_labels, self.head.bias,
                                          ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                          softcap=self.softcap, rows=rows, logit_scale=self.logit_scale)

    def remove(self) -> None:
        """Take the pre-hook off the head (the model is then as before the lever)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def apply(model: nn.Module, cfg: Any, earlier: Mapping[str, Any] | None = None) -> Applied | Declined:
    """Put the fused loss's pre-hook on ``model``'s LM head (peft wrappers looked through).

    Declined when switched off, under DeepSpeed ZeRO-3 (it frees the head's weight after its
    forward), for a family that does not declare ``fusable_head`` (its loss is not transformers'
    causal-LM loss on the head's output), or when the head is not a plain ``nn.Linear``.
    The :class:`FusedHead` rides in ``Applied.state`` for the training forward."""
    if not getattr(cfg, SWITCH, False):
        return Declined(f"switched off ({SWITCH}: false)")
    if _zero3():
        return Declined("DeepSpeed ZeRO-3 frees the head's weight after its forward")
    base = unwrap_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", "")
    entry = get_composite_model(model_type)
    if entry is None or not entry.speed.fusable_head:
        return Declined(f"{type(base).__name__} ({model_type or 'no model type'}): its family declares no fusable "
                        "head (its loss is not transformers' causal-LM loss on a plain LM head)")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return Declined(f"the output head is {type(head).__name__}, not a plain Linear")
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)
    state = FusedHead(head=head, softcap=softcap, logit_scale=_logit_scale(config), model=base,
                      model_name=type(base).__name__)
    state.handle = head.register_forward_pre_hook(state.pre_hook, with_kwargs=True)
    logger.info("fused linear cross-entropy on (%s, vocabulary %d%s%s): logits are never materialised whole",
                "liger-kernel" if _liger_flce() is not None else "chunked PyTorch", head.out_features,
                f", soft-cap {softcap}" if softcap else "",
                f", logit scale {state.logit_scale}" if state.logit_scale is not None else "")
    return Applied(detail=True, state=state)
