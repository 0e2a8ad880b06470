"""Batched prediction speed: ``mmtune predict``'s library function on a Qwen2-VL-2B-sized model
(random weights, the sizes from a model folder's config.json), one image and a question a
sample, a fixed number of new tokens each (end-of-turn held back): samples/s, new tokens/s and
peak GPU memory.

    python benchmarks/predict_speed.py --model-dir /path/to/Qwen2-VL-2B-Instruct   # GPU, bf16
    python benchmarks/predict_speed.py --cpu                                       # CPU smoke test
    python benchmarks/predict_speed.py --model-dir /tmp/lfbench/model --model-as-is \
        --data /tmp/lfbench/data/bench.json                  # the LLaMA-Factory peer's model and data

The model folder gives config.json and the processor files only (no weights are read); random
weights are saved once into ``--work-dir``; with ``--model-as-is`` the folder's own weights are
read instead (the peer's random-weight folder, so that both sides run the very same model). With
``--data`` the prompts come from that ShareGPT file (the last assistant turn is the label)
instead of ``WORK_DIR/data/predict.json``. ``benchmarks/gpu_predict_speed.sh`` runs
LLaMA-Factory's ``do_predict`` (``benchmarks/peer/lf_predict/``) on the same model folder and data
beside it for the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch


def build_random_model(model_dir: str | None, out: str, dtype: torch.dtype) -> str:
    """A model folder with random weights of ``model_dir``'s config (or the tiny stand-in when
    None) and its processor."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mmtune.demo import build_model_dir

    if model_dir is None:
        return build_model_dir(out, hidden=64)
    path = os.path.join(out, "random-" + os.path.basename(os.path.normpath(model_dir)))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def build_data(root: str, samples: int, seed: int = 0) -> str:
    """``samples`` rows: one of a few images of varied sizes and a question of varied length."""
    from mmtune.demo import COLOURS, SHAPES, draw_shape

    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    sizes = (224, 336, 448, 280)
    images = []
    for k, size in enumerate(sizes):
        name = f"images/{k}.png"
        draw_shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), size, rng).save(os.path.join(root, name))
        images.append(name)
    rows = []
    for i in range(samples):
        question = "Describe the shape in the picture" + ", in detail" * rng.randint(0, 12) + "."
        rows.append({"messages": [{"role": "user", "content": "<image>" + question},
                                  {"role": "assistant", "content": "a shape"}], "images": [images[i % len(images)]]})
    path = os.path.join(root, "predict.json")
    with open(path, "w") as fh:
        json.dump(rows, fh)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a Qwen2-VL folder (config.json + processor; weights not read)")
    parser.add_argument("--cpu", action="store_true", help="tiny stand-in model, few samples, on the CPU (smoke test)")
    parser.add_argument("--samples", type=int, default=None, help="default: 512 (--cpu: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens a sample; default: 64 (--cpu: 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (--cpu: 4)")
    parser.add_argument("--model-as-is", action="store_true",
                        help="read --model-dir's own weights (no random model is built)")
    parser.add_argument("--data", help="a ShareGPT JSON with images to predict on (default: built in WORK_DIR/data)")
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="the KV cache")
    parser.add_argument("--work-dir", help="where the random model, data and predictions go (default: a temp dir)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if not args.cpu and not args.model_dir:
        parser.error("--model-dir is required (or --cpu for the smoke test)")
    if args.model_as_is and not args.model_dir:
        parser.error("--model-as-is needs --model-dir")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no GPU: use --cpu for the smoke test")
    samples = args.samples or (8 if args.cpu else 512)
    new_tokens = args.new_tokens or (4 if args.cpu else 64)
    batch = args.batch_size or (4 if args.cpu else 64)
    work = args.work_dir or tempfile.mkdtemp(prefix="mmtune-predict-bench-")
    dtype = "fp32" if args.cpu else "bf16"
    from mmtune.config.model import DTYPES
    from mmtune.infer.predict import predict_folder

    if args.model_as_is:
        model = args.model_dir
    else:
        model = build_random_model(None if args.cpu else args.model_dir, work, DTYPES[dtype])
    data = args.data or build_data(os.path.join(work, "data"), samples)
    if torch.cuda.is_available() and not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = predict_folder(model, data, os.path.join(work, "predict"), torch_dtype=dtype, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, predict_batch_size=batch, overwrite_output_dir=True,
                             cache_implementation=args.cache, **({"max_samples": samples} if args.data else {}))
    wall = time.perf_counter() - start
    result = {
        "model": (model if args.model_as_is else "tiny qwen2_vl (random)" if args.cpu
                  else f"{os.path.basename(args.model_dir)} sizes (random weights)"),
        "data": data,
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(), "dtype": dtype, "samples": results["predict_samples"],
        "new_tokens": new_tokens, "batch_size": batch, "cache": args.cache,
        "samples_per_second": results["predict_samples_per_second"],
        "tokens_per_second": results["predict_tokens_per_second"], "generate_seconds": results["predict_runtime"],
        "wall_seconds_with_load": round(wall, 2), "predictions": os.path.join(work, "predict"),
    }
    if torch.cuda.is_available() and not args.cpu:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
