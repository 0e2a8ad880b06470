"""The training forward: one explicit object that owns the fused loss and the sync-free inputs.

The levers of :mod:`mmtune.speed.fused_loss` and :mod:`mmtune.speed.sync_free` only put hooks
on modules (the LM head, the vision tower, the language model); what a training step does with
them lives here, called by ``MMTrainer.compute_loss`` (and by tests and benchmarks that run
steps themselves): take the collator's entries out of the batch, call the model, without the
labels when the fused loss is on, and compute the loss from the head's kept input. Evaluation
and generation call the model as it is, and the hooks leave it alone there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from . import fused_loss, sync_free
from .fused_loss import FusedHead, random_state, restore_random_state
from .result import Applied
from .sync_free import ForwardCall, ForwardPrecompute, SyncFree, SyncFreeError, without_precomputed

logger = logging.getLogger(__name__)

#: a failure of the first fused call that means "this model does not take the fused head", not a bug
_FIRST_CALL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def _state(results: Mapping[str, Any] | None, key: str, kind: type) -> Any:
    result = (results or {}).get(key)
    state = result.state if isinstance(result, Applied) else None
    return state if isinstance(state, kind) else None


def collator_precompute(results: Mapping[str, Any] | None) -> ForwardPrecompute | None:
    """The collator's :class:`ForwardPrecompute` when the sync-free lever applied, else None."""
    state = _state(results, sync_free.SWITCH, SyncFree)
    return state.precompute if state is not None else None


class TrainingForward:
    """``forward(model, inputs, num_items_in_batch=None)`` -> the model's output with the loss.

    - With the sync-free lever: the collator's entries are taken out of ``inputs`` and serve
      the model call (tower inputs, host grid, no all-ones mask, loss rows).
    - With the fused loss and labels: the model is called without them (so it computes no
      loss and no full logits), the LM head's input is kept by its pre-hook, and the loss is
      the fused cross-entropy of it (``logits`` is None in the output). The first call checks
      the model's last-position logits against the fused head's; a model it does not fit
      makes the lever decline (one warning) and that call runs again with the labels through
      the model's own loss, from the same random draws.
    - Otherwise the model runs with ``inputs`` as they are (plus ``num_items_in_batch``).

    ``num_items_in_batch`` is what the Trainer hands a model that accepts loss kwargs: the
    loss is the sum over labelled tokens divided by it (the mean when None)."""

    def __init__(self, fused: FusedHead | None = None, sync_free: SyncFree | None = None) -> None:
        self.fused, self.sync_free = fused, sync_free

    @classmethod
    def from_levers(cls, results: Mapping[str, Any] | None) -> TrainingForward | None:
        """From the levers' results (keyed by switch); None when neither lever applied."""
        fused = _state(results, fused_loss.SWITCH, FusedHead)
        free = _state(results, sync_free.SWITCH, SyncFree)
        if fused is None and free is None:
            return None
        return cls(fused, free)

    @property
    def precompute(self) -> ForwardPrecompute | None:
        """The collator's part of the sync-free forward, or None."""
        return self.sync_free.precompute if self.sync_free is not None else None

    def _run(self, model: nn.Module, inputs: dict[str, Any], call: ForwardCall | None,
             capture: Any = None) -> Any:
        """One model call, served by the sync-free forward when the batch brought its entries."""
        if call is None or self.sync_free is None:
            with capture or contextlib.nullcontext():
                return model(**inputs)
        with self.sync_free.serving(call), capture or contextlib.nullcontext():
            return model(**inputs)

    def __call__(self, model: nn.Module, inputs: Mapping[str, Any], num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        call = self.sync_free.take(inputs) if self.sync_free is not None else None
        inputs = without_precomputed(inputs)  # entries of a precompute this forward does not serve
        loss_kwargs = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
        fused = self.fused
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        if fused is None or fused.declined or (labels is None and shift_labels is None):
            return self._run(model, {**inputs, **loss_kwargs}, call)
        reason = None if fused.verified else fused.own_loss_reason()
        if reason is not None:
            fused.decline(reason)
            return self._run(model, {**inputs, **loss_kwargs}, call)
        plain = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        rng = None if fused.verified else random_state()  # a declined first call runs again from the same draws
        out, hidden = None, None
        try:
            out = self._run(model, plain, call, fused.capture())
            hidden = fused.take_hidden()
        except _FIRST_CALL_ERRORS as exc:
            if fused.verified or isinstance(exc, (torch.OutOfMemoryError, SyncFreeError)):
                raise
            fused.decline(f"its forward failed with the fused head ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})")
        if not fused.declined and hidden is None:
            fused.decline(f"{fused.model_name}'s forward did not call its LM head as a module")
        if not fused.declined and not fused.verified:
            logits = out.get("logits") if isinstance(out, Mapping) else None
            if logits is None:
                fused.decline(f"{fused.model_name} returned no logits to check")
            else:
                fused.verify(hidden, logits)
        if fused.declined:  # this call's loss would not be the model's: the same call again, as with the lever off
            del out, hidden
            if rng is not None:
                restore_random_state(rng)
            return self._run(model, {**inputs, **loss_kwargs}, call)
        out["loss"] = fused.loss(hidden, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                                 rows=call.rows_for(labels) if call is not None else None)
        if "logits" in out:
            out["logits"] = None  # one row per sample, kept only for the check
        return out
