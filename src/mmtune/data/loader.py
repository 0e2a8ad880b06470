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
    cutoff_len: int = field(default=2048, metadata={
        "help": "Most tokens a sample keeps: text past it is cut; a sample whose media tokens would be cut is "
                "dropped (counted in a warning) or, with drop_overlong: false, an error."})
    max_samples: int | None = field(default=None, metadata={"help": "Read at most this many samples of each dataset."})
    dataset_ratios: str | None = field(default=None, metadata={
        "help": "Comma-separated sampling weights, one per dataset (e.g. 0.7,0.3): the datasets are interleaved."})
    mix_strategy: str = field(default="concat", metadata={
        "help": "concat; interleave_under (stop when a dataset runs out); interleave_over (until all are seen, "
                "oversampling the small ones). dataset_ratios implies interleave_under unless set.",
        "choices": ("concat", "interleave_under", "interleave_over")})
    mix_seed: int = field(default=0, metadata={"help": "Seed of the interleaving draw."})
    val_size: float = field(default=0.0, metadata={
        "help": "Samples held out for evaluation: a share below 1 (0.1: a tenth), or a count; 0: none."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes that tokenise the dataset; default: one."})
    overwrite_cache: bool = field(default=False, metadata={
        "help": "Tokenise again instead of reusing the on-disk cache of the same config."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Loss on the prompts too, not only the answers."})
    mask_history: bool = field(default=False, metadata={
        "help": "Loss on the last answer only; earlier turns are context."})
    drop_overlong: bool = field(default=True, metadata={
        "help": "Drop (and count) a sample whose media tokens cutoff_len would cut; false: stop with an error "
                "naming it."})
    image_max_pixels: int | None = field(default=None, metadata={
        "help": "Cap on an image's pixels (width x height), aspect ratio kept; default: the processor's own limit."})
    image_min_pixels: int | None = field(default=None, metadata={
        "help": "Floor on an image's pixels, aspect ratio kept; default: the processor's own limit."})
    video_max_pixels: int | None = field(default=None, metadata={
        "help": "Cap on a video frame's pixels; default: the processor's own limit."})
    video_min_pixels: int | None = field(default=None, metadata={
        "help": "Floor on a video frame's pixels; default: the processor's own limit."})
    video_fps: float = field(default=2.0, metadata={"help": "Frames sampled per second of video."})
    video_maxlen: int = field(default=128, metadata={"help": "Most frames sampled from one video."})
    audio_sampling_rate: int = field(default=16000, metadata={"help": "Rate audio is resampled to, in Hz."})
    use_audio_in_video: bool = field(default=False, metadata={
        "help": "Feed a video's sound track as audio too (Qwen2.5-Omni)."})
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
