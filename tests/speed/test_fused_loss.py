"""The fused linear cross-entropy (mmtune.speed.fused_loss) changes no result: the kernel equals
full logits, and the lever in the training forward gives the losses and gradients of the
model's own loss, or declines (one warning) and gives them anyway."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from mmtune.speed import fused_loss
from mmtune.speed.result import Declined

from ..helpers import (IGNORE, assert_same, fast_forward, fused_forward, make_batch, make_model, switches, tiny_configs,
                       tiny_model, train_steps, unwrap)

DECLINED = {"qwen2_audio"}  # builds its own CrossEntropyLoss in forward: its family declares no fusable head
LOGGER = "mmtune.speed.fused_loss"


# ------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("softcap,scale", [(None, None), (5.0, None), (None, 0.3), (5.0, 0.3)])
@pytest.mark.parametrize("num_items", [None, 11])
def test_fused_linear_cross_entropy_equals_full_logits(softcap, scale, num_items):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    bias = torch.randn(37, requires_grad=True)
    target = torch.randint(0, 37, (2, 9))
    target[0, :4] = IGNORE
    target[1, -2:] = IGNORE

    logits = F.linear(hidden, weight, bias)
    if scale:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits.view(-1, 37), target.view(-1), ignore_index=IGNORE,
                          reduction="mean" if num_items is None else "sum")
    ref = ref if num_items is None else ref / num_items
    (ref * 3).backward()  # a grad_output other than 1
    ref_grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None

    loss = fused_loss.fused_linear_cross_entropy(hidden, weight, target, bias, num_items_in_batch=num_items,
                                                 softcap=softcap, chunk_size=4, logit_scale=scale)  # several chunks
    (loss * 3).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for t, g in zip((hidden, weight, bias), ref_grads):
        assert torch.allclose(t.grad, g, atol=1e-6), (t.grad - g).abs().max()
    assert hidden.grad[0, :4].abs().sum() == 0  # ignored rows get no gradient


def test_fused_linear_cross_entropy_gradcheck_and_edge_cases():
    torch.manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, IGNORE, 6, 0, 3])
    assert torch.autograd.gradcheck(
        lambda h, w: fused_loss.fused_linear_cross_entropy(h, w, t, softcap=2.0, chunk_size=2), (h, w))
    # only the trainable side is computed (LoRA: frozen head)
    w.requires_grad_(False)
    fused_loss.fused_linear_cross_entropy(h, w, t).backward()
    assert h.grad is not None and w.grad is None
    # no labelled token: a zero loss still joined to the graph
    loss = fused_loss.fused_linear_cross_entropy(h, w, torch.full((5,), IGNORE))
    assert loss.item() == 0 and loss.requires_grad
    assert fused_loss.default_chunk_size(151936) == 512 and fused_loss.default_chunk_size(400) == 8192


# ------------------------------------------------------------------ the lever in the training forward
@pytest.mark.parametrize("model_type,method", [("qwen2_vl", "lora"), ("qwen2_vl", "full"), ("llava", "lora"),
                                               ("gemma3", "lora")])
def test_fused_cross_entropy_in_the_model_keeps_losses_and_grads(model_type, method):
    batches = [make_batch(model_type, seed=s) for s in (0, 1)]
    ref = train_steps(make_model(model_type, method), batches)
    model = make_model(model_type, method)
    forward = fused_forward(model)
    new = train_steps(model, batches, forward)
    assert_same(ref, new)
    model.train()
    out = forward(model, batches[0])
    assert out.logits is None and out.loss is not None  # the full logits were never made
    model.eval()
    with torch.no_grad():
        assert model(**batches[0]).logits.shape[-1] == model.get_output_embeddings().out_features  # eval: as before


def test_fused_cross_entropy_respects_num_items_in_batch():
    """Gradient accumulation: HF Trainer passes the batch's label count; sum / that count."""
    batch = make_batch("qwen2_vl")
    ref, fused = make_model("qwen2_vl"), make_model("qwen2_vl")
    forward = fused_forward(fused)
    ref.train(), fused.train()
    a = ref(**batch, num_items_in_batch=torch.tensor(23)).loss
    b = forward(fused, batch, num_items_in_batch=torch.tensor(23)).loss
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert b.item() != pytest.approx(forward(fused, batch).loss.item(), rel=1e-3)


