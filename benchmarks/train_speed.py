"""Training speed of the real ``mmtune train`` path (dataset file on disk, JPEGs, dataloader,
trainer) for a model folder, printing one row and writing it as JSON.

    python benchmarks/train_speed.py --model /tmp/lfbench/model --data /tmp/lfbench/data/bench.json \\
        --method lora --batch 8 --steps 50 --json benchmarks/results/x.json

Steady state = steps after the first ``--warmup`` (default 5). Tokens/s counts every non-pad
token of every sample. MFU uses 6*N*T for trained weights and 4*N*T for frozen-but-backpropagated
ones (LoRA: forward + activation gradients), 2*N*T for the frozen tower's forward (N parameters,
T tokens or patches), against the bf16 dense peak (H100 SXM: 989 TFLOP/s).

``--stage dpo`` (``--pref-loss``, default sigmoid) or ``--stage kto`` times preference training on
the same data shape: each row's last answer is the chosen (desirable) one and the next row's
answer the rejected one (:func:`preference_data` writes ``<data>.dpo.json`` / ``.kto.json``
beside it). A sample is then a pair (dpo) or a marked answer (kto); the FLOP and MFU columns
count a pair as its two sequences (``tokens_per_sample`` is the chosen and rejected tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import yaml
from transformers import TrainerCallback

from mmtune.speed.levers import WITHOUT

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
#: --without NAME switches one speed lever (or a setting of regional compile) off, for its row in the table:
#: mmtune.speed.levers.WITHOUT, read from the one list of levers


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.wait: list[float] = []
        self.ends: list[float] = []  # synchronised step ends: end-to-end intervals, as the peer's harness times
        self._end = None
        self.samples_per_row = 1.0  # packing: samples a row, averaged over the packed dataset
        self.warmup = 5
        self.on_warm = None  # called once the warm-up steps are done
        self.on_done = None  # called when training ends (before the final save)
        self.sync_each_step = True  # False (--no-step-sync): one sync after the warm-up, one at the end
        self._steady_start: float | None = None
        self.steady_span: tuple[float, int] | None = None  # (seconds, steps) between those two syncs

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):  # type: ignore[no-untyped-def]
        self.samples_per_row = getattr(getattr(train_dataloader, "dataset", None), "samples_per_row", 1.0)

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        if self._end is not None:
            self.wait.append(now - self._end)
        if len(self.times) == self.warmup and self.on_warm is not None:
            self.on_warm()
            self.on_warm = None
        if torch.cuda.is_available() and (self.sync_each_step or len(self.times) == self.warmup):
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        if len(self.times) == self.warmup:
            self._steady_start = self._start

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._steady_start is not None and len(self.times) > self.warmup:
            self.steady_span = (time.perf_counter() - self._steady_start, len(self.times) - self.warmup)
        if self.on_done is not None:
            self.on_done()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if torch.cuda.is_available() and self.sync_each_step:
            torch.cuda.synchronize()
        self._end = time.perf_counter()
        self.times.append(self._end - self._start)
        self.ends.append(self._end)


class StepProfiler(TrainerCallback):
    """torch.profiler over ``steps`` training steps after ``start``: prints the CUDA kernels that
    take the most time and the kernel launches per step (``--profile``)."""

    def __init__(self, start: int = 15, steps: int = 3, trace: str | None = None) -> None:
        self.start, self.steps, self.prof, self.trace = start, steps, None, trace

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.prof is not None and state.global_step == self.start + self.steps:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            if self.trace:
                self.prof.export_chrome_trace(self.trace)  # open in chrome://tracing or ui.perfetto.dev
            events = self.prof.key_averages()
            print(events.table(sort_by="cuda_time_total", row_limit=35, max_name_column_width=70))
            kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            print(f"[profile] CUDA kernel launches per step: {kernels / self.steps:.0f}")
            self.prof = None


class GpuUtilisation:
    """GPU utilisation from one ``nvidia-smi -lms 500`` child started before training (a thread
    reads its lines), averaged over the samples taken between ``start`` and ``pause``. One child,
    forked once, instead of an ``nvidia-smi`` run (a fork of the training process) every 0.5 s;
    the step times with either were within the spread between device calls."""

    def __init__(self, command: list[str] | None = None) -> None:
        import shutil
        import subprocess
        import threading

        self.samples: list[float] = []
        self._recording = False
        self._proc = None
        if command is None and shutil.which("nvidia-smi"):
            command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500",
                       "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]]
        if command:
            self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            if self._recording:
                try:
                    self.samples.append(float(line.split(",")[0]))
                except ValueError:
                    continue

    def start(self) -> None:
        self._recording = True

    def pause(self) -> None:
        self._recording = False

    def stop(self) -> float | None:
        self._recording = False
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
        return round(statistics.mean(self.samples), 1) if self.samples else None


def find_peer_harness(explicit: str | None = None) -> str:
    """LLaMA-Factory's harness folder: ``explicit``, else ``.peer/llamafactory`` (carried to the
    GPU machine), else ``../shared/peers/llamafactory``."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ([explicit] if explicit else [os.path.join(root, ".peer", "llamafactory"),
                                                  os.path.join(root, "..", "shared", "peers", "llamafactory")]):
        if os.path.isfile(os.path.join(folder, "lf_train.py")):
            return folder
    raise FileNotFoundError(f"no LLaMA-Factory harness (lf_train.py) in {explicit or '.peer/llamafactory'}; copy "
                            "../shared/peers/llamafactory there (see its README)")


