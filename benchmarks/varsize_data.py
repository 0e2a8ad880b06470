"""A variable-size multimodal dataset for the packing and preprocessing benchmarks (issue 7:
images 200-1200 px a side, 50-1500 text tokens a sample), written like the fixed-size one:
JPEGs on disk and a ShareGPT-style ``messages`` + ``images`` JSON that ``mmtune train`` (and
LLaMA-Factory) read.

    python benchmarks/varsize_data.py --model /tmp/lfbench/model --out /tmp/varsize --n 512
    python benchmarks/train_speed.py --model /tmp/lfbench/model --data /tmp/varsize/varsize.json \\
        --cutoff-len 4096 --packing off   # then --packing on (same batch: rows of the longest sample)

    # 20,000 samples in 16 processes, plus a LLaMA-Factory work folder for the peer's
    # preproc_bench.py (WORKDIR/model -> the model, WORKDIR/data/{varsize.json,images,dataset_info.json})
    python benchmarks/varsize_data.py --model /tmp/lfbench/model --n 20000 --workers 16 --lf-workdir /tmp/lfvar
    python .peer/llamafactory/preproc_bench.py /tmp/lfvar 16

Widths and heights are drawn independently and uniformly from [200, 1200]; the text token
count uniformly from [50, 1500], a fifth in the question and the rest in the answer, counted
with ``--model``'s tokenizer (without one, one word is taken as one token). Deterministic
for a seed, whatever ``--workers``: every random draw is made in the parent, in sample order;
the processes only crop, encode and tokenise.
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

#: the dataset's name in the LLaMA-Factory work folder (as the peer's prepare.py registers it)
LF_DATASET = "bench_mllm"
JSON_NAME = "varsize.json"


def _text(rng: random.Random, tokenizer: Any, ntok: int) -> str:
    """About ``ntok`` tokens of words (exactly ``ntok`` ids re-decoded, with a tokenizer)."""
    return _finish_text(_draw_words(rng, ntok), tokenizer, ntok, rng)


def _draw_words(rng: random.Random, ntok: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(ntok + 8)]


def _finish_text(words: list[str], tokenizer: Any, ntok: int, rng: random.Random) -> str:
    """The text of ``ntok`` tokens from the drawn ``words`` (``rng`` draws more words only
    when they make fewer than ``ntok`` tokens, which one token or more a word never does)."""
    if tokenizer is None:
        return " ".join(words[:ntok])
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    while len(ids) < ntok:
        words += [rng.choice(WORDS) for _ in range(ntok)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:ntok]).strip()


def _noise(side: int, seed: int) -> Any:
    """A grey Gaussian-noise picture (sigma 64, as ``Image.effect_noise``): JPEG size and
    decode cost like photos'; seeded, so the same in every process and run."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).normal(128.0, 64.0, (side, side)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").convert("RGB")


# ------------------------------------------------------------------ one sample (in a worker)
_STATE: dict[str, Any] = {}


def _init_worker(out: str, side: int, seed: int, tokenizer: Any) -> None:
    _STATE.update(out=out, base=_noise(side, seed), tokenizer=tokenizer, seed=seed)


def _write_sample(task: tuple[Any, ...]) -> tuple[dict[str, Any], int]:
    """Crop and save sample ``i``'s JPEG, finish its texts; returns the row and its text
    token count (re-tokenised, for the summary)."""
    i, box, q, a, q_words, a_words = task
    out, base, tokenizer = _STATE["out"], _STATE["base"], _STATE["tokenizer"]
    name = f"images/{i:05d}.jpg"
    base.crop(box).save(os.path.join(out, name), quality=90)
    spare = random.Random(_STATE["seed"] * 1_000_003 + i)  # only if the drawn words fall short
    question, answer = _finish_text(q_words, tokenizer, q, spare), _finish_text(a_words, tokenizer, a, spare)
    row = {"messages": [{"role": "user", "content": "<image>" + question},
                        {"role": "assistant", "content": answer}],
           "images": [name]}
    if tokenizer is None:
        ntext = len(question.split()) + len(answer.split())
    else:
        ntext = sum(len(x) for x in tokenizer([question, answer], add_special_tokens=False)["input_ids"])
    return row, ntext


