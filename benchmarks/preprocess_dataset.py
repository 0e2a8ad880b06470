"""The real preprocessing pass (``build_dataset``: read rows, normalise, count media tokens from
headers, template, tokenise; ``datasets.map`` in processes), timed end to end (cache off).

The dataset is used as it is (its first ``--n`` rows when ``--n`` is smaller); only an ``--n``
above its length repeats its rows (into a temporary file), unless ``--no-repeat`` forbids it.

    # the issue's variable-size set, as the peer's preproc_bench.py reads it (varsize_data.py --lf-workdir)
    python benchmarks/preprocess_dataset.py --model /tmp/lfvar/model --data /tmp/lfvar/data/varsize.json \\
        --workers 16 --image-max-pixels 200704 --cutoff-len 1024 --cap-rule peer --no-repeat
    # the fixed 448 px set repeated to 20,000 rows
    python benchmarks/preprocess_dataset.py --model /tmp/lfbench/model --data /tmp/lfbench/data/bench.json \\
        --n 20000 --workers 16

``--image-max-pixels`` is mmtune's ``image_max_pixels``: for Qwen2-VL it is handed to the image
processor as its ``max_pixels`` (the smart resize fits the original size into it). LLaMA-Factory
reads the same option differently: it first shrinks the image with PIL to fit it, then lets
the processor apply its own default bounds; the token counts differ (mostly by a row or a
column of patches). ``--cap-rule peer`` counts as the peer does, so that both passes produce
the same number of tokens for every sample (``peer_lengths.py --compare`` checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any


def peer_cap_plugin(template_plugin: str, media: Any) -> Any:
    """The family's plugin, but with ``image_max_pixels`` applied as LLaMA-Factory applies it:
    the image is first scaled to fit (as mmtune's generic families do), the processor then
    keeps its own bounds. Header-only counting is unchanged."""
    from mmtune.plugins import BasePlugin, get_mm_plugin

    cls = type(get_mm_plugin(template_plugin))

    class PeerCapPlugin(cls):  # type: ignore[valid-type, misc]
        def _user_image_caps(self) -> tuple[int | None, int | None]:
            return BasePlugin._user_image_caps(self)

        def image_kwargs(self, processor: Any) -> dict[str, Any]:
            return {}

    return PeerCapPlugin(media=media)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=None, help="rows (default: the file's); more than it has repeats them")
    ap.add_argument("--no-repeat", action="store_true", help="never repeat rows (an --n above the length fails)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--template", default="qwen2_vl")
    ap.add_argument("--cutoff-len", type=int, default=4096, help="the peer's preproc_bench.py uses 1024")
    ap.add_argument("--image-max-pixels", type=int, default=None, help="the peer's preproc_bench.py uses 200704")
    ap.add_argument("--cap-rule", choices=("mmtune", "peer"), default="mmtune",
                    help="how --image-max-pixels counts: mmtune's (the processor's max_pixels) or the peer's "
                         "(shrink first, then the processor's defaults)")
    ap.add_argument("--lengths", default=None, help="write every sample's token count here (JSON)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import datasets  # noqa: F401  imported before the clock starts, as the peer's harness does (~0.5 s)

    from mmtune.config import DataArguments, ModelArguments
    from mmtune.data.loader import build_dataset
    from mmtune.model.loader import load_tokenizer_and_processor
    from mmtune.plugins import get_mm_plugin
    from mmtune.templates import get_template

    with open(args.data) as fh:
        total = len(json.load(fh))
    n = total if args.n is None else args.n
    if n > total and args.no_repeat:
        ap.error(f"--n {n} is above the {total} rows of {args.data} and --no-repeat is set")
    path, temporary = args.data, None
    if n > total:  # repeat the rows, beside the original so that relative media paths still resolve
        rows = json.load(open(args.data))
        rows = (rows * (n // total + 1))[:n]
        base = os.path.dirname(os.path.abspath(args.data))
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=base, delete=False) as fh:
            json.dump(rows, fh)
            path = temporary = fh.name
    try:
        tokenizer, processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=args.model))
        data_args = DataArguments(dataset=path, template=args.template, cutoff_len=args.cutoff_len,
                                  overwrite_cache=True, max_samples=n if n < total else None,
                                  image_max_pixels=args.image_max_pixels,
                                  preprocessing_num_workers=args.workers if args.workers > 1 else None)
        template = get_template(args.template)
        if args.cap_rule == "peer":
            plugin = peer_cap_plugin(template.plugin, data_args.media_config())
        else:
            plugin = get_mm_plugin(template.plugin, media=data_args.media_config())
        start = time.perf_counter()
        dataset = build_dataset(data_args, template, plugin, tokenizer, processor)["train"]
        seconds = time.perf_counter() - start
    finally:
        if temporary:
            os.unlink(temporary)
    from mmtune.data.packing import dataset_lengths

    lengths = dataset_lengths(dataset)
    row = {"samples": len(dataset), "seconds": round(seconds, 2), "samples_per_s": round(len(dataset) / seconds, 1),
           "tokens": sum(lengths), "rows_in_file": total, "repeated": n > total, "workers": args.workers,
           "cutoff_len": args.cutoff_len, "image_max_pixels": args.image_max_pixels, "cap_rule": args.cap_rule,
           "omp_threads": os.environ.get("OMP_NUM_THREADS"), "command": " ".join(sys.argv)}
    print(" | ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)
    if args.lengths:
        with open(args.lengths, "w") as fh:
            json.dump({"lengths": lengths, "tokens": sum(lengths), "cutoff_len": args.cutoff_len,
                       "image_max_pixels": args.image_max_pixels, "cap_rule": args.cap_rule}, fh)
    return row


if __name__ == "__main__":
    main()
