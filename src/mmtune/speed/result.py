"""What applying one speed lever gives back (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Applied:
    """The lever is on. ``detail`` is what ``mmtune env`` and the log report (e.g. the modules it
    touched); ``state`` is the object later parts of the run need from it (e.g. the trainer's
    training forward), passed on explicitly instead of being stored on the model."""

    detail: Any = True
    state: Any = field(default=None, compare=False)

    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Declined:
    """The lever is off for this model or run; ``reason`` is the one line logged about it."""

    reason: str

    def __bool__(self) -> bool:
        return False
