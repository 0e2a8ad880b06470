"""Packing changes no result: a packed batch's loss and gradients equal the padded batch's of
the same samples; positions restart per sample (M-RoPE: each sample's own rope index); no
sample attends to another; the policy packs only where exact; `mmtune train` wires it."""

import json
import logging
import os

import pytest
import torch
from PIL import Image

from mmtune.data import MultiModalCollator, encode_sample, normalize_row
from mmtune.data.packing import (
    PackedDataset,
    PackingCollator,
    dataset_lengths,
    first_fit_decreasing,
    maybe_pack,
    packing_unsupported_reason,
)
from mmtune.model.composite import packable_model_types
from mmtune.plugins import get_mm_plugin
from mmtune.templates import get_template
from mmtune.testing import get_fixture, load_processor, make_audio_file, make_image_file, make_video_file

IGNORE = -100


def _model(name, attn="sdpa", config_key=None):
    from mmtune.model.loader import model_class_for

    fixture = get_fixture(name)
    config = fixture.extra[config_key]() if config_key else fixture.tiny_config()
    config._attn_implementation = attn
    torch.manual_seed(0)
    cls = model_class_for(config)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model.config.use_cache = False
    text = model.config.get_text_config()
    text.use_cache = False
    return model


def _samples(name, root, specs, template=None, train_on_prompt=False):
    """specs: (question, answer, images [(w, h)], videos [frames], audios [seconds])."""
    processor = load_processor(name)
    fixture = get_fixture(name)
    plugin = get_mm_plugin(fixture.plugin or name)
    try:
        template = get_template(template or name)
    except ValueError:  # families without a template of their own yet
        template = get_template("chatml")
    feats = []
    for i, (q, a, images, videos, audios) in enumerate(specs):
        paths = [make_image_file(os.path.join(root, f"{name}{i}_{j}.png"), w, h, seed=i + j) for j, (w, h) in enumerate(images)]
        vids = [make_video_file(os.path.join(root, f"{name}{i}_{j}.mp4"), frames=f, seed=i) for j, f in enumerate(videos)]
        auds = [make_audio_file(os.path.join(root, f"{name}{i}_{j}.wav"), seconds=s) for j, s in enumerate(audios)]
        prefix = "<image>" * len(paths) + "<video>" * len(vids) + "<audio>" * len(auds)
        s = normalize_row({"messages": [{"role": "user", "content": prefix + q}, {"role": "assistant", "content": a}],
                           "images": paths, "videos": vids, "audios": auds})
        enc = encode_sample(s, template, plugin, processor.tokenizer, processor, cutoff_len=100_000,
                            train_on_prompt=train_on_prompt and i == 1)
        feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "images": s.images, "videos": s.videos,
                      "audios": s.audios})
    return feats, plugin, processor


QWEN_SPECS = [
    ("what is in the picture", "a red circle", [(60, 50)], [], []),
    ("describe both pictures in detail please", "two squares, one blue", [(90, 40), (50, 70)], [], []),  # prompt labelled
    ("hello there, no picture", "hi", [], [], []),
    ("and this clip", "moving bars", [], [8], []),
    ("one more", "green", [(120, 60)], [], []),
]


def _loss_and_grads(model, batch, forward=None):
    model.zero_grad()
    out = forward(model, batch) if forward is not None else model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_loss_and_grads(model, padded, packed):
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    # the Trainer's num_items_in_batch: labels[..., 1:] that count; the same tokens either way
    assert int((padded["labels"][..., 1:] != IGNORE).sum()) == int((packed["labels"][..., 1:] != IGNORE).sum())
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], rtol=1e-4, atol=1e-6), (name, (g - grads_b[name]).abs().max())


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack_qwen")
    feats, plugin, processor = _samples("qwen2_vl", str(root), QWEN_SPECS, train_on_prompt=True)
    model = _model("qwen2_vl").train()
    return feats, plugin, processor, model


def test_first_fit_decreasing_is_deterministic_and_fills_rows():
    lengths = [5, 3, 8, 2, 2, 7, 1, 4, 6, 3]
    bins = first_fit_decreasing(lengths, 10)
    assert bins == first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 41 tokens: the lower bound
    assert bins[0] == [2, 3]  # 8 first, then the first 2 that fits
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long for a row: alone


