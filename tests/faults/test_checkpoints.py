"""Checkpoints (issue 17, "Stops mid-run"): written under a temporary name and renamed when complete,
``resume_from_checkpoint: true`` takes the newest complete one (a kill -9 during a save, then a
resume, gives the uninterrupted losses), an explicit incomplete one is a one-line error before the
model loads, and the Trainer methods the staging relies on keep their shape."""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import Trainer, TrainerCallback

from mmtune.demo import build_model_dir, make_dataset
from mmtune.errors import ModelFolderError
from mmtune.config import parse_config
from mmtune.train import run_sft
from mmtune.train.checkpoints import checkpoint_problem, latest_complete_checkpoint, publish_checkpoint, resolve_resume

from .conftest import logged_losses, lora_run_config

DRIVER = Path(__file__).with_name("train_driver.py")


class StagedFolders(TrainerCallback):
    """Where each checkpoint was when complete but not yet renamed (``write_checkpoint``), and
    whether its final name existed then."""

    def __init__(self):
        self.seen = []

    def write_checkpoint(self, args, state, folder):
        final = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.seen.append((os.path.relpath(folder, args.output_dir), os.path.exists(final),
                          os.path.isfile(os.path.join(folder, "trainer_state.json"))))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    data, _ = make_dataset(str(root / "data"), n_train=24, n_test=0, size=56)
    model = build_model_dir(str(root), hidden=64)
    ws = {"root": root, "data": data, "model": model}
    reference, staged = root / "reference", StagedFolders()
    run_sft(*parse_config(None, extra=lora_run_config(ws, reference, save_total_limit=2)), callbacks=[staged])
    ws["reference"], ws["staged"] = logged_losses(reference), staged.seen
    return ws


def test_checkpoints_are_staged_renamed_and_rotated(ws):
    """Each checkpoint is complete under tmp-checkpoint-N/ before checkpoint-N exists; the rename
    leaves no staging folder; save_total_limit still rotates; the config and processor are in."""
    assert ws["staged"] == [(f"tmp-checkpoint-{n}/checkpoint-{n}", False, True) for n in (2, 4, 6)]
    out = ws["root"] / "reference"
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-4", "checkpoint-6"]
    for n in (4, 6):
        folder = out / f"checkpoint-{n}"
        assert checkpoint_problem(str(folder)) is None
        for name in ("mmtune_config.json", "processor_config.json", "adapter_model.safetensors", "optimizer.pt"):
            assert (folder / name).is_file(), (folder, name)


def test_full_fine_tuning_checkpoints_are_staged_too(ws, tmp_path):
    staged = StagedFolders()
    out = tmp_path / "full"
    run_sft(*parse_config(None, extra=lora_run_config(ws, out, finetuning_type="full", max_steps=2, save_steps=1,
                                              save_total_limit=1, learning_rate=1e-3)), callbacks=[staged])
    assert staged.seen == [(f"tmp-checkpoint-{n}/checkpoint-{n}", False, True) for n in (1, 2)]
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2"]
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert (out / "checkpoint-2" / "mmtune_config.json").is_file()


def test_kill_9_during_a_save_then_resume_true_gives_the_uninterrupted_losses(ws, caplog):
    """The run is SIGKILLed inside the save of checkpoint-4 (weights, optimizer and RNG states
    written, trainer_state.json not yet): the partial save is tmp-checkpoint-4, never a
    checkpoint-4; resume_from_checkpoint: true takes checkpoint-2 and finishes with the losses of
    the uninterrupted run."""
    out = ws["root"] / "killed"
    config = ws["root"] / "killed.yaml"
    config.write_text(yaml.safe_dump(lora_run_config(ws, out)))
    ready = str(ws["root"] / "killed.ready")
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(config), "block_in_save", "4", ready],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(ready) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert os.path.exists(ready), err[-4000:]
    assert Path(ready).read_text() == str(out / "tmp-checkpoint-4" / "checkpoint-4")

    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2", "tmp-checkpoint-4"]
    partial = out / "tmp-checkpoint-4" / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "trainer_state.json").exists()

    with caplog.at_level(logging.INFO, logger="mmtune.train.checkpoints"):
        run_sft(*parse_config(None, extra=lora_run_config(ws, out, resume_from_checkpoint=True)))
    messages = [r.getMessage() for r in caplog.records if r.name == "mmtune.train.checkpoints"]
    assert any("skipping" in m and "tmp-checkpoint-4" in m for m in messages), messages
    assert any(m.startswith(f"resume: from {out / 'checkpoint-2'}") for m in messages), messages
    resumed = logged_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-4 logged by the killed run, 3-6 by the resumed one
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(ws["reference"][step], rel=1e-5, abs=1e-6), step
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert checkpoint_problem(str(out / "checkpoint-4")) is None


