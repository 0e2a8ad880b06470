"""Videos from files or embedded bytes (PyAV) or lists of frames, sampled at ``video_fps`` up
to ``video_maxlen``."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .errors import MediaError
from .image import describe, embedded_bytes, load_image, resize_image, unreadable


@dataclass
class VideoClip:
    """Sampled frames plus the timing facts some processors need (e.g. Qwen3-VL timestamps)."""

    frames: list[Image.Image]
    indices: list[int]
    total_frames: int
    source_fps: float
    sample_fps: float
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.total_frames / self.source_fps if self.source_fps else float(len(self.frames))

    def metadata(self) -> dict[str, Any]:
        """transformers' VideoMetadata fields for this clip."""
        return {
            "total_num_frames": self.total_frames,
            "fps": self.source_fps,
            "duration": self.duration,
            "frames_indices": list(self.indices),
            "video_backend": "pyav",
        }


def sample_indices(total: int, source_fps: float, fps: float, maxlen: int, frame_factor: int = 1) -> list[int]:
    """Evenly spaced frame indices: ``fps`` per second of video, at most ``maxlen``,
    a multiple of ``frame_factor`` (e.g. 2 for Qwen's temporal patch), never zero."""
    if total <= 0:
        return []
    duration = total / source_fps if source_fps else total
    wanted = math.floor(duration * fps) if fps else total
    wanted = max(1, min(wanted, maxlen, total))
    if frame_factor > 1:
        wanted = max(frame_factor, (wanted // frame_factor) * frame_factor)
    return np.linspace(0, total - 1, wanted).round().astype(int).tolist()


def _decode_file(source: Any, choose: Any, obj: Any) -> tuple[list[Image.Image], list[int], int, float]:
    """Decode ``source`` (a path or a file object over embedded bytes) once, converting to PIL
    only the frames ``choose(total, rate)`` picks; errors name ``obj``, the input as given.

    The total comes from the container header when it has one (then no unpicked frame is
    ever converted or kept); otherwise, or when the header's count turns out wrong, every
    frame is converted and the pick is made afterwards."""
    import av

    try:
        with av.open(source) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 1)
            declared = int(stream.frames or 0)
            if declared > 0:
                wanted = choose(declared, rate)
                want, kept, seen = set(wanted), {}, 0
                for i, frame in enumerate(container.decode(stream)):
                    if i in want:
                        kept[i] = frame.to_image()
                    seen += 1
                if seen == declared and len(kept) == len(want):
                    return [kept[i] for i in wanted], wanted, declared, rate
                container.seek(0)
            frames = [frame.to_image() for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, OSError) as exc:  # type: ignore[attr-defined]
        raise unreadable(obj, exc, "video") from exc
    if not frames:
        raise MediaError(f"video {describe(obj, 'video')} has no frames")
    wanted = choose(len(frames), rate)
    return [frames[i] for i in wanted], wanted, len(frames), rate


def load_video(
    obj: Any,
    fps: float = 2.0,
    maxlen: int = 128,
    frame_factor: int = 1,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    source_fps: float | None = None,
) -> VideoClip:
    """Decode and sample a video.

    ``obj`` is a path (any container PyAV reads), embedded bytes (raw, a ``{"bytes": ...,
    "path": ...}`` dict as a ``datasets.Video`` column stores it, or a base64 data URI), a
    ``{"path": ...}`` dict, or a list of frames (paths, bytes or PIL images) which is taken as
    a clip at ``source_fps`` (default: ``fps``, i.e. every frame is kept up to ``maxlen``).
    """
    def choose(total: int, rate: float) -> list[int]:
        return sample_indices(total, rate, fps, maxlen, frame_factor)

    data = embedded_bytes(obj)
    if isinstance(obj, dict) and data is None and obj.get("path"):
        obj = obj["path"]
    if data is not None:
        frames, indices, total, rate = _decode_file(io.BytesIO(data), choose, obj)
        name = describe(obj, "video")
    elif isinstance(obj, (str, os.PathLike)):
        path = str(obj)
        if not os.path.exists(path):
            raise MediaError(f"video file not found: {path}")
        frames, indices, total, rate = _decode_file(path, choose, path)
        name = path
    elif isinstance(obj, (list, tuple)):
        if not obj:
            raise MediaError("video given as an empty list of frames")
        all_frames = [load_image(f) for f in obj]
        rate = float(source_fps or fps)
        total = len(all_frames)
        indices = sample_indices(total, rate, fps, maxlen, frame_factor)
        frames = [all_frames[i] for i in indices]
        name = f"<{len(obj)} frames>"
    else:
        raise MediaError(f"unsupported video input {describe(obj, 'video')}")
    frames = [f.convert("RGB") if f.mode != "RGB" else f for f in frames]
    if max_pixels is not None or min_pixels is not None:
        frames = [resize_image(f, max_pixels, min_pixels) for f in frames]
    duration = total / rate
    sample_fps = len(indices) / duration if duration else fps
    return VideoClip(frames, indices, total, rate, sample_fps, name)
