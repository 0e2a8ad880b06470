"""Preference training (``stage: dpo`` with ``pref_loss`` sigmoid / ipo / hinge / orpo / simpo,
and ``stage: kto``) for every family, LoRA / freeze / full, on the same pipeline as SFT.

What makes it cheap, by construction:

- **One forward per pair, the media encoded once.** The collator lays a batch of B pairs out as
  2B rows (the chosen answers, then the rejected ones, each after the shared prompt) with the
  same media in the same order in both halves. :class:`PairedMedia` (a forward pre-hook and a
  forward hook on each vision/audio tower module) hands the tower the first half of its inputs
  and gives the model the tower's output twice, so the tower runs once per pair. The first call
  checks that the halves are equal; a batch whose halves differ (a dummy image for a text-only
  batch on several ranks) runs the tower on all rows.
- **No second model.** The reference log-probabilities come from the same weights with the LoRA
  adapter disabled (peft's ``disable_adapter()``), or, for freeze and full, are computed once
  before training with the initial weights and kept beside the samples
  (:func:`precompute_reference`).
- **No full-vocabulary logits.** With the fused-loss lever's head (``speed/fused_loss.py``) the
  model is called without labels and the LM head projects one position; the per-token
  log-probabilities of the answer tokens are computed from the head's input chunk by chunk
  (:class:`FusedTokenLogps`: the logits are recomputed in the backward, never kept). Without
  the lever the model's logits are used.

The losses and their metrics follow TRL's ``DPOTrainer`` (sigmoid with conservative label
smoothing, ipo, hinge), ``ORPOTrainer`` (orpo), ``CPOTrainer`` (simpo) and ``KTOTrainer`` (kto),
with TRL's metric names (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``kl``); tests/train compare them
with TRL's on the same log-probabilities.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtune.constants import IGNORE_INDEX
from mmtune.model.composite import get_composite_model
from mmtune.model.layers import unwrap_model
from mmtune.speed.fused_loss import FusedHead, default_chunk_size, next_token_targets
from mmtune.speed.sync_free import without_precomputed

from .trainer import MMTrainer

logger = logging.getLogger(__name__)

#: batch keys that are not model inputs
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")
#: the collator's mark that the two halves of the batch carry the same media in the same order
SHARED_MEDIA = "shared_media"


# ---------------------------------------------------------------------------------------------- data
def _side(feature: Mapping[str, Any], ids: str, labels: str) -> dict[str, Any]:
    """One row of a pair (or a KTO row) as the padding collator takes it."""
    return {**{k: v for k, v in feature.items() if k in ("images", "videos", "audios", "sample_index", "source")
               or k.startswith("embedded_")}, "input_ids": list(feature[ids]), "labels": list(feature[labels])}


def _first_label(labels: list[int]) -> int:
    return next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))


def add_kl_rows(dataset: Any, batch_size: int) -> Any:
    """KTO's mismatched rows, as TRL builds them: within each run of ``batch_size`` samples, the
    prompt of sample i with the answer of sample i-1 (the first takes the last's). They
    estimate the KL term; fixed per sample, so the reference's log-probabilities of them can be
    cached too."""
    def rotate(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids, labels = batch["input_ids"], batch["labels"]
        cuts = [_first_label(list(y)) for y in labels]
        n = len(ids)
        kl_ids, kl_labels = [], []
        for i in range(n):
            j = (i - 1) % n
            kl_ids.append(list(ids[i][:cuts[i]]) + list(ids[j][cuts[j]:]))
            kl_labels.append([IGNORE_INDEX] * cuts[i] + list(labels[j][cuts[j]:]))
        return {"kl_input_ids": kl_ids, "kl_labels": kl_labels}

    return dataset.map(rotate, batched=True, batch_size=batch_size, desc="KTO: mismatched rows for the KL term")


@dataclass
class PreferenceCollator:
    """Pairs (``kind`` pairs) -> 2B rows, chosen then rejected, padded together, one set of media
    tensors for both halves (:class:`PairedMedia` encodes it once); KTO rows (``kind`` kto) ->
    the rows, ``kto_label``, and their mismatched rows under ``kl`` (a batch of its own). Cached
    reference log-probabilities ride along as tensors."""

    base: Any
    kind: str = "pairs"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self.kind == "pairs":
            rows = [_side(f, "input_ids", "labels") for f in features]
            rows += [_side(f, "rejected_input_ids", "rejected_labels") for f in features]
            batch = self.base(rows)
            faked = bool(getattr(self.base, "fake_media_for_text_only", False)) and not any(
                f.get("images") or f.get("videos") or f.get("audios") for f in features)
            batch[SHARED_MEDIA] = not faked
        else:
            batch = self.base([_side(f, "input_ids", "labels") for f in features])
            batch["kto_label"] = torch.tensor([int(f["kto_label"]) for f in features], dtype=torch.bool)
            if "kl_input_ids" in features[0]:
                batch["kl"] = self.base([_side(f, "kl_input_ids", "kl_labels") for f in features])
        for key in REF_KEYS:
            if key in features[0]:
                batch[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        return batch


# ---------------------------------------------------------------------------------------------- media
def _halve(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] % 2 == 0 and value.shape[0] > 0:
        return value[: value.shape[0] // 2]
    return value


def _halves_equal(value: Any) -> bool:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.shape[0] % 2:
            return False
        n = value.shape[0] // 2
        return bool(torch.equal(value[:n], value[n:]))
    return True


def _twice(value: Any) -> Any:
    """Every tensor of a tower's output (a tensor, tuple, list or ModelOutput) repeated along
    its first dimension: the features of the chosen half, then the same for the rejected."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value], dim=0) if value.dim() > 0 else value
    if isinstance(value, Mapping):  # transformers' ModelOutput is an ordered dict
        items = {k: _twice(v) for k, v in value.items()}
        return items if type(value) is dict else type(value)(**items)
    if isinstance(value, tuple):
        return type(value)(_twice(v) for v in value) if not hasattr(value, "_fields") else \
            type(value)(*(_twice(v) for v in value))
    if isinstance(value, list):
        return [_twice(v) for v in value]
    return value


def encoder_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The whole vision/audio encoders of ``model``, from its family's declared keys: for each of
    ``vision_model_keys``, its shortest module path that holds no language-model key (Qwen2-VL's
    ``model.visual.patch_embed`` and ``model.visual.blocks`` -> ``model.visual``; Qwen2.5-Omni's
    visual and audio towers apart). The encoder's output then covers every step from the media
    to the features the model merges."""
    base = unwrap_model(model)
    entry = get_composite_model(getattr(getattr(base, "config", None), "model_type", ""))
    if entry is None:
        return []
    found: dict[str, nn.Module] = {}
    for key in entry.vision_model_keys:
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if any(lm == prefix or lm.startswith(prefix + ".") for lm in entry.language_model_keys):
                continue
            if any(prefix.startswith(other + ".") for other in found):
                break
            try:
                found.setdefault(prefix, base.get_submodule(prefix))
            except AttributeError:
                pass
            break
    return [(k, m) for k, m in found.items() if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]


@dataclass(eq=False)
class PairedMedia:
    """Hooks on the model's vision/audio tower modules that run each tower on the first half of a
    paired batch and give the model its output twice, while :meth:`sharing` is open. ``calls``
    counts the tower calls served so; ``declined`` says why sharing is off, if it is."""

    handles: list[Any] = field(default_factory=list)
    active: bool = False
    checked: bool = False
    declined: str | None = None
    halved: list[bool] = field(default_factory=list)
    calls: int = 0

    @classmethod
    def install(cls, model: nn.Module) -> PairedMedia:
        share = cls()
        towers = encoder_roots(model)
        if not towers:
            share.declined = "the model has no vision/audio tower"
        for _, module in towers:
            share.handles.append(module.register_forward_pre_hook(share.pre_hook, with_kwargs=True))
            share.handles.append(module.register_forward_hook(share.hook, with_kwargs=True, always_call=True))
        return share

    @contextlib.contextmanager
    def sharing(self, on: bool = True) -> Iterator[None]:
        before, self.active = self.active, on and self.declined is None
        try:
            yield
        finally:
            self.active = before

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not self.active:
            self.halved.append(False)
            return None
        values = [*args, *kwargs.values()]
        tensors = [v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not tensors or any(t.shape[0] % 2 for t in tensors):
            self.halved.append(False)
            return None
        if not self.checked:  # once: the halves the collator promised are the same media
            if not all(_halves_equal(v) for v in tensors):
                self.declined = (f"{type(module).__name__}'s inputs differ between the chosen and the rejected half; "
                                 "its media are encoded for every row")
                logger.warning("preference: %s", self.declined)
                self.active = False
                self.halved.append(False)
                return None
            self.checked = True
        self.halved.append(True)
        self.calls += 1
        return tuple(_halve(a) for a in args), {k: _halve(v) for k, v in kwargs.items()}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        halved = self.halved.pop() if self.halved else False
        return _twice(output) if halved and output is not None else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# ---------------------------------------------------------------------------------------------- log-probs
class FusedTokenLogps(torch.autograd.Function):
    """log p(target) of each row of ``hidden`` under the head ``weight`` / ``bias`` (logit
    ``scale`` and ``softcap`` as the model applies them), chunk by chunk: at most one chunk of
    logits exists at a time, in the forward and in the backward (which recomputes them)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                scale: float | None, softcap: float | None, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lses = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            z = FusedTokenLogps._logits(hidden[start:start + chunk], weight, bias, scale, softcap, acc)[0]
            lse = torch.logsumexp(z, dim=-1)
            t = target[start:start + chunk]
            out[start:start + chunk] = z.gather(1, t[:, None]).squeeze(1) - lse
            lses[start:start + chunk] = lse
        ctx.save_for_backward(hidden, weight, bias, target, lses)
        ctx.scale, ctx.softcap, ctx.chunk = scale, softcap, chunk
        return out

    @staticmethod
    def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
                softcap: float | None, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = F.linear(h, weight, bias).to(acc)
        if scale is not None:
            z = z * scale
        tanh = None
        if softcap:
            tanh = torch.tanh(z / softcap)
            z = tanh * softcap
        return z, tanh

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        hidden, weight, bias, target, lses = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        acc = lses.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            z, tanh = FusedTokenLogps._logits(h, weight, bias, ctx.scale, ctx.softcap, acc)
            g = grad[start:start + ctx.chunk].to(acc)
            dz = z.sub_(lses[start:start + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax
            dz[torch.arange(h.shape[0], device=h.device), target[start:start + ctx.chunk]] += g
            if tanh is not None:
                dz.mul_(1.0 - tanh * tanh)
            if ctx.scale is not None:
                dz.mul_(ctx.scale)
            if need_b:
                grad_b += dz.sum(0)
            if need_h:
                grad_h[start:start + ctx.chunk] = (dz.to(hidden.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += dz.t() @ h.to(acc)
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None)


@dataclass
class SequenceLogps:
    """Per row: the sum of the answer tokens' log-probabilities (``logps``) and their count
    (``tokens``)."""

    logps: torch.Tensor
    tokens: torch.Tensor


def logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
    """:class:`SequenceLogps` from full logits (the path without the fused head)."""
    targets = next_token_targets(labels)
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return SequenceLogps((logp * mask).sum(-1), mask.sum(-1))


def logps_from_hidden(fused: FusedHead, hidden: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
    """:class:`SequenceLogps` from the LM head's input, only the answer tokens projected, in chunks."""
    targets = next_token_targets(labels)
    mask = targets != IGNORE_INDEX
    flat = mask.flatten().nonzero().squeeze(1)
    h = hidden.flatten(0, -2).index_select(0, flat)
    head = fused.head
    token = FusedTokenLogps.apply(h, head.weight, head.bias, targets.flatten().index_select(0, flat),
                                  fused.logit_scale, fused.softcap, default_chunk_size(head.out_features))
    rows = torch.div(flat, labels.shape[-1], rounding_mode="floor")
    logps = torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
    return SequenceLogps(logps, mask.sum(-1))


# ---------------------------------------------------------------------------------------------- losses
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class PairLoss:
    """The loss of a batch of pairs and its metrics (TRL's names), from the policy's (and the
    reference's) summed log-probabilities and answer token counts."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def pair_loss(kind: str, beta: float, chosen: SequenceLogps, rejected: SequenceLogps,
              ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None, *,
              label_smoothing: float = 0.0, gamma: float = 0.5, ftx: float = 0.0) -> PairLoss:
    """sigmoid (DPO; ``label_smoothing``: conservative DPO), ipo (per-token averaged log-ratios,
    as TRL), hinge, orpo (TRL's ORPO: the chosen tokens' mean NLL plus beta times the odds-ratio
    term, on mean log-probabilities), simpo (TRL's CPO with loss_type simpo, margin ``gamma``).
    ``ftx`` adds the chosen tokens' mean NLL (TRL's ``sft`` loss) times ftx."""
    pc, pr = chosen.logps.float(), rejected.logps.float()
    nc, nr = chosen.tokens.clamp(min=1).float(), rejected.tokens.clamp(min=1).float()
    nll = -pc.sum() / chosen.tokens.sum().clamp(min=1)
    if kind in ("sigmoid", "ipo", "hinge"):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"pref_loss {kind} needs the reference log-probabilities")
        lc, lr = pc - ref_chosen.float(), pr - ref_rejected.float()
        delta = lc - lr
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
        elif kind == "hinge":
            losses = torch.relu(1 - beta * delta)
        else:
            losses = (lc / nc - lr / nr - 1 / (2 * beta)) ** 2
        loss = losses.mean()
        rc, rr = beta * lc.detach(), beta * lr.detach()
    elif kind == "orpo":
        ac, ar = pc / nc, pr / nr
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        ratio = F.logsigmoid(log_odds)
        loss = nll - (beta * ratio).mean()
        rc, rr = beta * ac.detach(), beta * ar.detach()
    elif kind == "simpo":
        ac, ar = pc / nc, pr / nr
        logits = (ac - ar) - gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
        loss = losses.mean()
        rc, rr = beta * ac.detach(), beta * ar.detach()
    else:
        raise ValueError(f"unknown pref_loss {kind!r}")
    if ftx and kind != "orpo":
        loss = loss + ftx * nll
    metrics = {"rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
               "rewards/margins": (rc - rr).mean().item(), "rewards/accuracies": (rc > rr).float().mean().item(),
               "logps/chosen": pc.detach().mean().item(), "logps/rejected": pr.detach().mean().item()}
    if kind == "orpo":
        metrics["nll_loss"] = nll.item()
    return PairLoss(loss, rc, rr, metrics)


def kto_loss(beta: float, policy: SequenceLogps, ref: torch.Tensor, desirable: torch.Tensor,
             kl_policy: torch.Tensor | None, kl_ref: torch.Tensor | None, *, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, ftx: float = 0.0) -> PairLoss:
    """TRL's KTO loss (``loss_type: kto``): the KL estimate from the mismatched rows, detached
    and clamped at 0; desirable answers pushed above it, undesirable below; the mean over the
    batch. ``ftx`` adds the desirable tokens' mean NLL times ftx."""
    logratios = policy.logps.float() - ref.float()
    kl = (kl_policy.float() - kl_ref.float()).mean().detach().clamp(min=0) if kl_policy is not None else \
        torch.zeros((), device=logratios.device)
    good, bad = logratios[desirable], logratios[~desirable]
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad)))])
    loss = losses.nanmean()
    if ftx:
        tokens = policy.tokens[desirable].sum().clamp(min=1)
        loss = loss + ftx * (-policy.logps.float()[desirable].sum() / tokens)
    rc, rr = beta * good.detach(), beta * bad.detach()
    metrics = {"kl": kl.item()}
    if rc.numel():
        metrics.update({"rewards/chosen": rc.mean().item(),
                        "logps/chosen": policy.logps[desirable].detach().float().mean().item()})
    if rr.numel():
        metrics.update({"rewards/rejected": rr.mean().item(),
                        "logps/rejected": policy.logps[~desirable].detach().float().mean().item()})
    if rc.numel() and rr.numel():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return PairLoss(loss, rc, rr, metrics)


