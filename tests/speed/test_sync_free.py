"""The sync-free forward (mmtune.speed.sync_free) changes no result: what the collator builds
on the CPU is what the model would have built on the GPU, and is really used."""

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmtune.model.composite import COMPOSITE_MODELS, get_composite_model, has_prefix
from mmtune.speed import sync_free
from mmtune.speed.forward import TrainingForward, collator_precompute
from mmtune.speed.result import Applied, Declined
from mmtune.speed.sync_free import HOST_KEY, PRECOMPUTED_KEY, ForwardCall, ForwardPrecompute, HostSide, SyncFree

from ..helpers import (assert_same, fast_forward, fused_forward, make_batch, make_model, switches, tiny_configs,
                       tiny_model, train_steps, unwrap, with_positions)


def _types():
    from mmtune.testing import FIXTURES

    return [t for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "qwen3_5", "glm46v", "qwen3_omni_moe_thinker") if t in tiny_configs() and t in FIXTURES]


def _fast(model_type, method="lora", **flags):
    model = make_model(model_type, method, **flags)
    forward, pre = fast_forward(model)
    return model, forward, pre


@pytest.mark.parametrize("projector", ["frozen", "trains"])
@pytest.mark.parametrize("model_type", _types())
def test_sync_free_forward_keeps_losses_and_grads(model_type, projector):
    """LoRA with everything frozen but the adapters (features without gradients), and with the
    projector training too (its features reach the text through the index merge instead of
    masked_scatter's backward)."""
    flags = {"freeze_multi_modal_projector": projector == "frozen"}
    batches = [make_batch(model_type, seed=s) for s in (0, 1)]
    m = make_model(model_type, **flags)
    ref = train_steps(m, batches, fused_forward(m))
    entry = get_composite_model(tiny_configs()[model_type].model_type)
    assert any(has_prefix(n, [entry.projector_key]) for n in ref[1]) == (projector == "trains")
    model, forward, pre = _fast(model_type, **flags)
    fast = [pre(dict(b)) for b in batches]
    assert pre.grid_on_host == (model_type not in ("glm4v", "glm46v"))  # GLM-4V's tower reads the grid for its embeddings too
    host = fast[0][HOST_KEY].values
    if pre.grid_on_host:
        assert torch.equal(host["image_grid_thw"], batches[0]["image_grid_thw"])
    assert host["labels_shape"] == tuple(batches[0]["labels"].shape)
    rows = fast[0][PRECOMPUTED_KEY]["loss_rows"]
    shifted = torch.nn.functional.pad(batches[0]["labels"], (0, 1), value=-100)[..., 1:].reshape(-1)
    assert torch.equal(rows, (shifted != -100).nonzero().squeeze(1))
    assert_same(ref, train_steps(model, fast, forward))


@pytest.mark.parametrize("model_type", _types())
def test_the_precomputed_tower_inputs_are_the_ones_used(model_type):
    """Spoil the precomputed cu_seqlens (one segment over all images): the tower's output
    moves, so the tower took them instead of computing its own."""
    model, forward, pre = _fast(model_type, "full")
    batch = pre(make_batch(model_type))
    outputs = []
    hook = pre.tower.register_forward_hook(lambda m, a, out: outputs.append(out.last_hidden_state.clone()))
    with torch.no_grad():
        model.eval()
        forward(model, copy.deepcopy(batch))
        image = batch[PRECOMPUTED_KEY]["image"]
        assert {"position_ids", "cu_seqlens"} <= set(image)
        image["cu_seqlens"] = image["cu_seqlens"][[0, -1]]
        if image.get("max_seqlen") is not None:
            image["max_seqlen"] = int(image["cu_seqlens"][-1])
        forward(model, batch)
    hook.remove()
    assert len(outputs) == 2 and not torch.allclose(outputs[0], outputs[1])


def _applying_types():
    """Every tiny model the lever takes (the MoE variants and Omni's thinker too)."""
    out = []
    for t in sorted(tiny_configs()):
        result = sync_free.apply(copy.deepcopy(tiny_model(t)), switches(), {})
        if isinstance(result, Applied):
            result.state.remove()
            out.append(t)
    return out


