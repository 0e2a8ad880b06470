"""Model families: one file each (plugin, chat template, composite keys, tiny test fixture).

Nothing low imports a family by name: registries call :func:`load_families` on a miss.
Add a new family by adding its module name to ``FAMILY_MODULES``.
"""

from __future__ import annotations

import importlib

FAMILY_MODULES: tuple[str, ...] = (
    "base",
    "qwen2_vl",
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "video_llava",
    "gemma3",
    "paligemma",
    "qwen2_audio",
    "qwen3_vl",
    "glm4v",
    "pixtral",
    "internvl",
    "idefics3",
    "mllama",
    "llama4",
    "gemma3n",
    "qwen2_omni",
    "aya_vision",
    "idefics2",
    "minicpmv",
    "llava_llama",
)

_LOADED = False


def load_families() -> None:
    """Import every family module once, filling the plugin/template/composite registries."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{name}")
