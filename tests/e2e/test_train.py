"""`mmtune train` end to end on a tiny Qwen2-VL: outputs, resume equality, CLI, benchmark smoke."""

import json
import os

import pytest

from mmtune.demo import build_model_dir, make_dataset
from mmtune.config import parse_config
from mmtune.train import run_sft


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, _ = make_dataset(str(root / "data"), n_train=24, n_test=0, size=56)
    model = build_model_dir(str(root), hidden=64)
    return {"root": root, "data": data, "model": model}


def _config(ws, out, **extra):
    cfg = dict(model_name_or_path=ws["model"], dataset=ws["data"], template="qwen2_vl", finetuning_type="lora",
               lora_rank=4, freeze_multi_modal_projector=False, torch_dtype="fp32", output_dir=str(out),
               per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3, logging_steps=1, save_steps=3,
               save_strategy="steps", seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
               cutoff_len=256, data_seed=0)
    cfg.update(extra)
    if cfg.get("finetuning_type", "lora") != "lora":
        cfg.pop("lora_rank")  # only LoRA reads it: a full or freeze run refuses it
    return parse_config(None, extra=cfg)


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "trainer_log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_train_saves_everything_and_resume_is_exact(workspace):
    full = workspace["root"] / "full"
    metrics = run_sft(*_config(workspace, full))
    assert metrics["train_loss"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_log.jsonl", "training_loss.png",
                 "all_results.json", "processor_config.json", "checkpoint-3"):
        assert os.path.exists(full / name), name
    uninterrupted = _losses(full)
    assert uninterrupted[6] < uninterrupted[1]  # it learns
    resumed_dir = workspace["root"] / "resumed"
    run_sft(*_config(workspace, resumed_dir, resume_from_checkpoint=str(full / "checkpoint-3")))
    resumed = _losses(resumed_dir)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


def test_full_fine_tuning_resume_is_exact(workspace):
    """Full checkpoints are saved in the hub key layout; resume must load them (not train on from
    the base weights with a 'missing keys' warning)."""
    common = dict(finetuning_type="full", max_steps=4, save_steps=2, learning_rate=1e-3)
    full = workspace["root"] / "full_ft"
    run_sft(*_config(workspace, full, **common))
    resumed_dir = workspace["root"] / "full_ft_resumed"
    run_sft(*_config(workspace, resumed_dir, resume_from_checkpoint=str(full / "checkpoint-2"), **common))
    uninterrupted, resumed = _losses(full), _losses(resumed_dir)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


def test_cli_train_with_yaml_and_overrides(workspace, tmp_path):
    from mmtune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {workspace['model']}\ndataset: {workspace['data']}\ntemplate: qwen2_vl\n"
                   f"finetuning_type: lora\ntorch_dtype: fp32\nuse_cpu: true\nper_device_train_batch_size: 4\n"
                   f"save_strategy: 'no'\nlogging_steps: 1\n")
    assert main(["train", str(cfg), f"output_dir={tmp_path / 'out'}", "max_steps=2"]) == 0
    assert os.path.exists(tmp_path / "out" / "all_results.json")
    _, _, _, _, training = parse_config(str(cfg), ["save_strategy=no", f"output_dir={tmp_path / 'o2'}"])
    assert str(training.save_strategy.value if hasattr(training.save_strategy, "value") else training.save_strategy) == "no"
    with pytest.raises(ValueError, match="unknown option"):
        parse_config(str(cfg), ["not_an_option=1"])


