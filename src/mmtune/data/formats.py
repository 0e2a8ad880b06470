"""ShareGPT, OpenAI-messages and Alpaca rows normalised into one :class:`Sample`.

A row that cannot be read as one conversation (a ``conversations`` that is not a list of
turns, a turn without a role or text, two user turns in a row, ...) raises :class:`RowError`
naming the turn and saying what is expected: nothing is dropped, merged or reordered to make
it fit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmtune.errors import DataError
from mmtune.media import MediaError
from mmtune.plugins import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from mmtune.templates import conversation_problem

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}
PART_PLACEHOLDER = {"image": IMAGE_PLACEHOLDER, "image_url": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER,
                    "audio": AUDIO_PLACEHOLDER, "input_audio": AUDIO_PLACEHOLDER}


class RowError(DataError, MediaError):
    """A row that cannot be read as one conversation. A :class:`~mmtune.errors.DataError` (the
    CLI prints it as one line) and a :class:`~mmtune.media.MediaError` (inside
    :func:`~mmtune.media.sample_context` the message starts with the sample and file)."""


@dataclass
class Sample:
    messages: list[dict[str, str]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)
    system: str | None = None
    #: each message's 1-based turn number in the row (system turns counted), for messages that
    #: name a turn; empty: the messages' own order
    positions: list[int] = field(default_factory=list)

    def turn_number(self, index: int) -> int:
        """The row's number for ``messages[index]``."""
        return self.positions[index] if index < len(self.positions) else index + 1


#: the columns a row's media are read from, by kind, first found wins
MEDIA_COLUMNS = {"images": ("images", "image"), "videos": ("videos", "video"), "audios": ("audios", "audio")}


def _resolve(item: Any, media_dir: str | None) -> Any:
    """Relative paths are relative to ``media_dir``; URLs, data URIs and embedded media pass
    through. A ``{"bytes", "path"}`` dict (a ``datasets`` Image/Audio/Video column read
    undecoded) stays a dict when it carries bytes, the bytes winning over its path (often
    only the original file name); without bytes it is its path."""
    if isinstance(item, dict):
        if item.get("path") and item.get("bytes") is None and item.get("array") is None:
            return _resolve(item["path"], media_dir)
        if "url" in item:
            return _resolve(item["url"], media_dir)
        return item
    if isinstance(item, os.PathLike):
        item = os.fspath(item)
    if isinstance(item, str) and media_dir and not os.path.isabs(item) and not item.startswith(("data:", "http://", "https://")):
        return os.path.join(media_dir, item)
    return item


def media_column(row: dict[str, Any], kind: str) -> str | None:
    """The column :func:`normalize_row` reads ``kind`` (images, videos, audios) from in
    ``row``: the first of :data:`MEDIA_COLUMNS` that holds anything."""
    for name in MEDIA_COLUMNS[kind]:
        value = row.get(name)
        if value is not None and not (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0):
            return name
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _what(value: Any) -> str:
    """A short description of a value of the wrong type: its type and, when short, itself."""
    if value is None:
        return "null (missing)"
    kind = type(value).__name__
    article = "an" if kind[:1] in "aeiou" else "a"
    if isinstance(value, Mapping):
        return f"a dict (keys: {', '.join(map(str, value))})"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    text = repr(value)
    return f"{article} {kind} ({text})" if len(text) <= 40 else f"{article} {kind}"


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    """The value of the first of ``keys`` that ``mapping`` holds and is not None. Rows of one
    file that spell turns differently ({from, value} beside {role, content}) come out of
    Arrow with every key in every turn, the absent ones None."""
    for key in keys:
        value = mapping.get(key)
        if value is not None:
            return value
    return None


#: the content-part types, with the key each keeps its medium under
PART_TYPES = "text, image, image_url, video, audio, input_audio"
_BUCKET = {"image": "images", "image_url": "images", "video": "videos", "audio": "audios", "input_audio": "audios"}


