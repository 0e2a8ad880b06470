"""The real preprocessing pass (``build_dataset``: read rows, normalise, count media tokens from
headers, template, tokenise; ``datasets.map`` in processes) on a dataset file repeated to
``--n`` rows, timed end to end (cache off).

    python benchmarks/preprocess_dataset.py --model /tmp/lfbench/model --data /tmp/lfbench/data/bench.json \\
        --n 20000 --workers 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--template", default="qwen2_vl")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from mmtune.data.loader import DataArguments, build_dataset
    from mmtune.hparams import ModelArguments
    from mmtune.model.loader import load_tokenizer_and_processor
    from mmtune.plugins import get_mm_plugin
    from mmtune.templates import get_template

    rows = json.load(open(args.data))
    rows = (rows * (args.n // len(rows) + 1))[: args.n]
    base = os.path.dirname(os.path.abspath(args.data))
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=base, delete=False) as fh:
        json.dump(rows, fh)
        path = fh.name
    try:
        tokenizer, processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=args.model))
        data_args = DataArguments(dataset=path, template=args.template, cutoff_len=4096, overwrite_cache=True,
                                  preprocessing_num_workers=args.workers if args.workers > 1 else None)
        template = get_template(args.template)
        plugin = get_mm_plugin(template.plugin, media=data_args.media_config())
        start = time.perf_counter()
        dataset = build_dataset(data_args, template, plugin, tokenizer, processor)["train"]
        seconds = time.perf_counter() - start
    finally:
        os.unlink(path)
    row = {"samples": len(dataset), "seconds": round(seconds, 2), "samples_per_s": round(len(dataset) / seconds, 1),
           "workers": args.workers, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "command": " ".join(sys.argv)}
    print(" | ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)
    return row


if __name__ == "__main__":
    main()
