"""Errors that name the sample they come from.

The data layer wraps each sample in :func:`sample_context`; every :class:`MediaError`
raised below it (in media loading or in a plugin) then says which sample and which
dataset file was being read, without threading that through every signature.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_SAMPLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmtune_sample", default=None)


@contextlib.contextmanager
def sample_context(index: int | str | None = None, source: str | None = None) -> Iterator[None]:
    """Name the sample being processed for any error raised inside the block."""
    parts = []
    if index is not None:
        parts.append(f"sample {index}")
    if source:
        parts.append(f"of {source}" if parts else source)
    token = _SAMPLE.set(" ".join(parts) or None)
    try:
        yield
    finally:
        _SAMPLE.reset(token)


def current_sample() -> str | None:
    """The sample named by the innermost :func:`sample_context`, if any."""
    return _SAMPLE.get()


class MediaError(ValueError):
    """Bad media or a bad placeholder layout; the message names the sample when known."""

    def __init__(self, message: str) -> None:
        where = current_sample()
        super().__init__(f"{where}: {message}" if where else message)
