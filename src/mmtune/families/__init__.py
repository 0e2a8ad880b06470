"""Model families: one file each (its plugin, its chat template(s), its composite-model entry).

Every module of this package is a family and is imported when ``mmtune`` is (``mmtune/__init__``
imports this package last), so the plugin, template and composite-model registries are complete
from then on; nothing keeps a list of the families. Add a family by adding its file here (and
its tiny offline stand-ins under ``mmtune/testing/stand_ins/``). A module whose name starts with
``_`` is a helper, not a family, and is not imported here.
"""

from __future__ import annotations

import importlib
import pkgutil


def family_modules() -> list[str]:
    """The names of the family modules of this package (every module not starting with ``_``)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


for _name in family_modules():
    importlib.import_module(f"{__name__}.{_name}")
