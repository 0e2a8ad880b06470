"""The benchmark data writer (benchmarks/varsize_data.py) and the preprocessing benchmark's options:
deterministic whatever the process count, a LLaMA-Factory work folder laid out as the peer's
prepare.py lays it, the dataset used as it is, token totals and per-sample lengths."""

import importlib.util
import json
import os
import pathlib
import sys

import pytest
from PIL import Image

from mmtune.testing import processor_dir

BENCH = pathlib.Path(__file__).parents[2] / "benchmarks"


def _module(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its worker function is pickled by reference, as from an import
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def varsize():
    return _module("varsize_data")


def _tree(root):
    return {p: open(os.path.join(root, p), "rb").read() for p in sorted(os.listdir(root))}


def test_varsize_data_is_the_same_in_one_process_or_several(tmp_path, varsize):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(processor_dir("qwen2_vl"))
    kw = dict(n=7, tokenizer=tok, seed=3, image_px=(40, 90), text_tokens=(5, 30))
    one = varsize.make_varsize_dataset(str(tmp_path / "one"), workers=1, **kw)
    stats: list[int] = []
    two = varsize.make_varsize_dataset(str(tmp_path / "two"), workers=2, stats=stats, **kw)
    rows = json.load(open(one))
    assert rows == json.load(open(two)) and len(rows) == 7
    assert _tree(tmp_path / "one" / "images") == _tree(tmp_path / "two" / "images")
    assert len(stats) == 7 and all(5 <= s <= 31 for s in stats)
    for row in rows:
        assert row["messages"][0]["content"].startswith("<image>") and row["messages"][1]["role"] == "assistant"
        w, h = Image.open(tmp_path / "one" / row["images"][0]).size
        assert 40 <= w <= 90 and 40 <= h <= 90
    other = varsize.make_varsize_dataset(str(tmp_path / "other"), **{**kw, "seed": 4})
    assert json.load(open(other)) != rows  # another seed, other samples


def test_lf_workdir_is_laid_out_as_the_peer_reads_it(tmp_path, varsize):
    model = processor_dir("qwen2_vl")
    work = tmp_path / "lf"
    varsize.main(["--n", "3", "--model", model, "--lf-workdir", str(work), "--workers", "2"])
    assert os.path.realpath(work / "model") == os.path.realpath(model)
    info = json.load(open(work / "data" / "dataset_info.json"))
    assert info == {"bench_mllm": {
        "file_name": "varsize.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}
    rows = json.load(open(work / "data" / "varsize.json"))
    assert len(rows) == 3 and all((work / "data" / r["images"][0]).is_file() for r in rows)
    # data written elsewhere is linked into the work folder, not copied
    elsewhere = tmp_path / "elsewhere"
    varsize.main(["--n", "2", "--model", model, "--out", str(elsewhere), "--lf-workdir", str(tmp_path / "lf2")])
    assert os.path.realpath(tmp_path / "lf2" / "data" / "varsize.json") == str(elsewhere / "varsize.json")
    assert (tmp_path / "lf2" / "data" / "images").is_symlink()


def test_preprocess_dataset_uses_the_file_as_it_is(tmp_path, varsize):
    model = processor_dir("qwen2_vl")
    work = tmp_path / "lf"
    varsize.main(["--n", "6", "--model", model, "--lf-workdir", str(work)])
    bench = _module("preprocess_dataset")
    data = str(work / "data" / "varsize.json")
    common = ["--model", model, "--data", data, "--workers", "1", "--image-max-pixels", "200704"]
    whole = bench.main(common + ["--lengths", str(tmp_path / "l.json")])
    assert whole["samples"] == 6 and not whole["repeated"] and whole["tokens"] > 0
    lengths = json.load(open(tmp_path / "l.json"))
    assert len(lengths["lengths"]) == 6 and sum(lengths["lengths"]) == whole["tokens"] == lengths["tokens"]
    first = bench.main(common + ["--n", "4", "--no-repeat"])
    assert first["samples"] == 4 and first["tokens"] == sum(lengths["lengths"][:4])
    more = bench.main(common + ["--n", "9"])
    assert more["samples"] == 9 and more["repeated"]
    with pytest.raises(SystemExit):
        bench.main(common + ["--n", "9", "--no-repeat"])
    # the peer's reading of image_max_pixels: shrink first, then the processor's own bounds
    peer = bench.main(common + ["--cap-rule", "peer", "--cutoff-len", "8192"])
    assert peer["samples"] == 6 and peer["cap_rule"] == "peer"
