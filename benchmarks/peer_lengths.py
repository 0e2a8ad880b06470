"""Per-sample token counts from LLaMA-Factory's own preprocessing, to check that mmtune's pass
(``preprocess_dataset.py --lengths``) does the same work as the peer's ``preproc_bench.py``.

Run with LLaMA-Factory importable (its own site folder), on a work folder that
``varsize_data.py --lf-workdir`` (or the peer's ``prepare.py``) wrote; same arguments as
``preproc_bench.py`` (template qwen2_vl, image_max_pixels 200704), cutoff and sample count set here:

    PYTHONPATH=/tmp/site-lf python3 benchmarks/peer_lengths.py /tmp/lfvar --max-samples 200 \\
        --cutoff-len 1024 --out /tmp/lf_lengths.json
    python3 benchmarks/preprocess_dataset.py ... --lengths /tmp/mm_lengths.json
    python3 benchmarks/peer_lengths.py --compare /tmp/lf_lengths.json /tmp/mm_lengths.json

Imports nothing of mmtune (the two never share a Python path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def peer_lengths(work: str, max_samples: int | None, cutoff_len: int, image_max_pixels: int,
                 num_proc: int | None) -> list[int]:
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = dict(
        model_name_or_path=f"{work}/model", stage="sft", do_train=True, finetuning_type="lora", dataset="bench_mllm",
        dataset_dir=f"{work}/data", template="qwen2_vl", output_dir=f"{work}/out_lengths",
        image_max_pixels=image_max_pixels, cutoff_len=cutoff_len, overwrite_output_dir=True, overwrite_cache=True,
        preprocessing_num_workers=num_proc, report_to="none", max_samples=max_samples,
    )
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return [len(ids) for ids in dataset["train_dataset"]["input_ids"]]


def compare(peer_path: str, mine_path: str) -> dict:
    peer, mine = json.load(open(peer_path)), json.load(open(mine_path))
    peer = peer.get("lengths", peer) if isinstance(peer, dict) else peer
    mine = mine.get("lengths", mine) if isinstance(mine, dict) else mine
    n = min(len(peer), len(mine))
    diff = [i for i in range(n) if peer[i] != mine[i]]
    row = {"samples": n, "differ": len(diff), "peer_tokens": sum(peer[:n]), "mmtune_tokens": sum(mine[:n]),
           "first_differences": [(i, peer[i], mine[i]) for i in diff[:10]]}
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", nargs="?")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--cutoff-len", type=int, default=1024, help="preproc_bench.py's is 1024")
    ap.add_argument("--image-max-pixels", type=int, default=200704)
    ap.add_argument("--num-proc", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs=2, metavar=("PEER_JSON", "MMTUNE_JSON"))
    args = ap.parse_args(argv)
    if args.compare:
        return 1 if compare(*args.compare)["differ"] else 0
    if not args.workdir:
        ap.error("give WORKDIR (or --compare)")
    lengths = peer_lengths(args.workdir, args.max_samples, args.cutoff_len, args.image_max_pixels, args.num_proc)
    print(f"[peer_lengths] {len(lengths)} samples, {sum(lengths)} tokens", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"lengths": lengths, "tokens": sum(lengths), "cutoff_len": args.cutoff_len,
                       "image_max_pixels": args.image_max_pixels}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