def test_qwen2_vl_packed_loss_and_gradients_equal_padded(qwen):
    feats, plugin, processor, model = qwen
    assert feats[1]["labels"][0] != IGNORE  # a labelled first token: must not be predicted across samples
    col = PackingCollator(plugin, processor, processor.tokenizer, model=model)
    padded = col(feats)
    packed = col([{"packed": feats[:2]}, {"packed": feats[2:]}])
    assert "attention_mask" not in packed and packed["position_ids"].shape[:2] == (4, 2)
    assert torch.equal(packed["image_grid_thw"], padded["image_grid_thw"])
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    _assert_same_loss_and_grads(model, padded, packed)
    flat = PackingCollator(plugin, processor, processor.tokenizer, model=model, flatten=True)(
        [{"packed": feats[:2]}, {"packed": feats[2:]}])  # flash-attention's layout: one row
    assert flat["input_ids"].shape[0] == 1
    _assert_same_loss_and_grads(model, padded, flat)


def test_llava_packed_loss_and_gradients_equal_padded(tmp_path):
    specs = [("what is it", "a circle", [(60, 50)], [], []), ("no image here at all", "fine", [], [], []),
             ("and this", "a red square on blue", [(80, 40)], [], [])]
    feats, plugin, processor = _samples("llava", str(tmp_path), specs, template="llava")
    model = _model("llava").train()
    col = PackingCollator(plugin, processor, processor.tokenizer, model=model)
    padded = col(feats)
    packed = col([{"packed": [feats[0], feats[2]]}, {"packed": [feats[1]]}])
    assert packed["position_ids"].dim() == 2
    _assert_same_loss_and_grads(model, padded, packed)


def test_positions_restart_per_sample_and_rope_is_each_samples_own(qwen):
    feats, plugin, processor, model = qwen
    col = PackingCollator(plugin, processor, processor.tokenizer, model=model)
    packed = col([{"packed": feats}])
    pos = packed["position_ids"][:, 0]
    at = 0
    for f in feats:
        n = len(f["input_ids"])
        assert torch.equal(pos[0, at:at + n], torch.arange(n))  # text positions restart at 0
        alone = MultiModalCollator(plugin, processor, processor.tokenizer, model=model)([f])
        expected = alone.get("position_ids", torch.arange(n).expand(3, 1, n))[:, 0]
        assert torch.equal(pos[1:, at:at + n], expected)  # 3D rope index as if unpacked
        at += n


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_no_attention_across_samples(name, qwen, tmp_path):
    if name == "qwen2_vl":
        feats, plugin, processor, model = qwen
        feats = feats[:2]
    else:
        specs = [("what is it", "a circle", [(60, 50)], [], []), ("and this", "a square", [(80, 40)], [], [])]
        feats, plugin, processor = _samples("llava", str(tmp_path), specs, template="llava")
        model = _model("llava")
    model.eval()
    col = PackingCollator(plugin, processor, processor.tokenizer, model=model)
    changed = dict(feats[0])
    media = {processor.tokenizer.convert_tokens_to_ids(t) for t in (plugin.image_token, plugin.video_token) if t}
    changed["input_ids"] = [t if t in media else (t + 7) % 50 for t in feats[0]["input_ids"]]
    changed["images"] = [make_image_file(str(tmp_path / "other.png"), *Image.open(p).size, seed=99)
                         for p in feats[0]["images"]]
    n_a = len(feats[0]["input_ids"])
    with torch.no_grad():
        logits = [model(**col([{"packed": [a, feats[1]]}])).logits[0, n_a:] for a in (feats[0], changed)]
        alone = model(**col([feats[1]])).logits[0]
        batch = col([{"packed": [changed, feats[1]]}])
        crossing = model(**{**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}).logits[0, n_a:] \
            if name == "llava" else None
    assert torch.allclose(logits[0], logits[1], atol=1e-5)  # B does not see A
    assert torch.allclose(logits[0], alone, atol=1e-5)  # B packed == B alone
    if crossing is not None:  # the same row with one running position: B does see A (the test can fail)
        assert not torch.allclose(crossing, logits[1], atol=1e-3)


#: model type -> (fixture, its config builder in ``extra`` or None for ``tiny_config``)
_FIXTURE_OF = {t: (t, None) for t in ("qwen2_5_vl", "qwen3_vl", "glm4v", "llava_next", "llava_next_video",
                                      "llava_onevision", "video_llava", "glm46v", "qwen2_audio", "internvl", "mistral3",
                                      "idefics3", "smolvlm")}
