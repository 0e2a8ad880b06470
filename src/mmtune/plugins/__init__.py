"""The plugin API: turn media placeholders into a family's tokens and tensors."""

from .base import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    BasePlugin,
    Message,
)
from .registry import PLUGINS, get_mm_plugin, register_mm_plugin

__all__ = [
    "AUDIO_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "BasePlugin",
    "Message",
    "PLUGINS",
    "get_mm_plugin",
    "register_mm_plugin",
]
