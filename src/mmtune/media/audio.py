"""Audio from files or embedded bytes (soundfile, or PyAV for containers such as a video's
audio track) or arrays, as mono float32 at the requested sampling rate."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from .errors import MediaError
from .image import describe, embedded_bytes, unreadable


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


def _read_with_av(source: Any, name: str) -> tuple[np.ndarray, int]:
    import av

    with av.open(source) as container:
        if not container.streams.audio:
            raise MediaError(f"{name} has no audio track")
        stream = container.streams.audio[0]
        sr = stream.rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise MediaError(f"{name} has an empty audio track")
    return np.concatenate(chunks), sr


def _read(source: Any, obj: Any) -> tuple[np.ndarray, int]:
    """Mono samples and their rate from a path or a file object over embedded bytes:
    soundfile first, PyAV for what it cannot read (mp4, m4a, ...); errors name ``obj``."""
    try:
        import soundfile

        wave, sr = soundfile.read(source, dtype="float32", always_2d=True)
        return wave.mean(axis=1), sr
    except Exception:  # soundfile cannot read containers: use PyAV
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            return _read_with_av(source, describe(obj, "audio"))
        except MediaError:
            raise
        except Exception as exc:
            raise unreadable(obj, exc, "audio") from exc


def load_audio(obj: Any, sampling_rate: int = 16000) -> np.ndarray:
    """Mono float32 waveform at ``sampling_rate``.

    ``obj``: a path, embedded bytes (raw, ``{"bytes": ..., "path": ...}`` as a
    ``datasets.Audio(decode=False)`` column gives them, or a base64 data URI; bytes win over the
    path), ``{"path": ...}``, ``{"array": ..., "sampling_rate": ...}`` (a decoded
    ``datasets.Audio``), or a bare array assumed to be at ``sampling_rate`` already.
    """
    data = embedded_bytes(obj)
    if isinstance(obj, dict) and obj.get("array") is not None:
        wave = np.asarray(obj["array"], dtype=np.float32)
        sr = int(obj.get("sampling_rate") or sampling_rate)
    elif data is not None:
        wave, sr = _read(io.BytesIO(data), obj)
    elif isinstance(obj, dict) and obj.get("path"):
        return load_audio(obj["path"], sampling_rate)
    elif isinstance(obj, (str, os.PathLike)):
        path = str(obj)
        if not os.path.exists(path):
            raise MediaError(f"audio file not found: {path}")
        wave, sr = _read(path, path)
    elif isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        wave, sr = np.asarray(obj, dtype=np.float32), sampling_rate
    else:
        raise MediaError(f"unsupported audio input {describe(obj, 'audio')}")
    if wave.ndim > 1:
        wave = wave.mean(axis=0) if wave.shape[0] < wave.shape[-1] else wave.mean(axis=-1)
    return _resample(wave, sr, sampling_rate)


def _header_seconds(source: Any) -> float | None:
    """Duration from the container's header (soundfile, else PyAV), None when it gives none."""
    try:
        import soundfile

        info = soundfile.info(source)
        if info.samplerate and info.frames >= 0:
            return info.frames / info.samplerate
    except Exception:  # soundfile cannot read containers: ask PyAV
        if hasattr(source, "seek"):
            source.seek(0)
    try:
        import av

        with av.open(source) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except Exception:  # unreadable here: load_audio names the problem
        return None
    return None


def _array_seconds(array: Any, sampling_rate: int) -> float:
    """Seconds of a waveform array: its longer axis is time (as :func:`load_audio` reads it)."""
    shape = np.shape(array)
    return (max(shape) if shape else 0) / sampling_rate


def audio_seconds(obj: Any, sampling_rate: int = 16000) -> float:
    """How long an audio input lasts, in seconds, read from its header where it has one (a
    file or embedded bytes: no decoding), else from its samples; takes what
    :func:`load_audio` takes (a bare array is taken to be at ``sampling_rate``)."""
    data = embedded_bytes(obj)
    if isinstance(obj, dict) and obj.get("array") is not None:
        return _array_seconds(obj["array"], int(obj.get("sampling_rate") or sampling_rate))
    if isinstance(obj, np.ndarray) or (data is None and not isinstance(obj, (str, os.PathLike, dict))
                                       and hasattr(obj, "__array__")):
        return _array_seconds(obj, sampling_rate)
    if data is not None:
        seconds = _header_seconds(io.BytesIO(data))
    elif isinstance(obj, dict) and obj.get("path"):
        return audio_seconds(obj["path"], sampling_rate)
    elif isinstance(obj, (str, os.PathLike)):
        if not os.path.exists(str(obj)):
            raise MediaError(f"audio file not found: {obj}")
        seconds = _header_seconds(str(obj))
    else:
        seconds = None
    if seconds is None:
        return len(load_audio(obj, sampling_rate)) / sampling_rate
    return seconds
