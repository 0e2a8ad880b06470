"""Offline stand-ins for the families: per family, a tiny tokenizer, its real processor class
assembled from it and a tiny random model config, so tests, benchmarks and the demo run
without the Hub. One module per family (named as its file in ``mmtune.families``); each
registers its :class:`~mmtune.testing.fixtures.FamilyFixture` entries when imported, and every
module here is imported with ``mmtune.testing``, so ``FIXTURES`` is complete from then on.
They are not part of the product: a family file never imports them."""

from __future__ import annotations

import importlib
import pkgutil


def stand_in_modules() -> list[str]:
    """The names of the stand-in modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


for _name in stand_in_modules():
    importlib.import_module(f"{__name__}.{_name}")
