"""Load datasets (files, folders, saved datasets, Hub ids), normalise rows, tokenise once with
``datasets.map`` (cached on disk).

Embedded media (``datasets.Image`` / ``Audio`` / ``Video`` columns, ``{"bytes", "path"}``
structs) are read undecoded: tokenising reads image headers from the bytes, as it does from
files. The tokenised dataset does not copy those bytes: the source's media column rides
along beside the token ids as ``embedded_<kind>`` (a column-wise concatenation, which
references the source's Arrow file instead of writing it again), and each media entry that
lives there is stored as :data:`FROM_EMBEDDED`; the collator takes it from that column at
batch time (:func:`sample_media`). Row selections (dropped samples, mixing, the eval split)
are index mappings, so every row keeps its own media.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from mmtune.errors import DataError
from mmtune.config.data import DataArguments
from mmtune.media import MediaError, media_reference, sample_context

from .formats import MEDIA_COLUMNS, PREFERENCE_KINDS, media_column, normalize_preference, normalize_row
from .entries import split_entry
from .problems import (MAX_LISTED, BadSamplesError, cause, file_problem, listing, name_samples, one_line, sample_lines,
                       where)
from .tokenize import encode_sample

logger = logging.getLogger(__name__)

#: a tokenised media entry that stands for the same position of the row's ``embedded_<kind>``
FROM_EMBEDDED = ""
#: prefix of the columns that carry a source's embedded media into the tokenised dataset
EMBEDDED_PREFIX = "embedded_"


#: file types read through ``datasets.load_dataset``'s packaged builders, by extension
FILE_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet"}


def _one_line(exc: BaseException) -> str:
    return one_line(str(exc)) or type(exc).__name__


def _is_saved_dataset(folder: str) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json"))


def _looks_local(location: str) -> bool:
    """A name that can only mean a local path (a Hub id is ``name`` or ``org/name``)."""
    return (location.startswith((".", "/", "~")) or location.count("/") > 1 or os.sep != "/" and os.sep in location
            or location.rsplit(".", 1)[-1].lower() in FILE_BUILDERS)


def load_with_datasets(location: str, split: str | None) -> Any:
    """``datasets.load_dataset(location, split=...)``: a Hub id, or a local folder laid out as a
    Hub dataset repository (data files, optional README.md configs). One call for both, so a
    local folder exercises the Hub path offline."""
    import datasets

    return datasets.load_dataset(location, split=split or "train")


def _load_raw(path: str) -> Any:
    """The dataset an entry of ``dataset`` names, as ``datasets`` loads it: a json/jsonl/parquet
    file, a ``save_to_disk`` folder (``load_from_disk``; a saved DatasetDict gives its
    ``train`` split or the one named), another folder or a Hub id (:func:`load_with_datasets`).
    Any failure is one :class:`~mmtune.errors.DataError` line that names the entry and, for a
    JSON or JSONL file, the line and column of the first bad line
    (:func:`~mmtune.data.problems.diagnose_json`)."""
    import datasets

    location, split = split_entry(path)
    try:
        if os.path.isdir(location) and _is_saved_dataset(location):
            loaded = datasets.load_from_disk(location)
            if isinstance(loaded, datasets.DatasetDict):
                name = split or "train"
                if name not in loaded:
                    raise DataError(f"dataset {path!r}: no split {name!r} (it has {', '.join(loaded)}); "
                                    f"name one as {location}:SPLIT")
                return loaded[name]
            if split:
                raise DataError(f"dataset {path!r}: a dataset saved with save_to_disk has no splits; drop ':{split}'")
            return loaded
        if os.path.isdir(location):
            return load_with_datasets(location, split)
        if os.path.isfile(location):
            builder = FILE_BUILDERS.get(location.rsplit(".", 1)[-1].lower())
            if builder is None:
                raise DataError(f"dataset {path!r}: unsupported file type (json, jsonl, parquet, a saved dataset "
                                "folder, a folder of data files or a Hub id)")
            return datasets.load_dataset(builder, data_files=location, split=split or "train")
        if _looks_local(location):
            raise DataError(f"dataset {path!r}: no such file or folder (relative paths start in {os.getcwd()}); "
                            "fix the path in `dataset`")
    except DataError:
        raise
    except Exception as exc:  # datasets' own errors (generation, file format, a bare StopIteration), each its own class
        raise DataError(file_problem(path, exc)) from exc
    try:
        return load_with_datasets(location, split)
    except Exception as exc:  # not found, offline, gated, unknown split: each its own class
        raise DataError(f"dataset {path!r}: not a local file or folder, and loading it as a Hugging Face Hub "
                        f"dataset failed: {_one_line(exc)}") from exc


def default_media_dir(path: str) -> str | None:
    """Where relative media paths of entry ``path`` point when ``media_dir`` is unset: the
    folder of a file (or of a saved dataset's folder), a Hub-layout folder itself, and for a
    Hub id nothing (paths are taken as given)."""
    location, _ = split_entry(path)
    if os.path.isfile(location) or (os.path.isdir(location) and _is_saved_dataset(location)):
        return os.path.dirname(os.path.abspath(location))
    if os.path.isdir(location):
        return os.path.abspath(location)
    return None


def _decodable(feature: Any) -> bool:
    """An Image, Audio or Video feature (the features ``datasets`` decodes on access)."""
    import datasets

    return isinstance(feature, (datasets.Image, datasets.Audio, datasets.Video))


def _undecoded_feature(feature: Any) -> Any:
    """``feature`` with every Image/Audio/Video inside it set to ``decode=False``."""
    import datasets

    if _decodable(feature) and feature.decode:
        return dataclasses.replace(feature, decode=False)
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return dataclasses.replace(feature, feature=_undecoded_feature(feature.feature))
    if isinstance(feature, dict):
        return {key: _undecoded_feature(value) for key, value in feature.items()}
    return feature


def undecoded(dataset: Any) -> Any:
    """``dataset`` whose media features read as ``{"bytes", "path"}`` dicts instead of decoded
    PIL images, arrays or video readers: tokenising needs headers only, and the collator
    decodes at batch time. Only the features change; the Arrow data is shared, not cast or
    rewritten (``cast_column`` rewrites every row of a list-of-Image column)."""
    import datasets
    from datasets.fingerprint import Hasher

    features = datasets.Features({name: _undecoded_feature(f) for name, f in dataset.features.items()})
    if features == dataset.features:
        return dataset
    info = dataset.info.copy()
    info.features = features
    return datasets.Dataset(dataset.data, info=info, split=dataset.split, indices_table=dataset._indices,
                            fingerprint=Hasher.hash([dataset._fingerprint, "mmtune-undecoded"]))


def load_samples(path: str, max_samples: int | None = None) -> Any:
    """The rows of entry ``path`` (see :func:`_load_raw`), media undecoded (:func:`undecoded`),
    the first ``max_samples`` when set."""
    ds = undecoded(_load_raw(path))
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))  # contiguous: a slice, no index mapping
    return ds


def _holds_bytes(feature: Any) -> bool:
    """Whether a column of this feature carries media in the dataset itself (an Image /
    Audio / Video feature, a struct with a binary ``bytes`` or an ``array`` field) rather
    than paths."""
    import datasets

    if _decodable(feature):
        return True
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return _holds_bytes(feature.feature)
    if isinstance(feature, dict):
        raw = feature.get("bytes")
        return "array" in feature or (isinstance(raw, datasets.Value) and "binary" in raw.dtype)
    return False


def embedded_columns(dataset: Any) -> dict[str, str]:
    """Per media kind, the source column whose embedded media the tokenised dataset reads back
    at batch time (the first of :data:`~mmtune.data.formats.MEDIA_COLUMNS` that holds bytes)."""
    out = {}
    for kind, names in MEDIA_COLUMNS.items():
        for name in names:
            if name in dataset.features and _holds_bytes(dataset.features[name]):
                out[kind] = name
                break
    return out


def _stored_media(row: dict[str, Any], items: list[Any], kind: str, column: str | None) -> list[str]:
    """What the tokenised dataset stores for a sample's media of one kind: paths as they are,
    :data:`FROM_EMBEDDED` for an entry of the source column that rides along, and any other
    in-memory media (e.g. inside content parts) as a data URI."""
    carried = 0
    if column is not None and media_column(row, kind) == column:
        value = row[column]
        carried = len(value) if isinstance(value, (list, tuple)) else 1
    return [FROM_EMBEDDED if k < carried and not isinstance(item, str) else media_reference(item, kind[:-1])
            for k, item in enumerate(items)]


def mix_datasets(parts: list[Any], data_args: DataArguments) -> Any:
    """One dataset from several: concatenated, or interleaved by ``dataset_ratios``."""
    import datasets

    strategy = data_args.mix_strategy
    if data_args.dataset_ratios and strategy == "concat":
        strategy = "interleave_under"
    if strategy not in ("concat", "interleave_under", "interleave_over"):
        raise DataError(f"mix_strategy must be concat, interleave_under or interleave_over, not {strategy!r}")
    if len(parts) == 1:
        return parts[0]
    if strategy == "concat":
        return datasets.concatenate_datasets(parts)
    weights = [float(w) for w in data_args.dataset_ratios.split(",")] if data_args.dataset_ratios else [1.0] * len(parts)
    if len(weights) != len(parts) or any(w < 0 for w in weights) or not sum(weights):
        raise DataError(f"dataset_ratios={data_args.dataset_ratios!r}: need {len(parts)} non-negative weights "
                         f"(one per dataset in {data_args.dataset!r})")
    total = sum(weights)
    stopping = "first_exhausted" if strategy == "interleave_under" else "all_exhausted"
    mixed = datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=data_args.mix_seed,
                                         stopping_strategy=stopping)
    logger.info("mixed %s with weights %s (%s): %d samples", data_args.dataset, weights, stopping, len(mixed))
    return mixed


#: rows per ``datasets.map`` call: one Python call and one Arrow conversion per batch, not per row
MAP_BATCH_SIZE = 256


def encoded_features(preference: str | None = None) -> Any:
    """The tokenised columns' types, given to ``datasets.map`` so that it neither infers them
    nor scans every id for mixed types (datasets 5 does that per batch: it cost a third of the
    pass). The ids come as numpy arrays, which Arrow takes without a per-int Python loop.

    Beside the ids and media: ``dropped`` (why a sample was dropped, else empty), ``error``
    (why it cannot be used, else empty: the map records it instead of raising, so that every
    bad sample is reported at once), ``notes`` (:attr:`EncodeResult.notes`), and where the
    sample comes from, ``sample_index`` and ``source`` (the ``dataset`` entry): the collator
    names a sample whose media fail at batch time by them.

    ``preference`` ``pairs`` adds the rejected answer's ids (``rejected_input_ids``,
    ``rejected_labels``; ``input_ids`` and ``labels`` are the chosen one's); ``kto`` adds
    ``kto_label`` (1: desirable)."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    extra: dict[str, Any] = {}
    if preference == "pairs":
        extra = {"rejected_input_ids": seq(datasets.Value("int32")), "rejected_labels": seq(datasets.Value("int64"))}
    elif preference == "kto":
        extra = {"kto_label": datasets.Value("int8")}
    return datasets.Features({**extra,
        "input_ids": seq(datasets.Value("int32")), "labels": seq(datasets.Value("int64")),
        "images": seq(datasets.Value("string")), "videos": seq(datasets.Value("string")),
        "audios": seq(datasets.Value("string")), "dropped": datasets.Value("string"),
        "error": datasets.Value("string"),
        "notes": seq({"kind": datasets.Value("string"), "detail": datasets.Value("string")}),
        "sample_index": datasets.Value("int64"), "source": datasets.Value("string"),
    })


#: columns of the tokenising pass that only report; gone from the datasets build_dataset returns
REPORT_COLUMNS = ("dropped", "error", "notes")
#: content-part fields that hold a media reference (OpenAI-style messages)
PART_MEDIA_FIELDS = frozenset({"image", "image_url", "video", "audio", "input_audio", "url", "path"})
#: what each kind of :attr:`EncodeResult.notes` means, for the log and ``check-data``
NOTE_KINDS = {
    "truncated": "answers cut by cutoff_len",
    "audio_cut": "audio longer than the model takes, cut",
    "empty_answer": "empty answers kept (keep_empty_answers)",
    "large_image": "images over PIL's decompression-bomb warning limit (decoding them takes much memory)",
}


def _strings(array: Any, take: bool, fields: frozenset[str] | None) -> Iterator[str]:
    """Every string of an Arrow array: through lists and struct fields (all but ``bytes``, or
    only the fields in ``fields`` and whatever nests below them); strings outside such a field
    are taken when ``take``."""
    import pyarrow as pa

    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if take:
            yield from (x for x in array.to_pylist() if x)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        yield from _strings(array.flatten(), take, fields)
    elif pa.types.is_struct(kind):
        for i in range(kind.num_fields):
            name = kind.field(i).name
            if name not in ("bytes", "array"):
                yield from _strings(array.field(i), take or (fields is not None and name in fields),
                                    None if fields is not None and name in fields else fields)


def media_signature(dataset: Any, media_dir: str | None) -> str:
    """A digest of (path, size, mtime) of every local media file the rows reference, in their
    media columns and content parts: part of the tokenising pass's fingerprint, so replacing
    an image after a run tokenises again instead of reusing ids counted from the old file's
    size. One ``os.stat`` a file; embedded media are part of the dataset's own fingerprint."""
    media = {name for names in MEDIA_COLUMNS.values() for name in names}
    columns = [name for name in dataset.column_names if name in media or name in ("conversations", "messages")]
    if not columns:
        return ""
    table = dataset.select_columns(columns).with_format("arrow")[:]
    paths: dict[str, None] = {}
    for name in columns:
        is_media = name in media
        for chunk in table.column(name).chunks:
            for item in _strings(chunk, is_media, None if is_media else PART_MEDIA_FIELDS):
                paths[item] = None
    digest = hashlib.sha256()
    for item in paths:
        if item.startswith(("data:", "http://", "https://")):
            continue
        path = os.path.join(media_dir, item) if media_dir and not os.path.isabs(item) else item
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except (OSError, ValueError):
            digest.update(f"{path}\0-\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _reason_key(reason: str) -> str:
    """A drop reason without its numbers: reasons that differ only in counts group together."""
    return re.sub(r"\d+", "#", reason)


def _nonempty(encoded: Any, column: str) -> tuple[list[int], list[str]]:
    """Rows of a freshly mapped dataset (no index mapping) whose string ``column`` is not
    empty, and those values; read in Arrow (a Python list of every row costs more than the
    tokenising pass's own bookkeeping), nothing copied when all are empty."""
    import pyarrow.compute as pc

    values = encoded.data.column(column)
    rows = pc.indices_nonzero(pc.not_equal(values, "")).to_pylist()
    return rows, (values.take(rows).to_pylist() if rows else [])


def _log_outcomes(path: str, encoded: Any) -> list[int] | None:
    """Log a dataset's dropped samples (one warning a reason) and notes (one a kind), each with
    its count and first example by sample index and line; return the rows kept (None: all)."""
    import pyarrow.compute as pc

    total = len(encoded)
    dropped_rows, reasons = _nonempty(encoded, "dropped")
    groups: dict[str, list[tuple[int, str]]] = {}
    for row, reason in zip(dropped_rows, reasons):
        groups.setdefault(_reason_key(reason), []).append((row, reason))
    notes = encoded.data.column("notes")
    by_kind: dict[str, list[tuple[int, str]]] = {}
    if pc.sum(pc.list_value_length(notes)).as_py():
        flat = pc.list_flatten(notes)
        owners = pc.list_parent_indices(notes).to_pylist()
        details = pc.struct_field(flat, "detail").to_pylist()
        for k, kind in enumerate(pc.struct_field(flat, "kind").to_pylist()):
            by_kind.setdefault(kind, []).append((owners[k], details[k]))
    if not groups and not by_kind:
        return None
    firsts = [items[0][0] for items in groups.values()] + [items[0][0] for items in by_kind.values()]
    index_of = dict(zip(firsts, encoded.data.column("sample_index").take(firsts).to_pylist()))
    lines = sample_lines(path, index_of.values())
    for items in groups.values():
        row, reason = items[0]
        logger.warning("%s: dropped %d of %d samples: %s (first: %s)", path, len(items), total, reason,
                       where(index_of[row], path, lines.get(index_of[row])))
    for kind, items in by_kind.items():
        row, detail = items[0]
        logger.warning("%s: %d of %d samples: %s (first: %s: %s)", path, len({r for r, _ in items}), total,
                       NOTE_KINDS.get(kind, kind), where(index_of[row], path, lines.get(index_of[row])), detail)
    if not groups:
        return None
    dropped = set(dropped_rows)
    return [row for row in range(total) if row not in dropped]


def sample_media(feature: dict[str, Any], kind: str) -> list[Any]:
    """A tokenised sample's media of ``kind`` (images, videos, audios) as the media loaders
    take them: the stored entries, each :data:`FROM_EMBEDDED` replaced by the entry at the
    same position of the row's ``embedded_<kind>`` value (a list, or one item for a
    single-media column)."""
    stored = list(feature.get(kind) or [])
    wanted = [k for k, item in enumerate(stored) if isinstance(item, str) and item == FROM_EMBEDDED]
    if not wanted:
        return stored
    carried = feature.get(EMBEDDED_PREFIX + kind)
    carried = [] if carried is None else list(carried) if isinstance(carried, (list, tuple)) else [carried]
    if wanted[-1] >= len(carried):
        raise MediaError(f"{len(wanted)} {kind} of this sample refer to its {EMBEDDED_PREFIX}{kind} column, which holds "
                         f"{len(carried)}: the tokenised cache does not match the dataset; rebuild it (overwrite_cache: true)")
    for k in wanted:
        stored[k] = carried[k]
    return stored


def _as_list_feature(feature: Any) -> Any:
    import datasets

    return feature if isinstance(feature, (datasets.List, datasets.LargeList)) else datasets.List(feature)


def _align_embedded(parts: list[Any], names: list[str]) -> list[Any]:
    """Give every part the same ``embedded_*`` columns of the same type, so that they can be
    concatenated or interleaved: a part without one gets an all-null column (nothing
    written); parts whose types differ (one image per row beside a list, Image beside a
    plain struct) are rewritten to a list of the first part's type (logged: it copies them)."""
    import datasets

    columns = sorted({c for p in parts for c in p.column_names if c.startswith(EMBEDDED_PREFIX)})
    for column in columns:
        holders = [i for i, p in enumerate(parts) if column in p.column_names]
        target = parts[holders[0]].features[column]
        if any(parts[i].features[column] != target for i in holders):
            target = _as_list_feature(target)
            for i in holders:
                if parts[i].features[column] == target:
                    continue
                logger.info("%s: rewriting its %s column as %s to mix it with the other datasets", names[i], column,
                            target)
                features = datasets.Features({**parts[i].features, column: target})

                def as_list(batch: dict[str, list[Any]], _column: str = column) -> dict[str, list[Any]]:
                    return {_column: [[] if v is None else v if isinstance(v, list) else [v] for v in batch[_column]]}

                try:
                    parts[i] = parts[i].map(as_list, batched=True, features=features, desc=f"aligning {column}")
                except Exception as exc:  # the feature's own encoder refused a value
                    raise DataError(f"dataset {names[i]!r}: its {column} ({parts[i].features[column]}) cannot be mixed "
                                     f"with {names[holders[0]]!r}'s ({target}): {_one_line(exc)}") from exc
        for i, part in enumerate(parts):
            if column not in part.column_names:
                parts[i] = part.add_column(column, [None] * len(part), feature=target)
    return parts


def encode_preference(row: dict[str, Any], preference: str, media_dir: str | None, data_args: DataArguments,
                       template: Any, plugin: Any, tokenizer: Any, processor: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(the sample whose media are stored, the encoding of its chosen / only answer, the extra
    columns) of a preference row: each answer encoded after the shared prompt, the loss on the
    last answer only. A pair with a dropped side is dropped, the side named."""
    pref = normalize_preference(row, preference, media_dir)

    def encode(sample: Any) -> Any:
        return encode_sample(sample, template, plugin, tokenizer, processor, data_args.cutoff_len, False, True,
                             data_args.drop_overlong, keep_empty_answers=False)

    chosen = encode(pref.chosen)
    if preference == "kto":
        return pref.chosen, chosen, {"kto_label": int(bool(pref.desirable))}
    rejected = encode(pref.rejected)
    for side, result in (("chosen", chosen), ("rejected", rejected)):
        if result.dropped:
            chosen = dataclasses.replace(chosen, dropped=f"{side} answer: {result.dropped}")
            break
    chosen.notes += [(kind, f"rejected answer: {detail}") for kind, detail in rejected.notes]
    return pref.chosen, chosen, {"rejected_input_ids": np.asarray(rejected.input_ids, dtype=np.int32),
                                 "rejected_labels": np.asarray(rejected.labels, dtype=np.int64)}


def _encode_batch(batch: dict[str, list[Any]], indices: list[int], *, path: str, media_dir: str | None,
                  carried: dict[str, str], data_args: DataArguments, template: Any, plugin: Any, tokenizer: Any,
                  processor: Any, features: Any, preference: str | None = None) -> dict[str, list[Any]]:
    """One ``datasets.map`` batch: every row normalised and encoded in its own
    :func:`~mmtune.media.sample_context`. Whatever a row raises (any type: a malformed row, a
    media header, the processor, the template) is recorded in its ``error`` column, never
    raised, so one pass finds every bad sample."""
    out: dict[str, list[Any]] = {name: [] for name in features}
    keys = list(batch)
    empty_ids, empty_labels = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    for index, values in zip(indices, zip(*(batch[k] for k in keys))):
        row = dict(zip(keys, values))
        stored: dict[str, list[str]] = {kind: [] for kind in MEDIA_COLUMNS}
        extra: dict[str, Any] = {}
        try:
            with sample_context(index, path):
                if preference:
                    sample, result, extra = encode_preference(row, preference, media_dir, data_args, template,
                                                               plugin, tokenizer, processor)
                else:
                    sample = normalize_row(row, media_dir)
                    result = encode_sample(sample, template, plugin, tokenizer, processor, data_args.cutoff_len,
                                           data_args.train_on_prompt, data_args.mask_history, data_args.drop_overlong,
                                           keep_empty_answers=data_args.keep_empty_answers)
                if not result.dropped:
                    for kind in MEDIA_COLUMNS:
                        stored[kind] = _stored_media(row, getattr(sample, kind), kind, carried.get(kind))
        except Exception as exc:  # any type: recorded with the sample, reported with its line after the pass
            out["error"].append(cause(exc, index, path))
            out["dropped"].append("")
            out["notes"].append([])
            out["input_ids"].append(empty_ids)
            out["labels"].append(empty_labels)
            extra = {"rejected_input_ids": empty_ids, "rejected_labels": empty_labels, "kto_label": 0}
        else:
            out["error"].append("")
            out["dropped"].append(result.dropped or "")
            out["notes"].append([{"kind": kind, "detail": detail} for kind, detail in result.notes])
            out["input_ids"].append(np.asarray(result.input_ids, dtype=np.int32))
            out["labels"].append(np.asarray(result.labels, dtype=np.int64))
        for name in ("rejected_input_ids", "rejected_labels", "kto_label"):
            if name in out:
                out[name].append(extra.get(name, empty_ids if name != "kto_label" else 0))
        for kind in MEDIA_COLUMNS:
            out[kind].append(stored[kind])
        out["sample_index"].append(index)
        out["source"].append(path)
    return out


#: what every data error that lists samples ends with
CHECK_HINT = "run `mmtune check-data CONFIG` (same config and overrides) for the full report"


def build_dataset(data_args: DataArguments, template: Any, plugin: Any, tokenizer: Any, processor: Any,
                  preference: str | None = None) -> dict[str, Any]:
    """Tokenised ``train`` (and ``eval`` when ``val_size`` > 0) datasets; dropped samples and
    notes are counted and logged per dataset, never silently lost. Embedded media stay in
    their source's Arrow file (see the module's docstring).

    Runs before the model loads, so that bad data stop a run before anything heavy: every
    dataset that cannot be read and every sample that cannot be used (the checks of
    ``mmtune check-data`` but full media decoding) is collected, then raised as one
    :class:`~mmtune.data.problems.BadSamplesError` listing the first ten by sample index,
    file and line; so is a dataset with no samples, or none left after dropping, and an empty
    training set. The tokenising pass is cached by ``datasets`` under a fingerprint that
    covers the config and the referenced media files' sizes and times (:func:`media_signature`).

    ``preference`` (``pairs``, ``kto``) reads preference rows
    (:func:`~mmtune.data.formats.normalize_preference`) into the columns
    :func:`encoded_features` lists for it."""
    import datasets

    if preference is not None and preference not in PREFERENCE_KINDS:
        raise ValueError(f"preference must be one of {PREFERENCE_KINDS}, not {preference!r}")
    features = encoded_features(preference)
    parts, keeps, names = [], [], []
    problems: list[str] = []
    total_problems = 0
    entries = [p.strip() for p in data_args.dataset.split(",") if p.strip()]
    if not entries:
        raise DataError("no dataset given: set `dataset` to a json/jsonl/parquet file, a folder or a Hub id")
    for path in entries:
        try:
            raw = load_samples(path, data_args.max_samples)
        except DataError as exc:
            problems.append(str(exc))
            total_problems += 1
            continue
        if len(raw) == 0:
            problems.append(f"dataset {path!r}: no samples (it holds no rows); add samples or remove it from `dataset`")
            total_problems += 1
            continue
        media_dir = data_args.media_dir or default_media_dir(path)
        carried = embedded_columns(raw)
        signature = media_signature(raw, media_dir)

        def encode(batch: dict[str, list[Any]], indices: list[int], _path: str = path, _dir: str | None = media_dir,
                   _carried: dict[str, str] = carried, _media_signature: str = signature,
                   _preference: str | None = preference) -> dict[str, list[Any]]:
            return _encode_batch(batch, indices, path=_path, media_dir=_dir, carried=_carried, data_args=data_args,
                                 template=template, plugin=plugin, tokenizer=tokenizer, processor=processor,
                                 features=features, preference=_preference)

        try:
            encoded = raw.map(encode, with_indices=True, batched=True, batch_size=MAP_BATCH_SIZE, features=features,
                              remove_columns=raw.column_names, num_proc=data_args.preprocessing_num_workers,
                              load_from_cache_file=not data_args.overwrite_cache,
                              desc=f"tokenising {os.path.basename(path)}")
        except Exception as exc:  # rows that cannot be read at all (invalid UTF-8 in a JSON file): the file's line
            problem = file_problem(path, exc)
            if problem.startswith(f"dataset {path!r}: could not be read"):
                raise  # nothing wrong with the file that the json module sees: not a data error
            problems.append(problem)
            total_problems += 1
            continue
        error_rows, causes = _nonempty(encoded, "error")
        if error_rows:
            errors = list(zip(encoded.data.column("sample_index").take(error_rows).to_pylist(), causes))
            total_problems += len(errors)
            room = max(0, MAX_LISTED - len(problems))
            problems.extend(name_samples(path, errors[:room]))
            continue
        if carried:
            columns = raw.select_columns(list(carried.values())).rename_columns(
                {column: EMBEDDED_PREFIX + kind for kind, column in carried.items()})
            if len(columns) != len(encoded):
                raise DataError(f"dataset {path!r}: the tokenised cache has {len(encoded)} rows, the dataset "
                                f"{len(columns)}; rebuild it (overwrite_cache: true)")
            encoded = datasets.concatenate_datasets([encoded, columns], axis=1)
            logger.info("%s: embedded %s read at batch time from the dataset's own files", path,
                        ", ".join(f"{kind} ({column!r})" for kind, column in carried.items()))
        keep = _log_outcomes(path, encoded)
        if keep is not None and not keep:
            first = _nonempty(encoded, "dropped")[1][0]
            problems.append(f"dataset {path!r}: all {len(encoded)} samples were dropped (e.g. {first}); "
                            f"{CHECK_HINT}")
            total_problems += 1
            continue
        parts.append(encoded.remove_columns(list(REPORT_COLUMNS)))
        keeps.append(keep)
        names.append(path)
    if problems:
        raise BadSamplesError(listing(problems, total_problems, CHECK_HINT))
    parts = _align_embedded(parts, names)
    parts = [part if keep is None else part.select(keep) for part, keep in zip(parts, keeps)]
    dataset = mix_datasets(parts, data_args)
    if len(dataset) == 0:
        raise DataError(f"the training set is empty after mixing {data_args.dataset!r} (mix_strategy="
                        f"{data_args.mix_strategy}, dataset_ratios={data_args.dataset_ratios}); give the datasets "
                        "non-zero weights")
    if data_args.val_size:
        try:
            split = dataset.train_test_split(test_size=data_args.val_size, seed=0)
        except ValueError as exc:  # datasets' own check of the sizes
            raise DataError(f"val_size={data_args.val_size}: cannot hold out that many of the {len(dataset)} samples "
                            f"({_one_line(exc)}); lower val_size") from exc
        if len(split["train"]) == 0:
            raise DataError(f"val_size={data_args.val_size} leaves no training samples of {len(dataset)}; lower it")
        return {"train": split["train"], "eval": split["test"]}
    return {"train": dataset}
