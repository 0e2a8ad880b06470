"""``mmtune check-data``: read every sample the way training will, report every problem by
sample index and file, without training."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from mmtune.media import load_audio, load_image, load_video, sample_context

from .formats import normalize_row
from .loader import DataArguments, default_media_dir, load_samples
from .tokenize import encode_sample


@dataclass
class CheckReport:
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    overlong: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.overlong

    def histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        if not self.lengths:
            return []
        lo, hi = min(self.lengths), max(self.lengths)
        bins = max(1, min(bins, hi - lo + 1))
        width = max(1, -(-(hi - lo + 1) // bins))
        counts = [0] * bins
        for n in self.lengths:
            counts[min(bins - 1, (n - lo) // width)] += 1
        return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts)]

    def render(self) -> str:
        lines = [f"{self.samples} samples read, {len(self.problems)} with errors, {len(self.overlong)} over cutoff_len"]
        lines += [f"  ERROR {p}" for p in self.problems]
        lines += [f"  DROPPED {p}" for p in self.overlong]
        if self.lengths:
            lines.append("token lengths:")
            peak = max(c for _, _, c in self.histogram()) or 1
            for lo, hi, c in self.histogram():
                lines.append(f"  {lo:>6}-{hi:<6} {c:>6} {'#' * max(1 if c else 0, round(30 * c / peak))}")
        return "\n".join(lines)


def check_dataset(data_args: DataArguments, template: Any, plugin: Any, tokenizer: Any, processor: Any) -> CheckReport:
    report = CheckReport()
    for path in [p.strip() for p in data_args.dataset.split(",") if p.strip()]:
        try:
            rows = load_samples(path, data_args.max_samples)  # media undecoded: each is decoded below, named
        except ValueError as exc:  # one line naming the entry; the other entries are still checked
            report.problems.append(str(exc))
            continue
        media_dir = data_args.media_dir or default_media_dir(path)
        for index, row in enumerate(tqdm(rows, desc=f"checking {os.path.basename(path)}")):
            report.samples += 1
            try:
                with sample_context(index, path):
                    sample = normalize_row(row, media_dir)
                    for image in sample.images:  # decode fully: a corrupt body can hide behind a good header
                        load_image(image)
                    for video in sample.videos:
                        load_video(video, fps=data_args.video_fps, maxlen=data_args.video_maxlen)
                    for audio in sample.audios:
                        load_audio(audio, data_args.audio_sampling_rate)
                    result = encode_sample(sample, template, plugin, tokenizer, processor, data_args.cutoff_len,
                                           data_args.train_on_prompt, data_args.mask_history, drop_overlong=True)
            except ValueError as exc:
                report.problems.append(str(exc))
                continue
            if result.dropped:
                report.overlong.append(f"sample {index} of {path}: {result.dropped}")
            else:
                report.lengths.append(len(result.input_ids))
    return report
