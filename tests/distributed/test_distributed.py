"""Two CPU processes (gloo) through the real ``mmtune train`` path (run_sft), on a tiny Qwen2-VL whose
rank 0 batches hold images and whose rank 1 batches are text-only.

- DDP (full fine-tuning with a trainable tower and find_unused_parameters=False, and LoRA): no hang,
  the vision tower runs on both ranks (the collator's masked dummy image), the loss equals the
  single-process loss on the same global batch, save -> resume continues exactly (LoRA, and full
  fine-tuning through run_sft's reload of the hub-layout checkpoint keys).
- FSDP2: accelerate 1.15 drops the FSDP plugin when the ranks are CPU processes (MULTI_CPU) and trains
  plain DDP without a word (``test_accelerate_drops_fsdp_on_cpu`` pins that). The FSDP2 runs lift that
  one gate (``dist_train._lift_cpu_fsdp_gate``) and take their settings from the example accelerate
  configs; everything after the gate is real: fully_shard, DTensor parameters, DCP or gathered
  checkpoints. The control run without the dummy image breaks the collectives.
- ``mmtune train CONFIG --nproc 2`` re-launches itself with two ranks.

All 2-rank trainings go through one launch (torch + transformers import once per rank: 10-25 s; a run
takes 1-6 s). A launch that runs past LAUNCH_TIMEOUT is killed with its ranks and the test fails, and
gloo gives up on a collective after ddp_timeout (60 s): a hang never hangs CI. tests/distributed/README.md
has the figures and what does not work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
HELPER = HERE / "dist_train.py"
EXAMPLES = HERE.parents[1] / "examples" / "distributed"
B = 2  # per-rank batch; the single-process reference uses 2 * B
STEPS = 4
LAUNCH_TIMEOUT = 240
FSDP = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]}
TOL = dict(rel=2e-5, abs=2e-5)

pytestmark = pytest.mark.timeout(480)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny Qwen2-VL + a dataset ordered [img, img, txt, txt] * 8 (examples/distributed/interleave_text_only.py):
    with the sequential sampler and accelerate's batch sharding (rank r takes per-device batches r, r + 2,
    ...), rank 0 gets every image batch and rank 1 every text-only one; one process with batch 2B sees the
    same global batches."""
    from mmtune.demo import build_model_dir, make_dataset

    root = tmp_path_factory.mktemp("dist")
    model = build_model_dir(str(root), hidden=64)
    path, _ = make_dataset(str(root / "data"), n_train=8, n_test=0, size=56)
    images = json.load(open(path))
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen"]
    texts = [{"messages": [{"role": "user", "content": f"Say the number {i} in words, please."},
                           {"role": "assistant", "content": w}]} for i, w in enumerate(words)]
    rows = _example_module("interleave_text_only").interleave(images, texts, batch=B, ranks=2)
    assert len(rows) == 32 and [bool(r.get("images")) for r in rows[:8]] == [True] * B + [False] * B + [True] * B + [False] * B
    data = root / "data" / "mixed.json"
    data.write_text(json.dumps(rows))
    return {"root": root, "model": model, "data": str(data)}


def _example_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(ws, name, nproc, method="full", **extra):
    cfg = dict(model_name_or_path=ws["model"], dataset=ws["data"], template="qwen2_vl", finetuning_type=method,
               freeze_multi_modal_projector=False, torch_dtype="fp32", output_dir=str(ws["root"] / name),
               per_device_train_batch_size=B * 2 // nproc, max_steps=STEPS, learning_rate=1e-3, logging_steps=1,
               save_strategy="steps", save_steps=2, seed=0, use_cpu=True, dataloader_num_workers=0,
               disable_tqdm=True, cutoff_len=256, train_sampling_strategy="sequential", plot_loss=False,
               ddp_find_unused_parameters=False, ddp_timeout=60)
    if method == "full":
        cfg["freeze_vision_tower"] = False  # the tower trains too: DDP would fail on a rank that skips it
    else:
        cfg["lora_rank"] = 4
    cfg.update(extra)
    return cfg


