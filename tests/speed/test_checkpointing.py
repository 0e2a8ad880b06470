"""Selective activation checkpointing (mmtune.speed.checkpointing): the same losses, only N layers
recomputed."""

import pytest

from mmtune.model.layers import decoder_layers
from mmtune.speed import checkpointing

from ..helpers import tiny_model

from ..helpers import assert_same as _assert_same
from ..helpers import make_batch as _batch
from ..helpers import make_model as _model
from ..helpers import train_steps as _train


# ------------------------------------------------------------------ selective activation checkpointing
def test_choose_checkpoint_layers_from_a_memory_budget():
    assert checkpointing.choose_checkpoint_layers(28, 1.0, 0.1, 40.0) == 0  # everything fits
    assert checkpointing.choose_checkpoint_layers(28, 1.0, 0.1, 0.0) == 28  # nothing fits
    n = checkpointing.choose_checkpoint_layers(28, 1.0, 0.1, 20.0)
    assert (28 - n) * 1.0 + n * 0.1 <= 20.0 < (28 - n + 1) * 1.0 + (n - 1) * 0.1
    per_token, ckpt = checkpointing.activation_bytes_per_token(tiny_model("qwen2_vl").config)
    assert per_token > ckpt > 0
    model = _model("qwen2_vl")
    kw = dict(device_type="cpu", batch_tokens=1000)
    assert checkpointing.resolve_checkpoint_layers("auto", model, gradient_checkpointing=True, **kw) == 2
    assert checkpointing.resolve_checkpoint_layers("auto", model, gradient_checkpointing=False, **kw) == 0
    assert checkpointing.resolve_checkpoint_layers(1, model, gradient_checkpointing=False, **kw) == 1
    assert checkpointing.resolve_checkpoint_layers("9", model, gradient_checkpointing=False, **kw) == 2
    with pytest.raises(ValueError):
        checkpointing.resolve_checkpoint_layers(-1, model, gradient_checkpointing=False, **kw)


def test_selective_checkpointing_keeps_losses_and_recomputes_only_n_layers():
    batches = [_batch("qwen2_vl", seed=s) for s in (0, 1)]
    ref = _train(_model("qwen2_vl"), batches)
    for n in (0, 1, 2):  # none, half, all of the 2 decoder layers
        model = _model("qwen2_vl")
        assert checkpointing.set_checkpointed_layers(model, n) == n
        layers = decoder_layers(model)
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):
            layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        _assert_same(ref, _train(model, batches, steps=3))
        # a checkpointed layer runs its forward (so its MLP) again in the backward
        assert calls == [6 if i < n else 3 for i in range(len(layers))], (n, calls)


