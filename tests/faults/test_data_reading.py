"""Issue 17, reading data: `check-data` never aborts and names every problem by sample, file and
line; training collects the same problems before the model loads; the tokenisation cache
follows the media files."""

import json
import logging
import os

import pytest

import mmtune.data.check as check_module
import mmtune.data.loader as loader_module
from mmtune.data.check import check_dataset
from mmtune.config import DataArguments
from mmtune.data.loader import build_dataset
from mmtune.data.problems import sample_lines
from mmtune.errors import DataError
from mmtune.plugins import get_mm_plugin
from mmtune.templates import get_template
from mmtune.testing import load_processor, make_image_file

GOOD = {"messages": [{"role": "user", "content": "<image>what colour?"}, {"role": "assistant", "content": "red"}],
        "images": ["ok.png"]}
TEXT = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}


@pytest.fixture(scope="module")
def kit():
    processor = load_processor("qwen2_vl")
    return {"processor": processor, "tokenizer": processor.tokenizer, "template": get_template("qwen2_vl"),
            "plugin": get_mm_plugin("qwen2_vl")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mmtune.testing import tiny_model_dir

    return tiny_model_dir("qwen2_vl", str(tmp_path_factory.mktemp("model")))


def _array_file(path, rows):
    """A JSON array with element k on line k + 2 (so the expected lines are plain)."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    return str(path)


def _jsonl_file(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after + 1, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _check(kit, dataset, **kw):
    args = DataArguments(dataset=dataset, **kw)
    return check_dataset(args, kit["template"], kit["plugin"], kit["tokenizer"], kit["processor"])


def _build(kit, dataset, **kw):
    args = DataArguments(dataset=dataset, overwrite_cache=True, **kw)
    return build_dataset(args, kit["template"], kit["plugin"], kit["tokenizer"], kit["processor"])


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


def _wide_image(tmp_path):
    make_image_file(str(tmp_path / "wide.png"), 1000, 4)
    return {"messages": GOOD["messages"], "images": ["wide.png"]}


BAD_ROWS = {  # case -> (row builder, words the problem line holds)
    "conversations is a string": (lambda tmp: {"conversations": "just a string"}, []),
    "conversations is a dict": (lambda tmp: {"conversations": {"from": "human", "value": "hi"}}, []),
    "content is an int": (lambda tmp: {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
                          []),
    "extreme aspect ratio": (_wide_image, ["aspect ratio"]),
    "placeholders and images differ": (
        lambda tmp: {"messages": [{"role": "user", "content": "<image><image>two?"},
                                  {"role": "assistant", "content": "one"}], "images": ["ok.png"]}, ["image"]),
    "unknown role": (lambda tmp: {"conversations": [{"from": "alien", "value": "x"}]}, ["alien"]),
    "truncated JPEG body": (lambda tmp: {"messages": GOOD["messages"], "images": ["cut.jpg"]}, ["cut.jpg", "truncated"]),
}


def _cut_jpeg(path):
    from io import BytesIO

    from mmtune.testing.media import make_image

    buffer = BytesIO()
    make_image(64, 64, 0).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])  # the header is whole: only decoding fails


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_check_data_reports_a_bad_row_with_its_line_and_checks_the_rest(kit, tmp_path, case):
    """Each of these aborted the whole report, or named no sample, before: now one ERROR line
    `sample 1 of FILE (line 3): ...` and the good samples around it are still checked."""
    make_image_file(str(tmp_path / "ok.png"), 56, 56)
    _cut_jpeg(tmp_path / "cut.jpg")
    build, words = BAD_ROWS[case]
    path = _array_file(tmp_path / "d.json", [GOOD, build(tmp_path), TEXT])
    before = _snapshot(tmp_path)
    report = _check(kit, path)
    assert report.samples == 3 and len(report.lengths) == 2, report.render()  # the rest were checked
    assert len(report.problems) == 1 and not report.ok, report.render()
    problem = report.problems[0]
    assert problem.startswith(f"sample 1 of {path} (line 3): "), problem
    assert "\n" not in problem and all(w in problem for w in words), problem
    assert _snapshot(tmp_path) == before  # nothing written


def test_check_data_reports_a_decompression_bomb_and_goes_on(kit, tmp_path, monkeypatch):
    """PIL's DecompressionBombError (not a ValueError) aborted check-data; its warning level is
    a counted note. The limits are lowered so that small images stand for huge ones."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    make_image_file(str(tmp_path / "bomb.png"), 64, 64)  # 4096 px > 2 x 2000: PIL refuses it
    make_image_file(str(tmp_path / "big.png"), 50, 50)  # 2500 px > 2000: PIL warns
    rows = [TEXT, {"messages": GOOD["messages"], "images": ["bomb.png"]},
            {"messages": GOOD["messages"], "images": ["big.png"]}]
    path = _jsonl_file(tmp_path / "d.jsonl", rows)
    report = _check(kit, path)
    assert report.samples == 3 and len(report.lengths) == 2, report.render()
    (problem,) = report.problems
    assert problem.startswith(f"sample 1 of {path} (line 2): DecompressionBombError: ") and "downscale" in problem
    assert report.note_counts == {"large_image": 1}
    assert report.note_examples["large_image"][0].startswith(f"sample 2 of {path} (line 3): ")
    assert "NOTE large_image: 1 samples" in report.render()


def _files(tmp_path):
    """Each broken file, with the problem words (file, line, column, what to do) it must name."""
    good = [json.dumps(TEXT)] * 2
    (tmp_path / "array.json").write_text("[\n" + json.dumps(TEXT) + ",\n" + json.dumps(TEXT)[:-1] + ",,\n]\n")
    (tmp_path / "lines.jsonl").write_text("\n".join([good[0], good[1], '{"messages": [1,}', good[0]]) + "\n")
    (tmp_path / "latin.jsonl").write_bytes(("\n".join(good) + "\n").encode() + b'{"messages": "caf\xe9"}\n')
    (tmp_path / "latin.json").write_bytes(b'[\n' + json.dumps(TEXT).encode() + b',\n{"messages": "caf\xe9"}\n]')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "scalar.jsonl").write_text(good[0] + "\n[1, 2]\n")
    return {
        "invalid JSON array": ("array.json", ["line 3, column", "invalid JSON", "fix"]),
        "broken jsonl line": ("lines.jsonl", ["line 3, column 17", "invalid JSON", "fix that line"]),
        "non-UTF-8 jsonl": ("latin.jsonl", ["line 3, column 18", "byte 0xe9 is not UTF-8", "save the file as UTF-8"]),
        "non-UTF-8 json": ("latin.json", ["line 3, column 18", "byte 0xe9 is not UTF-8", "save the file as UTF-8"]),
        "empty jsonl": ("empty.jsonl", ["the file is empty", "remove it from `dataset`"]),
        "blank jsonl": ("blank.jsonl", ["the file is empty"]),
        "empty json array": ("empty.json", ["empty JSON array", "no samples"]),
        "a line that is no object": ("scalar.jsonl", ["line 2 is an array, not a JSON object"]),
        "missing file": ("missing.jsonl", ["no such file or folder", "fix the path in `dataset`"]),
    }