# ---------------------------------------------------------------------------------------------- the forward
def _peft(model: nn.Module) -> Any:
    """The peft model inside ``model`` (accelerate / DDP wrappers looked through), or None."""
    seen = model
    while seen is not None:
        if hasattr(seen, "disable_adapter") and hasattr(seen, "peft_config"):
            return seen
        seen = getattr(seen, "module", None)
    return None


class PreferenceForward:
    """``forward(model, batch)`` -> :class:`PairLoss`: the policy's log-probabilities of the
    answers (one forward for a batch of pairs), the reference's (the adapter disabled, or the
    batch's cached values), and the loss ``finetuning_args`` names."""

    def __init__(self, finetuning_args: Any, fused: FusedHead | None = None, media: PairedMedia | None = None) -> None:
        self.args = finetuning_args
        self.fused = fused if fused is not None and not fused.declined else None
        self.media = media

    def logps(self, model: nn.Module, batch: Mapping[str, Any], paired: bool = False) -> SequenceLogps:
        """The summed answer log-probabilities of every row of ``batch`` (one model call)."""
        inputs = without_precomputed({k: v for k, v in batch.items()
                                      if k not in (*REF_KEYS, "labels", "kto_label", "kl", SHARED_MEDIA)})
        inputs["use_cache"] = False
        labels = batch["labels"]
        share = self.media.sharing(paired) if self.media is not None else contextlib.nullcontext()
        fused = self.fused
        if fused is not None and not fused.declined:
            with share, fused.capture():
                out = model(**inputs)
            hidden = fused.take_hidden()
            if not fused.verified and hidden is not None:
                logits = out.get("logits") if isinstance(out, Mapping) else None
                if logits is None:
                    fused.decline("the model returned no logits to check")
                else:
                    fused.verify(hidden, logits)
            elif hidden is None:
                fused.decline("the model's forward did not call its LM head as a module")
            if not fused.declined:
                return logps_from_hidden(fused, hidden, labels)
            self.fused = None
        with share:
            out = model(**inputs)
        return logps_from_logits(out["logits"] if isinstance(out, Mapping) else out[0], labels)

    @contextlib.contextmanager
    def reference_mode(self, model: nn.Module) -> Iterator[None]:
        """The reference: the same weights with the adapter disabled, without autograd."""
        peft = _peft(model)
        if peft is None:
            raise ValueError("pref_reference adapter: the model carries no peft adapter to disable")
        with torch.no_grad(), peft.disable_adapter():
            yield

    def reference(self, model: nn.Module, batch: Mapping[str, Any], keys: tuple[str, ...],
                  paired: bool = False) -> tuple[torch.Tensor, ...] | None:
        """The reference's log-probabilities: the batch's cached ``keys``, or a forward of the
        same weights with the adapter disabled; None when the loss reads none."""
        if not self.args.needs_reference:
            return None
        if all(k in batch for k in keys):
            return tuple(batch[k] for k in keys)
        if self.args.reference != "adapter":
            raise ValueError(f"the batch carries no cached reference log-probabilities ({', '.join(keys)}): run "
                             "precompute_reference first, or train LoRA with pref_reference adapter")
        with self.reference_mode(model):
            return (self.logps(model, batch, paired).logps,)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> PairLoss:
        args = self.args
        if args.stage == "dpo":
            paired = bool(batch.get(SHARED_MEDIA, False))
            policy = self.logps(model, batch, paired)
            n = policy.logps.shape[0] // 2
            chosen = SequenceLogps(policy.logps[:n], policy.tokens[:n])
            rejected = SequenceLogps(policy.logps[n:], policy.tokens[n:])
            ref = self.reference(model, batch, ("ref_chosen_logps", "ref_rejected_logps"), paired)
            if ref is not None and len(ref) == 1:
                ref = (ref[0][:n], ref[0][n:])
            ref_c, ref_r = (ref[0].to(policy.logps.device), ref[1].to(policy.logps.device)) if ref else (None, None)
            return pair_loss(args.pref_loss, args.pref_beta, chosen, rejected, ref_c, ref_r,
                             label_smoothing=args.pref_label_smoothing, gamma=args.simpo_gamma, ftx=args.pref_ftx)
        kl_batch = batch.get("kl")
        kl_policy = None
        if kl_batch is not None:
            with torch.no_grad():
                kl_policy = self.logps(model, kl_batch).logps
        policy = self.logps(model, batch)
        if "ref_logps" in batch and ("ref_kl_logps" in batch or kl_batch is None):
            ref, kl_ref = batch["ref_logps"], batch.get("ref_kl_logps")
        elif args.reference == "adapter":
            with self.reference_mode(model):
                ref = self.logps(model, batch).logps
                kl_ref = self.logps(model, kl_batch).logps if kl_batch is not None else None
        else:
            raise ValueError("the batch carries no cached reference log-probabilities (ref_logps): run "
                             "precompute_reference first, or train LoRA with pref_reference adapter")
        device = policy.logps.device
        return kto_loss(args.pref_beta, policy, ref.to(device), batch["kto_label"].to(device), kl_policy,
                        kl_ref.to(device) if kl_ref is not None else None,
                        desirable_weight=args.kto_desirable_weight, undesirable_weight=args.kto_undesirable_weight,
                        ftx=args.pref_ftx)