def test_train_speed_benchmark_smoke(workspace, tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.main(["--model", workspace["model"], "--data", workspace["data"], "--cpu", "--steps", "3",
                       "--warmup", "1", "--batch", "2", "--output-dir", str(tmp_path / "o"), "--json", str(tmp_path / "r.json")])
    assert row["samples_per_s"] > 0 and row["tokens_per_sample"] > 0 and row["gflop_per_sample"] > 0
    assert json.load(open(tmp_path / "r.json"))["steps"] == 3
    assert row["step_sync"] == "every step end"


def test_train_speed_times_one_span_without_step_syncs(workspace, tmp_path, monkeypatch):
    import importlib.util
    import pathlib
    import time

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    spans = []
    on_train_end = module.StepTimer.on_train_end

    def recording(self, *a, **kw):
        before = time.perf_counter()
        on_train_end(self, *a, **kw)
        spans.append((self._steady_start, before, self.steady_span))

    monkeypatch.setattr(module.StepTimer, "on_train_end", recording)
    row = module.main(["--model", workspace["model"], "--data", workspace["data"], "--cpu", "--steps", "4",
                       "--warmup", "1", "--batch", "2", "--output-dir", str(tmp_path / "o"), "--no-step-sync"])
    ((start, end, (seconds, steps)),) = spans
    assert row["step_sync"] == "none (one span)" and steps == 3  # the steps after the warm-up
    assert start < end and seconds >= end - start  # from the first steady step's start to the end
    assert row["steady_step_s"] == pytest.approx(seconds / steps, abs=1e-4)


def test_preprocess_dataset_benchmark_smoke(workspace, tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "preprocess_dataset.py"
    spec = importlib.util.spec_from_file_location("preprocess_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.main(["--model", workspace["model"], "--data", workspace["data"], "--n", "60", "--workers", "1",
                       "--json", str(tmp_path / "p.json")])
    assert row["samples"] == 60 and row["samples_per_s"] > 0
    assert json.load(open(tmp_path / "p.json"))["samples"] == 60


def test_train_speed_runs_the_peer_first_and_prints_the_ratios(workspace, tmp_path):
    """``--peer llamafactory`` through a stand-in harness (the real one needs LLaMA-Factory and a
    GPU): same model, data folder, method, batch and cutoff handed over; ratios computed."""
    import importlib.util
    import pathlib
    import shutil

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "lora.yaml").write_text("finetuning_type: lora\n")
    (harness / "lf_train.py").write_text(
        "import json, os, sys\n"
        "json.dump({'steady_samples_per_s': 2.0, 'peak_allocated_gib': 4.0, 'argv': sys.argv[1:],\n"
        "           'pythonpath': os.environ['PYTHONPATH']}, open(os.environ['BENCH_JSON'], 'w'))\n")
    data_dir = tmp_path / "data"
    shutil.copytree(os.path.dirname(workspace["data"]), data_dir)
    data = str(data_dir / os.path.basename(workspace["data"]))
    argv = ["--model", workspace["model"], "--data", data, "--cpu", "--steps", "3", "--warmup", "1", "--batch", "2",
            "--output-dir", str(tmp_path / "o"), "--peer", "llamafactory", "--peer-dir", str(harness),
            "--peer-site", "/nowhere/site-lf"]
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        module.main(argv)
    (data_dir / "dataset_info.json").write_text("{}")
    row = module.main(argv)
    peer = json.load(open(tmp_path / "o_peer" / "bench_peer.json"))
    assert peer["argv"][0] == str(harness / "lora.yaml")
    assert set(peer["argv"][1:]) >= {f"model_name_or_path={workspace['model']}", f"dataset_dir={data_dir}",
                                     "per_device_train_batch_size=2", "cutoff_len=1024"}
    assert peer["pythonpath"].startswith("/nowhere/site-lf")
    assert row["peer_samples_per_s"] == 2.0 and row["speed_ratio"] == round(row["samples_per_s"] / 2.0, 2)


def test_step_anatomy_benchmark_smoke(workspace, tmp_path):
    import importlib.util
    import pathlib

    folder = pathlib.Path(__file__).parents[2] / "benchmarks"
    spec = importlib.util.spec_from_file_location("step_anatomy", folder / "step_anatomy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.main(["--model", workspace["model"], "--data", workspace["data"], "--cpu", "--steps", "2",
                       "--warmup", "1", "--batch", "2", "--phases", "--trace", str(tmp_path / "t.json.gz"),
                       "--loaders", "--json", str(tmp_path / "r.json")])
    assert row["step_ms"] > 0 and row["issue_ms"] > 0 and row["tower_fwd_ms"] > 0 and row["optimizer_ms"] > 0
    assert len(row["loaders"]) == len(module.LOADER_VARIANTS) and min(row["loaders"].values()) > 0
    assert (tmp_path / "t.json.gz").stat().st_size > 0
    assert json.load(open(tmp_path / "r.json"))["device"] == "cpu"


def test_gpu_utilisation_reads_one_sampler_child_over_the_recorded_span():
    """One child started up front (not one ``nvidia-smi`` fork a sample); only the lines read
    between start() and stop() count; stop() ends the child."""
    import importlib.util
    import pathlib
    import sys
    import time

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script = "import time\nfor i in range(1000):\n    print(f'{50 + i % 2}, x', flush=True)\n    time.sleep(0.01)"
    util = module.GpuUtilisation([sys.executable, "-u", "-c", script])
    time.sleep(0.5)
    assert util.samples == []  # not recording yet
    util.start()
    deadline = time.time() + 10
    while len(util.samples) < 5 and time.time() < deadline:
        time.sleep(0.05)
    util.pause()
    count = len(util.samples)
    time.sleep(0.3)
    assert len(util.samples) == count  # paused: the final save is not sampled
    mean = util.stop()
    assert count >= 5 and 50 <= mean <= 51
    assert util._proc.poll() is not None  # the child is gone
    assert module.GpuUtilisation([]).stop() is None  # no sampler: no figure


def test_run_sft_trains_with_the_asked_host_threads(workspace, tmp_path):
    import torch
    from transformers import TrainerCallback

    seen = []

    class Threads(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    run_sft(*_config(workspace, tmp_path / "o", max_steps=2, save_strategy="no", host_threads=1), callbacks=[Threads()])
    assert seen == [1, 1] and torch.get_num_threads() == before  # restored after training
