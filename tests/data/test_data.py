"""Dataset formats, truncation that never cuts media, and the collator."""

import json

import pytest
import torch

from mmtune.data import MultiModalCollator, encode_sample, normalize_row
from mmtune.config import DataArguments
from mmtune.data.loader import build_dataset
from mmtune.media import MediaError
from mmtune.plugins import get_mm_plugin
from mmtune.templates import get_template
from mmtune.testing import get_fixture, load_processor, make_image_file


def test_sharegpt_openai_and_alpaca_rows(tmp_path):
    s = normalize_row({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "<image>hi"},
                                         {"from": "gpt", "value": "yo"}], "images": ["a.png"]}, str(tmp_path))
    assert s.system == "S" and s.messages[0] == {"role": "user", "content": "<image>hi"}
    assert s.images == [str(tmp_path / "a.png")]
    s = normalize_row({"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"},
                                                                   {"type": "text", "text": "what?"}]},
                                    {"role": "assistant", "content": "a dog"}]}, "/data")
    assert s.messages[0]["content"] == "<image>what?" and s.images == ["/data/b.png"]
    s = normalize_row({"instruction": "Describe", "input": "<image>", "output": "x", "images": ["/abs.png"]})
    assert s.messages == [{"role": "user", "content": "Describe\n<image>"}, {"role": "assistant", "content": "x"}]
    assert s.images == ["/abs.png"]
    with pytest.raises(MediaError, match="unknown role"):
        normalize_row({"conversations": [{"from": "alien", "value": "x"}]})


def test_truncation_keeps_media_whole_or_drops(tmp_path):
    processor = load_processor("qwen2_vl")
    plugin, template = get_mm_plugin("qwen2_vl"), get_template("qwen2_vl")
    img = make_image_file(str(tmp_path / "i.png"), 112, 112)
    long_answer = "word " * 200
    s = normalize_row({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": long_answer}],
                       "images": [img]})
    full = encode_sample(s, template, plugin, processor.tokenizer, processor, cutoff_len=10_000)
    cut = encode_sample(s, template, plugin, processor.tokenizer, processor, cutoff_len=60)
    assert cut.dropped is None and cut.input_ids == full.input_ids[:60]
    tiny = encode_sample(s, template, plugin, processor.tokenizer, processor, cutoff_len=20)
    assert tiny.dropped and "media tokens" in tiny.dropped
    with pytest.raises(MediaError, match="cutoff_len"):
        encode_sample(s, template, plugin, processor.tokenizer, processor, cutoff_len=20, drop_overlong=False)