FILE_CASES = ["invalid JSON array", "broken jsonl line", "non-UTF-8 jsonl", "non-UTF-8 json", "empty jsonl",
              "blank jsonl", "empty json array", "a line that is no object", "missing file"]


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_broken_file_is_one_problem_with_its_line_and_the_other_entries_are_checked(kit, tmp_path, case):
    name, words = _files(tmp_path)[case]
    bad = str(tmp_path / name)
    good = _jsonl_file(tmp_path / "good.jsonl", [TEXT, TEXT])
    before = _snapshot(tmp_path)
    report = _check(kit, f"{bad},{good}")
    assert len(report.problems) == 1, report.render()
    problem = report.problems[0]
    assert problem.startswith(f"dataset {bad!r}: ") and "\n" not in problem, problem
    for word in words:
        assert word in problem, problem
    assert len(report.lengths) == 2  # the good entry was still checked
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", FILE_CASES)
def test_training_stops_on_a_broken_file_naming_its_line(kit, tmp_path, case):
    """The training path raises the same line as check-data, a DataError (one line in the CLI)."""
    name, words = _files(tmp_path)[case]
    bad = str(tmp_path / name)
    good = _jsonl_file(tmp_path / "good.jsonl", [TEXT, TEXT])
    with pytest.raises(DataError) as info:
        _build(kit, f"{good},{bad}")
    message = str(info.value)
    assert message == _check(kit, bad).problems[0], message
    for word in words:
        assert word in message, message


def test_rows_after_an_unreadable_row_are_still_checked(kit, tmp_path):
    """datasets reads a JSONL file with a non-UTF-8 byte and fails only on that row: the file's
    line is named once, and the rows after it are checked one by one."""
    good = json.dumps(TEXT).encode()
    path = tmp_path / "latin.jsonl"
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "hi"}]}'
    path.write_bytes(b"\n".join([good, good, bad, *[good] * 12]) + b"\n")  # one schema: datasets loads it
    report = _check(kit, str(path))
    assert report.samples == 15 and len(report.lengths) == 14, report.render()
    (problem,) = report.problems
    assert problem == (f"dataset {str(path)!r}: line 3, column 47: byte 0xe9 is not UTF-8 text; save the file as UTF-8 "
                       "(e.g. `iconv -f latin1 -t utf-8`) (1 samples cannot be read)"), problem
    with pytest.raises(DataError) as info:  # training: the tokenising pass meets the row, the file's line is named
        _build(kit, str(path))
    assert str(info.value) == problem[:problem.rindex(" (1 samples")]


