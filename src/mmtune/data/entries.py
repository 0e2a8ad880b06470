"""How a ``dataset:`` entry names its data (a leaf module: the loader and the problem
diagnosis both read entries, and neither imports the other for it)."""

from __future__ import annotations

import os


def split_entry(entry: str) -> tuple[str, str | None]:
    """``entry`` as (location, split): ``org/name:validation`` -> (``org/name``, ``validation``).
    An existing local path is taken whole (a path may hold a colon); the split may carry a
    slice (``train[:1000]``)."""
    if os.path.exists(entry) or ":" not in entry:
        return entry, None
    location, split = entry.split(":", 1)
    return location, split or None