def run_peer(args: argparse.Namespace, out_json: str) -> dict:
    """LLaMA-Factory on the same model folder, data, method, batch and cutoff, through the
    harness's ``lf_train.py`` (its own per-step timer, synchronised at each step end), in a
    subprocess whose packages come from ``--peer-site`` (``gpu_run.sh env`` installs them).
    The data folder must register the dataset as ``bench_mllm`` in its ``dataset_info.json``
    (``prepare.py`` and ``varsize_data.py --lf-workdir`` write it). Returns its JSON."""
    import os
    import subprocess

    harness = find_peer_harness(args.peer_dir)
    data_dir = os.path.dirname(os.path.abspath(args.data))
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        raise FileNotFoundError(f"{data_dir}/dataset_info.json is missing: LLaMA-Factory needs the dataset registered "
                                "as bench_mllm there (benchmarks/varsize_data.py --lf-workdir writes it)")
    config = os.path.join(harness, "lora.yaml" if args.method == "lora" else "full.yaml")
    overrides = [f"model_name_or_path={args.model}", f"dataset_dir={data_dir}", f"cutoff_len={args.cutoff_len}",
                 f"per_device_train_batch_size={args.batch}", f"max_steps={args.peer_steps}",
                 f"output_dir={args.output_dir}_peer"]
    if args.method == "freeze":
        overrides.append("finetuning_type=freeze")
    overrides += args.peer_set
    env = dict(os.environ, DISABLE_VERSION_CHECK="1", BENCH_JSON=out_json, BENCH_SKIP_SAVE="1", RECORD_VRAM="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (args.peer_site, os.environ.get("PYTHONPATH", "")) if p))
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    command = [sys.executable, os.path.join(harness, "lf_train.py"), config, *overrides]
    print("[peer] " + " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)
    with open(out_json) as fh:
        return json.load(fh)


def peer_columns(row: dict, peer: dict) -> dict:
    """The peer's figures beside ours, and the ratios (speed; memory)."""
    speed = peer.get("steady_samples_per_s")
    memory = peer.get("peak_allocated_gib")
    out = {"peer": "llamafactory", "peer_samples_per_s": round(speed, 2) if speed else None,
           "peer_peak_allocated_gib": round(memory, 2) if memory else None}
    if speed:
        out["speed_ratio"] = round(row["samples_per_s"] / speed, 2)
    if memory and row.get("peak_allocated_gib") is not None:
        out["memory_ratio"] = round(row["peak_allocated_gib"] / memory, 2)
    return out


def preference_data(path: str, stage: str) -> str:
    """``path`` (``messages`` ending with the answer, ``images``) as preference rows beside it:
    the prompt and its answer chosen, the next row's answer rejected (dpo); the same answers
    marked desirable on even rows and, replaced by the next row's, undesirable on odd ones
    (kto). Media paths stay relative to the same folder."""
    import os

    rows = json.load(open(path))
    out = []
    for i, row in enumerate(rows):
        messages = row["messages"]
        other = rows[(i + 1) % len(rows)]["messages"][-1]["content"]
        if stage == "dpo":
            out.append({**row, "messages": messages[:-1], "chosen": messages[-1],
                        "rejected": {"role": "assistant", "content": other}})
        else:
            answer = messages[-1] if i % 2 == 0 else {"role": "assistant", "content": other}
            out.append({**row, "messages": [*messages[:-1], answer], "kto_tag": i % 2 == 0})
    target = os.path.splitext(path)[0] + f".{stage}.json"
    with open(target, "w") as fh:
        json.dump(out, fh)
    return target


def bench_config(args: argparse.Namespace) -> dict:
    """The ``mmtune train`` config of a benchmark run (what a user's YAML would say)."""
    cuda = torch.cuda.is_available() and not args.cpu
    cfg = dict(model_name_or_path=args.model, dataset=args.data, template="qwen2_vl", finetuning_type=args.method,
               cutoff_len=args.cutoff_len, output_dir=args.output_dir,
               per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4, warmup_steps=0,
               logging_steps=10, save_strategy="no", bf16=cuda, torch_dtype="bf16" if cuda else "fp32",
               gradient_checkpointing=args.gradient_checkpointing, dataloader_num_workers=4 if cuda else 0,
               dataloader_pin_memory=cuda, use_cpu=not cuda, disable_tqdm=True, plot_loss=False,
               preprocessing_num_workers=8 if cuda else None, overwrite_cache=True,
               overwrite_output_dir=True,  # a scratch folder: a rerun replaces the last one
               packing={"auto": None, "on": True, "off": False}[args.packing])
    if args.method == "lora":  # LoRA's keys only where LoRA reads them (elsewhere they are refused)
        cfg.update(lora_rank=8, lora_target="all")
    stage = getattr(args, "stage", "sft")  # step_anatomy.py's options have no stage
    if stage != "sft":  # pairs are padded, never packed
        cfg.update(stage=stage, dataset=preference_data(args.data, stage), packing=False)
        if stage == "dpo":
            cfg["pref_loss"] = args.pref_loss
    cfg.update({WITHOUT[name]: False for name in args.without})
    if args.ckpt_layers is not None:
        cfg["gradient_checkpointing_layers"] = args.ckpt_layers
    return cfg


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", default="lora", choices=["lora", "full", "freeze"])
    ap.add_argument("--stage", default="sft", choices=["sft", "dpo", "kto"],
                    help="preference training on the same data, a rejected answer added (see the module)")
    ap.add_argument("--pref-loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "orpo", "simpo"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--output-dir", default="/tmp/mmtune_bench_out")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu", action="store_true", help="smoke test on the CPU")
    ap.add_argument("--without", action="append", default=[], choices=sorted(WITHOUT), help="a speed lever off")
    ap.add_argument("--ckpt-layers", default=None, help="gradient_checkpointing_layers: N or auto (default)")
    ap.add_argument("--packing", default="auto", choices=["auto", "on", "off"], help="data_args.packing (auto: default)")
    ap.add_argument("--cutoff-len", type=int, default=1024)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 steady steps")
    ap.add_argument("--trace", default=None, help="with --profile: also write a chrome trace (.json.gz) here")
    ap.add_argument("--peer", choices=["llamafactory"], default=None,
                    help="first run LLaMA-Factory's harness on the same model, data, method and batch, then print "
                         "the ratios (its packages: --peer-site)")
    ap.add_argument("--peer-dir", default=None, help="the harness folder (default .peer/llamafactory)")
    ap.add_argument("--peer-site", default="/tmp/site-lf", help="folder with LLaMA-Factory's packages")
    ap.add_argument("--peer-steps", type=int, default=60, help="the peer's steps (its first 10 are warm-up)")
    ap.add_argument("--peer-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a LLaMA-Factory key for the peer's run (e.g. quantization_bit=4)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key")
    ap.add_argument("--no-step-sync", action="store_true",
                    help="time the steady steps as one span (a sync after the warm-up and one at the end) instead of "
                         "syncing at every step end as the peer's harness does: what a run without a timer gets, "
                         "the host free to run ahead across steps. Not a figure to pair with the peer's")
    args = ap.parse_args(argv)

    from mmtune.config import parse_config
    from mmtune.train import run_sft

    cuda = torch.cuda.is_available() and not args.cpu
    peer = None
    if args.peer and args.stage != "sft":
        ap.error("--peer runs the peer's SFT harness: time --stage dpo / kto without it")
    if args.peer:  # first, so each run has the GPU to itself
        import os

        peer = run_peer(args, os.path.join(args.output_dir + "_peer", "bench_peer.json"))
    cfg = bench_config(args)
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)  # numbers and booleans as YAML reads them
    parsed = parse_config(None, extra=cfg)
    timer = StepTimer()
    timer.warmup = args.warmup
    timer.sync_each_step = not args.no_step_sync
    util = GpuUtilisation() if cuda else None  # its one child is forked before CUDA starts here
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer.on_warm = util.start if util is not None else None  # sampled over the steady steps only,
    timer.on_done = util.pause if util is not None else None  # not over the final save
    start = time.perf_counter()
    run_sft(*parsed, callbacks=[timer, *([StepProfiler(trace=args.trace)] if args.profile and cuda else [])])
    wall = time.perf_counter() - start
    gpu_util = util.stop() if util is not None else None
    steady = timer.times[args.warmup:] or timer.times
    compute_step = statistics.mean(steady)
    ends = timer.ends[args.warmup:]  # step end to step end: the data fetch and the Trainer's own work included
    step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else compute_step
    if args.no_step_sync and timer.steady_span is not None:  # one span: the host ran ahead across steps
        step = timer.steady_span[0] / timer.steady_span[1]
    samples = args.batch * timer.samples_per_row  # a step's samples (batch = rows when packed)
    data = json.load(open(args.data))
    tokens_per_sample = _tokens_per_sample(parsed, args)
    if args.stage == "dpo":  # a pair is two sequences
        tokens_per_sample *= 2
        _tokens_per_sample.image_tokens *= 2  # type: ignore[attr-defined]
    row = {
        "stage": args.stage + (f" ({args.pref_loss})" if args.stage == "dpo" else ""),
        "method": args.method, "batch": args.batch, "steps": len(timer.times), "device":
            torch.cuda.get_device_name() if cuda else "cpu",
        "steady_step_s": round(step, 4), "samples_per_s": round(samples / step, 2),
        "compute_step_s": round(compute_step, 4), "samples_per_s_excluding_wait": round(samples / compute_step, 2),
        "tokens_per_s": round(samples * tokens_per_sample / step, 1), "tokens_per_sample": tokens_per_sample,
        "dataloader_wait_pct": round(100 * statistics.mean(timer.wait[args.warmup:] or [0.0]) / step, 2),  # of the e2e step
        "wall_s": round(wall, 1), "gradient_checkpointing": args.gradient_checkpointing, "samples": len(data),
        "levers_off": args.without, "ckpt_layers": args.ckpt_layers or "auto",
        "packing": args.packing, "samples_per_row": round(timer.samples_per_row, 2),
        "step_sync": "none (one span)" if args.no_step_sync else "every step end",
    }
    flops = flops_per_sample(parsed, args.method, tokens_per_sample, _tokens_per_sample.image_tokens)  # type: ignore[attr-defined]
    row["gflop_per_sample"] = round(flops / 1e9, 3)
    row["achieved_tflops"] = round(flops * samples / step / 1e12, 2)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in row["device"]), None)
    if peak:
        row["mfu_pct"] = round(100 * row["achieved_tflops"] / peak, 1)
    if gpu_util is not None:
        row["gpu_util_pct"] = gpu_util  # nvidia-smi, over the steady steps
    if cuda:
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    if peer is not None:
        row.update(peer_columns(row, peer))
    print(" | ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**row, "command": " ".join(sys.argv)}, fh, indent=1)
    return row


def flops_per_sample(parsed: tuple, method: str, tokens: float, image_tokens: float) -> float:
    """Model FLOPs of one sample (the formula in the module docstring; attention scores and
    recompute not counted). Parameters are counted on a meta-device copy of the model."""
    from mmtune.model.composite import get_composite_model, has_prefix
    from mmtune.model.loader import load_config, model_class_for

    config = load_config(parsed[0])
    cls = model_class_for(config)
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    entry = get_composite_model(config.model_type)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    vision = projector = language = 0
    for name, param in model.named_parameters():
        if entry is not None and has_prefix(name, [entry.projector_key]):
            projector += param.numel()
        elif entry is not None and has_prefix(name, entry.vision_model_keys):
            vision += param.numel()
        elif param is not embed or (head is not None and head.weight is embed):
            language += param.numel()  # the embedding lookup is no matmul; a tied head is
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1) or 1
    patches = image_tokens * merge * merge  # tower positions per sample
    lm = (6 if method == "full" else 4) * language * tokens  # LoRA/frozen: forward + activation gradients
    return 2 * vision * patches + 2 * projector * image_tokens * merge * merge + lm


def _tokens_per_sample(parsed: tuple, args: argparse.Namespace) -> float:
    """Mean tokenised length of the first 32 samples, as the trainer sees them."""
    from mmtune.data.formats import normalize_row
    from mmtune.data.tokenize import encode_sample
    from mmtune.train.recipe import build
    import os

    model_args, data_args, finetuning_args, mm_args, _ = parsed
    parts = build(model_args, data_args, finetuning_args, mm_args=mm_args, datasets=False, model=False)
    tok, proc, template, plugin = parts.tokenizer, parts.processor, parts.template, parts.plugin
    rows = json.load(open(args.data))[:32]
    encoded = [encode_sample(normalize_row(r, os.path.dirname(os.path.abspath(args.data))), template, plugin, tok, proc,
                             data_args.cutoff_len).input_ids for r in rows]
    image_id = tok.convert_tokens_to_ids(plugin.image_token) if plugin.image_token else None
    _tokens_per_sample.image_tokens = sum(ids.count(image_id) for ids in encoded) / len(encoded)  # type: ignore[attr-defined]
    return round(sum(len(ids) for ids in encoded) / len(encoded), 1)


if __name__ == "__main__":
    main()
