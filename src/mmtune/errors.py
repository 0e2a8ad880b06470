"""Exceptions for mistakes in what the user gave (data, model folders, output folders).

The CLI prints any :class:`UserError` as one line (``mmtune COMMAND: error: ...``) and exits
with status 2, without a traceback: the message itself names what is wrong (the sample and
file, the folder, the key) and what to do. Each subclass is also a ``ValueError``, so code
that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input that the message fully explains."""


class DataError(UserError, ValueError):
    """Bad data: the message names the sample index, the file and, for JSON/JSONL, the line."""


class ModelFolderError(UserError, ValueError):
    """A model or adapter path that is missing, or is not the kind of folder it is used as."""


class OutputFolderError(UserError, ValueError):
    """An output folder that a run or an export would overwrite or mix with another run's files."""
