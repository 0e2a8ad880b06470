"""``skip_bad_samples: true``: a sample whose media fail to decode at batch time is replaced,
not the run stopped.

Tokenising reads media headers only, so a file with a good header and a broken body (a
truncated JPEG) first fails when a batch decodes it, perhaps hours into a run. The collator
names such samples (:class:`~mmtune.data.problems.BadSamplesError`); :class:`BadSampleGuard`
wraps the run's collator and puts in each one's place the next sample of its dataset whose
media decode (wrapping around at the end), so the batch keeps its size (a batch of one
works) and the choice is the same on every run. Each skip is one JSON line in
``OUTPUT_DIR/skipped_samples.jsonl``, appended with one write, so dataloader worker processes
can share the file; :class:`SkippedSamplesCallback` logs the run's count at its end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from mmtune.errors import DataError

from .problems import BadSamplesError, sample_lines, where

logger = logging.getLogger(__name__)

#: the report file in the output folder: one JSON object a line per skipped sample
SKIPPED_FILE = "skipped_samples.jsonl"
#: rounds of replacement one batch may take (each round replaces every bad sample found)
MAX_ROUNDS = 8

Key = tuple[str, int]


def _key(sample: dict[str, Any]) -> Key | None:
    index, source = sample.get("sample_index"), sample.get("source")
    return None if index is None or not source else (source, int(index))


class BadSampleGuard:
    """A collate function: ``collator(features)``, with every sample whose media fail replaced
    by the next good one of its dataset (see the module). ``datasets`` are the tokenised
    datasets the batches come from (train, eval); samples carry ``sample_index`` and
    ``source``, by which each is found in them."""

    def __init__(self, collator: Any, datasets: Sequence[Any], output_dir: str) -> None:
        self.collator = collator
        self.datasets = [d for d in datasets if d is not None]
        self.report_path = os.path.join(output_dir, SKIPPED_FILE)
        self._positions: list[dict[Key, int]] | None = None
        self._bad: set[Key] = set()

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        features = list(features)
        for _ in range(MAX_ROUNDS):
            try:
                return self.collator(features)
            except BadSamplesError as exc:
                if not exc.bad or any(_key(sample) is None for _, sample, _ in exc.bad):
                    raise
                for _, sample, reason in exc.bad:
                    features = self._replace(features, sample, reason)
        return self.collator(features)

    def _locate(self, key: Key) -> tuple[Any, int]:
        """The dataset holding sample ``key`` and its position there (the first, if repeated)."""
        if self._positions is None:  # once per process, on the first bad sample
            self._positions = []
            for dataset in self.datasets:
                columns = dataset.select_columns(["source", "sample_index"])[:]
                positions: dict[Key, int] = {}
                for position, found in enumerate(zip(columns["source"], columns["sample_index"])):
                    positions.setdefault(found, position)
                self._positions.append(positions)
        for dataset, positions in zip(self.datasets, self._positions):
            if key in positions:
                return dataset, positions[key]
        raise DataError(f"skip_bad_samples: {where(key[1], key[0])} is in none of the run's datasets")

    def next_good(self, key: Key) -> dict[str, Any]:
        """The first sample after ``key`` in its dataset (wrapping around) whose media decode."""
        dataset, position = self._locate(key)
        for step in range(1, len(dataset)):
            candidate = dataset[(position + step) % len(dataset)]
            found = _key(candidate)
            if found in self._bad:
                continue
            if self.collator.media_problem(candidate) is None:
                return candidate
            self._bad.add(found)
        raise DataError(f"skip_bad_samples: no sample of {key[0]} has media that decode; check them with "
                        "`mmtune check-data CONFIG`")

    def _replace(self, features: list[Any], sample: dict[str, Any], reason: str) -> list[Any]:
        key = _key(sample)
        self._bad.add(key)
        replacement = self.next_good(key)
        self._record(key, reason, _key(replacement))

        def swap(item: dict[str, Any]) -> dict[str, Any]:
            return replacement if item is sample or _key(item) == key else item

        return [{**f, "packed": [swap(s) for s in f["packed"]]} if "packed" in f else swap(f) for f in features]

    def _record(self, key: Key, reason: str, replacement: Key) -> None:
        source, index = key
        line = sample_lines(source, [index]).get(index)
        entry = {"sample": index, "file": source, "line": line, "reason": reason,
                 "replaced_by": {"sample": replacement[1], "file": replacement[0]}}
        folder = os.path.dirname(self.report_path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(self.report_path, "a", encoding="utf-8") as fh:  # one write a line: workers append safely
            fh.write(json.dumps(entry) + "\n")
        logger.warning("skip_bad_samples: skipped %s: %s; replaced by %s (listed in %s)", where(index, source, line),
                       reason, where(replacement[1], replacement[0]), self.report_path)


def count_skipped(path: str) -> int:
    """Lines in a skipped-samples report (0 when there is none)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        return 0


class SkippedSamplesCallback(TrainerCallback):
    """Logs at the end of training how many samples ``skip_bad_samples`` skipped in this run
    (the report file's new lines: dataloader workers write them in their own processes)."""

    def __init__(self, report_path: str) -> None:
        self.report_path = report_path
        self.before = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.before = count_skipped(self.report_path)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        skipped = count_skipped(self.report_path) - self.before
        if skipped:
            logger.warning("skip_bad_samples: %d samples skipped in this run, their media failed to decode; each is "
                           "listed in %s", skipped, self.report_path)
        else:
            logger.info("skip_bad_samples: no sample skipped in this run")