def _resumed(cfg):
    return dict(cfg, output_dir=cfg["output_dir"] + "_resumed", resume_from_checkpoint=cfg["output_dir"] + "/checkpoint-2")


def _launch(ws, name, runs, timeout=LAUNCH_TIMEOUT, expect_ok=True):
    """torchrun 2 ranks on the helper."""
    spec = ws["root"] / f"{name}.json"
    spec.write_text(json.dumps({"runs": runs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER), str(spec)]
    return _run(ws, name, cmd, timeout, expect_ok)


def _run(ws, name, cmd, timeout, expect_ok):
    """Run ``cmd`` in its own process group; past ``timeout`` kill the group (launcher and ranks) and fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{name}: 2-rank run still going after {timeout} s (hang?)\n{out[-4000:]}")
    (ws["root"] / f"{name}.log").write_text(out)
    ws.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    if expect_ok:
        assert proc.returncode == 0, out[-6000:]
    return proc.returncode, out


def _losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "trainer_log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _probe(out_dir, rank):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, f"probe_rank{rank}.jsonl"))]
    return [r for r in rows if "rows" in r], rows[-1]


@pytest.fixture(scope="module")
def reference(ws):
    """One process, batch 2B: the losses every 2-rank run must reproduce."""
    from mmtune.config import parse_config
    from mmtune.train import run_sft

    out = {}
    for method in ("full", "lora"):
        cfg = _config(ws, f"single_{method}", 1, method, save_strategy="no")
        run_sft(*parse_config(None, extra=cfg))
        out[method] = _losses(cfg["output_dir"])
        assert sorted(out[method]) == list(range(1, STEPS + 1))
    return out


def accelerate_env(yaml_name, **override):
    """The environment ``accelerate launch --config_file examples/distributed/<yaml_name>`` gives each rank
    (accelerate's own parser and env builder), with ``override`` on top."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(EXAMPLES / yaml_name), "-m", "mmtune.cli", "train", "x"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    keep = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    return {**keep, **override}


@pytest.fixture(scope="module")
def launch(ws):
    """One 2-rank launch for every DDP and FSDP2 case (a launch costs 10-25 s of imports; a run 1-6 s):
    DDP full / LoRA, each resumed; the canary (fsdp=True in TrainingArguments, gate not lifted); FSDP2
    full from examples/distributed/fsdp2_full.yaml (gathered checkpoints) and LoRA from fsdp2_lora.yaml
    with sharded (DCP) checkpoints, each resumed; last, the control run without the dummy image, which
    must crash the launch (hence last). fp32 (ACCELERATE_MIXED_PRECISION=no) for tight loss equality.
    A run finished when its all_results.json exists."""
    fp32 = {"ACCELERATE_MIXED_PRECISION": "no"}
    full_env = accelerate_env("fsdp2_full.yaml", **fp32)
    lora_env = accelerate_env("fsdp2_lora.yaml", FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT", **fp32)
    cfg = {"ddp_full": _config(ws, "ddp_full", 2), "ddp_lora": _config(ws, "ddp_lora", 2, "lora"),
           "fsdp_ignored": _config(ws, "fsdp_ignored", 2, max_steps=1, save_strategy="no", fsdp=True,
                                   fsdp_config=FSDP),
           "fsdp2_full": _config(ws, "fsdp2_full", 2), "fsdp2_lora": _config(ws, "fsdp2_lora", 2, "lora"),
           "fsdp2_nofake": _config(ws, "fsdp2_nofake", 2, max_steps=2, save_strategy="no",
                                   fake_media_for_text_only=False)}
    c = cfg
    runs = [{"config": x} for x in (c["ddp_full"], _resumed(c["ddp_full"]), c["ddp_lora"], _resumed(c["ddp_lora"]),
                                    c["fsdp_ignored"])]
    runs += [{"config": x, "env": full_env, "lift_cpu_fsdp_gate": True} for x in (c["fsdp2_full"], _resumed(c["fsdp2_full"]))]
    runs += [{"config": x, "env": lora_env, "lift_cpu_fsdp_gate": True} for x in (c["fsdp2_lora"], _resumed(c["fsdp2_lora"]))]
    complete = [r["config"] for r in runs]
    runs.append({"config": c["fsdp2_nofake"], "env": full_env, "lift_cpu_fsdp_gate": True})
    code, log = _launch(ws, "all", runs, expect_ok=False)
    missing = [x["output_dir"] for x in complete if not os.path.exists(os.path.join(x["output_dir"], "all_results.json"))]
    assert not missing, f"runs that did not finish: {missing}\n{log[-6000:]}"
    return {**cfg, "code": code, "log": log}


@pytest.fixture(scope="module")
def ddp(launch):
    return {"full": launch["ddp_full"], "lora": launch["ddp_lora"], "fsdp_ignored": launch["fsdp_ignored"]}


@pytest.fixture(scope="module")
def fsdp2(launch):
    return {"full": launch["fsdp2_full"], "lora": launch["fsdp2_lora"], "nofake": launch["fsdp2_nofake"],
            "code": launch["code"], "log": launch["log"]}


def _check_ranks(out_dir, sharded):
    """Rank 0 attended real image tokens at every step; rank 1 none (text-only), but carried the
    masked dummy image; the tower ran once per step on both ranks."""
    for rank in (0, 1):
        steps, last = _probe(out_dir, rank)
        assert len(steps) == STEPS
        assert last["tower_calls_total"] == STEPS, (rank, last)
        assert all(s["has_pixel_values"] for s in steps)
        assert all(s["sharded"] == sharded for s in steps), steps
        if rank == 0:
            assert all(s["attended_image_tokens"] > 0 and s["masked_image_tokens"] == 0 for s in steps), steps
        else:
            assert all(s["attended_image_tokens"] == 0 and s["masked_image_tokens"] > 0 for s in steps), steps


def _assert_losses(got, want):
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], **TOL), (step, got, want)


def test_ddp_text_only_rank_runs_tower_and_matches_single_process(ddp, reference):
    for method in ("full", "lora"):
        out = ddp[method]["output_dir"]
        _check_ranks(out, sharded=False)
        _assert_losses(_losses(out), reference[method])
    assert os.path.exists(os.path.join(ddp["full"]["output_dir"], "checkpoint-2", "rng_state_1.pth"))


def test_ddp_resume_lora_is_exact(ddp):
    out = ddp["lora"]["output_dir"]
    resumed = _losses(out + "_resumed")
    _assert_losses(resumed, {s: v for s, v in _losses(out).items() if s > 2})


def test_ddp_resume_full_is_exact(ddp):
    out = ddp["full"]["output_dir"]
    resumed, want = _losses(out + "_resumed"), {s: v for s, v in _losses(out).items() if s > 2}
    _assert_losses(resumed, want)


def test_accelerate_drops_fsdp_on_cpu(ddp, reference):
    """fsdp=True on CPU ranks: accelerate's AcceleratorState keeps DistributedType.MULTI_CPU and never
    stores the FSDP plugin, so nothing is sharded (DDP trains). When this fails, accelerate shards on
    CPU: drop ``lift_cpu_fsdp_gate`` from the FSDP2 tests."""
    steps, _ = _probe(ddp["fsdp_ignored"]["output_dir"], 0)
    assert [(s["sharded"], s["distributed_type"]) for s in steps] == [(False, "MULTI_CPU")]
    assert _losses(ddp["fsdp_ignored"]["output_dir"])[1] == pytest.approx(reference["full"][1], **TOL)


def test_fsdp2_text_only_rank_runs_tower_and_matches_single_process(fsdp2, reference):
    for method in ("full", "lora"):
        out = fsdp2[method]["output_dir"]
        _check_ranks(out, sharded=True)
        _assert_losses(_losses(out), reference[method])
    steps, _ = _probe(fsdp2["lora"]["output_dir"], 0)
    assert steps[0]["distributed_type"] == "FSDP"
    steps, _ = _probe(fsdp2["full"]["output_dir"], 0)
    assert steps[0]["model_class"].startswith("FSDP") and steps[0]["distributed_type"] == "FSDP"


def test_fsdp2_resume_is_exact(fsdp2):
    for method in ("full", "lora"):
        out = fsdp2[method]["output_dir"]
        _assert_losses(_losses(out + "_resumed"), {s: v for s, v in _losses(out).items() if s > 2})
    # LoRA ran with SHARDED_STATE_DICT: one DCP file per rank
    shards = os.listdir(os.path.join(fsdp2["lora"]["output_dir"], "checkpoint-2", "pytorch_model_fsdp_0"))
    assert sorted(f for f in shards if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_fsdp2_full_state_dict_saves_a_transformers_model_equal_to_ddp(fsdp2, ddp):
    """fsdp2_full.yaml (FULL_STATE_DICT) gathers the trained model into model.safetensors; transformers
    loads it with no missing key, and it equals the model DDP trained on the same batches."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = fsdp2["full"]["output_dir"]
    _, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sharded, plain = load_file(os.path.join(out, "model.safetensors")), load_file(
        os.path.join(ddp["full"]["output_dir"], "model.safetensors"))
    assert sorted(sharded) == sorted(plain)
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp2_sharded_run_leaves_a_final_model(fsdp2):
    """Checkpoints stay DCP shards; the final save is gathered (run_sft switches the plugin to
    FULL_STATE_DICT), so the output folder holds an adapter peft loads."""
    from safetensors.torch import load_file

    out = fsdp2["lora"]["output_dir"]
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert adapter and all("lora_" in k or "merger" in k for k in adapter), sorted(adapter)[:5]
    assert any(f.endswith(".distcp") for _, _, files in os.walk(out) for f in files)


def test_fsdp2_without_dummy_image_breaks(fsdp2):
    """The control: with fake_media_for_text_only off, rank 1 skips the tower's all-gathers and the
    collectives of the two ranks no longer pair up (gloo reports a size mismatch; NCCL would hang)."""
    assert fsdp2["code"] != 0
    assert not os.path.exists(os.path.join(fsdp2["nofake"]["output_dir"], "all_results.json"))
    log = fsdp2["log"]
    assert "collective mismatch" in log or "timed out" in log.lower(), log[-3000:]


def test_example_configs_parse():
    """Every accelerate YAML goes through accelerate's launcher parser; the FSDP ones ask for FSDP2; the
    DeepSpeed JSONs are JSON with the stage their name says and gather 16-bit weights at save (ZeRO-3)."""
    for name in ("ddp.yaml", "fsdp2_full.yaml", "fsdp2_lora.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        args = launch_command_parser().parse_args(["--config_file", str(EXAMPLES / name), "-m", "mmtune.cli", "train", "x"])
        args, _, _ = _validate_launch_command(args)
        assert args.num_processes == 2, name
        assert bool(args.use_fsdp) == name.startswith("fsdp2") and bool(args.use_deepspeed) == name.startswith("deep")
    for name in ("fsdp2_full.yaml", "fsdp2_lora.yaml"):
        env = accelerate_env(name)
        assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP", env
    strip = _example_module("interleave_text_only").strip_images
    row = {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "a"}],
           "images": ["x.jpg"]}
    assert strip(row) == {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a"}]}
    for stage in (2, 3):
        ds = json.load(open(EXAMPLES / f"ds_zero{stage}.json"))
        assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_cli_nproc_launches_two_ranks(ws, reference, tmp_path):
    """``mmtune train CONFIG --nproc 2`` re-launches itself under torch.distributed.run."""
    cfg = _config(ws, "cli", 2, max_steps=2, save_steps=2)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items() if k != "output_dir"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmtune.cli", "train", str(yaml_path), "--nproc", "2", f"output_dir={out}"]
    _run(ws, "cli", cmd, LAUNCH_TIMEOUT, expect_ok=True)
    assert os.path.exists(out / "checkpoint-2" / "rng_state_1.pth")  # a second rank saved its RNG
    _assert_losses(_losses(out), {s: v for s, v in reference["full"].items() if s <= 2})