def _parts_to_text(content: Any, media: dict[str, list[Any]], turn: int) -> str:
    """A turn's text with placeholders: a string as it is, OpenAI-style content parts joined
    (each medium collected in order, its placeholder in its place)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise RowError(f"the content of turn {turn} is {_what(content)}: expected a string or a list of content parts "
                       "such as {\"type\": \"text\", \"text\": ...} and {\"type\": \"image\", \"image\": ...}")
    pieces = []
    for j, part in enumerate(content, 1):
        if not isinstance(part, Mapping):
            raise RowError(f"content part {j} of turn {turn} is {_what(part)}: expected a dict such as "
                           "{\"type\": \"text\", \"text\": ...} or {\"type\": \"image\", \"image\": ...}")
        kind = part.get("type") or "text"
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise RowError(f"content part {j} of turn {turn} is a text part whose text is {_what(text)}: "
                               "expected a string under \"text\"")
            pieces.append(text)
        elif kind in PART_PLACEHOLDER:
            value = part.get(kind)
            if isinstance(value, Mapping) and "url" in value:
                value = value["url"]
            if value is None:
                raise RowError(f"content part {j} of turn {turn} is of type {kind!r} but holds no {kind}: put the "
                               f"file path, URL or bytes under {kind!r}")
            media[_BUCKET[kind]].append(value)
            pieces.append(PART_PLACEHOLDER[kind])
        else:
            raise RowError(f"content part {j} of turn {turn} has the unknown type {kind!r}: "
                           f"expected one of {PART_TYPES}")
    return "".join(pieces)


def _turn_list(turns: Any, key: str) -> list[Any]:
    """The row's turns as a list. A dict of equal-length lists (a ``datasets.Sequence`` of
    turns, stored column-wise) is read turn by turn."""
    if isinstance(turns, Mapping) and turns and all(isinstance(v, (list, tuple)) for v in turns.values()):
        lengths = {len(v) for v in turns.values()}
        if len(lengths) == 1 and ({"role", "from"} & set(turns)):
            n = lengths.pop()
            return [{k: v[i] for k, v in turns.items()} for i in range(n)]
    if not isinstance(turns, (list, tuple)):
        raise RowError(f"{key} must be a list of {{from, value}} or {{role, content}} turns, got {_what(turns)}")
    return list(turns)


def _conversation(turns: list[Any], media: dict[str, list[Any]]) -> tuple[list[dict[str, str]], list[int], str | None]:
    """(messages, their turn numbers, the system turn's text) of a list of turns."""
    messages: list[dict[str, str]] = []
    positions: list[int] = []
    system = None
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, Mapping):
            raise RowError(f"turn {k} is {_what(turn)}: expected a {{from, value}} or {{role, content}} dict")
        role = _first(turn, "role", "from")
        if role is None:
            raise RowError(f"turn {k} has no role: expected a 'role' or 'from' key (keys: {', '.join(map(str, turn))})")
        if not isinstance(role, str) or role not in ROLES:
            raise RowError(f"turn {k} has the unknown role {role!r}: expected one of {', '.join(ROLES)}")
        content = _first(turn, "content", "value")
        if content is None:
            raise RowError(f"turn {k} ({role}) has no text: its 'content' or 'value' is missing or null")
        text = _parts_to_text(content, media, k)
        if ROLES[role] == "system":
            system = text
        messages.append({"role": ROLES[role], "content": text})
        positions.append(k)
    problem = conversation_problem([m["role"] for m in messages], positions)
    if problem:
        raise RowError(problem)
    keep = [i for i, m in enumerate(messages) if m["role"] != "system"]  # checked: only ever the first
    return [messages[i] for i in keep], [positions[i] for i in keep], system