def _scaled(model):
    unwrap(model).get_output_embeddings().register_forward_hook(lambda m, i, out: out * 3.0)
    return model


def test_fused_cross_entropy_declines_logits_it_does_not_reproduce_and_the_run_goes_on(caplog):
    """A logit post-processing the fused head does not know: one warning on the first training
    call, that call and every later one give the model's own loss (the lever off)."""
    batches = [make_batch("qwen2_vl", seed=s) for s in (0, 1)]
    ref = train_steps(_scaled(make_model("qwen2_vl")), batches)
    model = make_model("qwen2_vl")
    forward = fused_forward(model)
    _scaled(model)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        new = train_steps(model, batches, forward)
    assert_same(ref, new)
    warnings = [r for r in caplog.records if "fused cross-entropy declined" in r.getMessage()]
    assert len(warnings) == 1 and "max difference" in warnings[0].getMessage()
    assert forward.fused.declined
    model.train()
    assert forward(model, batches[0]).logits is not None  # the full logits again: the lever is off


def _own_loss(logits, labels, vocab_size, **kwargs):
    """A model's own causal-LM loss that takes as many labels as it got logit positions."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels[..., -logits.shape[-2]:], vocab_size, **kwargs)


@pytest.mark.parametrize("loss_function,message", [
    ("transformers", "carries its own loss function"),  # transformers' own, but set on the model
    ("own", "carries its own loss function"),  # a loss of its own: the fused one would not be the model's
])
def test_fused_cross_entropy_declines_a_forward_that_skips_the_loss_function(loss_function, message, caplog):
    """A model that computes its loss with a loss function of its own (here: one is set on the
    model after the lever went on) declines on its first call, which runs again without it."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    function = ForCausalLMLoss if loss_function == "transformers" else _own_loss
    batches = [make_batch("qwen2_vl")]
    ref = make_model("qwen2_vl")
    unwrap(ref).loss_function = function
    ref = train_steps(ref, batches, steps=2)
    model = make_model("qwen2_vl")
    forward = fused_forward(model)
    unwrap(model).loss_function = function
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        new = train_steps(model, batches, forward, steps=2)
    assert_same(ref, new)
    assert caplog.text.count("fused cross-entropy declined") == 1 and message in caplog.text


def test_a_declined_first_call_runs_again_from_the_same_random_draws():
    """With dropout on, the lever-off run and the declined run draw the same masks."""
    def with_dropout(model):
        base = unwrap(model)
        base.get_output_embeddings().register_forward_hook(lambda m, i, out: out * 3.0)
        for module in base.model.language_model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.3
        return model

    batch = make_batch("qwen2_vl")
    ref, model = with_dropout(make_model("qwen2_vl")), make_model("qwen2_vl")
    forward = fused_forward(model)
    with_dropout(model)
    ref.train(), model.train()
    torch.manual_seed(3)
    a = ref(**batch).loss
    torch.manual_seed(3)
    b = forward(model, batch).loss
    assert forward.fused.declined and b.item() == a.item()


def test_a_declined_first_call_under_the_sync_free_forward_gives_the_losses_of_the_lever_off():
    """The repeated call is served by the sync-free forward as the first was: the precomputed
    tower inputs and the index merge of a training projector's features."""
    batches = [make_batch("qwen2_vl", seed=s) for s in (0, 1)]
    ref = train_steps(_scaled(make_model("qwen2_vl", freeze_multi_modal_projector=False)), batches)
    model = make_model("qwen2_vl", freeze_multi_modal_projector=False)
    forward, pre = fast_forward(model)
    _scaled(model)
    assert_same(ref, train_steps(model, [pre(dict(b)) for b in batches], forward))
    assert forward.fused.declined


