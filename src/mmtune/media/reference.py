"""One string that stands for a media object: what a tokenised dataset stores for media
that are not read back from their source column (see ``mmtune.data.loader``).

A path stays a path. Media held in memory become a base64 ``data:`` URI that every loader
here reads back to the same pixels, frames or samples: embedded bytes as they are (no
re-encoding), a PIL image as lossless PNG, an audio array as 32-bit float WAV.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import numpy as np
from PIL import Image

from .errors import MediaError
from .image import describe, embedded_bytes

#: the ``data:`` URI prefix of stored bytes (the loaders find the format from the bytes)
DATA_URI_PREFIX = "data:application/octet-stream;base64,"


def _pil_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _wav_bytes(array: Any, sampling_rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(array, dtype=np.float32), int(sampling_rate), format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def media_reference(obj: Any, kind: str = "image") -> str:
    """``obj`` (a path, ``{"bytes", "path"}`` dict, raw bytes, data URI, PIL image or
    ``{"array", "sampling_rate"}`` audio) as one string the media loaders accept."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    data = embedded_bytes(obj)
    if data is None and isinstance(obj, dict) and obj.get("path") and obj.get("array") is None:
        return str(obj["path"])
    if data is None and isinstance(obj, Image.Image):
        data = _pil_bytes(obj)
    if data is None and isinstance(obj, dict) and obj.get("array") is not None and obj.get("sampling_rate"):
        data = _wav_bytes(obj["array"], obj["sampling_rate"])
    if data is None:
        raise MediaError(f"cannot store {describe(obj, kind)}: give a path, bytes, a {{'bytes', 'path'}} dict"
                         + (" or {'array', 'sampling_rate'}" if kind == "audio" else ""))
    return DATA_URI_PREFIX + base64.b64encode(data).decode("ascii")
