"""Media settings shared by the data pipeline and the plugins."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MediaConfig:
    """How media are regularised before a family's processor sees them.

    Pixel caps left at ``None`` mean "the processor's own limits": nothing is resized
    here. A cap the user sets is applied exactly once, either here (generic families)
    or by handing it to the processor (families whose processor has such a cap).
    """

    image_max_pixels: int | None = None
    image_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_min_pixels: int | None = None
    video_fps: float = 2.0
    video_maxlen: int = 128
    audio_sampling_rate: int = 16000
    use_audio_in_video: bool = False
