"""The prediction speed benchmark runs end to end on the tiny stand-in on the CPU."""

import importlib.util
import json
import pathlib


def test_predict_speed_benchmark_smoke(tmp_path):
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "predict_speed.py"
    spec = importlib.util.spec_from_file_location("predict_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--cpu", "--samples", "6", "--work-dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert result["samples"] == 6 and result["samples_per_second"] > 0 and result["tokens_per_second"] > 0
    with open(tmp_path / "predict" / "generated_predictions.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 6 and all(r["new_tokens"] == 4 for r in rows)  # min_new_tokens: the length is fixed
    assert json.loads((tmp_path / "r.json").read_text()) == result