_FIXTURE_OF.update({"qwen3_vl_moe": ("qwen3_vl", "moe_config"), "glm4v_moe": ("glm4v", "moe_config")})


def test_every_packable_type_is_checked():
    assert packable_model_types() == set(_FIXTURE_OF) | {"qwen2_vl", "llava"}


@pytest.mark.parametrize("model_type", sorted(_FIXTURE_OF))
def test_packed_logits_equal_unpacked(model_type, tmp_path):
    name, config_key = _FIXTURE_OF[model_type]
    kind = get_fixture(name).modalities[0]
    media = {"image": ([(60, 50)], [], []), "audio": ([], [], [0.5])}[kind]
    media2 = {"image": ([(90, 60)], [], []), "audio": ([], [], [0.75])}[kind]
    specs = [("what is it", "a circle", *media), ("nothing", "ok", [], [], []), ("and this one", "a red square", *media2)]
    feats, plugin, processor = _samples(name, str(tmp_path), specs)
    model = _model(name, config_key=config_key).eval()
    assert model.config.model_type == model_type
    assert packing_unsupported_reason(model, MultiModalCollator(plugin, processor, processor.tokenizer, model=model)) is None
    col = PackingCollator(plugin, processor, processor.tokenizer, model=model)
    with torch.no_grad():
        packed = model(**col([{"packed": feats}])).logits[0]
        at = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = model(**col([f])).logits[0]
            assert torch.allclose(packed[at:at + n], alone, atol=2e-5), (name, (packed[at:at + n] - alone).abs().max())
            at += n


def test_text_only_packed_rows_carry_the_dummy_image_as_a_sample_of_its_own(qwen):
    feats, plugin, processor, model = qwen
    text = [f for f in feats if not f["images"] and not f["videos"]] * 2
    plain = PackingCollator(plugin, processor, processor.tokenizer, model=model)([{"packed": text}])
    fake = PackingCollator(plugin, processor, processor.tokenizer, model=model, fake_media_for_text_only=True)(
        [{"packed": text}])
    assert "pixel_values" in fake and "pixel_values" not in plain
    with torch.no_grad():
        assert torch.allclose(model(**plain).loss, model(**fake).loss, atol=1e-6)


def test_policy_packs_variable_lengths_only_where_exact(qwen):
    feats, plugin, processor, model = qwen
    col = MultiModalCollator(plugin, processor, processor.tokenizer, model=model)
    varied = [{"input_ids": [1] * n} for n in (10, 200, 30, 15, 180, 20, 25, 190)]
    uniform = [{"input_ids": [1] * 100} for _ in range(8)]
    ds, c = maybe_pack(varied, col, model, None, None, batch_size=4)
    assert isinstance(ds, PackedDataset) and isinstance(c, PackingCollator) and len(ds) < len(varied)
    assert sum(len(p) for p in ds.packs) == len(varied) and all(
        sum(len(varied[i]["input_ids"]) for i in p) <= 200 for p in ds.packs)  # default row: the longest sample
    assert maybe_pack(uniform, col, model, None, None, batch_size=4)[0] is uniform  # nothing to gain
    assert maybe_pack(varied, col, model, False, None, batch_size=4)[0] is varied  # the switch
    assert isinstance(maybe_pack(uniform, col, model, True, None, batch_size=4)[0], PackedDataset)
    no_rope = MultiModalCollator(plugin, processor, processor.tokenizer, model=None)
    assert "M-RoPE" in packing_unsupported_reason(model, no_rope)
    assert maybe_pack(varied, no_rope, model, None, None, batch_size=4)[0] is varied
    with pytest.raises(ValueError, match="not exact"):
        maybe_pack(varied, no_rope, model, True, None, batch_size=4)
    gemma = _model("gemma3")
    g_processor = load_processor("gemma3")
    assert packing_unsupported_reason(gemma, MultiModalCollator(get_mm_plugin("gemma3"), g_processor,
                                                                g_processor.tokenizer, model=gemma))


