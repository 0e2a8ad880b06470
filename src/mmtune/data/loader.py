"""Load dataset files, normalise rows, tokenise once with ``datasets.map`` (cached on disk)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from mmtune.media import MediaConfig, sample_context

from .formats import normalize_row
from .tokenize import encode_sample

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    dataset: str = field(default="", metadata={"help": "Comma-separated json/jsonl/parquet files or saved HF datasets."})
    media_dir: str | None = field(default=None, metadata={"help": "Base of relative media paths (default: file's folder)."})
    template: str = "qwen2_vl"
    cutoff_len: int = 2048
    max_samples: int | None = None
    dataset_ratios: str | None = field(default=None, metadata={
        "help": "Comma-separated sampling weights, one per dataset (e.g. 0.7,0.3): the datasets are interleaved."})
    mix_strategy: str = field(default="concat", metadata={
        "help": "concat; interleave_under (stop when a dataset runs out); interleave_over (until all are seen, "
                "oversampling the small ones). dataset_ratios implies interleave_under unless set."})
    mix_seed: int = 0
    val_size: float = 0.0
    preprocessing_num_workers: int | None = None
    overwrite_cache: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    drop_overlong: bool = True
    image_max_pixels: int | None = None
    image_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_min_pixels: int | None = None
    video_fps: float = 2.0
    video_maxlen: int = 128
    audio_sampling_rate: int = 16000
    use_audio_in_video: bool = False
    packing: bool | None = field(default=None, metadata={
        "help": "Several samples per row, attention kept inside each (data/packing.py). Default: on when the model "
                "packs exactly and the lengths vary enough to gain >= 1.2x samples a step; false: pad."})
    packing_max_len: int | None = field(default=None, metadata={
        "help": "Tokens per packed row; default: the longest sample (the peak memory padding already needs)."})

    def media_config(self) -> MediaConfig:
        names = {f.name for f in fields(MediaConfig)}
        return MediaConfig(**{k: getattr(self, k) for k in names})


def _load_raw(path: str) -> Any:
    import datasets

    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    ext = path.rsplit(".", 1)[-1].lower()
    builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(ext)
    if builder is None:
        raise ValueError(f"unsupported dataset file {path!r} (json, jsonl, parquet or a saved dataset folder)")
    return datasets.load_dataset(builder, data_files=path, split="train")


def load_samples(path: str, max_samples: int | None = None) -> Any:
    ds = _load_raw(path)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def mix_datasets(parts: list[Any], data_args: DataArguments) -> Any:
    """One dataset from several: concatenated, or interleaved by ``dataset_ratios``."""
    import datasets

    strategy = data_args.mix_strategy
    if data_args.dataset_ratios and strategy == "concat":
        strategy = "interleave_under"
    if strategy not in ("concat", "interleave_under", "interleave_over"):
        raise ValueError(f"mix_strategy must be concat, interleave_under or interleave_over, not {strategy!r}")
    if len(parts) == 1:
        return parts[0]
    if strategy == "concat":
        return datasets.concatenate_datasets(parts)
    weights = [float(w) for w in data_args.dataset_ratios.split(",")] if data_args.dataset_ratios else [1.0] * len(parts)
    if len(weights) != len(parts) or any(w < 0 for w in weights) or not sum(weights):
        raise ValueError(f"dataset_ratios={data_args.dataset_ratios!r}: need {len(parts)} non-negative weights "
                         f"(one per dataset in {data_args.dataset!r})")
    total = sum(weights)
    stopping = "first_exhausted" if strategy == "interleave_under" else "all_exhausted"
    mixed = datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=data_args.mix_seed,
                                         stopping_strategy=stopping)
    logger.info("mixed %s with weights %s (%s): %d samples", data_args.dataset, weights, stopping, len(mixed))
    return mixed


#: rows per ``datasets.map`` call: one Python call and one Arrow conversion per batch, not per row
MAP_BATCH_SIZE = 256


def encoded_features() -> Any:
    """The tokenised columns' types, given to ``datasets.map`` so that it neither infers them
    nor scans every id for mixed types (datasets 5 does that per batch: it cost a third of the
    pass). The ids come as numpy arrays, which Arrow takes without a per-int Python loop."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features({
        "input_ids": seq(datasets.Value("int32")), "labels": seq(datasets.Value("int64")),
        "images": seq(datasets.Value("string")), "videos": seq(datasets.Value("string")),
        "audios": seq(datasets.Value("string")), "dropped": datasets.Value("string"),
    })


def build_dataset(data_args: DataArguments, template: Any, plugin: Any, tokenizer: Any, processor: Any) -> dict[str, Any]:
    """Tokenised ``train`` (and ``eval`` when ``val_size`` > 0) datasets; dropped samples are
    counted and logged, never silently lost."""
    features = encoded_features()
    parts = []
    for path in [p.strip() for p in data_args.dataset.split(",") if p.strip()]:
        raw = load_samples(path, data_args.max_samples)
        media_dir = data_args.media_dir or os.path.dirname(os.path.abspath(path))

        def encode(batch: dict[str, list[Any]], indices: list[int], _path: str = path,
                   _dir: str = media_dir) -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {name: [] for name in features}
            keys = list(batch)
            for index, values in zip(indices, zip(*(batch[k] for k in keys))):
                with sample_context(index, _path):
                    sample = normalize_row(dict(zip(keys, values)), _dir)
                    result = encode_sample(sample, template, plugin, tokenizer, processor, data_args.cutoff_len,
                                           data_args.train_on_prompt, data_args.mask_history, data_args.drop_overlong)
                out["input_ids"].append(np.asarray(result.input_ids, dtype=np.int32))
                out["labels"].append(np.asarray(result.labels, dtype=np.int64))
                out["images"].append([str(x) for x in sample.images])
                out["videos"].append([str(x) for x in sample.videos])
                out["audios"].append([str(x) for x in sample.audios])
                out["dropped"].append(result.dropped or "")
            return out

        encoded = raw.map(encode, with_indices=True, batched=True, batch_size=MAP_BATCH_SIZE, features=features,
                          remove_columns=raw.column_names, num_proc=data_args.preprocessing_num_workers,
                          load_from_cache_file=not data_args.overwrite_cache, desc=f"tokenising {os.path.basename(path)}")
        reasons = encoded["dropped"]
        dropped = [r for r in reasons if r]
        if dropped:
            logger.warning("%s: dropped %d of %d samples (first reason: %s)", path, len(dropped), len(encoded), dropped[0])
            encoded = encoded.select([i for i, r in enumerate(reasons) if not r])
        parts.append(encoded.remove_columns("dropped"))
    dataset = mix_datasets(parts, data_args)
    if data_args.val_size:
        split = dataset.train_test_split(test_size=data_args.val_size, seed=0)
        return {"train": split["train"], "eval": split["test"]}
    return {"train": dataset}