def _draw_tasks(n: int, seed: int, image_px: tuple[int, int], text_tokens: tuple[int, int]) -> list[tuple[Any, ...]]:
    """Every random draw, in sample order: image size and crop, text lengths, words."""
    rng = random.Random(seed)
    side = image_px[1]
    tasks = []
    for i in range(n):
        w, h = rng.randint(*image_px), rng.randint(*image_px)
        x, y = rng.randint(0, side - w), rng.randint(0, side - h)
        ntok = rng.randint(*text_tokens)
        q = max(1, ntok // 5)
        q_words = _draw_words(rng, q)
        a_words = _draw_words(rng, ntok - q)
        tasks.append((i, (x, y, x + w, y + h), q, ntok - q, q_words, a_words))
    return tasks


def make_varsize_dataset(out: str, n: int = 512, tokenizer: Any = None, seed: int = 0,
                         image_px: tuple[int, int] = (200, 1200), text_tokens: tuple[int, int] = (50, 1500),
                         workers: int = 1, stats: list[int] | None = None) -> str:
    """Write ``n`` samples (one JPEG each) under ``out``, in ``workers`` processes; returns the
    JSON's path. ``stats``, when given, receives each sample's text token count."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    tasks = _draw_tasks(n, seed, image_px, text_tokens)
    init = (out, image_px[1], seed, tokenizer)
    if workers > 1:
        import multiprocessing

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with multiprocessing.get_context().Pool(workers, _init_worker, init) as pool:
            results = pool.map(_write_sample, tasks, chunksize=max(1, min(64, n // (workers * 4) or 1)))
    else:
        _init_worker(*init)
        try:
            results = [_write_sample(t) for t in tasks]
        finally:
            _STATE.clear()
    rows = [row for row, _ in results]
    if stats is not None:
        stats.extend(ntext for _, ntext in results)
    path = os.path.join(out, JSON_NAME)
    with open(path, "w") as fh:
        json.dump(rows, fh)
    return path


def write_lf_workdir(workdir: str, model: str, json_path: str) -> str:
    """Lay out a LLaMA-Factory work folder as the peer's ``prepare.py`` does, for its
    ``preproc_bench.py WORKDIR NUM_PROC``: ``model`` -> the model folder (a link), ``data/``
    with the JSON, its images and ``dataset_info.json`` naming it ``bench_mllm`` (sharegpt,
    ``messages`` / ``images`` columns). Data written elsewhere is linked, never copied."""
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    _link(os.path.abspath(model), os.path.join(workdir, "model"))
    src = os.path.dirname(os.path.abspath(json_path))
    if os.path.realpath(src) != os.path.realpath(data):
        _link(os.path.abspath(json_path), os.path.join(data, JSON_NAME))
        _link(os.path.join(src, "images"), os.path.join(data, "images"))
    info = {
        LF_DATASET: {
            "file_name": JSON_NAME,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }
    with open(os.path.join(data, "dataset_info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    return workdir


def _link(target: str, name: str) -> None:
    if os.path.islink(name):
        os.unlink(name)
    elif os.path.exists(name):
        raise FileExistsError(f"{name} exists and is not a link: remove it or choose another --lf-workdir")
    os.symlink(target, name)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="data folder (default: LF_WORKDIR/data, else /tmp/varsize)")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--model", default=None, help="folder whose tokenizer counts the text tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes writing the JPEGs and texts")
    ap.add_argument("--lf-workdir", default=None,
                    help="also lay out a LLaMA-Factory work folder here (needs --model) for preproc_bench.py")
    args = ap.parse_args(argv)
    if args.lf_workdir and not args.model:
        ap.error("--lf-workdir needs --model (linked as WORKDIR/model)")
    out = args.out or (os.path.join(args.lf_workdir, "data") if args.lf_workdir else "/tmp/varsize")
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    lens: list[int] = []
    path = make_varsize_dataset(out, args.n, tokenizer, args.seed, workers=args.workers, stats=lens)
    print(f"text tokens a sample: min {min(lens)}, mean {statistics.mean(lens):.0f}, max {max(lens)}")
    print(f"{len(lens)} samples -> {path}")
    if args.lf_workdir:
        write_lf_workdir(args.lf_workdir, args.model, path)
        print(f"LLaMA-Factory work folder: {args.lf_workdir} (dataset {LF_DATASET})")
    return path


if __name__ == "__main__":
    main()
