"""Builders shared by the speed-lever tests: tiny random models of every registered family,
batches from the family's own plugin, the fused-loss and sync-free levers applied as loading
applies them, and a few SGD steps through the training forward."""

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

from mmtune.hparams import FinetuningArguments, ModelArguments
from mmtune.model.adapters import init_adapter
from mmtune.speed import fused_loss, sync_free
from mmtune.speed.forward import TrainingForward
from mmtune.speed.result import Applied

IGNORE = -100


@functools.cache
def tiny_configs():
    """A tiny config of every registered composite model type (one per model type)."""
    from mmtune.families import load_families
    from mmtune.testing import FIXTURES

    load_families()
    out = {}
    for fixture in FIXTURES.values():
        builders = [fixture.tiny_config] + [v for k, v in fixture.extra.items() if k.endswith("_config")]
        for build in builders:
            if build is None:
                continue
            config = build()
            out.setdefault(config.model_type, config)
    return out


@functools.cache
def tiny_model(model_type):
    from mmtune.model.loader import model_class_for

    config = tiny_configs()[model_type]
    torch.manual_seed(0)
    cls = model_class_for(config)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def make_batch(model_type, seed=0, answer_lens=(3, 7)):
    """Two samples of different lengths (one image each), right-padded, prompt unlabelled."""
    from mmtune.plugins import get_mm_plugin
    from mmtune.testing import load_processor, make_image
    from mmtune.testing.parity import MMSample, plugin_ids

    processor = load_processor(model_type)
    plugin = get_mm_plugin(model_type)
    words = "red blue green circle square star cross the a shape".split()
    g = torch.Generator().manual_seed(seed)
    images, ids, labels = [], [], []
    for i, n in enumerate(answer_lens):
        img = make_image(64 + 8 * i, 48, seed=seed + i)
        answer = " ".join(words[j] for j in torch.randint(0, len(words), (n,), generator=g).tolist())
        prompt = MMSample([{"role": "user", "content": "<image>what is it"}], [img])
        full = MMSample([{"role": "user", "content": "<image>what is it"}, {"role": "assistant", "content": answer}], [img])
        p, f = plugin_ids(plugin, processor, prompt), plugin_ids(plugin, processor, full)
        images.append(img)
        ids.append(f)
        labels.append([IGNORE] * len(p) + f[len(p):])
    width = max(map(len, ids))
    pad = processor.tokenizer.pad_token_id or 0
    batch = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels]),
    }
    batch.update(plugin.get_mm_inputs(images, [], [], [1, 1], [0, 0], [0, 0], ids, processor))
    if plugin.token_type_key:
        batch[plugin.token_type_key] = plugin.mm_token_type_ids(batch["input_ids"], processor)
    return batch


def make_model(model_type, method="lora", **flags):
    """The tiny model under ``method`` (LoRA adapters with a non-zero B, or full)."""
    base = copy.deepcopy(tiny_model(model_type))
    torch.manual_seed(0)
    args = FinetuningArguments(finetuning_type=method, lora_rank=4, **flags)
    model = init_adapter(base, ModelArguments(), args)
    with torch.no_grad():  # LoRA B starts at 0: make every adapter matter from step 1
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def switches(fused=True, sync_free_forward=True, device_type="cpu"):
    """The ``cfg`` the two levers read."""
    return SimpleNamespace(fused_cross_entropy=fused, sync_free_forward=sync_free_forward, device_type=device_type)


def apply_levers(model, fused=True, sync=True):
    """Apply the fused loss, then (when ``sync``) the sync-free forward, as loading does;
    returns their results by key."""
    cfg = switches(fused, sync)
    results = {}
    if fused:
        results["fused_cross_entropy"] = fused_loss.apply(model, cfg, results)
    if sync:
        results["sync_free_forward"] = sync_free.apply(model, cfg, results)
    return results


def fused_forward(model):
    """The training forward of the fused loss on ``model`` (asserting the lever applied)."""
    result = fused_loss.apply(model, switches(sync_free_forward=False), {})
    assert isinstance(result, Applied), result
    return TrainingForward(fused=result.state)


def fast_forward(model):
    """The training forward of both levers and the collator's precompute (asserting both applied)."""
    results = apply_levers(model)
    assert all(isinstance(r, Applied) for r in results.values()), results
    forward = TrainingForward.from_levers(results)
    assert forward.precompute is results["sync_free_forward"].state.precompute
    return forward, forward.precompute


def train_steps(model, batches, forward=None, steps=3, lr=0.5):
    """Losses of ``steps`` SGD steps (through ``forward`` when given, else the model's own
    loss), and the gradients of the first step."""
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=lr)
    losses, first = [], None
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = (forward(model, batch) if forward is not None else model(**batch)).loss
        loss.backward()
        if first is None:
            first = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, first


def assert_same(ref, new, rel=1e-5, atol=1e-6):
    (ref_losses, ref_grads), (losses, grads) = ref, new
    assert losses == pytest.approx(ref_losses, rel=rel, abs=atol)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=atol), (name, (grads[name] - g).abs().max())


def unwrap(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def with_positions(model, batch):
    """``batch`` with the M-RoPE positions the collator builds (the model's own rope index on
    the CPU), which let the training forward merge the media itself."""
    import inspect

    from mmtune.speed.sync_free import _merge_owner

    rope = _merge_owner(unwrap(model)).get_rope_index
    params = inspect.signature(rope).parameters
    with torch.no_grad():
        position_ids, _ = rope(**{k: v for k, v in batch.items() if k in params})
    return {**batch, "position_ids": position_ids}
