"""ShareGPT, OpenAI-messages and Alpaca rows normalised into one :class:`Sample`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mmtune.media import MediaError
from mmtune.plugins import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}
PART_PLACEHOLDER = {"image": IMAGE_PLACEHOLDER, "image_url": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER,
                    "audio": AUDIO_PLACEHOLDER, "input_audio": AUDIO_PLACEHOLDER}


@dataclass
class Sample:
    messages: list[dict[str, str]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)
    system: str | None = None


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


def _parts_to_text(content: Any, media: dict[str, list[Any]]) -> str:
    """OpenAI-style content parts -> text with placeholders; media collected in order."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        kind = part.get("type", "text")
        if kind == "text":
            pieces.append(part.get("text", ""))
        elif kind in PART_PLACEHOLDER:
            value = part.get(kind)
            if isinstance(value, dict) and "url" in value:
                value = value["url"]
            bucket = {"image": "images", "image_url": "images", "video": "videos"}.get(kind, "audios")
            media[bucket].append(value)
            pieces.append(PART_PLACEHOLDER[kind])
        else:
            raise MediaError(f"unknown content part type {kind!r}")
    return "".join(pieces)


def normalize_row(row: dict[str, Any], media_dir: str | None = None) -> Sample:
    """One dataset row (any supported format) as a :class:`Sample`."""
    media: dict[str, list[Any]] = {}
    for kind in MEDIA_COLUMNS:
        column = media_column(row, kind)
        media[kind] = _as_list(row[column]) if column else []
    system = row.get("system")
    turns = row.get("conversations") or row.get("messages")
    messages: list[dict[str, str]] = []
    if turns is not None:
        for turn in turns:
            role = turn.get("role", turn.get("from"))
            if role not in ROLES:
                raise MediaError(f"unknown role {role!r} in a conversation")
            content = turn.get("content", turn.get("value", ""))
            text = _parts_to_text(content, media)
            if ROLES[role] == "system":
                system = text
            else:
                messages.append({"role": ROLES[role], "content": text})
    elif "instruction" in row:  # Alpaca
        prompt = row["instruction"] + (("\n" + row["input"]) if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row.get("output", "")}]
    else:
        raise MediaError(f"row has neither conversations/messages nor instruction (keys: {sorted(row)})")
    return Sample(
        messages=messages,
        images=[_resolve(x, media_dir) for x in media["images"]],
        videos=[_resolve(x, media_dir) for x in media["videos"]],
        audios=[_resolve(x, media_dir) for x in media["audios"]],
        system=system,
    )
