"""Loading and regularising media (images, videos, audio). Knows nothing of models."""

from .config import MediaConfig
from .errors import MediaError, current_sample, sample_context
from .image import describe, embedded_bytes, image_size, load_image, resize_image, scaled_size
from .video import VideoClip, load_video
from .audio import load_audio
from .reference import media_reference

__all__ = [
    "MediaConfig",
    "MediaError",
    "current_sample",
    "sample_context",
    "describe",
    "embedded_bytes",
    "image_size",
    "load_image",
    "resize_image",
    "scaled_size",
    "VideoClip",
    "load_video",
    "load_audio",
    "media_reference",
]