@pytest.mark.parametrize("model_type", _applying_types())
def test_every_tower_the_lever_takes_gives_its_own_outputs_from_the_precomputed_inputs(model_type):
    """The tower alone, images of two sizes: computing its inputs itself, or taking the
    collator's (and the CPU grid where the lever keeps it there), gives the same outputs."""
    model, forward, pre = _fast(model_type, "full")
    tower, config = pre.tower, pre.tower.config
    m = pre.merge
    grid = torch.tensor([[1, 2 * m, 2 * m], [1, 2 * m, 3 * m]])
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(0))
    tower.eval()
    with torch.no_grad():
        own = tower(pixels, grid_thw=grid)
        theirs = tower(pixels, grid_thw=grid.clone(), **pre.tower_inputs(grid))
    assert torch.equal(own.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(own.pooler_output, theirs.pooler_output)


def test_collator_checks_placeholder_counts_on_the_cpu():
    model, forward, pre = _fast("qwen2_vl")
    batch = make_batch("qwen2_vl")
    token = model.config.image_token_id
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == token).nonzero()[0]] = 0  # one image token fewer than the features
    with pytest.raises(ValueError, match="media tokens and media do not match"):
        pre({**batch, "input_ids": ids})


def _unpadded_collated(model, pre):
    """Two equal rows (one image each) through the real collator: M-RoPE positions from the
    model's rope index, and the ForwardPrecompute's entries when ``pre`` is given."""
    from mmtune.data import MultiModalCollator
    from mmtune.plugins import get_mm_plugin
    from mmtune.testing import load_processor

    processor = load_processor("qwen2_vl")
    batch = make_batch("qwen2_vl", answer_lens=(4, 4))
    grid = batch["image_grid_thw"][:1]
    n = int(grid.prod())
    feats = [{"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}] * 2
    collator = MultiModalCollator(get_mm_plugin("qwen2_vl"), processor, processor.tokenizer, model=model,
                                  precompute=pre)
    collator.media_inputs = lambda features, ids: {"pixel_values": batch["pixel_values"][:n].repeat(2, 1),
                                                   "image_grid_thw": grid.repeat(2, 1)}
    return collator(feats)


def test_an_unpadded_batch_passes_no_mask_and_the_same_loss():
    """Equal rows with M-RoPE positions from the collator: the all-ones mask is dropped (the
    model would drop it after testing it on the GPU), the loss is unchanged."""
    model, forward, pre = _fast("qwen2_vl")
    fast = _unpadded_collated(model, pre)
    assert fast[HOST_KEY].values.get("drop_attention_mask") is True and bool(fast["attention_mask"].all())
    seen = []
    inner = model.get_base_model()
    hook = inner.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    ref = {k: v for k, v in fast.items() if k not in (HOST_KEY, PRECOMPUTED_KEY)}
    with torch.no_grad():
        model.eval()
        a = forward(model, copy.deepcopy(fast)).loss
        hook.remove()
        b = model(**ref).loss
    assert seen == [None]
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


#: aten ops whose result the host must read (a sync on the GPU): .item()/bool(), and the ones
#: whose output size depends on values
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter_backward", "repeat_interleave",
              "unique_consecutive", "_unique2"}


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _step_reads(on, method="lora", **flags):
    """The host reads of a steady training step (the second: the fused loss checks the head
    once, on the first) through the training forward, with the sync-free lever on or off."""
    if on:
        model, forward, pre = _fast("qwen2_vl", method, **flags)
    else:
        model, pre = make_model("qwen2_vl", method, **flags), None
        forward = fused_forward(model)
    batch = _unpadded_collated(model, pre)
    model.train()
    forward(model, copy.deepcopy(batch)).loss.backward()
    audit = _HostReads()
    with audit:
        forward(model, batch).loss.backward()
    return audit.seen


def test_a_lora_training_step_reads_nothing_back_to_the_host():
    """The real collator's batch, LoRA, the fused loss: forward and backward of a steady step
    run no aten op that makes the host wait for the GPU, where the lever off runs several (the
    tower's ``cu_seqlens`` and ``max_seqlen``, the placeholder check, the mask test, the loss
    rows). On the CPU the dispatcher does not see ``tolist``: torch.cuda's sync debug mode on
    a GPU is the full check (``benchmarks/step_anatomy.py --syncs``)."""
    assert _step_reads(True) == []
    off = _step_reads(False)
    assert {"_local_scalar_dense", "nonzero", "repeat_interleave"} <= set(off), off


def test_a_training_projector_backward_reads_nothing_back_either():
    """Full fine-tuning with the projector training: without the index merge, masked_scatter's
    backward (masked_select on the GPU) would read the mask's count back in every backward."""
    flags = {"freeze_multi_modal_projector": False}
    assert _step_reads(True, "full", **flags) == []
    assert "masked_scatter_backward" in _step_reads(False, "full", **flags)


def test_features_that_never_reach_the_language_model_are_an_error():
    """If the language model's pre-hook did not run (a model that skips it), the gradients of
    held-back features would be lost silently: the forward refuses instead."""
    model, forward, pre = _fast("qwen2_vl", "full", freeze_multi_modal_projector=False)
    batch = pre(make_batch("qwen2_vl"))
    inner = model.model
    hooks = inner.language_model._forward_pre_hooks
    saved = dict(hooks)
    hooks.clear()
    model.train()
    try:
        with pytest.raises(RuntimeError, match="never reached the language model"):
            forward(model, batch)
    finally:
        hooks.update(saved)
    forward(model, pre(make_batch("qwen2_vl"))).loss.backward()  # with the hook back, it trains
    assert not forward.fused.declined  # the sync-free error was not taken for a model the fused loss misfits


def test_host_side_stays_on_the_host_and_pickles():
    from accelerate.utils import send_to_device

    host = HostSide({"image_grid_thw": torch.tensor([[1, 4, 4]])})
    batch = {"input_ids": torch.ones(1, 3), PRECOMPUTED_KEY: {"image": {"cu_seqlens": torch.tensor([0, 16])}},
             HOST_KEY: host}
    moved = send_to_device(batch, "cpu", non_blocking=True)
    assert moved[HOST_KEY] is host and not hasattr(host, "to")
    assert torch.equal(pickle.loads(pickle.dumps(host)).values["image_grid_thw"], host.values["image_grid_thw"])


def test_towers_mmtune_cannot_read_are_left_alone(monkeypatch):
    """A family that declares no tower inputs, and one whose declared inputs cannot be built
    (a transformers release without them): declined with the reason, nothing attached."""
    for model_type in ("llava", "gemma3"):
        if model_type in tiny_configs():
            model = make_model(model_type)
            result = sync_free.apply(model, switches(), {})
            assert isinstance(result, Declined) and "declares no precomputable tower inputs" in result.reason
            assert collator_precompute({"sync_free_forward": result}) is None
    model = make_model("qwen2_vl")
    entry = get_composite_model("qwen2_vl")

    def unavailable(tower, grid):
        raise ImportError("no vision_utils in this transformers")

    speed_caps = dataclasses.replace(entry.speed, tower_inputs=unavailable)
    monkeypatch.setitem(COMPOSITE_MODELS, "qwen2_vl", dataclasses.replace(entry, speed=speed_caps))
    result = sync_free.apply(model, switches(), {})
    assert isinstance(result, Declined) and "cannot be built on the host" in result.reason
    tower = unwrap(model).model.visual
    assert not tower._forward_pre_hooks and not tower._forward_hooks


def test_the_lever_is_on_by_default_and_switchable():
    from mmtune.config import ModelArguments
    from mmtune.speed.config import resolve_speed_config
    from mmtune.speed.levers import apply_levers

    assert ModelArguments().sync_free_forward is True
    model = make_model("qwen2_vl")
    off = apply_levers(model, resolve_speed_config(ModelArguments(sync_free_forward=False, compile=False),
                                                   device_type="cpu"))
    assert collator_precompute(off) is None
    applied = apply_levers(model, resolve_speed_config(ModelArguments(compile=False), device_type="cpu"))
    assert isinstance(applied["sync_free_forward"], Applied)
    assert isinstance(collator_precompute(applied), ForwardPrecompute)
    assert TrainingForward.from_levers(applied).precompute is collator_precompute(applied)


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, pixel_values, grid_thw=None, **kwargs):
        self.calls.append((grid_thw, sorted(kwargs)))
        return pixel_values