@pytest.mark.parametrize("applied", [True, False])
def test_a_configured_logit_scale_is_reproduced_where_the_model_applies_it(applied):
    """Cohere's ``logit_scale`` (Aya Vision's LM): newer transformers multiply the logits by
    it, older ones do not; the first call's check finds which, and the losses are the model's."""
    model = make_model("qwen2_vl")
    base = unwrap(model)
    base.config.text_config.logit_scale = 0.25
    ref = copy.deepcopy(model)
    if applied:
        for m in (model, ref):
            unwrap(m).get_output_embeddings().register_forward_hook(lambda mod, i, out: out * 0.25)
    forward = fused_forward(model)
    assert forward.fused.logit_scale == 0.25
    batches = [make_batch("qwen2_vl")]
    assert_same(train_steps(ref, batches, steps=2), train_steps(model, batches, forward, steps=2))
    state = forward.fused
    assert state.verified and not state.declined and state.logit_scale == (0.25 if applied else None)


def test_softcapped_logits_are_reproduced():
    """PaliGemma / Gemma-2 style final_logit_softcapping, detected from the config and checked."""
    model = make_model("qwen2_vl")
    base = unwrap(model)
    base.config.text_config.final_logit_softcapping = 0.5  # strong: tiny random logits are ~0.1..1
    head = base.get_output_embeddings()
    ref = copy.deepcopy(model)
    for m in (model, ref):
        unwrap(m).get_output_embeddings().register_forward_hook(lambda mod, i, out: torch.tanh(out / 0.5) * 0.5)
    forward = fused_forward(model)
    assert forward.fused.softcap == 0.5 and head is base.get_output_embeddings()
    batches = [make_batch("qwen2_vl")]
    assert_same(train_steps(ref, batches, steps=2), train_steps(model, batches, forward, steps=2))


def test_fused_cross_entropy_under_bf16_autocast_matches():
    batch = make_batch("qwen2_vl")
    ref, fused = make_model("qwen2_vl"), make_model("qwen2_vl")
    forward = fused_forward(fused)
    ref.train(), fused.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(**batch).loss, forward(fused, batch).loss
    assert b.item() == pytest.approx(a.item(), rel=1e-2)


@pytest.mark.parametrize("model_type", sorted(tiny_configs()))
def test_fused_cross_entropy_is_exact_or_declined_for_every_family(model_type):
    """Every registered family with a transformers class: the lever either declines (its family
    declares no fusable head: it computes its own loss, e.g. Qwen2-Audio) or gives the loss and
    gradients of the full logits on a text-only batch."""
    ref = copy.deepcopy(tiny_model(model_type))
    fused = copy.deepcopy(ref)
    result = fused_loss.apply(fused, switches(sync_free_forward=False), {})
    if isinstance(result, Declined):
        assert model_type in DECLINED, f"{model_type}: fused cross-entropy declined: {result.reason}"
        return
    from mmtune.speed.forward import TrainingForward

    forward = TrainingForward(fused=result.state)
    vocab = ref.get_output_embeddings().out_features
    ids = torch.randint(3, min(vocab, 200), (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    results = []
    for model in (ref, fused):
        model.train()
        loss = (forward(model, batch) if model is fused else model(**batch)).loss  # every family takes text only
        loss.backward()
        head = model.get_output_embeddings().weight
        results.append((loss.item(), head.grad.clone() if head.grad is not None else None))
    (a, ga), (b, gb) = results
    assert b == pytest.approx(a, rel=1e-5)
    if ga is not None:
        assert torch.allclose(gb, ga, atol=1e-6)
    state = forward.fused
    assert state.verified and not state.declined, f"{model_type}: the fused head does not reproduce its logits"


def test_switched_off_or_under_a_family_without_a_fusable_head_it_declines():
    model = make_model("qwen2_vl")
    off = fused_loss.apply(model, switches(fused=False), {})
    assert isinstance(off, Declined) and "switched off" in off.reason
    assert not unwrap(model).get_output_embeddings()._forward_pre_hooks  # nothing attached
