"""Synthetic media written to disk (JPEG/PNG images, MP4 videos, WAV audio)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure (gradient + shapes), not flat colour."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    base = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    arr = (base + rng.integers(0, 40, size=(height, width, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse([width // 4, height // 4, width // 2, height // 2], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def make_image_file(path: str, width: int, height: int, seed: int = 0) -> str:
    make_image(width, height, seed).save(path)
    return path


def make_video_file(
    path: str, frames: int = 8, width: int = 64, height: int = 48, fps: int = 4, seed: int = 0, with_audio: bool = False
) -> str:
    """An MP4 (mpeg4 codec) of moving content, via PyAV; ``with_audio`` adds an AAC tone track
    as long as the video."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=16000, layout="mono") if with_audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_image(make_image(width, height, seed + i))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            total = int(16000 * frames / fps)
            wave = (0.3 * np.sin(2 * math.pi * 440 * np.arange(total) / 16000)).astype(np.float32)
            for start in range(0, total, 1024):
                chunk = wave[start:start + 1024]
                aframe = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                aframe.sample_rate = 16000
                aframe.pts = start
                for packet in audio.encode(aframe):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path


def make_audio_file(path: str, seconds: float = 1.0, sampling_rate: int = 16000, freq: float = 440.0) -> str:
    """A WAV sine tone with a little noise, via soundfile."""
    import soundfile

    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    wave = 0.3 * np.sin(2 * math.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    soundfile.write(path, wave.astype(np.float32), sampling_rate)
    return path
