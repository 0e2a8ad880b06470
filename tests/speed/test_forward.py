"""The training forward (mmtune.speed.forward) is the one place the fused loss and the sync-free
inputs act: the levers only hook modules, nothing is rebound or stored on the model, and the
model's own path (evaluation) is left as it was."""

import copy

import pytest
import torch

from mmtune.speed.forward import TrainingForward, collator_precompute
from mmtune.speed.result import Applied, Declined
from mmtune.speed.sync_free import HOST_KEY, PRECOMPUTED_KEY

from ..helpers import apply_forward_levers, assert_same, make_batch, make_model, train_steps, unwrap, with_positions


def _shadowed_methods(model):
    """(module name, attribute) for every instance attribute that hides a method of the
    module's class, and every attribute named ``_mmtune_*``."""
    found = []
    for name, module in model.named_modules():
        cls = type(module)
        for attr in vars(module):
            if attr.startswith("_mmtune"):
                found.append((name, attr))
            elif callable(getattr(cls, attr, None)) and not isinstance(getattr(cls, attr), type):
                found.append((name, attr))
    return found


@pytest.mark.parametrize("method", ["lora", "full"])
def test_after_the_levers_and_a_training_step_no_method_is_shadowed_and_nothing_rides_on_the_model(method):
    model = make_model("qwen2_vl", method, freeze_multi_modal_projector=False)
    before = _shadowed_methods(model)
    results = apply_forward_levers(model)
    assert all(isinstance(r, Applied) for r in results.values())
    forward = TrainingForward.from_levers(results)
    batch = forward.precompute(with_positions(model, make_batch("qwen2_vl")))
    model.train()
    forward(model, batch).loss.backward()
    assert _shadowed_methods(model) == before == []
    for module in (model, unwrap(model)):
        assert not any(k.startswith("_mmtune") for k in vars(module))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_training_forward_gives_the_models_own_losses_and_gradients(method):
    """Both levers on a LoRA (peft) model and a fully trained one, batches as the collator
    builds them: the losses and gradients of the model's own forward and loss."""
    flags = {"freeze_multi_modal_projector": False}
    ref_model = make_model("qwen2_vl", method, **flags)
    batches = [with_positions(ref_model, make_batch("qwen2_vl", seed=s)) for s in (0, 1)]
    ref = train_steps(ref_model, batches)
    model = make_model("qwen2_vl", method, **flags)
    forward = TrainingForward.from_levers(apply_forward_levers(model))
    assert_same(ref, train_steps(model, [forward.precompute(dict(b)) for b in batches], forward))
    assert forward.fused.verified and not forward.fused.declined


def test_evaluation_runs_the_models_own_path():
    """After training steps through the training forward, ``model.eval()`` without gradients
    is the model's own forward: full logits, its own loss, no hook acting."""
    model = make_model("qwen2_vl")
    plain = copy.deepcopy(model)
    forward = TrainingForward.from_levers(apply_forward_levers(model))
    batch = make_batch("qwen2_vl")
    model.train()
    forward(model, forward.precompute(dict(batch))).loss.backward()
    model.zero_grad()
    captured = []
    head = unwrap(model).get_output_embeddings()
    head.register_forward_hook(lambda m, args, out: captured.append(args[0].shape[-2]))
    for m in (model, plain):
        m.eval()
    with torch.no_grad():
        out, ref = model(**batch), plain(**batch)
    assert out.logits.shape == ref.logits.shape and out.logits.shape[-1] == head.out_features
    assert captured == [batch["input_ids"].shape[1]]  # every position projected: the fused hook is idle
    assert torch.allclose(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    assert forward.fused.hidden is None and forward.sync_free.current is None


def test_from_levers_and_the_collators_precompute():
    model = make_model("llava")  # fused head, no precomputable tower
    results = apply_forward_levers(model)
    assert isinstance(results["fused_cross_entropy"], Applied)
    assert isinstance(results["sync_free_forward"], Declined)
    forward = TrainingForward.from_levers(results)
    assert forward.sync_free is None and forward.precompute is None and collator_precompute(results) is None
    assert TrainingForward.from_levers({}) is None
    assert TrainingForward.from_levers({"fused_cross_entropy": Declined("off")}) is None


def test_a_batch_without_labels_runs_the_model_as_it_is():
    model = make_model("qwen2_vl")
    forward = TrainingForward.from_levers(apply_forward_levers(model))
    batch = forward.precompute(make_batch("qwen2_vl"))
    batch.pop("labels")
    model.train()
    out = forward(model, batch)
    assert out.loss is None and out.logits.shape[-1] == unwrap(model).get_output_embeddings().out_features
    assert PRECOMPUTED_KEY in batch and HOST_KEY in batch  # the caller's batch is not changed
