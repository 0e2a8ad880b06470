"""The tested version ranges of the libraries mmtune's exactness depends on, and the check that
warns at ``import mmtune`` when the installed transformers is outside its range.

Processors change their token rules between transformers releases (a placeholder wrapper kept
or collapsed, a pixel cap applied or not), and mmtune's plugins must produce the processor's
ids exactly; a release nobody ran the test suite on may silently give other tokens. So the
ranges here are the tested ones: the lower bound is the oldest release tested (the GPU image),
the upper bound excludes minors not yet tested. ``pyproject.toml`` declares the same ranges (a
test holds the two equal, and the lock inside them); widening one means running
``make test-latest UNCAPPED=1`` first (README, "Versions").

This module is imported by ``mmtune/__init__.py``: it stays light (no torch, no transformers).
"""

from __future__ import annotations

import importlib.metadata
import warnings

#: distribution name -> the tested range (PEP 440 specifiers); pyproject.toml's dependencies agree
TESTED_RANGES: dict[str, str] = {
    "transformers": ">=5.17,<5.26",
    "peft": ">=0.21,<0.22",
    "accelerate": ">=1.15,<2",
    "datasets": ">=5.2,<6",
    "tokenizers": ">=0.23.1,<0.24",
}


class UntestedVersionWarning(UserWarning):
    """A library mmtune's exactness depends on is outside its tested range."""


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (``-`` and ``_`` alike), None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_tested_range(name: str, version: str | None) -> bool | None:
    """Whether ``version`` of ``name`` lies in its tested range; None when there is no range or
    no version to judge (pre-releases and development builds count by their number)."""
    spec = TESTED_RANGES.get(name)
    if spec is None or version is None:
        return None
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return None


def untested_message(name: str, version: str) -> str:
    spec = TESTED_RANGES[name]
    return (f"mmtune is tested with {name}{spec}, and {name} {version} is installed: processors change their "
            f"token rules between releases, so mmtune's ids may differ from the processor's. Install a tested "
            f"release (pip install '{name}{spec}'), or run the tests on this one first (from a clone: "
            f"make test-latest UNCAPPED=1).")


def check_transformers() -> bool:
    """Warn once (:class:`UntestedVersionWarning`) when the installed transformers is outside its
    tested range; returns whether it is inside (or cannot be judged: not installed)."""
    version = installed_version("transformers")
    inside = in_tested_range("transformers", version)
    if inside is False:
        warnings.warn(untested_message("transformers", version or "?"), UntestedVersionWarning, stacklevel=3)
    return inside is not False
