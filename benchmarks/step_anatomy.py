"""Where a training step's time goes: the same model, levers and batches as ``train_speed.py``,
driven by a plain loop (no HF Trainer), timed phase by phase, with an optional profiler trace.

    python benchmarks/step_anatomy.py --model /tmp/lfbench/model --data /tmp/lfbench/data/bench.json \\
        --method lora --batch 8 --steps 20 [--without compile] [--trace /tmp/trace.json.gz]

Prints, in ms per step: the steady step (one sync at its end), the CPU time to issue it (before
that sync: when it equals the step, the CPU is the bottleneck), and each phase run alone between
syncs (tower forward, whole forward, backward, optimizer). Comparing its step with
``train_speed.py``'s on the same machine gives the Trainer's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import yaml

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_speed import WITHOUT, bench_config  # noqa: E402
from mmtune.train.trainer import clip_grad_norm_one_device  # noqa: E402


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)  # nested entries too, as the Trainer's loader does


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any, n: int) -> float:
    """Mean ms of ``fn`` run alone (synchronised before and after)."""
    times = []
    for _ in range(n):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.mean(times)


def list_syncs(fn: Any) -> list[dict[str, Any]]:
    """The host syncs ``fn`` makes on the GPU, grouped by call site (the innermost frames
    outside torch), most frequent first: torch's sync debug mode warns at each one."""
    import traceback
    import warnings

    sites: dict[str, int] = {}
    torch_dir = os.path.dirname(torch.__file__) + os.sep

    def note(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        frames = [f for f in stack if not f.filename.startswith(torch_dir) and "step_anatomy" not in f.filename]
        frames = frames or [f for f in stack if "step_anatomy" not in f.filename] or stack  # torch's own, then
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:4])
        sites[where] = sites.get(where, 0) + 1

    _sync()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old, warnings.showwarning = warnings.showwarning, note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    _sync()
    return [{"where": w, "count": n} for w, n in sorted(sites.items(), key=lambda kv: -kv[1])]


LOADER_VARIANTS = [  # (workers, pinned memory, host intra-op threads or None: as they are)
    (4, True, None), (4, False, None), (0, True, None), (4, True, 1)]


def time_loaders(data: Any, collator: Any, batch: int, device: str, train_on: Any, steps: int,
                 variants: list[tuple[int, bool, int | None]] | None = None, warmup: int = 3) -> dict[str, float]:
    """Mean synchronised step (ms) with batches drawn from a ``DataLoader`` per variant: the
    host-side cost of the Trainer's data path (worker processes, the pinning thread, the copy),
    beside the cached on-GPU batches of the main measurement."""
    from torch.utils.data import DataLoader

    out = {}
    for workers, pinned, threads in variants or LOADER_VARIANTS:
        workers = min(workers, os.cpu_count() or 1)  # no more workers than cores (the 2-core CI)
        name = f"workers{workers}_{'pinned' if pinned else 'pageable'}" + (f"_{threads}thread" if threads else "")
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        loader = DataLoader(data, batch_size=batch, collate_fn=collator, num_workers=workers, drop_last=True,
                            pin_memory=pinned and device == "cuda")
        it = iter(loader)
        times = []
        for i in range(warmup + steps):
            _sync()
            start = time.perf_counter()
            train_on(_to(next(it), device))
            _sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        del it, loader
        torch.set_num_threads(before)
        out[name] = round(1000 * statistics.mean(times), 1)
        print(f"[anatomy] loader {name}: step {out[name]} ms", flush=True)
    return out


