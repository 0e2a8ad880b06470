"""Ctrl-C (SIGINT) and SIGTERM (issue 17, "Stops mid-run"): during training, a checkpoint of the step
reached, one line on stderr, exit status 130 / 143, no final model in output_dir, and a resume that
gives the losses of the uninterrupted run; before training, one line and 130. Each run is a real
process signalled as a terminal (the whole process group) or a scheduler would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmtune.demo import build_model_dir, make_dataset
from mmtune.config import parse_config
from mmtune.train import run_sft
from mmtune.train.checkpoints import checkpoint_problem

from .conftest import logged_losses, lora_run_config

DRIVER = Path(__file__).with_name("train_driver.py")
FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json", "all_results.json", "mmtune_config.json",
               "model.safetensors", "training_loss.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    data, _ = make_dataset(str(root / "data"), n_train=24, n_test=0, size=56)
    model = build_model_dir(str(root), hidden=64)
    ws = {"root": root, "data": data, "model": model}
    reference = root / "reference"
    run_sft(*parse_config(None, extra=lora_run_config(ws, reference)))
    ws["reference"] = logged_losses(reference)
    assert sorted(ws["reference"]) == [1, 2, 3, 4, 5, 6]
    return ws


def _start(ws, name, hook, step, **extra):
    """The driver in its own process group (as a shell runs a foreground job); returns the process,
    the ready file and the output folder."""
    out = ws["root"] / name
    config = ws["root"] / f"{name}.yaml"
    config.write_text(yaml.safe_dump(lora_run_config(ws, out, **extra)))
    ready = str(ws["root"] / f"{name}.ready")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(config), hook, str(step), ready], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, ready, out


def _wait_ready(proc, ready, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the run never reached its hook (exit {proc.returncode})\n{err[-4000:]}")
        time.sleep(0.05)


def _finish(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run did not end\n{err[-4000:]}")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_saves_the_step_exits_with_one_line_and_resumes_exactly(ws, sig, status):
    # one dataloader worker: a Ctrl-C reaches it too, and the last step must still get its batch
    proc, ready, out = _start(ws, f"signal_{sig.name}", "handshake", 2, dataloader_num_workers=1)
    _wait_ready(proc, ready)
    os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C
    Path(ready + ".sent").touch()
    _, err = _finish(proc)

    assert proc.returncode == status, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    # the signal came at the end of step 2: step 3 ran to its end and was saved
    line = f"mmtune train: interrupted at step 3: saved {out}/checkpoint-3; resume with resume_from_checkpoint: true"
    assert [x for x in err.splitlines() if "interrupted" in x] == [line]
    assert checkpoint_problem(str(out / "checkpoint-3")) is None
    assert (out / "checkpoint-3" / "mmtune_config.json").is_file()
    assert not [n for n in os.listdir(out) if n in FINAL_FILES or n.startswith("tmp-")], os.listdir(out)
    assert not (out / "checkpoint-4").exists()
    assert logged_losses(out) == {s: ws["reference"][s] for s in (1, 2, 3)}

    run_sft(*parse_config(None, extra=lora_run_config(ws, out, resume_from_checkpoint=True)))
    resumed = logged_losses(out)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(ws["reference"][step], rel=1e-5, abs=1e-6), step
    assert (out / "adapter_model.safetensors").is_file()  # now a finished run


@pytest.mark.parametrize("stage", ["build_dataset", "load_model"])
def test_ctrl_c_before_training_is_one_line_and_130(ws, tmp_path, monkeypatch, capsys, stage):
    """Ctrl-C while tokenising or loading the model (a real SIGINT to this process, in the step
    replaced here): the CLI prints one line and returns 130; nothing is written."""
    import mmtune.train.recipe as recipe
    from mmtune.cli import main

    def ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(recipe, stage, ctrl_c)
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(lora_run_config(ws, out)))
    assert main(["train", str(config)]) == 130
    assert capsys.readouterr().err.splitlines() == ["mmtune train: interrupted"]
    assert not out.exists() or os.listdir(out) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_aborts_at_once(ws, tmp_path):
    """The first Ctrl-C asks for a checkpoint at the step's end; a second one (the step hangs, the
    user insists) raises KeyboardInterrupt at once: no checkpoint of the step, no final save, and
    the handlers of before training are back."""
    from transformers import TrainerCallback

    class TwoSignals(TrainerCallback):
        survived_the_first = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                TwoSignals.survived_the_first = True
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)
                raise AssertionError("the second SIGINT did not interrupt")

    out = tmp_path / "twice"
    with pytest.raises(KeyboardInterrupt) as caught:
        run_sft(*parse_config(None, extra=lora_run_config(ws, out)), callbacks=[TwoSignals()])
    assert TwoSignals.survived_the_first  # the first one only asked for a stop
    assert type(caught.value) is KeyboardInterrupt  # the second: not a stop with a checkpoint
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2"]
    assert not [n for n in os.listdir(out) if n in FINAL_FILES]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handlers_are_restored_after_training(ws, tmp_path):
    """A run in-process installs its handlers for training alone and leaves them as it found them
    (library use: the caller's own Ctrl-C handling comes back)."""
    from transformers import TrainerCallback

    during = []

    class Handlers(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            during.append({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run_sft(*parse_config(None, extra=lora_run_config(ws, tmp_path / "o", max_steps=1, save_strategy="no")),
            callbacks=[Handlers()])
    assert during and all(during[0][s] != before[s] for s in before)  # training's own handlers
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_run_that_fails_with_dataloader_workers_still_exits(ws):
    """The workers forked while training block SIGTERM; a run whose training raises keeps them alive
    (the traceback holds their iterator), and multiprocessing's exit would SIGTERM and wait for them
    for ever: the process must end, with the error."""
    proc, _, _ = _start(ws, "fails", "raise_at_step", 2, dataloader_num_workers=1, save_strategy="no")
    _, err = _finish(proc, timeout=90)
    assert proc.returncode == 1 and "train_driver: raised at step 2" in err, err[-4000:]


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(ws):
    """Two ranks under torchrun, which passes a SIGTERM (a scheduler's) on to each rank: the ranks
    agree on one step (the one after the signal's), write one checkpoint of it together (each
    rank's RNG state in it), and each prints the same line, no traceback; no rank is left waiting in
    a collective (the launch ends well within its timeout). The launcher's own SignalException
    traceback is torchrun's."""
    out = ws["root"] / "two_ranks"
    config = ws["root"] / "two_ranks.yaml"
    config.write_text(yaml.safe_dump(lora_run_config(ws, out, per_device_train_batch_size=2, ddp_timeout=60)))
    ready = str(ws["root"] / "two_ranks.ready")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER),
           str(config), "handshake", "1", ready]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_ready(proc, ready, timeout=240)
    proc.send_signal(signal.SIGTERM)  # to the launcher alone: it signals each rank
    Path(ready + ".sent").touch()
    log, _ = _finish(proc)
    line = f"mmtune train: interrupted at step 3: saved {out}/checkpoint-3; resume with resume_from_checkpoint: true"
    # each rank says it once, at step 3 (counted in the text: the two ranks share one pipe, and their lines
    # can arrive glued together)
    assert log.count("interrupted at step") == 2 and log.count(line) == 2, log[-4000:]
    assert "TrainingInterrupted" not in log and "KeyboardInterrupt" not in log, log[-4000:]  # no rank traceback
    assert checkpoint_problem(str(out / "checkpoint-3")) is None
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / "checkpoint-3"))
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2", "checkpoint-3"]
    assert not [n for n in os.listdir(out) if n in FINAL_FILES]