def test_build_dataset_names_the_bad_sample(tmp_path):
    good = make_image_file(str(tmp_path / "ok.png"), 64, 64)
    rows = [{"messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"}], "images": ["ok.png"]},
            {"messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"}], "images": ["missing.png"]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    processor = load_processor("qwen2_vl")
    args = DataArguments(dataset=str(path), overwrite_cache=True)
    with pytest.raises(Exception) as info:
        build_dataset(args, get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"), processor.tokenizer, processor)
    assert "sample 1" in str(info.value) and "missing.png" in str(info.value)
    assert good


def test_collator_pads_and_builds_mrope_positions_like_the_model(tmp_path):
    from transformers import AutoModelForImageTextToText

    processor = load_processor("qwen2_vl")
    plugin, template = get_mm_plugin("qwen2_vl"), get_template("qwen2_vl")
    img = make_image_file(str(tmp_path / "i.png"), 100, 60)
    feats = []
    for row in ({"messages": [{"role": "user", "content": "<image>what"}, {"role": "assistant", "content": "red"}], "images": [img]},
                {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}):
        s = normalize_row(row)
        enc = encode_sample(s, template, plugin, processor.tokenizer, processor)
        feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "images": s.images})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture("qwen2_vl").tiny_config()).eval()
    batch = MultiModalCollator(plugin, processor, processor.tokenizer, model=model)(feats)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["position_ids"].shape[:2] == (3, 2) or batch["position_ids"].shape[0] in (3, 4)
    assert batch["attention_mask"][1].sum() == len(feats[1]["input_ids"])
    with torch.no_grad():
        with_pos = model(**batch).loss
        batch.pop("position_ids")
        inside = model(**batch).loss
    assert torch.allclose(with_pos, inside, atol=1e-6)  # collator positions == the model's own


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_text_only_batch_runs_the_tower_on_a_dummy_with_zero_effect(name):
    from transformers import AutoModelForImageTextToText

    from mmtune.model.composite import COMPOSITE_MODELS

    processor = load_processor(name)
    plugin, template = get_mm_plugin(name), get_template(name if name != "llava" else "llava")
    feats = []
    for text, answer in (("hello there", "hi"), ("what is two plus two", "four")):
        s = normalize_row({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]})
        enc = encode_sample(s, template, plugin, processor.tokenizer, processor)
        feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "images": []})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(name).tiny_config()).eval()
    calls = []
    tower = model.get_submodule(COMPOSITE_MODELS[model.config.model_type].vision_model_keys[0])
    tower.register_forward_hook(lambda *a: calls.append(1))
    plain = MultiModalCollator(plugin, processor, processor.tokenizer, model=model)(feats)
    with_fake = MultiModalCollator(plugin, processor, processor.tokenizer, model=model, fake_media_for_text_only=True)(feats)
    assert "pixel_values" not in plain and "pixel_values" in with_fake
    with torch.no_grad():
        loss_plain = model(**plain).loss
        assert not calls
        loss_fake = model(**with_fake).loss
    assert calls, "the vision tower must run on the dummy"
    assert torch.allclose(loss_plain, loss_fake, atol=1e-6), (loss_plain, loss_fake)


@pytest.mark.parametrize("workers", [None, 2])
def test_build_dataset_in_batches_equals_encode_sample_and_drops_with_a_count(tmp_path, monkeypatch, caplog, workers):
    """build_dataset maps in batches (a batch size of 3 here: rows cross batch and process
    borders) with fixed column types; every kept row is exactly encode_sample's, the dropped
    ones are gone and counted in the log."""
    import logging

    import mmtune.data.loader as loader

    monkeypatch.setattr(loader, "MAP_BATCH_SIZE", 3)
    sizes = [(64, 64), (120, 40), (33, 97), (200, 150), (56, 56), (90, 300), (64, 65)]
    rows = []
    for i, (w, h) in enumerate(sizes):
        make_image_file(str(tmp_path / f"{i}.png"), w, h, seed=i)
        messages = [{"role": "user", "content": f"<image>question {i}?"}]
        if i not in (2, 5):  # no answer: nothing to train on, dropped
            messages.append({"role": "assistant", "content": f"answer number {i} " * (i + 1)})
        rows.append({"messages": messages, "images": [f"{i}.png"]})
    rows.append({"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "fine"}]})
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    processor = load_processor("qwen2_vl")
    plugin, template = get_mm_plugin("qwen2_vl"), get_template("qwen2_vl")
    args = DataArguments(dataset=str(path), overwrite_cache=True, preprocessing_num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="mmtune.data.loader"):
        ds = build_dataset(args, template, plugin, processor.tokenizer, processor)["train"]
    assert "dropped 2 of 8 samples" in caplog.text
    kept = [i for i in range(len(rows)) if i not in (2, 5)]
    assert len(ds) == len(kept)
    assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["labels"].feature.dtype == "int64"
    assert ds.features["videos"].feature.dtype == "string"
    for row, i in zip(ds, kept):
        sample = normalize_row(rows[i], str(tmp_path))
        ref = encode_sample(sample, template, plugin, processor.tokenizer, processor, args.cutoff_len)
        assert list(row["input_ids"]) == ref.input_ids and list(row["labels"]) == ref.labels
        assert row["images"] == [str(x) for x in sample.images] and row["videos"] == [] and row["audios"] == []