def _alpaca(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """An Alpaca row (instruction, optional input, output) as one user turn and its answer."""
    instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
    if not isinstance(instruction, str):
        raise RowError(f"the Alpaca row's instruction is {_what(instruction)}: expected a string")
    if extra is not None and not isinstance(extra, str):
        raise RowError(f"the Alpaca row's input is {_what(extra)}: expected a string (or no input)")
    if not isinstance(output, str):
        raise RowError(f"the Alpaca row's output is {_what(output)}: expected the answer as a string")
    prompt = instruction + (("\n" + extra) if extra else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def normalize_row(row: dict[str, Any], media_dir: str | None = None) -> Sample:
    """One dataset row (any supported format) as a :class:`Sample`; :class:`RowError` for a row
    that is not one well-formed conversation (see :func:`~mmtune.templates.conversation_problem`).
    A conversation may end with a user turn here (a generation prompt); training refuses it."""
    media: dict[str, list[Any]] = {}
    for kind in MEDIA_COLUMNS:
        column = media_column(row, kind)
        media[kind] = _as_list(row[column]) if column else []
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError(f"the row's system is {_what(system)}: expected a string")
    key = next((k for k in ("conversations", "messages") if row.get(k) is not None and (
        not isinstance(row[k], (list, tuple, dict, str)) or len(row[k]))), None)
    positions: list[int] = []
    if key is not None:
        messages, positions, turn_system = _conversation(_turn_list(row[key], key), media)
        if turn_system is not None:
            if system and system != turn_system:
                raise RowError("the row has both a system column and a system turn, and they differ: keep one")
            system = turn_system
    elif row.get("instruction") is not None or ("instruction" in row and not any(
            k in row for k in ("conversations", "messages"))):
        messages = _alpaca(row)
        positions = [1, 2]
    elif any(k in row for k in ("conversations", "messages")):
        empty = next(k for k in ("conversations", "messages") if k in row)
        raise RowError(f"the row's {empty} is empty: it needs a user turn and the assistant's answer")
    else:
        raise RowError(f"row has neither conversations/messages nor instruction (keys: {', '.join(sorted(row))})")
    return Sample(
        messages=messages,
        images=[_resolve(x, media_dir) for x in media["images"]],
        videos=[_resolve(x, media_dir) for x in media["videos"]],
        audios=[_resolve(x, media_dir) for x in media["audios"]],
        system=system,
        positions=positions,
    )


#: what a preference stage reads from a row: ``pairs`` (stage dpo) or ``kto`` (unpaired, marked answers)
PREFERENCE_KINDS = ("pairs", "kto")


@dataclass
class PreferenceSample:
    """A preference row as samples sharing one prompt and its media: ``chosen`` and ``rejected``
    (a pair, stage dpo), or ``chosen`` alone with ``desirable`` (stage kto: the answer is good
    or bad). Each sample is the whole conversation ending with its answer."""

    chosen: Sample
    rejected: Sample | None = None
    desirable: bool | None = None


def _answer_turns(value: Any, name: str) -> list[Any]:
    """A row's answer (``chosen``, ``rejected``, ``completion``) as turns: a string is one
    assistant turn, a dict one turn, a list its turns (TRL's conversational form)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, (list, tuple)) and value:
        return list(value)
    raise RowError(f"the row's {name} is {_what(value)}: expected the answer as a string, a "
                   "{\"role\": \"assistant\", \"content\": ...} turn or a list of turns")


def _column_parts(turns: list[Any]) -> list[Any]:
    """TRL's vision form: content parts ``{"type": "image"}`` that hold no image stand for the
    next item of the row's ``images`` column; they become the placeholder text."""
    out = []
    for turn in turns:
        content = turn.get("content") if isinstance(turn, Mapping) else None
        if isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind in PART_PLACEHOLDER and part.get(kind) is None:
                    part = {"type": "text", "text": PART_PLACEHOLDER[kind]}
                parts.append(part)
            turn = {**turn, "content": parts}
        out.append(turn)
    return out


def _with_answer(row: dict[str, Any], answer: Any, name: str, media_dir: str | None) -> Sample:
    """``row``'s prompt (``conversations`` / ``messages`` or TRL's ``prompt``) followed by ``answer``."""
    base = {k: v for k, v in row.items() if k not in ("chosen", "rejected", "completion", "prompt", "conversations",
                                                      "messages", "kto_tag", "label")}
    key = next((k for k in ("conversations", "messages") if row.get(k) is not None), None)
    if key is not None:
        prompt = _turn_list(row[key], key)
    elif row.get("prompt") is not None:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turn_list(prompt, "prompt")
        key = "messages"
    else:
        raise RowError(f"the preference row has no prompt: expected conversations/messages (ending with the user's "
                       f"turn) or prompt beside {name} (keys: {', '.join(sorted(row))})")
    turns = _column_parts([*prompt, *_answer_turns(answer, name)])
    return normalize_row({**base, key: turns}, media_dir)


def normalize_preference(row: dict[str, Any], kind: str, media_dir: str | None = None) -> PreferenceSample:
    """One preference row as a :class:`PreferenceSample`.

    ``kind`` ``pairs``: the pairwise ShareGPT form (``conversations`` / ``messages`` ending with
    the user's turn, ``chosen`` and ``rejected`` answers beside them, as LLaMA-Factory's ranking
    datasets) or TRL's (``prompt``, ``chosen``, ``rejected``, ``images``). ``kind`` ``kto``: a
    conversation ending with its answer and ``kto_tag`` (LLaMA-Factory), or TRL's ``prompt``,
    ``completion`` and ``label``. Both answers of a pair share the prompt's media: an answer that
    brings media of its own is a :class:`RowError`, as is a missing answer or mark."""
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"kind must be one of {PREFERENCE_KINDS}, not {kind!r}")
    if kind == "pairs":
        missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
        if missing:
            raise RowError(f"the preference row has no {' and no '.join(missing)} answer (keys: "
                           f"{', '.join(sorted(row))}): stage dpo needs both beside the prompt")
        chosen = _with_answer(row, row["chosen"], "chosen", media_dir)
        rejected = _with_answer(row, row["rejected"], "rejected", media_dir)
        for media in ("images", "videos", "audios"):
            if getattr(chosen, media) != getattr(rejected, media):
                raise RowError(f"the chosen and rejected answers bring different {media} "
                               f"({len(getattr(chosen, media))} and {len(getattr(rejected, media))}): the media "
                               "belong to the prompt, which both answers share")
        return PreferenceSample(chosen, rejected)
    mark_key = next((k for k in ("kto_tag", "label") if row.get(k) is not None), None)
    if mark_key is None:
        raise RowError(f"the row has no kto_tag or label (keys: {', '.join(sorted(row))}): stage kto needs each "
                       "answer marked desirable (true) or undesirable (false)")
    mark = row[mark_key]
    if not isinstance(mark, (bool, int)) or isinstance(mark, int) and not isinstance(mark, bool) and mark not in (0, 1):
        raise RowError(f"the row's {mark_key} is {_what(mark)}: expected true (desirable) or false (undesirable)")
    if row.get("completion") is not None:
        sample = _with_answer(row, row["completion"], "completion", media_dir)
    else:
        sample = normalize_row({k: v for k, v in row.items() if k not in ("kto_tag", "label")}, media_dir)
    return PreferenceSample(sample, desirable=bool(mark))