def test_sample_lines_of_json_arrays_and_json_lines(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)]
    pretty = tmp_path / "p.json"
    pretty.write_text(json.dumps(rows, indent=2))  # 8 lines an element after the "[" line
    assert sample_lines(str(pretty), [0, 1, 3]) == {0: 2, 1: 10, 3: 26}
    assert pretty.read_text().split("\n")[25] == "  {"
    jsonl = _jsonl_file(tmp_path / "l.jsonl", rows, blank_after=1)  # a blank line 3: sample 2 is on line 4
    assert sample_lines(jsonl, [0, 2, 3]) == {0: 1, 2: 4, 3: 5}
    assert sample_lines(str(tmp_path / "none.parquet"), [0]) == {}


def _bad_rows(n_bad):
    rows = [TEXT]
    rows += [{"conversations": "not a list"} for _ in range(n_bad)]
    return rows


def test_training_lists_every_bad_sample_at_once_with_lines(kit, tmp_path):
    path = _array_file(tmp_path / "d.json", _bad_rows(12))
    with pytest.raises(DataError) as info:
        _build(kit, path)
    lines = str(info.value).split("\n")
    assert len(lines) == 11, lines  # the first 10, then the count and what to do
    for k in range(10):
        assert lines[k].startswith(f"sample {k + 1} of {path} (line {k + 3}): "), lines[k]
    assert lines[10].startswith("12 problems (the first 10 above)") and "mmtune check-data CONFIG" in lines[10]


def _train_config(model_dir, data, out, **extra):
    from mmtune.config import parse_config

    cfg = dict(model_name_or_path=model_dir, dataset=data, template="qwen2_vl", finetuning_type="lora", lora_rank=4,
               torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=2, max_steps=1, use_cpu=True,
               dataloader_num_workers=0, disable_tqdm=True, save_strategy="no", report_to="none", overwrite_cache=True)
    cfg.update(extra)
    return parse_config(None, extra=cfg)


@pytest.fixture
def no_model(monkeypatch):
    """load_model raises: a data error that comes first is the one seen."""
    import mmtune.train.recipe as recipe

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data error")

    monkeypatch.setattr(recipe, "load_model", refuse)


def _written(out):
    return sorted(os.listdir(out)) if os.path.isdir(out) else []


@pytest.mark.parametrize("case", ["bad samples", "zero rows", "every row dropped", "val_size takes all",
                                  "val_size share takes all"])
def test_run_sft_raises_data_errors_before_the_model_loads(model_dir, tmp_path, no_model, case):
    from mmtune.train import run_sft

    out = tmp_path / "out"
    good = _jsonl_file(tmp_path / "good.jsonl", [TEXT] * 3)
    extra, words = {}, []
    if case == "bad samples":
        data = _array_file(tmp_path / "d.json", _bad_rows(2))
        words = [f"sample 1 of {data} (line 3)", f"sample 2 of {data} (line 4)", "2 problems"]
    elif case == "zero rows":
        (tmp_path / "d.json").write_text("[]")
        data = f"{good},{tmp_path / 'd.json'}"
        words = [repr(str(tmp_path / "d.json")), "no samples"]
    elif case == "every row dropped":
        data = _jsonl_file(tmp_path / "d.jsonl", [{"messages": TEXT["messages"][:1]}] * 2)  # no answer at all
        words = [repr(data), "all 2 samples were dropped", "mmtune check-data"]
    elif case == "val_size takes all":
        data, extra, words = good, {"val_size": 3}, ["val_size=3", "lower"]
    else:
        data, extra, words = good, {"val_size": 0.99}, ["val_size=0.99", "lower"]
    with pytest.raises(DataError) as info:
        run_sft(*_train_config(model_dir, data, out, **extra))
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not [n for n in _written(out) if not n.startswith(".")], _written(out)  # nothing written


