"""Preference rows: the pairwise ShareGPT and TRL forms, KTO rows, the pair checks of the
tokenising pass and check-data, the collator's layout, and the config's preference keys."""

import json

import pytest

from mmtune.config import ConfigError, DataArguments, parse_config
from mmtune.data import MultiModalCollator, encode_sample, normalize_row
from mmtune.data.check import check_dataset
from mmtune.data.formats import RowError, normalize_preference
from mmtune.data.loader import build_dataset
from mmtune.plugins import get_mm_plugin
from mmtune.templates import get_template
from mmtune.testing import load_processor, make_image_file
from mmtune.train.preference import SHARED_MEDIA, PreferenceCollator, add_kl_rows

USER = {"role": "user", "content": "<image>What colour is it?"}


def _tools():
    processor = load_processor("qwen2_vl")
    return get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"), processor.tokenizer, processor


def test_the_sharegpt_and_trl_forms_give_the_same_pair():
    sharegpt = {"conversations": [{"from": "human", "value": "<image>What colour is it?"}],
                "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"},
                "images": ["a.png"]}
    trl = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}],
           "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}],
           "images": ["a.png"]}
    plain = {"prompt": "<image>What colour is it?", "chosen": "red", "rejected": "blue", "images": ["a.png"]}
    pairs = [normalize_preference(row, "pairs", "/data") for row in (sharegpt, trl, plain)]
    for pair in pairs:
        assert pair.chosen.messages == [{"role": "user", "content": "<image>What colour is it?"},
                                        {"role": "assistant", "content": "red"}]
        assert pair.rejected.messages[-1] == {"role": "assistant", "content": "blue"}
        assert pair.chosen.images == pair.rejected.images == ["/data/a.png"]


def test_kto_rows_in_both_forms():
    factory = {"messages": [USER, {"role": "assistant", "content": "red"}], "kto_tag": False, "images": ["a.png"]}
    trl = {"prompt": [USER], "completion": [{"role": "assistant", "content": "red"}], "label": True,
           "images": ["a.png"]}
    one, two = normalize_preference(factory, "kto"), normalize_preference(trl, "kto")
    assert one.chosen.messages == two.chosen.messages and (one.desirable, two.desirable) == (False, True)
    with pytest.raises(RowError, match="no kto_tag or label"):
        normalize_preference({"messages": factory["messages"]}, "kto")


@pytest.mark.parametrize("row, message", [
    ({"messages": [USER], "chosen": "red", "images": ["a.png"]}, "no rejected answer"),
    ({"messages": [USER], "chosen": "red", "rejected": {"role": "assistant", "content": [
        {"type": "image", "image": "b.png"}, {"type": "text", "text": "blue"}]}, "images": ["a.png"]},
     "different images"),
    ({"chosen": "red", "rejected": "blue"}, "has no prompt"),
    ({"messages": [USER], "chosen": 3, "rejected": "blue"}, "chosen is an int"),
])
def test_a_bad_pair_is_named(row, message):
    with pytest.raises(RowError, match=message):
        normalize_preference(row, "pairs")


