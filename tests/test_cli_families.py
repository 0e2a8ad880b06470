"""`mmtune families`: one row per registered model type, read from the registries and each
family's SpeedCapabilities, as a table and as JSON."""

import json

from mmtune.cli import family_rows, main
from mmtune.model.composite import COMPOSITE_MODELS


def test_every_model_type_has_a_row_with_what_its_family_declares():
    rows = {r["model_type"]: r for r in family_rows()}
    assert set(rows) == set(COMPOSITE_MODELS)
    assert rows["qwen3_5"] == {"model_type": "qwen3_5", "modalities": ["image", "video"], "plugin": "qwen3_5",
                               "templates": ["qwen3_5", "qwen3_5_thinking"], "packing": None,
                               "no_packing": COMPOSITE_MODELS["qwen3_5"].no_packing,
                               "levers": ["fused-ce", "vision-varlen", "sync-free"], "in_transformers": True}
    assert rows["qwen3_5_moe"]["templates"] == ["qwen3_5", "qwen3_5_thinking"]
    assert rows["gemma4"]["modalities"] == ["image", "video", "audio"] and rows["gemma4"]["levers"] == ["fused-ce"]
    assert rows["qwen2_vl"]["packing"] == "mrope" and rows["llava"]["packing"] == "causal"
    assert rows["qwen2_audio"]["modalities"] == ["audio"] and rows["qwen2_audio"]["levers"] == []
    assert rows["aya_vision"]["modalities"] is None  # no plugin of its own yet: text-only runs
    assert rows["vipllava"]["templates"] == [] and rows["llava_llama"]["in_transformers"] is False


def test_the_command_prints_a_table_and_json(capsys):
    assert main(["families"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "type"]
    qwen = next(line for line in lines if line.startswith("qwen3_5 "))
    assert qwen.split() == ["qwen3_5", "image,video", "qwen3_5,", "qwen3_5_thinking", "no", "fused-ce,",
                            "vision-varlen,", "sync-free"]
    assert any(line.startswith("aya_vision ") and "text only (no plugin)" in line for line in lines)
    assert main(["families", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == family_rows()
