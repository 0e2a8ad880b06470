"""Several datasets mixed by ratio, and tokenisation cached on disk and re-used."""

import json

import pytest

from mmtune.config import DataArguments
from mmtune.data.loader import build_dataset
from mmtune.templates import get_template
from mmtune.plugins import get_mm_plugin
from mmtune.testing.fixtures import load_processor


def _write(path, answer, n):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    proc = load_processor("qwen2_vl")
    a, b = _write(root / "a.json", "alpha", 300), _write(root / "b.json", "beta", 300)
    return a, b, proc


def _answers(ds, tok):
    return [tok.decode([t for t, y in zip(r["input_ids"], r["labels"]) if y != -100]) for r in ds]


def _build(proc, **kw):
    return build_dataset(DataArguments(**kw), get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"), proc.tokenizer,
                         proc)["train"]


def test_ratios_interleave_by_weight(parts):
    a, b, proc = parts
    concat = _build(proc, dataset=f"{a},{b}")
    assert len(concat) == 600
    mixed = _build(proc, dataset=f"{a},{b}", dataset_ratios="0.8,0.2")
    answers = _answers(mixed, proc.tokenizer)
    share = sum("alpha" in x for x in answers) / len(answers)
    assert 0.72 < share < 0.88, share  # first_exhausted: stops when `a` (drawn 80%) runs out
    over = _build(proc, dataset=f"{a},{b}", dataset_ratios="0.8,0.2", mix_strategy="interleave_over")
    assert sum("beta" in x for x in _answers(over, proc.tokenizer)) >= 300  # every beta sample seen
    with pytest.raises(ValueError, match="need 2 non-negative weights"):
        _build(proc, dataset=f"{a},{b}", dataset_ratios="1")


def test_tokenisation_is_cached_and_reused_until_the_config_changes(parts):
    a, _, proc = parts
    first = _build(proc, dataset=a, cutoff_len=512)
    files = [f["filename"] for f in first.cache_files]
    assert files, "tokenised rows live in an on-disk cache"
    again = _build(proc, dataset=a, cutoff_len=512)
    assert again._fingerprint == first._fingerprint  # same fingerprint: datasets loads the cache, no re-tokenising
    assert [f["filename"] for f in again.cache_files] == files
    changed = _build(proc, dataset=a, cutoff_len=256)
    assert changed._fingerprint != first._fingerprint
