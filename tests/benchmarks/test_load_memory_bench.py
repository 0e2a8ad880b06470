"""The GPU load benchmark runs end to end on tiny sizes on the CPU."""

import importlib.util
import pathlib


def test_load_memory_benchmark_smoke(tmp_path):
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "load_memory.py"
    spec = importlib.util.spec_from_file_location("load_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--json", str(tmp_path / "r.json")])
    stats = result["parameters"]
    assert stats["vision"]["trainable"] == 0 and stats["projector"]["trainable"] == 0
    assert 0 < stats["language"]["trainable"] < stats["language"]["total"]
    assert (tmp_path / "r.json").exists()