def check_block_graphs(tower: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The tower's outputs with its blocks replayed from CUDA graphs (frozen_block_cuda_graphs)
    against the same blocks run as usual, compared bit for bit, and the tower's forward time
    both ways (ms, all batches, synchronised)."""
    from torch.utils._pytree import tree_flatten

    from mmtune.speed.block_graphs import GraphedBlock

    wrappers = [m.block_graphs for m in tower.modules() if isinstance(m, GraphedBlock)]

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = [tower(b["pixel_values"], grid_thw=b["image_grid_thw"]) for b in batches]
        return [x for x in tree_flatten([o.to_tuple() if hasattr(o, "to_tuple") else o for o in out])[0]
                if torch.is_tensor(x)]

    for _ in range(2):  # every signature seen twice: captured
        outputs()
    graphed, graphed_ms = outputs(), _timed(outputs, 5)
    for wrapper in wrappers:  # run as usual
        wrapper.enabled = False
    plain, plain_ms = outputs(), _timed(outputs, 5)
    for wrapper in wrappers:
        wrapper.enabled = True
    share = wrappers[0].share if wrappers else None
    result = {"blocks": len(wrappers), "bitwise_equal": len(graphed) == len(plain) and all(
        torch.equal(a, b) for a, b in zip(graphed, plain)), "tower_ms_graphed": round(graphed_ms, 2),
        "tower_ms_plain": round(plain_ms, 2), "captures": share.captures if share else 0,
        "replays": share.replays if share else 0}
    print(f"[anatomy] block graphs: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--without", action="append", default=[], choices=sorted(WITHOUT))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient clipping as the Trainer does (0: off)")
    ap.add_argument("--trace", default=None, help="write a chrome trace of 2 steady steps here (.json.gz)")
    ap.add_argument("--phases", action="store_true", help="also time each phase alone (compiles more variants)")
    ap.add_argument("--loaders", action="store_true",
                    help="also time steps fed by a DataLoader (workers, pinned memory, host threads) as the Trainer "
                         "feeds them, one variant after another in this process")
    ap.add_argument("--check-graphs", action="store_true",
                    help="turn frozen_block_cuda_graphs on and compare the frozen tower's outputs with and without "
                         "its blocks' CUDA graphs, bit for bit")
    ap.add_argument("--syncs", action="store_true",
                    help="list the host syncs of one steady step (torch.cuda.set_sync_debug_mode), by call site")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu", action="store_true", help="smoke test on the CPU (fp32, no autocast)")
    args = ap.parse_args(argv)
    args.gradient_checkpointing, args.ckpt_layers, args.packing = False, None, "off"
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    args.output_dir, args.cutoff_len = "/tmp/mmtune_anatomy", 1024

    from mmtune.config import parse_config
    from mmtune.model.composite import get_composite_model
    from mmtune.model.layers import unwrap_model
    from mmtune.train.recipe import build

    cfg = bench_config(args)
    if args.check_graphs:
        cfg["frozen_block_cuda_graphs"] = True  # on (the default with CUDA) for the comparison
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)  # numbers and booleans as YAML reads them
    model_args, data_args, ft_args, mm_args, training_args = parse_config(None, extra=cfg)
    parts = build(model_args, data_args, ft_args, training_args, mm_args=mm_args)  # as `mmtune train` builds it
    data, model, collator = parts.train_dataset, parts.model, parts.collator
    training_forward = parts.training_forward
    model.to(device).train()
    batches = [_to(collator([data[j] for j in range(i * args.batch, (i + 1) * args.batch)]), device) for i in range(4)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    base = unwrap_model(model)
    entry = get_composite_model(base.config.model_type)
    keys = [k.split(".") for k in entry.vision_model_keys]
    common = [parts[0] for parts in zip(*keys) if len(set(parts)) == 1] if len(keys) > 1 else keys[0]
    tower = base.get_submodule(".".join(common))  # the whole tower (model.visual), not its first part

    def forward(b: dict[str, Any]) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            return training_forward(model, b).loss if training_forward is not None else model(**b).loss

    def train_on(b: dict[str, Any]) -> torch.Tensor:
        loss = forward(b)
        loss.backward()
        if args.clip:
            clip_grad_norm_one_device(params, args.clip)  # as MMTrainer clips
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def step(i: int) -> torch.Tensor:
        return train_on(batches[i % len(batches)])

    for i in range(args.warmup):
        step(i)
    _sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, issue = [], []
    for i in range(args.steps):
        start = time.perf_counter()
        step(i)
        issued = time.perf_counter()
        _sync()
        end = time.perf_counter()
        steps.append(end - start)
        issue.append(issued - start)
    _sync()
    start = time.perf_counter()
    for i in range(args.steps):  # the same steps with one sync at the end: the host may run ahead
        step(i)
    _sync()
    span = (time.perf_counter() - start) / args.steps
    b0 = batches[0]
    print(f"[anatomy] unsynced steps {1000 * span:.1f} ms each", flush=True)
    print(f"[anatomy] step {1000 * statistics.mean(steps):.1f} ms, issued in {1000 * statistics.mean(issue):.1f} ms",
          flush=True)
    row: dict[str, Any] = {
        "method": args.method, "batch": args.batch, "levers_off": args.without, "set": args.set, "clip": args.clip,
        "step_ms": round(1000 * statistics.mean(steps), 1), "issue_ms": round(1000 * statistics.mean(issue), 1),
        "samples_per_s": round(args.batch / statistics.mean(steps), 2),
        "unsynced_step_ms": round(1000 * span, 1), "unsynced_samples_per_s": round(args.batch / span, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(2):
                step(i)
            _sync()
        prof.export_chrome_trace(args.trace)
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        row["gpu_busy_ms"] = round(gpu / 1000 / 2, 1)
        row["kernels_per_step"] = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) // 2
        print(events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))
    if args.syncs and device == "cuda":
        row["syncs"] = list_syncs(lambda: step(0))
        print(f"[anatomy] {sum(s['count'] for s in row['syncs'])} host syncs a step:", flush=True)
        for site in row["syncs"]:
            print(f"  {site['count']} x {site['where']}", flush=True)
    if args.check_graphs and device == "cuda":
        row["block_graphs"] = check_block_graphs(tower, batches)
    if args.loaders:
        row["loaders"] = time_loaders(data, collator, args.batch, device, train_on, steps=args.steps)
    if args.phases:
        with torch.no_grad():
            row["tower_fwd_ms"] = round(_timed(lambda: tower(b0["pixel_values"], grid_thw=b0["image_grid_thw"]), 5), 1)
        row["forward_ms"] = round(_timed(lambda: forward(b0), 5), 1)

        def fwd_bwd() -> None:
            forward(b0).backward()

        row["fwd_bwd_ms"] = round(_timed(fwd_bwd, 5), 1)
        row["optimizer_ms"] = round(_timed(lambda: (opt.step(), opt.zero_grad(set_to_none=False)), 5), 1)
    print(" | ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**row, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "command": " ".join(sys.argv)}, fh, indent=1)
    return row


if __name__ == "__main__":
    main()
