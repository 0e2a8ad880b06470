"""Issue 17, "stops mid-run": a JPEG with a good header and a truncated body passes tokenising
(headers only) and fails when a batch decodes it. By default the run stops with one line naming
the sample (index, file, line) and `skip_bad_samples`; with `skip_bad_samples: true` the sample
is replaced by the next good one, counted, and listed in OUTPUT_DIR/skipped_samples.jsonl."""

import json
import logging
import os
from io import BytesIO

import pytest
import torch

from mmtune.data import MultiModalCollator
from mmtune.config import DataArguments
from mmtune.data.loader import build_dataset
from mmtune.data.packing import PackingCollator
from mmtune.data.problems import BadSamplesError
from mmtune.data.skip import SKIPPED_FILE, BadSampleGuard
from mmtune.demo import build_model_dir
from mmtune.plugins import get_mm_plugin
from mmtune.templates import get_template
from mmtune.testing import load_processor
from mmtune.testing.media import make_image

N = 6
BAD = 2  # the sample whose image has a truncated body


def _jpeg(path, seed, cut=False):
    buffer = BytesIO()
    make_image(56, 56, seed).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2] if cut else data)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("skip")
    rows = []
    for i in range(N):
        _jpeg(root / f"{i}.jpg", i, cut=i == BAD)
        rows.append({"messages": [{"role": "user", "content": f"<image>what is shape {i}?"},
                                  {"role": "assistant", "content": "a red circle" if i % 2 else "a blue square"}],
                     "images": [f"{i}.jpg"]})
    data = root / "data.json"
    data.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")  # sample i on line i + 2
    model = build_model_dir(str(root), hidden=64)
    return {"root": root, "data": str(data), "model": model}


def _config(ws, out, **extra):
    from mmtune.config import parse_config

    cfg = dict(model_name_or_path=ws["model"], dataset=ws["data"], template="qwen2_vl", finetuning_type="lora",
               lora_rank=4, torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=2, max_steps=3,
               learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0, use_cpu=True,
               dataloader_num_workers=0, disable_tqdm=True, cutoff_len=256, plot_loss=False)
    cfg.update(extra)
    return parse_config(None, extra=cfg)


def _inputs(ws):
    return {name: (ws["root"] / name).read_bytes() for name in os.listdir(ws["root"]) if name.endswith((".jpg", ".json"))}


def test_by_default_the_run_stops_with_one_line_naming_the_sample(workspace, tmp_path, capsys):
    from mmtune.cli import main

    before = _inputs(workspace)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in dict(
        model_name_or_path=workspace["model"], dataset=workspace["data"], template="qwen2_vl", finetuning_type="lora",
        torch_dtype="fp32", use_cpu="true", per_device_train_batch_size=2, max_steps=3, save_strategy="'no'",
        output_dir=tmp_path / "out", disable_tqdm="true").items()))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmtune train: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    bad = os.path.join(str(workspace["root"]), f"{BAD}.jpg")
    assert line.startswith(f"mmtune train: error: sample {BAD} of {workspace['data']} (line {BAD + 2}): "), line
    assert bad in line and "truncated" in line and "skip_bad_samples: true" in line, line
    assert not os.path.exists(tmp_path / "out" / SKIPPED_FILE)
    assert _inputs(workspace) == before  # nothing of the user's touched


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_samples_replaces_counts_and_lists_it(workspace, tmp_path, caplog, workers):
    """Batch size 1, one epoch: every sample is seen once, the bad one is replaced by the next
    (sample 3), the run finishes, and the report has one line; also with worker processes,
    which append to the report in their own process."""
    from mmtune.train import run_sft

    before = _inputs(workspace)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="mmtune.data.skip"):
        metrics = run_sft(*_config(workspace, out, skip_bad_samples=True, per_device_train_batch_size=1, max_steps=N,
                                   dataloader_num_workers=workers))
    assert metrics["train_loss"] > 0 and metrics["epoch"] == pytest.approx(1.0)
    rows = [json.loads(line) for line in (out / SKIPPED_FILE).read_text().splitlines()]
    assert len(rows) == 1, rows
    (row,) = rows
    assert (row["sample"], row["file"], row["line"]) == (BAD, workspace["data"], BAD + 2)
    assert "truncated" in row["reason"] and f"{BAD}.jpg" in row["reason"]
    assert row["replaced_by"] == {"sample": BAD + 1, "file": workspace["data"]}
    ends = [r.message for r in caplog.records if "samples skipped in this run" in r.message]
    assert ends == [f"skip_bad_samples: 1 samples skipped in this run, their media failed to decode; each is listed in "
                    f"{out / SKIPPED_FILE}"], ends
    assert os.path.exists(out / "adapter_model.safetensors")  # the run saved its model
    assert _inputs(workspace) == before


@pytest.fixture(scope="module")
def tokenised(workspace):
    processor = load_processor("qwen2_vl")
    plugin = get_mm_plugin("qwen2_vl")
    args = DataArguments(dataset=workspace["data"], overwrite_cache=True)
    train = build_dataset(args, get_template("qwen2_vl"), plugin, processor.tokenizer, processor)["train"]
    collator = MultiModalCollator(plugin, processor, processor.tokenizer)
    return {"train": train, "collator": collator}


def test_the_collator_names_the_sample_and_never_passes_its_origin_to_the_model(tokenised, workspace):
    train, collator = tokenised["train"], tokenised["collator"]
    good = collator([train[0], train[1]])
    assert not {"sample_index", "source"} & set(good)
    with pytest.raises(BadSamplesError) as info:
        collator([train[0], train[BAD]])
    message = str(info.value)
    assert message.startswith(f"sample {BAD} of {workspace['data']} (line {BAD + 2}): unreadable image "), message
    assert [(position, reason) for position, _, reason in info.value.bad][0][0] == 1


def test_the_guard_replaces_deterministically_in_plain_and_packed_batches(tokenised, tmp_path):
    train, collator = tokenised["train"], tokenised["collator"]
    guard = BadSampleGuard(collator, [train], str(tmp_path))
    batch = guard([train[BAD]])  # a batch of one keeps its size
    expected = collator([train[BAD + 1]])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(guard([train[BAD]])["input_ids"], expected["input_ids"])  # the same choice every time
    packing = PackingCollator.from_collator(collator)
    packed_guard = BadSampleGuard(packing, [train], str(tmp_path / "packed"))
    rows = [{"packed": [train[0], train[BAD]]}, {"packed": [train[4]]}]
    packed = packed_guard(rows)
    reference = packing([{"packed": [train[0], train[BAD + 1]]}, {"packed": [train[4]]}])
    assert torch.equal(packed["input_ids"], reference["input_ids"])
    assert torch.equal(packed["pixel_values"], reference["pixel_values"])
    assert not {"sample_index", "source"} & set(packed)
    lines = (tmp_path / SKIPPED_FILE).read_text().splitlines()
    assert len(lines) == 2 and len((tmp_path / "packed" / SKIPPED_FILE).read_text().splitlines()) == 1


def test_an_error_from_a_dataloader_worker_keeps_its_one_line_message():
    """torch re-raises a worker's exception as ``type(text)`` with the worker's whole traceback
    in ``text``; the CLI prints the message, so it must stay the worker's own line."""
    from torch._utils import ExceptionWrapper

    line = "sample 2 of d.json (line 4): unreadable image 2.jpg: image file is truncated; fix or remove it"
    try:
        raise BadSamplesError(line, [(0, {}, "x")])
    except BadSamplesError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BadSamplesError) as info:
        wrapped.reraise()
    assert str(info.value) == line

