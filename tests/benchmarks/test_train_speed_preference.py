"""benchmarks/train_speed.py --stage dpo / kto: the peer harness's data shape with a rejected answer
added, timed on the CPU (the smoke test of the GPU measurement)."""

import importlib.util
import json
import pathlib
import sys

import pytest

from mmtune.demo import build_model_dir, make_dataset

BENCH = pathlib.Path(__file__).parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_speed", BENCH / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_preference_rows_from_the_harness_shape(bench, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": a}],
             "images": ["i.png"]} for a in ("one", "two", "three")]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(rows))
    pairs = json.load(open(bench.preference_data(str(path), "dpo")))
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in pairs] == [
        ("one", "two"), ("two", "three"), ("three", "one")]
    assert all(p["messages"] == rows[0]["messages"][:1] and p["images"] == ["i.png"] for p in pairs)
    kto = json.load(open(bench.preference_data(str(path), "kto")))
    assert [(k["messages"][-1]["content"], k["kto_tag"]) for k in kto] == [("one", True), ("three", False),
                                                                           ("three", True)]


@pytest.mark.parametrize("stage, method", [("dpo", "lora"), ("kto", "full")])
def test_cpu_smoke_run(bench, tmp_path, stage, method):
    data, _ = make_dataset(str(tmp_path / "data"), n_train=4, n_test=0, size=56)
    model = build_model_dir(str(tmp_path), hidden=64)
    row = bench.main(["--model", model, "--data", data, "--method", method, "--stage", stage, "--batch", "2",
                      "--steps", "3", "--warmup", "1", "--cpu", "--output-dir", str(tmp_path / "out"),
                      "--cutoff-len", "256"])
    assert row["stage"].startswith(stage) and row["steps"] == 3 and row["samples_per_s"] > 0
    assert row["tokens_per_sample"] > 0 and row["gflop_per_sample"] > 0