class _Owner(nn.Module):
    """Qwen3-VL's shape: the video features go through the image method (one tower call)."""

    def __init__(self):
        super().__init__()
        self.visual = _Tower()

    def get_image_features(self, pixel_values, image_grid_thw=None, by_name=False):
        if by_name:
            return self.visual(pixel_values, grid_thw=image_grid_thw)
        return self.visual(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos, video_grid_thw=None):
        return self.get_image_features(pixel_values_videos, video_grid_thw)


def test_the_tower_takes_the_grid_by_position_or_name_each_modality_once_and_only_inside_a_served_call():
    owner = _Owner()
    pre = ForwardPrecompute(owner, owner.visual, lambda tower, grid: {}, grid_on_host=True, merge=2)
    state = SyncFree(pre, None)
    device_image, device_video = torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 4]])
    inputs = {"position_ids": torch.zeros(1), "image_grid_thw": device_image, "video_grid_thw": device_video,
              PRECOMPUTED_KEY: {"image": {"cu_seqlens": 1}, "video": {"cu_seqlens": 2, "position_ids": 3}},
              HOST_KEY: HostSide({"image_grid_thw": "host image grid", "video_grid_thw": "host video grid"})}
    call = state.take(inputs)
    assert isinstance(call, ForwardCall) and PRECOMPUTED_KEY not in inputs and HOST_KEY not in inputs
    assert inputs["image_grid_thw"] is device_image  # the outer forward gets the batch as it is
    calls = owner.visual.calls
    with state.serving(call):
        owner.get_image_features("px", inputs["image_grid_thw"])
        owner.get_video_features("px", inputs["video_grid_thw"])
    with state.serving(call):
        owner.get_image_features("px", device_image, by_name=True)  # not the tensor it was given: the next in order
    assert calls == [("host image grid", ["cu_seqlens"]), ("host video grid", ["cu_seqlens", "position_ids"]),
                     ("host image grid", ["cu_seqlens"])]
    calls.clear()
    owner.get_image_features("px", device_image)  # outside a served call: untouched
    assert calls == [(device_image, [])] and state.current is None