def test_the_cli_prints_a_data_error_as_lines_and_exits_2(model_dir, tmp_path, capsys, no_model):
    from mmtune.cli import main

    data = _array_file(tmp_path / "d.json", _bad_rows(1))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {model_dir}\ndataset: {data}\ntemplate: qwen2_vl\nuse_cpu: true\n"
                   f"output_dir: {tmp_path / 'out'}\nmax_steps: 1\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"mmtune train: error: sample 1 of {data} (line 3): " in err and "Traceback" not in err, err
    assert main(["check-data", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR sample 1 of {data} (line 3): " in out, out
    assert not os.path.exists(tmp_path / "out")


def _note_everything(real):
    """encode_sample that adds one note of each kind to sample texts mentioning it (the notes
    themselves are the tokeniser's; this checks how they are counted and shown)."""

    def encode(sample, *args, **kwargs):
        result = real(sample, *args, **kwargs)
        text = sample.messages[0]["content"]
        if "cut" in text:
            result.notes.append(("truncated", "answer cut at 64 of 90 tokens"))
        return result

    return encode


def test_drops_and_notes_are_logged_per_dataset_with_the_first_sample(kit, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loader_module, "encode_sample", _note_everything(loader_module.encode_sample))
    rows = [TEXT, {"messages": TEXT["messages"][:1]}, {"messages": [{"role": "user", "content": "cut me"},
                                                                     {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "cut again"}, {"role": "assistant", "content": "y"}]}]
    path = _jsonl_file(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="mmtune.data.loader"):
        ds = _build(kit, path)["train"]
    assert len(ds) == 3
    dropped = [r.message for r in caplog.records if "dropped" in r.message]
    assert len(dropped) == 1 and f"{path}: dropped 1 of 4 samples: " in dropped[0], dropped
    assert f"(first: sample 1 of {path} (line 2))" in dropped[0]
    noted = [r.message for r in caplog.records if "answers cut by cutoff_len" in r.message]
    assert noted == [f"{path}: 2 of 4 samples: answers cut by cutoff_len (first: sample 2 of {path} (line 3): "
                     "answer cut at 64 of 90 tokens)"], noted
    assert set(ds.column_names) >= {"sample_index", "source"} and not {"error", "notes", "dropped"} & set(ds.column_names)
    assert list(ds["sample_index"]) == [0, 2, 3] and set(ds["source"]) == {path}


def test_check_data_counts_notes_by_kind_and_lists_the_first(kit, tmp_path, monkeypatch):
    monkeypatch.setattr(check_module, "encode_sample", _note_everything(check_module.encode_sample))
    rows = [TEXT] + [{"messages": [{"role": "user", "content": f"cut {i}"}, {"role": "assistant", "content": "x"}]}
                     for i in range(7)]
    path = _jsonl_file(tmp_path / "d.jsonl", rows)
    report = _check(kit, path)
    assert report.ok and report.note_counts == {"truncated": 7}  # notes alone pass
    assert len(report.note_examples["truncated"]) == check_module.NOTES_LISTED
    text = report.render()
    assert "notes: 7 truncated" in text.split("\n")[0]
    assert "NOTE truncated: 7 samples (answers cut by cutoff_len), the first 5:" in text
    assert f"    sample 1 of {path} (line 2): answer cut at 64 of 90 tokens" in text


def test_check_data_lists_dropped_samples_and_exits_1(kit, tmp_path):
    rows = [TEXT, {"messages": TEXT["messages"][:1]}]
    path = _jsonl_file(tmp_path / "d.jsonl", rows)
    report = _check(kit, path)
    assert not report.ok and report.dropped and report.dropped[0].startswith(f"sample 1 of {path} (line 2): ")
    assert "1 dropped for other reasons" in report.render()


def test_replacing_an_image_tokenises_again(kit, tmp_path):
    """The tokenised cache is keyed by the media files' size and mtime: a replaced image gives
    the ids a fresh pass gives (before: the old token count, a shape mismatch at batch time)."""
    image = tmp_path / "ok.png"
    make_image_file(str(image), 56, 56)
    path = _jsonl_file(tmp_path / "d.jsonl", [GOOD, TEXT])
    args = DataArguments(dataset=path)  # the default: the cache is used
    build = lambda: build_dataset(args, kit["template"], kit["plugin"], kit["tokenizer"], kit["processor"])  # noqa: E731
    first = list(build()["train"][0]["input_ids"])
    assert list(build()["train"][0]["input_ids"]) == first  # cached and equal
    make_image_file(str(image), 112, 84, seed=3)
    again = list(build()["train"][0]["input_ids"])
    fresh = list(_build(kit, path)["train"][0]["input_ids"])
    assert again == fresh and len(again) > len(first)


def test_a_real_truncated_answer_is_counted_in_training_and_listed_by_check_data(kit, tmp_path, caplog):
    """The tokeniser's own note (no stand-in): an answer cut by cutoff_len, with the defaults."""
    long = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "word " * 60}]}
    path = _jsonl_file(tmp_path / "d.jsonl", [TEXT, long])
    with caplog.at_level(logging.WARNING, logger="mmtune.data.loader"):
        assert len(_build(kit, path, cutoff_len=40)["train"]) == 2
    assert [r.message for r in caplog.records if "answers cut by cutoff_len" in r.message][0].startswith(
        f"{path}: 1 of 2 samples: answers cut by cutoff_len (first: sample 1 of {path} (line 2): 40 of ")
    report = _check(kit, path, cutoff_len=40)
    assert report.ok and report.note_counts == {"truncated": 1}
    assert report.note_examples["truncated"][0].startswith(f"sample 1 of {path} (line 2): 40 of ")
