"""``mmtune check-data``: read every sample the way training will, and decode its media fully,
then report every problem by sample index, file and line, without training.

It never stops at a problem: whatever one sample raises (any exception type: a malformed row,
a decompression bomb, the processor, the template) is one ``ERROR`` line and the next sample
is read; a dataset file that cannot be read is one line naming its line and column, and the
other entries are still checked. Dropped samples are listed with their reason, and the notes
of kept samples (answers cut by ``cutoff_len``, empty answers kept, audio cut, very large
images) are counted by kind with the first few listed.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from mmtune.config.data import DataArguments
from mmtune.media import load_audio, load_image, load_video, sample_context

from .formats import normalize_row
from .loader import NOTE_KINDS, default_media_dir, encode_preference, load_samples
from .problems import cause, file_problem, name_samples, one_line
from .tokenize import encode_sample

logger = logging.getLogger(__name__)

#: notes of each kind listed by sample (the rest are counted)
NOTES_LISTED = 5


@dataclass
class CheckReport:
    samples: int = 0
    #: ``sample N of FILE (line L): cause`` or ``dataset 'FILE': ...``, one per problem
    problems: list[str] = field(default_factory=list)
    #: ``sample N of FILE (line L): reason`` of every dropped sample
    dropped: list[str] = field(default_factory=list)
    #: per note kind, how many kept samples have it
    note_counts: dict[str, int] = field(default_factory=dict)
    #: per note kind, the first :data:`NOTES_LISTED` as ``sample N of FILE (line L): detail``
    note_examples: dict[str, list[str]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    #: other warnings raised while reading samples, each logged once
    warnings_seen: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """No error and no dropped sample (notes alone pass)."""
        return not self.problems and not self.dropped

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
        overlong = sum("cutoff_len" in d for d in self.dropped)
        head = f"{self.samples} samples read, {len(self.problems)} with errors, {overlong} over cutoff_len"
        if len(self.dropped) > overlong:
            head += f", {len(self.dropped) - overlong} dropped for other reasons"
        if self.note_counts:
            head += ", notes: " + ", ".join(f"{n} {kind}" for kind, n in self.note_counts.items())
        lines = [head]
        lines += [f"  ERROR {p}" for p in self.problems]
        lines += [f"  DROPPED {p}" for p in self.dropped]
        for kind, count in self.note_counts.items():
            shown = self.note_examples.get(kind, [])
            more = f", the first {len(shown)}:" if count > len(shown) else ":"
            lines.append(f"  NOTE {kind}: {count} samples ({NOTE_KINDS.get(kind, kind)}){more}")
            lines += [f"    {example}" for example in shown]
        if self.lengths:
            lines.append("token lengths:")
            peak = max(c for _, _, c in self.histogram()) or 1
            for lo, hi, c in self.histogram():
                lines.append(f"  {lo:>6}-{hi:<6} {c:>6} {'#' * max(1 if c else 0, round(30 * c / peak))}")
        return "\n".join(lines)


def _rows(rows: Any) -> Iterator[tuple[int, Any, BaseException | None]]:
    """(index, row, None) for every row; (index, None, exception) for one that cannot be read
    (e.g. invalid UTF-8 in a JSON file, found by ``datasets`` only when the row is read). After
    the first failure the rows are read one at a time, so the rest are still checked."""
    index = 0
    try:
        for row in rows:
            yield index, row, None
            index += 1
        return
    except Exception as exc:  # any type: the row reader's own
        yield index, None, exc
    for index in range(index + 1, len(rows)):
        try:
            row = rows[index]
        except Exception as exc:
            yield index, None, exc
        else:
            yield index, row, None


def _check_sample(row: Any, index: int, path: str, media_dir: str | None, data_args: DataArguments, template: Any,
                  plugin: Any, tokenizer: Any, processor: Any, report: CheckReport,
                  preference: str | None = None) -> tuple[Any, list[tuple[str, str]]]:
    """The encoded sample and its notes (with ``large_image`` for PIL's decompression-bomb
    warning); raises whatever the sample raises. A preference row (``preference``: pairs, kto)
    is checked as training reads it: both answers present, non-empty, sharing the prompt's
    media (:func:`~mmtune.data.loader.encode_preference`)."""
    with sample_context(index, path), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        if preference:
            sample, result, _ = encode_preference(row, preference, media_dir, data_args, template, plugin, tokenizer,
                                                   processor)
        else:
            sample = normalize_row(row, media_dir)
        for image in sample.images:  # decode fully: a corrupt body can hide behind a good header
            load_image(image)
        for video in sample.videos:
            load_video(video, fps=data_args.video_fps, maxlen=data_args.video_maxlen)
        for audio in sample.audios:
            load_audio(audio, data_args.audio_sampling_rate)
        if not preference:
            result = encode_sample(sample, template, plugin, tokenizer, processor, data_args.cutoff_len,
                                   data_args.train_on_prompt, data_args.mask_history, drop_overlong=True,
                                   keep_empty_answers=data_args.keep_empty_answers)
    notes = list(result.notes)
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            note = ("large_image", one_line(str(warning.message)))
            if note not in notes:  # one a file: its header and its pixels are read apart
                notes.append(note)
        elif str(warning.message) not in report.warnings_seen:  # recorded with the rest: logged once each
            report.warnings_seen.add(str(warning.message))
            logger.warning("%s (first at sample %d of %s)", warning.message, index, path)
    return result, notes


def check_dataset(data_args: DataArguments, template: Any, plugin: Any, tokenizer: Any, processor: Any,
                  preference: str | None = None) -> CheckReport:
    """Check every sample of every dataset entry; never raises for bad data (see the module).
    ``preference`` (pairs, kto): the rows are preference rows of that kind."""
    report = CheckReport()
    entries = [p.strip() for p in data_args.dataset.split(",") if p.strip()]
    if not entries:
        report.problems.append("no dataset given: set `dataset` to a json/jsonl/parquet file, a folder or a Hub id")
    for path in entries:
        try:
            rows = load_samples(path, data_args.max_samples)  # media undecoded: each is decoded below, named
        except Exception as exc:  # one line naming the entry (and line); the other entries are still checked
            report.problems.append(file_problem(path, exc))
            continue
        if len(rows) == 0:
            report.problems.append(f"dataset {path!r}: no samples (it holds no rows); add samples or remove it from "
                                   "`dataset`")
            continue
        media_dir = data_args.media_dir or default_media_dir(path)
        errors: list[tuple[int, str]] = []
        dropped: list[tuple[int, str]] = []
        notes: list[tuple[int, str, str]] = []
        unreadable: list[tuple[int, str]] = []
        for index, row, failure in tqdm(_rows(rows), total=len(rows), desc=f"checking {os.path.basename(path)}"):
            report.samples += 1
            if failure is not None:
                unreadable.append((index, f"cannot be read: {cause(failure)}"))
                continue
            try:
                result, sample_notes = _check_sample(row, index, path, media_dir, data_args, template, plugin,
                                                     tokenizer, processor, report, preference)
            except Exception as exc:  # any type: one problem line, the next sample is still checked
                errors.append((index, cause(exc, index, path)))
                continue
            if result.dropped:
                dropped.append((index, result.dropped))
                continue
            report.lengths.append(len(result.input_ids))
            notes += [(index, kind, detail) for kind, detail in sample_notes]
        if unreadable:  # the file's own first bad line says more than each row's decoding error
            found = file_problem(path, RuntimeError(unreadable[0][1]))
            if found.startswith(f"dataset {path!r}: could not be read"):
                errors = sorted(errors + unreadable)
            else:
                report.problems.append(f"{found} ({len(unreadable)} samples cannot be read)")
        report.problems += name_samples(path, errors)
        report.dropped += name_samples(path, dropped)
        pending: dict[str, list[tuple[int, str]]] = {}
        for index, kind, detail in notes:
            report.note_counts[kind] = report.note_counts.get(kind, 0) + 1
            if len(report.note_examples.get(kind, [])) + len(pending.get(kind, [])) < NOTES_LISTED:
                pending.setdefault(kind, []).append((index, detail))
        for kind, items in pending.items():
            report.note_examples.setdefault(kind, []).extend(name_samples(path, items))
    return report
