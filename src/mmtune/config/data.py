"""Arguments that say which data a run reads and how each sample is shaped."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mmtune.media.config import MediaConfig


@dataclass
class DataArguments:
    """Where the samples come from, the chat template, cutoff, mixing, media settings and packing."""

    dataset: str = field(default="", metadata={
        "help": "Comma-separated datasets: json/jsonl/parquet files, folders saved with save_to_disk, folders of data "
                "files laid out as a Hub dataset repository, or Hub ids (org/name); ':split' picks a split (default "
                "train), e.g. org/name:validation. Media may be paths or embedded (datasets.Image/Audio/Video "
                "columns, {bytes, path} dicts)."})
    media_dir: str | None = field(default=None, metadata={"help": "Base of relative media paths (default: file's folder)."})
    template: str | None = field(default=None, metadata={
        "help": "Chat template (e.g. qwen2_vl, gemma3, llava); default: the one the model's family declares for its "
                "model_type in config.json (logged)."})
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
    keep_empty_answers: bool = field(default=False, metadata={
        "help": "Train on samples whose answer is empty (the end-of-turn token alone); default: drop them, counted "
                "and listed by check-data."})
    skip_bad_samples: bool = field(default=False, metadata={
        "help": "A sample whose media fail to decode at batch time is replaced by the next good one (counted, and "
                "listed in OUTPUT_DIR/skipped_samples.jsonl) instead of stopping the run."})
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
