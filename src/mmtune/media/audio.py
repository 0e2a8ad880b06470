"""Audio from files (soundfile, or PyAV for containers such as a video's audio track) or
arrays, as mono float32 at the requested sampling rate."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import MediaError
from .image import describe


def _resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample with libswresample (through PyAV), the resampler ffmpeg itself uses."""
    if orig_sr == target_sr or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_sr)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, dtype=np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = orig_sr
    chunks = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _read_with_av(path: str) -> tuple[np.ndarray, int]:
    import av

    with av.open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path} has no audio track")
        stream = container.streams.audio[0]
        sr = stream.rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise MediaError(f"{path} has an empty audio track")
    return np.concatenate(chunks), sr


def load_audio(obj: Any, sampling_rate: int = 16000) -> np.ndarray:
    """Mono float32 waveform at ``sampling_rate``.

    ``obj``: a path, ``{"path": ...}``, ``{"array": ..., "sampling_rate": ...}`` (the HF
    datasets Audio feature), or a bare array assumed to be at ``sampling_rate`` already.
    """
    if isinstance(obj, dict) and obj.get("array") is not None:
        wave = np.asarray(obj["array"], dtype=np.float32)
        sr = int(obj.get("sampling_rate") or sampling_rate)
    elif isinstance(obj, dict) and obj.get("path"):
        return load_audio(obj["path"], sampling_rate)
    elif isinstance(obj, (str, os.PathLike)):
        path = str(obj)
        if not os.path.exists(path):
            raise MediaError(f"audio file not found: {path}")
        try:
            import soundfile

            wave, sr = soundfile.read(path, dtype="float32", always_2d=True)
            wave = wave.mean(axis=1)
        except Exception:  # soundfile cannot read containers (mp4, m4a, ...): use PyAV
            try:
                wave, sr = _read_with_av(path)
            except MediaError:
                raise
            except Exception as exc:
                raise MediaError(f"unreadable audio {path}: {exc}") from exc
    elif isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        wave, sr = np.asarray(obj, dtype=np.float32), sampling_rate
    else:
        raise MediaError(f"unsupported audio input {describe(obj)}")
    if wave.ndim > 1:
        wave = wave.mean(axis=0) if wave.shape[0] < wave.shape[-1] else wave.mean(axis=-1)
    return _resample(wave, sr, sampling_rate)