# ---------------------------------------------------------------------------------------------- reference cache
@torch.no_grad()
def precompute_reference(model: nn.Module, dataset: Any, collator: PreferenceCollator, forward: PreferenceForward,
                         batch_size: int = 8, device: Any = None) -> Any:
    """``dataset`` with the reference's log-probabilities as columns (``ref_chosen_logps`` and
    ``ref_rejected_logps`` for pairs; ``ref_logps`` and, with mismatched rows, ``ref_kl_logps``
    for KTO), computed once with the model's current (initial) weights in evaluation mode, so
    that no second copy of the model is needed during training."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    columns: dict[str, list[float]] = defaultdict(list)
    device = device or next(model.parameters()).device

    def to(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return {k: to(v) for k, v in batch.items()}
        return batch.to(device) if isinstance(batch, torch.Tensor) else batch

    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="reference log-probabilities"):
            features = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            batch = to(collator(features))
            if collator.kind == "pairs":
                logps = forward.logps(model, batch, bool(batch.get(SHARED_MEDIA))).logps.float().cpu()
                n = len(features)
                columns["ref_chosen_logps"] += logps[:n].tolist()
                columns["ref_rejected_logps"] += logps[n:].tolist()
            else:
                columns["ref_logps"] += forward.logps(model, batch).logps.float().cpu().tolist()
                if "kl" in batch:
                    columns["ref_kl_logps"] += forward.logps(model, batch["kl"]).logps.float().cpu().tolist()
    finally:
        model.train(was_training)
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    logger.info("reference log-probabilities cached for %d samples (%s)", len(dataset), ", ".join(columns))
    return dataset


# ---------------------------------------------------------------------------------------------- the trainer
class PreferenceTrainer(MMTrainer):
    """:class:`MMTrainer` whose loss is the preference loss of :class:`PreferenceForward`; the
    metrics (TRL's names) are averaged over the steps of each logging interval and logged with
    the loss (``eval_`` before them in evaluation)."""

    def __init__(self, *args: Any, preference: PreferenceForward, **kwargs: Any) -> None:
        kwargs.setdefault("training_forward", None)
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.model_accepts_loss_kwargs = False  # the loss is a batch mean: the Trainer scales it for accumulation
        self._pref_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list),
                                                                 "eval": defaultdict(list)}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = self.preference(model, inputs)
        mode = "train" if model.training else "eval"
        for key, value in result.metrics.items():
            self._pref_metrics[mode][key].append(value)
        return (result.loss, {"loss": result.loss}) if return_outputs else result.loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None:
            prefix = "eval_" if mode == "eval" else ""
            for key, values in self._pref_metrics[mode].items():
                if values:
                    logs[prefix + key] = sum(values) / len(values)
            self._pref_metrics[mode].clear()
        super().log(logs, *args, **kwargs)
