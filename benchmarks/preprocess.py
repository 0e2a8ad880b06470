"""Preprocessing throughput: Qwen2-VL samples/s through ``process_messages`` + tokenisation.

Each sample holds two JPEGs of random sizes (200-1200 px a side), written to a temp dir.
Two ways of counting the image tokens are timed on the same samples:

* ``header`` (mmtune): sizes from the JPEG headers + the processor's own smart-resize
  counter; no pixel is decoded.
* ``decode`` (the path peer projects take): decode every image and run the image processor
  on it to read ``image_grid_thw``.

Both give the same ids (checked on a subset). Usage::

    python benchmarks/preprocess.py                 # both modes, prints the ratio
    python benchmarks/preprocess.py --decode        # the decode path only
    python benchmarks/preprocess.py --header-only   # the header path only
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmtune.families.qwen2_vl import Qwen2VLPlugin  # noqa: E402
from mmtune.media import load_image  # noqa: E402
from mmtune.testing import load_processor, make_image  # noqa: E402
from mmtune.testing.parity import render  # noqa: E402


class DecodingQwen2VLPlugin(Qwen2VLPlugin):
    """Counts image tokens the slow way: decode, then run the image processor on the pixels."""

    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        ip = processor.image_processor
        out = ip(images=[load_image(x) for x in images], return_tensors="pt", **self.image_kwargs(processor))
        merge = ip.merge_size ** 2
        return [int(g.prod()) // merge for g in out["image_grid_thw"]]


def make_dataset(root: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` samples with two JPEGs each (random sizes 200-1200), cropped from one base picture."""
    rng = random.Random(seed)
    base = make_image(1200, 1200, seed=seed)
    samples = []
    for i in range(n):
        paths = []
        for j in range(2):
            w, h = rng.randint(200, 1200), rng.randint(200, 1200)
            x, y = rng.randint(0, 1200 - w), rng.randint(0, 1200 - h)
            path = os.path.join(root, f"{i:05d}_{j}.jpg")
            base.crop((x, y, x + w, y + h)).save(path, quality=85)
            paths.append(path)
        messages = [
            {"role": "user", "content": f"<image>Question {i}: compare it with <image>. What differs?"},
            {"role": "assistant", "content": "The second picture is brighter and shows a circle."},
        ]
        samples.append({"messages": messages, "images": paths})
    return samples


def encode(plugin: Qwen2VLPlugin, processor: Any, sample: dict[str, Any]) -> list[int]:
    messages = plugin.process_messages(sample["messages"], sample["images"], [], [], processor)
    ids = processor.tokenizer(render(messages), add_special_tokens=False)["input_ids"]
    ids, _ = plugin.process_token_ids(ids, None, sample["images"], [], [], processor.tokenizer, processor)
    return ids


def run(plugin: Qwen2VLPlugin, processor: Any, samples: list[dict[str, Any]]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(len(encode(plugin, processor, s)) for s in samples)
    return len(samples) / (time.perf_counter() - start), tokens


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--decode", action="store_true", help="time only the decode-and-process path")
    mode.add_argument("--header-only", action="store_true", help="time only the header path")
    args = parser.parse_args(argv)

    processor = load_processor("qwen2_vl")
    header, decode = Qwen2VLPlugin(), DecodingQwen2VLPlugin()
    with tempfile.TemporaryDirectory(prefix="mmtune-bench-") as root:
        t0 = time.perf_counter()
        samples = make_dataset(root, args.samples, args.seed)
        print(f"wrote {2 * len(samples)} JPEGs in {time.perf_counter() - t0:.1f}s")
        check = samples[:20]
        assert [encode(header, processor, s) for s in check] == [encode(decode, processor, s) for s in check], \
            "header and decode paths disagree"
        results = {}
        if not args.decode:
            results["header"] = run(header, processor, samples)
        if not args.header_only:
            results["decode"] = run(decode, processor, samples)
    for name, (rate, tokens) in results.items():
        print(f"{name:>6}: {rate:8.1f} samples/s  ({len(samples)} samples, {tokens} tokens)")
    if len(results) == 2:
        print(f" ratio: header path is {results['header'][0] / results['decode'][0]:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
