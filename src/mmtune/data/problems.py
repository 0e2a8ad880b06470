"""Where a data problem is and what it is: the line of a sample in a JSON or JSONL file, the
first bad line of a file that cannot be read, and one-line causes for any exception a sample
raised.

Line numbers are found only when a problem is reported (the file is parsed again then), so
reading and tokenising good data costs nothing extra. ``datasets`` reports a broken JSON file
without a line (``DatasetGenerationError``), an empty JSON Lines file as a bare
``StopIteration``, and invalid UTF-8 only when a row is read: :func:`diagnose_json` reads
the file with the ``json`` module instead and names the line and column.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from typing import Any

from mmtune.errors import DataError
from mmtune.media import MediaError, current_sample

#: file types whose samples have a line number (rows in file order)
JSON_SUFFIXES = (".json", ".jsonl")
#: most problems one error message lists; ``mmtune check-data`` lists them all
MAX_LISTED = 10


class BadSamplesError(DataError, MediaError):
    """Samples (or dataset files) that cannot be used; the message lists them, each with its
    sample index, file and line. A :class:`~mmtune.media.MediaError` too, so that callers that
    catch media errors keep working; the message is taken as it is (it names its samples)."""

    def __init__(self, message: str, bad: list[tuple[int, Any, str]] | None = None) -> None:
        ValueError.__init__(self, _worker_message(message, type(self)))
        #: (position in the batch, the sample as collated, cause) of each bad sample, when
        #: raised by the collator: what ``skip_bad_samples`` replaces
        self.bad = bad or []


#: what to do, by exception class name, for causes whose message does not say
HINTS = {
    "DecompressionBombError": "downscale the image (PIL refuses to decode images this large)",
    "UnicodeDecodeError": "save the file as UTF-8",
}


def _worker_message(text: str, cls: type) -> str:
    """The message alone of an exception that torch's DataLoader re-raised from a worker process:
    it builds ``cls(text)`` with the worker's whole traceback in ``text``, which the CLI would
    print as the error; the worker's own message is the text after the last ``module.Class: ``."""
    if not text.startswith(f"Caught {cls.__name__} in DataLoader worker"):
        return text
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else text


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cause(exc: BaseException, index: int | None = None, source: str | None = None) -> str:
    """What went wrong with a sample, on one line, without the sample's name (the caller adds
    it with the line number): a media or value error's own message, any other exception's
    type and message (a ``KeyError`` alone says nothing)."""
    text = str(exc)
    prefixes = [f"{current}: "] if (current := current_sample()) else []
    if index is not None and source:
        prefixes.append(f"sample {index} of {source}: ")
    for prefix in prefixes:  # a MediaError names the sample of the innermost sample_context
        while text.startswith(prefix):
            text = text[len(prefix):]
    text = one_line(text) or type(exc).__name__
    if not isinstance(exc, ValueError):
        text = f"{type(exc).__name__}: {text}"
    hint = next((h for name, h in HINTS.items() if name in {c.__name__ for c in type(exc).__mro__}), None)
    return f"{text}; {hint}" if hint else text


def json_file(entry: str) -> str | None:
    """The local JSON or JSONL file that an entry of ``dataset`` names, whole and in file
    order (so a sample's index is its position in the file); None for anything else."""
    from .entries import split_entry

    location, split = split_entry(entry)
    if split not in (None, "train") or not location.lower().endswith(JSON_SUFFIXES):
        return None
    return location if os.path.isfile(location) else None


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n\ufeff":
        at += 1
    return at


@functools.lru_cache(maxsize=8)
def _element_lines(path: str, size: int, mtime_ns: int) -> tuple[int, ...]:
    """The line on which each sample of a JSON array or JSON Lines file starts (1-based); a
    file whose array breaks off yields the lines up to the break. Keyed by size and mtime, so
    a file changed on disk is parsed again."""
    with open(path, "rb") as fh:
        text = fh.read().decode("utf-8", "surrogateescape")
    at = _skip_space(text, 0)
    if not text.startswith("[", at):  # JSON Lines: each non-blank line is one sample
        return tuple(n for n, line in enumerate(text.split("\n"), 1) if line.strip())
    starts = []
    decoder = json.JSONDecoder()
    at = _skip_space(text, at + 1)
    while at < len(text) and text[at] != "]":
        starts.append(at)
        try:
            _, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break
        at = _skip_space(text, at)
        if not text.startswith(",", at):
            break
        at = _skip_space(text, at + 1)
    lines, line, last = [], 1, 0
    for start in starts:
        line += text.count("\n", last, start)
        last = start
        lines.append(line)
    return tuple(lines)