def test_pairs_tokenise_with_the_loss_on_the_last_answer_and_check_data_names_bad_pairs(tmp_path):
    template, plugin, tokenizer, processor = _tools()
    make_image_file(str(tmp_path / "a.png"), 64, 64)
    rows = [{"messages": [USER], "chosen": "red", "rejected": "blue", "images": ["a.png"]},
            {"messages": [USER], "chosen": "red", "rejected": "  ", "images": ["a.png"]},
            {"messages": [USER], "chosen": "red", "images": ["a.png"]}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    args = DataArguments(dataset=str(path), overwrite_cache=True)
    report = check_dataset(args, template, plugin, tokenizer, processor, preference="pairs")
    assert not report.ok
    assert any("sample 2" in p and "no rejected answer" in p for p in report.problems)
    assert any("sample 1" in d and "rejected answer: empty answer" in d for d in report.dropped)
    path.write_text(json.dumps(rows[:2]))
    train = build_dataset(args, template, plugin, tokenizer, processor, preference="pairs")["train"]
    assert len(train) == 1  # the empty rejected answer is dropped, counted
    row = train[0]
    chosen = normalize_row({"messages": [USER, {"role": "assistant", "content": "red"}], "images": ["a.png"]},
                           str(tmp_path))
    expected = encode_sample(chosen, template, plugin, tokenizer, processor, mask_history=True)
    assert row["input_ids"] == expected.input_ids and row["labels"] == expected.labels
    answer = [t for t in row["rejected_labels"] if t != -100]
    assert tokenizer.decode(answer).startswith("blue")
    assert row["rejected_input_ids"][:len(row["rejected_input_ids"]) - len(answer)] == \
        row["input_ids"][:len(row["input_ids"]) - len([t for t in row["labels"] if t != -100])]  # one prompt


def test_the_collator_lays_pairs_out_chosen_then_rejected_with_one_set_of_media(tmp_path):
    template, plugin, tokenizer, processor = _tools()
    for name, size in (("a.png", 64), ("b.png", 96)):
        make_image_file(str(tmp_path / name), size, size)
    rows = [{"messages": [USER], "chosen": "red", "rejected": "blue green", "images": ["a.png"]},
            {"messages": [USER], "chosen": "yellow circle", "rejected": "red", "images": ["b.png"]}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    train = build_dataset(DataArguments(dataset=str(path), overwrite_cache=True), template, plugin, tokenizer,
                          processor, preference="pairs")["train"]
    base = MultiModalCollator(plugin, processor, tokenizer)
    batch = PreferenceCollator(base)([train[0], train[1]])
    assert batch["input_ids"].shape[0] == 4 and batch[SHARED_MEDIA] is True
    assert batch["image_grid_thw"].tolist()[:2] == batch["image_grid_thw"].tolist()[2:]
    half = batch["pixel_values"].shape[0] // 2
    assert (batch["pixel_values"][:half] == batch["pixel_values"][half:]).all()
    assert batch["input_ids"][0, :len(train[0]["input_ids"])].tolist() == train[0]["input_ids"]
    assert batch["input_ids"][2, :len(train[0]["rejected_input_ids"])].tolist() == train[0]["rejected_input_ids"]


def test_kto_mismatched_rows_pair_each_prompt_with_the_previous_answer(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]],
                            "labels": [[-100, -100, 3, 4], [-100, 6, 7], [-100, -100, -100, 11, 12]]})
    kl = add_kl_rows(ds, batch_size=3)
    assert kl["kl_input_ids"] == [[1, 2, 11, 12], [5, 3, 4], [8, 9, 10, 6, 7]]
    assert kl["kl_labels"] == [[-100, -100, 11, 12], [-100, 3, 4], [-100, -100, -100, 6, 7]]


@pytest.mark.parametrize("extra, message", [
    ({"pref_beta": 0.2}, r"stage: sft contradicts pref_beta: 0.2 \(only stage dpo or kto reads pref_beta\)"),
    ({"stage": "dpo", "simpo_gamma": 1.0}, r"pref_loss: sigmoid contradicts simpo_gamma: 1.0"),
    ({"stage": "dpo", "pref_loss": "orpo", "pref_reference": "cached"}, r"orpo reads no reference"),
    ({"stage": "kto", "pref_loss": "ipo"}, r"stage: kto contradicts pref_loss: ipo"),
    ({"stage": "dpo", "packing": True}, r"stage: dpo contradicts packing: true"),
    ({"stage": "dpo", "finetuning_type": "full", "pref_reference": "adapter"}, r"pref_reference: adapter needs "
                                                                                  r"finetuning_type lora"),
])
def test_preference_keys_that_contradict_are_one_line(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(None, extra=extra)


def test_the_reference_is_resolved_per_method():
    def reference(**extra):
        return parse_config(None, extra=extra)[2].reference

    assert reference(stage="dpo") == "adapter"
    assert reference(stage="dpo", finetuning_type="full") == "cached"
    assert reference(stage="kto", finetuning_type="freeze") == "cached"
    assert reference(stage="dpo", pref_loss="simpo") is None
    assert reference(stage="dpo", pref_reference="cached") == "cached"
    assert reference() is None
