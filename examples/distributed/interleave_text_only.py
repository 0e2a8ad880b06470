"""A dataset for the worst case of multi-GPU VLM training: some ranks see only text-only batches.

With ``train_sampling_strategy: sequential`` the Trainer reads the dataset in order and accelerate
hands per-device batch i to rank ``i % ranks``. This script orders the rows so that ranks
``0 .. image_ranks-1`` always get image batches and the other ranks always get text-only batches:
the vision tower would run on some ranks only, which deadlocks ZeRO-3 / FSDP unless every rank runs
the tower (mmtune's collator gives text-only batches a masked dummy image when several ranks train).

    python examples/distributed/interleave_text_only.py /tmp/lfbench/data/bench.json \\
        /tmp/lfbench/data/half_text.json --batch 8 --ranks 2

Text-only rows are the image rows themselves with their images and ``<image>`` placeholders removed
(unless ``--text`` gives a file of text-only rows), so both halves have the same answers and lengths.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any


def strip_images(row: dict[str, Any]) -> dict[str, Any]:
    """The same conversation without its images (ShareGPT ``conversations`` or OpenAI ``messages``)."""
    out = copy.deepcopy(row)
    for key in ("images", "image"):
        out.pop(key, None)
    for turn in out.get("messages") or out.get("conversations") or []:
        for field in ("content", "value"):
            if isinstance(turn.get(field), str):
                turn[field] = turn[field].replace("<image>", "").strip()
    return out


def interleave(image_rows: list[dict], text_rows: list[dict], batch: int, ranks: int = 2,
               image_ranks: int = 1) -> list[dict]:
    """Rows in per-device batches: in each round of ``ranks`` batches the first ``image_ranks`` hold
    images, the rest text only; stops when either list runs out (no partial round)."""
    if not 0 < image_ranks < ranks:
        raise ValueError("image_ranks must be between 1 and ranks - 1")
    per_round_img, per_round_txt = batch * image_ranks, batch * (ranks - image_ranks)
    rounds = min(len(image_rows) // per_round_img, len(text_rows) // per_round_txt)
    rows: list[dict] = []
    for r in range(rounds):
        rows += image_rows[r * per_round_img:(r + 1) * per_round_img]
        rows += text_rows[r * per_round_txt:(r + 1) * per_round_txt]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="json list of image rows")
    ap.add_argument("output")
    ap.add_argument("--batch", type=int, required=True, help="per_device_train_batch_size")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--image-ranks", type=int, default=1)
    ap.add_argument("--text", help="json list of text-only rows (default: the source rows without images)")
    args = ap.parse_args(argv)
    image_rows = [r for r in json.load(open(args.source)) if r.get("images") or r.get("image")]
    text_rows = json.load(open(args.text)) if args.text else [strip_images(r) for r in image_rows]
    # with text derived from the same rows, use each source row once: first half images, second half text
    if not args.text:
        k = len(image_rows) * args.image_ranks // args.ranks
        image_rows, text_rows = image_rows[:k], text_rows[k:]
    rows = interleave(image_rows, text_rows, args.batch, args.ranks, args.image_ranks)
    with open(args.output, "w") as fh:
        json.dump(rows, fh)
    print(f"{len(rows)} rows: per-device batch {args.batch}, ranks {args.ranks}, "
          f"image batches on ranks 0..{args.image_ranks - 1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
