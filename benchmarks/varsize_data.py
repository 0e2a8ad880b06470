"""A variable-size multimodal dataset for the packing benchmark (issue 7: images 200-1200 px a
side, 50-1500 text tokens a sample), written like the fixed-size one: JPEGs on disk and a
ShareGPT-style ``messages`` + ``images`` JSON that ``mmtune train`` (and LLaMA-Factory) read.

    python benchmarks/varsize_data.py --model /tmp/lfbench/model --out /tmp/varsize --n 512
    python benchmarks/train_speed.py --model /tmp/lfbench/model --data /tmp/varsize/varsize.json \\
        --cutoff-len 4096 --packing off   # then --packing on (same batch: rows of the longest sample)

Widths and heights are drawn independently and uniformly from [200, 1200]; the text token
count uniformly from [50, 1500], a fifth in the question and the rest in the answer, counted
with ``--model``'s tokenizer (without one, one word is taken as one token). Deterministic
for a seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from typing import Any

WORDS = ("the cat sat on a mat and then it ran to see what was in the red box near big blue door "
         "while two small dogs play with one old ball under green tree by river side every day").split()


def _text(rng: random.Random, tokenizer: Any, ntok: int) -> str:
    """About ``ntok`` tokens of words (exactly ``ntok`` ids re-decoded, with a tokenizer)."""
    words = [rng.choice(WORDS) for _ in range(ntok + 8)]
    if tokenizer is None:
        return " ".join(words[:ntok])
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    while len(ids) < ntok:
        words += [rng.choice(WORDS) for _ in range(ntok)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:ntok]).strip()


def make_varsize_dataset(out: str, n: int = 512, tokenizer: Any = None, seed: int = 0,
                         image_px: tuple[int, int] = (200, 1200), text_tokens: tuple[int, int] = (50, 1500)) -> str:
    """Write ``n`` samples (one JPEG each) under ``out``; returns the JSON's path."""
    from PIL import Image

    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    side = image_px[1]
    base = Image.effect_noise((side, side), 64).convert("RGB")  # noise: JPEG size and decode cost like photos'
    rows = []
    for i in range(n):
        w, h = rng.randint(*image_px), rng.randint(*image_px)
        x, y = rng.randint(0, side - w), rng.randint(0, side - h)
        name = f"images/{i:05d}.jpg"
        base.crop((x, y, x + w, y + h)).save(os.path.join(out, name), quality=90)
        ntok = rng.randint(*text_tokens)
        q = max(1, ntok // 5)
        rows.append({"messages": [{"role": "user", "content": "<image>" + _text(rng, tokenizer, q)},
                                  {"role": "assistant", "content": _text(rng, tokenizer, ntok - q)}],
                     "images": [name]})
    path = os.path.join(out, "varsize.json")
    with open(path, "w") as fh:
        json.dump(rows, fh)
    return path


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/varsize")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--model", default=None, help="folder whose tokenizer counts the text tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    path = make_varsize_dataset(args.out, args.n, tokenizer, args.seed)
    rows = json.load(open(path))
    if tokenizer is not None:
        lens = [sum(len(tokenizer(m["content"].replace("<image>", ""), add_special_tokens=False)["input_ids"])
                    for m in r["messages"]) for r in rows]
        print(f"text tokens a sample: min {min(lens)}, mean {statistics.mean(lens):.0f}, max {max(lens)}")
    print(f"{len(rows)} samples -> {path}")
    return path


if __name__ == "__main__":
    main()