def test_dataset_lengths_follow_the_index_mapping():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (3, 5, 7, 2, 9)]})
    kept = ds.filter(lambda r: len(r["input_ids"]) != 7).select([3, 0, 2])
    assert dataset_lengths(ds) == [3, 5, 7, 2, 9] and dataset_lengths(kept) == [9, 3, 2]


def test_train_packed_equals_padded_over_steps(tmp_path, caplog):
    """`mmtune train` with every sample in one step: the packed run's losses and gradient norms equal the
    padded run's, before and after an optimizer step."""
    from mmtune.testing import tiny_model_dir
    from mmtune.config import parse_config
    from mmtune.train import run_sft

    rows = []
    for i in range(6):
        path = make_image_file(str(tmp_path / f"i{i}.png"), 40 + 30 * (i % 3), 40 + 20 * (i % 2), seed=i)
        rows.append({"messages": [{"role": "user", "content": "<image>" + "tell me " * (1 + 6 * (i % 3))},
                                  {"role": "assistant", "content": "yes " * (1 + 3 * i)}], "images": [os.path.basename(path)]})
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    model = tiny_model_dir("qwen2_vl", str(tmp_path))
    losses = {}
    for packing in (False, True):
        out = tmp_path / f"out-{packing}"
        torch.manual_seed(0)  # run_sft builds the LoRA weights before the Trainer seeds: same start for both
        with caplog.at_level(logging.INFO, logger="mmtune.data.packing"):
            run_sft(*parse_config(None, extra=dict(
            model_name_or_path=model, dataset=str(data), template="qwen2_vl", finetuning_type="lora", lora_rank=4,
            torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=6, num_train_epochs=2,
            learning_rate=1e-2, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, plot_loss=False,
            packing=packing, seed=0, data_seed=0, dataloader_num_workers=0, overwrite_cache=True)))
        logs = [json.loads(x) for x in open(out / "trainer_log.jsonl")]
        losses[packing] = [(r["loss"], r["grad_norm"]) for r in logs if "loss" in r]
    assert "packing on: 6 samples -> 5 rows" in caplog.text
    assert len(losses[True]) == len(losses[False]) == 2
    for (loss_a, norm_a), (loss_b, norm_b) in zip(losses[False], losses[True]):
        assert loss_b == pytest.approx(loss_a, rel=1e-4) and norm_b == pytest.approx(norm_a, rel=1e-3)


def test_sync_free_forward_keeps_packed_and_padded_losses(qwen):
    """Images and a video, padded and packed rows: with the tower's inputs, the placeholder
    check, the loss rows (and, for the packed rows, the 4-row positions) handled by the
    collator's ForwardPrecompute, the losses and gradients are those of the plain model."""
    import copy

    from types import SimpleNamespace

    from mmtune.speed import fused_loss, sync_free
    from mmtune.speed.forward import TrainingForward
    from mmtune.speed.result import Applied
    from mmtune.speed.sync_free import HOST_KEY, PRECOMPUTED_KEY

    feats, plugin, processor, model = qwen
    fast = copy.deepcopy(model)
    cfg = SimpleNamespace(fused_cross_entropy=True, sync_free_forward=True, device_type="cpu")
    results = {"fused_cross_entropy": fused_loss.apply(fast, cfg, {})}
    results["sync_free_forward"] = sync_free.apply(fast, cfg, results)
    assert all(isinstance(r, Applied) for r in results.values())
    forward = TrainingForward.from_levers(results)
    pre = forward.precompute
    assert pre is not None and pre.grid_on_host
    plain = PackingCollator(plugin, processor, processor.tokenizer, model=model)
    col = PackingCollator(plugin, processor, processor.tokenizer, model=fast, precompute=pre)
    for features in (feats, [{"packed": feats[:2]}, {"packed": feats[2:]}]):
        ref, batch = plain(features), col(features)
        assert set(batch[PRECOMPUTED_KEY]) == {"image", "video", "loss_rows", "positions"}
        assert set(batch[PRECOMPUTED_KEY]["positions"]) == {"image", "video"}
        assert "drop_attention_mask" not in batch[HOST_KEY].values  # padded, or packed (4-row positions)
        loss_a, grads_a = _loss_and_grads(model, ref)
        loss_b, grads_b = _loss_and_grads(fast, batch, forward)
        assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys()
        for name, g in grads_a.items():
            assert torch.allclose(g, grads_b[name], rtol=1e-4, atol=1e-6), name