def _fake_checkpoint(folder, state=True, weights="adapter_model.safetensors"):
    os.makedirs(folder)
    if state:
        (folder / "trainer_state.json").write_text("{}")
    if weights:
        (folder / weights).write_bytes(b"x")


def test_resume_true_takes_the_newest_complete_checkpoint_and_names_each_skipped(tmp_path, caplog):
    out = tmp_path / "run"
    _fake_checkpoint(out / "checkpoint-3")
    _fake_checkpoint(out / "checkpoint-9", weights="model.safetensors")  # no trainer_state.json ...
    (out / "checkpoint-9" / "trainer_state.json").write_text('{"global_step": ')  # ... a torn one
    _fake_checkpoint(out / "checkpoint-10", weights=None)
    _fake_checkpoint(out / "checkpoint-11", weights="model.safetensors.index.json")
    (out / "checkpoint-11" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (out / "checkpoint-11" / "model-00001-of-00002.safetensors").write_bytes(b"x")
    _fake_checkpoint(out / "checkpoint-12", state=False)
    _fake_checkpoint(out / "tmp-checkpoint-13" / "checkpoint-13", state=False)
    with caplog.at_level(logging.WARNING, logger="mmtune.train.checkpoints"):
        assert resolve_resume(True, str(out)) == str(out / "checkpoint-3")
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for name, why in (("checkpoint-12", "no trainer_state.json"), ("checkpoint-11", "misses 1 of the 2 weight shards"),
                      ("checkpoint-10", "no model or adapter weights"), ("checkpoint-9", "unreadable trainer_state"),
                      ("tmp-checkpoint-13", "did not finish")):
        assert f"{out / name}: " in warned and why in warned, (name, warned)
    assert resolve_resume("yes", str(out)) == str(out / "checkpoint-3")  # yes/no words too
    assert resolve_resume("false", str(out)) is None and resolve_resume(None, str(out)) is None
    assert latest_complete_checkpoint(str(tmp_path / "nowhere")) is None


def test_an_explicit_incomplete_checkpoint_is_one_line_before_anything_loads(ws, tmp_path, monkeypatch, capsys):
    import mmtune.train.recipe as recipe
    from mmtune.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the checkpoint was checked")

    monkeypatch.setattr(recipe, "load_tokenizer_and_processor", must_not_load)
    monkeypatch.setattr(recipe, "load_model", must_not_load)
    partial = tmp_path / "run" / "checkpoint-4"
    _fake_checkpoint(partial, state=False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(lora_run_config(ws, tmp_path / "new", resume_from_checkpoint=str(partial))))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mmtune train: error: resume_from_checkpoint: {partial} has no trainer_state.json (its save did "
                   "not finish): name a complete checkpoint-N folder, or give resume_from_checkpoint: true to take "
                   "the newest complete one of output_dir"]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written

    config.write_text(yaml.safe_dump(lora_run_config(ws, tmp_path / "run", resume_from_checkpoint=True)))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmtune train: error: resume_from_checkpoint: true, but output_dir "
                                               f"{tmp_path / 'run'} holds no complete checkpoint-N")
    with pytest.raises(ModelFolderError, match="does not exist"):
        resolve_resume(str(tmp_path / "missing"), str(tmp_path))


def test_publishing_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    """A resumed run saves a step again: the new checkpoint replaces the old one, no file of the old
    one stays, and no temporary folder is left."""
    _fake_checkpoint(tmp_path / "checkpoint-4", weights="model.safetensors")
    (tmp_path / "checkpoint-4" / "stale.bin").write_bytes(b"old")
    _fake_checkpoint(tmp_path / "tmp-checkpoint-4" / "checkpoint-4")
    publish_checkpoint(str(tmp_path / "tmp-checkpoint-4" / "checkpoint-4"), str(tmp_path / "checkpoint-4"))
    assert sorted(os.listdir(tmp_path / "checkpoint-4")) == ["adapter_model.safetensors", "trainer_state.json"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "tmp-checkpoint-4"]  # the emptied parent: the trainer removes it
    assert os.listdir(tmp_path / "tmp-checkpoint-4") == []


def test_the_trainer_methods_staging_relies_on_keep_their_shape():
    """MMTrainer stages a checkpoint by overriding Trainer._save_checkpoint and _get_output_dir
    (no public seam decides where a checkpoint is written): a change upstream fails here."""
    from mmtune.train.sft import MMTrainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    source = inspect.getsource(Trainer._save_checkpoint)
    assert "self._get_output_dir(" in source  # where the checkpoint goes: the staging folder while staging
    assert "rotate_checkpoints(" in source  # rotation runs inside it, so MMTrainer rotates after the rename
    assert "self.state.save_to_json(" in source  # trainer_state.json is written inside it, so staged with the rest
    assert MMTrainer._save_checkpoint is not Trainer._save_checkpoint
