"""Frozen towers without autograd (mmtune.speed.tower_no_grad): the same losses and gradients, no
graph recorded in the tower, nothing assigned on a module."""

import torch

from mmtune.model.layers import unwrap_model
from mmtune.speed import tower_no_grad

from ..helpers import assert_same as _assert_same
from ..helpers import make_batch as _batch
from ..helpers import make_model as _model
from ..helpers import train_steps as _train


# ------------------------------------------------------------------ frozen tower without autograd
def _tower_output_requires_grad(model):
    seen = []
    base = unwrap_model(model)
    base.model.visual.blocks[-1].register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    model.train()
    model(**_batch("qwen2_vl"))
    return seen[-1]


def test_frozen_tower_without_autograd_keeps_losses_and_grads():
    from mmtune.model.layers import enable_gradient_checkpointing

    def build(lever):
        model = _model("qwen2_vl", freeze_multi_modal_projector=False)  # the projector (merger) trains
        enable_gradient_checkpointing(unwrap_model(model))  # makes the tower record a graph
        if lever:
            assert tower_no_grad.run_frozen_towers_without_grad(model).detail == ["model.visual.patch_embed",
                                                                             "model.visual.blocks"]
        return model

    batches = [_batch("qwen2_vl", seed=s) for s in (0, 1)]
    _assert_same(_train(build(False), batches), _train(build(True), batches))
    assert _tower_output_requires_grad(build(False)) and not _tower_output_requires_grad(build(True))
    # a tower that trains, even in part, is left alone
    assert not tower_no_grad.run_frozen_towers_without_grad(_model("qwen2_vl", "full", freeze_vision_tower=False))




def test_the_mode_is_given_back_when_the_tower_raises():
    """The forward hook is registered with always_call: a tower that raises leaves autograd as
    the caller had it, and nested calls restore each caller's mode."""
    model = _model("qwen2_vl", freeze_multi_modal_projector=False)
    hooks = tower_no_grad.run_frozen_towers_without_grad(model).state
    block = unwrap_model(model).model.visual.blocks[0]
    handle = block.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with torch.enable_grad():
            try:
                block(torch.zeros(1))
            except RuntimeError:
                pass
            assert torch.is_grad_enabled()
        with torch.no_grad():
            try:
                block(torch.zeros(1))
            except RuntimeError:
                pass
            assert not torch.is_grad_enabled()
    finally:
        handle.remove()
    assert all(not pair.modes for pair in hooks)