def sample_lines(entry: str, indices: Iterable[int]) -> dict[int, int]:
    """Line numbers (1-based) of samples ``indices`` of dataset entry ``entry``: for a JSON
    array the line where the sample's element starts, for JSON Lines its non-blank line. Empty
    for other sources (parquet, saved datasets, Hub ids) or a file that cannot be read."""
    path = json_file(entry)
    if path is None:
        return {}
    try:
        stat = os.stat(path)
        lines = _element_lines(path, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return {}
    return {i: lines[i] for i in indices if 0 <= i < len(lines)}


def where(index: int, entry: str, line: int | None = None) -> str:
    """``sample N of FILE`` with ``(line L)`` when known."""
    return f"sample {index} of {entry}" + (f" (line {line})" if line else "")


def name_samples(entry: str, items: list[tuple[int, str]]) -> list[str]:
    """``sample N of FILE (line L): detail`` for each (index, detail) of one dataset entry; the
    file is parsed once for all of them."""
    lines = sample_lines(entry, [i for i, _ in items])
    return [f"{where(i, entry, lines.get(i))}: {detail}" for i, detail in items]


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """(line, column), 1-based, of byte ``offset``; the column counts bytes."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _not_an_object(value: Any) -> str | None:
    if isinstance(value, dict):
        return None
    kind = {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(type(value), "a number")
    return f"{kind}, not a JSON object (a sample is an object with conversations/messages or instruction)"


def diagnose_json(entry: str) -> str | None:
    """Why the JSON or JSONL file of ``entry`` cannot be read as samples, as one line naming
    the file, the line and column, and what to do; None when the ``json`` module finds nothing
    wrong (or ``entry`` is no local JSON file)."""
    path = json_file(entry)
    if path is None:
        return None
    head = f"dataset {entry!r}"
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return f"{head}: cannot be read: {one_line(str(exc))}"
    if not data.strip():
        return (f"{head}: the file is empty: it holds no samples; add samples (JSON Lines: one JSON object a line; "
                ".json: an array of objects) or remove it from `dataset`")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _position(data, exc.start)
        return (f"{head}: line {line}, column {column}: byte 0x{data[exc.start]:02x} is not UTF-8 text; "
                "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    text = text.lstrip("\ufeff")
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return (f"{head}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}); fix it (a .json file "
                    "holds one array of sample objects)")
        if isinstance(value, list) and not value:
            return f"{head}: an empty JSON array: the file holds no samples; add samples or remove it from `dataset`"
        for k, item in enumerate(value if isinstance(value, list) else []):
            wrong = _not_an_object(item)
            if wrong:
                line = sample_lines(entry, [k]).get(k)
                return f"{head}: {where(k, entry, line)} is {wrong}"
        return None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return (f"{head}: line {number}, column {exc.colno}: invalid JSON ({exc.msg}); fix that line (JSON Lines: "
                    "each line is one whole JSON object)")
        wrong = _not_an_object(value)
        if wrong:
            return f"{head}: line {number} is {wrong}"
    return None


def file_problem(entry: str, exc: BaseException) -> str:
    """One line for a dataset entry that could not be read or iterated: the JSON diagnosis
    (line and column) where there is one, else the exception's own message naming the entry."""
    found = diagnose_json(entry)
    if found:
        return found
    text = str(exc)
    if text.startswith(f"dataset {entry!r}"):
        return one_line(text, 400)
    return f"dataset {entry!r}: could not be read: {cause(exc)}"


def listing(problems: list[str], total: int | None = None, hint: str | None = None) -> str:
    """An error message listing ``problems``: one alone is its own line; several are the first
    :data:`MAX_LISTED`, one a line, then the total and ``hint``."""
    total = len(problems) if total is None else total
    if total == 1 and len(problems) == 1:
        return problems[0]
    shown = problems[:MAX_LISTED]
    tail = f"{total} problems" + (f" (the first {len(shown)} above)" if total > len(shown) else "")
    return "\n".join([*shown, tail + (f"; {hint}" if hint else "")])


def raise_if_any(problems: list[str], total: int | None = None, hint: str | None = None) -> None:
    """Raise :class:`BadSamplesError` listing ``problems`` (see :func:`listing`), if any."""
    if problems:
        raise BadSamplesError(listing(problems, total, hint))
