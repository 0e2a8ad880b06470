"""Plugin registry. The families fill it when ``mmtune`` is imported (``mmtune.families``)."""

from __future__ import annotations

from typing import Any

from .base import BasePlugin

PLUGINS: dict[str, type[BasePlugin]] = {}


def register_mm_plugin(name: str, cls: type[BasePlugin]) -> None:
    """Register ``cls`` under ``name``; re-registering the same class is a no-op."""
    if name in PLUGINS and PLUGINS[name] is not cls:
        raise ValueError(f"multimodal plugin {name!r} is already registered to {PLUGINS[name].__name__}")
    PLUGINS[name] = cls


def get_mm_plugin(
    name: str,
    image_token: str | None = None,
    video_token: str | None = None,
    audio_token: str | None = None,
    **kwargs: Any,
) -> BasePlugin:
    """Instantiate the plugin registered as ``name``.

    Tokens left at ``None`` take the family's defaults (the class attributes
    ``default_image_token`` etc.). ``kwargs`` go to the plugin (``expand_mm_tokens``,
    ``media`` = a :class:`~mmtune.media.MediaConfig`, family options).
    """
    if name not in PLUGINS:
        raise ValueError(f"unknown multimodal plugin {name!r}; known: {', '.join(sorted(PLUGINS))}")
    return PLUGINS[name](image_token=image_token, video_token=video_token, audio_token=audio_token, **kwargs)