# the forward's own merge does not engage for the Qwen3-Omni thinker (the model merges its media
# itself there): its losses and gradients are held equal by the first test of this file
@pytest.mark.parametrize("projector", ["frozen", "trains"])
@pytest.mark.parametrize("model_type", [t for t in _types() if t != "qwen3_omni_moe_thinker"])
def test_the_forwards_own_merge_keeps_losses_and_grads(model_type, projector):
    """With the collator's positions the training forward builds ``inputs_embeds`` itself (the
    features at the placeholder positions, Qwen3-VL's deepstack features as the language
    model's arguments): the losses and gradients of the model's own merge."""
    flags = {"freeze_multi_modal_projector": projector == "frozen"}
    m = make_model(model_type, **flags)
    batches = [with_positions(m, make_batch(model_type, seed=s)) for s in (0, 1)]
    ref = train_steps(m, batches, fused_forward(m))
    model, forward, pre = _fast(model_type, **flags)
    fast = [pre(dict(b)) for b in batches]
    merged = []  # a pre-hook after the lever's on the merge owner sees what the owner gets
    hook = sync_free._merge_owner(unwrap(model)).register_forward_pre_hook(
        lambda mod, a, kw: merged.append(kw.get("inputs_embeds") is not None and kw.get("pixel_values") is None),
        with_kwargs=True)
    assert_same(ref, train_steps(model, fast, forward))
    hook.remove()
    assert merged == [True] * 3  # the owner got the merged embeddings, no pixels, each step


@pytest.mark.parametrize("model_type", [t for t in ("qwen3_vl", "qwen2_vl") if t in tiny_configs()])
def test_images_and_a_video_in_one_batch_through_the_collator_keep_losses_and_grads(model_type, tmp_path):
    """Images and a video in one batch, collated with the model's positions: the forward's own
    merge (and, for Qwen3-VL, the deepstack features of both modalities in the language model's
    order) gives the losses and gradients of the model's own forward."""
    import os

    from mmtune.data import MultiModalCollator, encode_sample, normalize_row
    from mmtune.plugins import get_mm_plugin
    from mmtune.templates import get_template
    from mmtune.testing import load_processor, make_image_file, make_video_file

    processor = load_processor(model_type)
    plugin = get_mm_plugin(model_type)
    template = get_template(model_type)
    rows = [("<image>what is it", "a red circle", [make_image_file(os.path.join(tmp_path, "a.png"), 60, 50)], []),
            ("<video>and this clip", "moving bars", [], [make_video_file(os.path.join(tmp_path, "b.mp4"), frames=4)]),
            ("<image><video>both", "a square and bars", [make_image_file(os.path.join(tmp_path, "c.png"), 50, 70, 1)],
             [make_video_file(os.path.join(tmp_path, "d.mp4"), frames=4, seed=1)])]
    feats = []
    for question, answer, images, videos in rows:
        sample = normalize_row({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}],
                                "images": images, "videos": videos})
        enc = encode_sample(sample, template, plugin, processor.tokenizer, processor, cutoff_len=100_000)
        feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "images": sample.images,
                      "videos": sample.videos, "audios": sample.audios})
    flags = {"freeze_multi_modal_projector": False}
    plain = make_model(model_type, "full", **flags)
    model, forward, pre = _fast(model_type, "full", **flags)
    batch = MultiModalCollator(plugin, processor, processor.tokenizer, model=plain)(feats)
    fast = MultiModalCollator(plugin, processor, processor.tokenizer, model=model, precompute=pre)(feats)
    assert set(fast[PRECOMPUTED_KEY]["positions"]) == {"image", "video"} and "position_ids" in fast
    ref = train_steps(plain, [batch], steps=2)
    assert_same(ref, train_steps(model, [fast], forward, steps=2))
