"""Images from paths, bytes, PIL images, ``{"path"|"bytes": ...}`` dicts and data URIs.

:func:`image_size` reads only the header: token counts that follow from an image's
size never decode its pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import MediaError

ImageInput = Any  # str | bytes | os.PathLike | PIL.Image.Image | dict


def _data_uri_payload(text: str) -> bytes:
    """The bytes a base64 ``data:`` URI carries."""
    try:
        return base64.b64decode(text.split(",", 1)[1], validate=True)
    except (IndexError, binascii.Error, ValueError) as exc:
        raise MediaError(f"malformed base64 data URI ({exc})") from exc


def embedded_bytes(obj: Any) -> bytes | None:
    """The media bytes ``obj`` carries in memory (raw bytes, a ``{"bytes": ...}`` dict, a
    base64 ``data:`` URI); None for a path or anything else. Bytes win over a dict's path:
    in a ``datasets`` Image/Audio/Video column the path is often only the original name."""
    if isinstance(obj, dict):
        obj = obj.get("bytes")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, str) and obj.startswith("data:"):
        return _data_uri_payload(obj)
    return None


def _image_format(data: bytes) -> str:
    """The image format named in ``data``'s header (PIL reads the header only), or a word
    saying it has none PIL knows."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format or "unknown format"
    except Exception:  # any header PIL cannot read
        return "unrecognised format"


def describe(obj: Any, kind: str = "image") -> str:
    """A short human name for a media object, for error messages: a path, or for media held
    in memory their kind, name, format and size (never the bytes themselves, never a repr)."""
    if isinstance(obj, (str, os.PathLike)) and not str(obj).startswith("data:"):
        return str(obj)
    data = embedded_bytes_safe(obj)
    if data is not None:
        name = obj.get("path") if isinstance(obj, dict) else None
        fmt = f"{_image_format(data)}, " if kind == "image" else ""
        return f"embedded {kind}{f' {name!r}' if name else ''} ({fmt}{len(data)} bytes)"
    if isinstance(obj, dict):
        if obj.get("path"):
            return str(obj["path"])
        if obj.get("array") is not None:
            return f"in-memory {kind} array ({len(obj['array'])} samples at {obj.get('sampling_rate')} Hz)"
        return f"{kind} dict with keys {sorted(obj)}"
    if isinstance(obj, Image.Image):
        return f"in-memory PIL image ({obj.size[0]}x{obj.size[1]}, {obj.mode})"
    return f"<{type(obj).__name__}>"


def embedded_bytes_safe(obj: Any) -> bytes | None:
    """:func:`embedded_bytes`, None for a malformed data URI (for error messages)."""
    try:
        return embedded_bytes(obj)
    except MediaError:
        return None


def _short(exc: BaseException) -> str:
    """An exception's message cut to one short line (decoders may quote their input)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL recognises"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def unreadable(obj: Any, exc: BaseException, kind: str = "image") -> MediaError:
    """The error for media that cannot be decoded: a file is named as such, embedded media
    by kind, name, format and size."""
    if embedded_bytes_safe(obj) is not None:
        return MediaError(f"{describe(obj, kind)} could not be decoded: {_short(exc)}")
    return MediaError(f"unreadable {kind} {describe(obj, kind)}: {_short(exc)}")


def _open(obj: ImageInput) -> Image.Image:
    """Open lazily (header only); pixels are decoded on first access."""
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, dict):
        if obj.get("bytes") is not None:
            return _open(obj["bytes"])
        if obj.get("path"):
            return _open(obj["path"])
        raise MediaError(f"image dict needs 'path' or 'bytes', got keys {sorted(obj)}")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(obj))
    if isinstance(obj, (str, os.PathLike)):
        text = str(obj)
        if text.startswith("data:"):
            return Image.open(io.BytesIO(_data_uri_payload(text)))
        if not os.path.exists(text):
            raise MediaError(f"image file not found: {text}")
        return Image.open(text)
    raise MediaError(f"unsupported image input {describe(obj)}")


#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic)
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_size(fh: Any) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, walking the marker segments as
    PIL's JPEG reader does, but without building an image object (a fifth of its cost, which
    a preprocessing pass pays once per image). None for anything else or anything odd: the
    caller then asks PIL."""
    read = fh.read
    if read(2) != b"\xff\xd8":
        return None
    while True:
        if read(1) != b"\xff":
            return None
        marker = read(1)
        while marker == b"\xff":  # fill bytes
            marker = read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a segment
            continue
        if code in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        head = read(2)
        if len(head) < 2:
            return None
        length = (head[0] << 8) | head[1]
        if code in _JPEG_SOF:
            frame = read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            height, width = (frame[1] << 8) | frame[2], (frame[3] << 8) | frame[4]
            return (width, height) if width and height else None
        if length < 2:
            return None
        fh.seek(length - 2, 1)


def _fast_size(obj: ImageInput) -> tuple[int, int] | None:
    """A JPEG file's or JPEG bytes' size without PIL; None where PIL must answer."""
    if isinstance(obj, dict) and obj.get("bytes") is None:
        obj = obj.get("path")
    elif isinstance(obj, dict):
        obj = obj["bytes"]
    if isinstance(obj, (bytes, bytearray)):
        return _jpeg_size(io.BytesIO(obj))
    if isinstance(obj, (str, os.PathLike)) and not str(obj).startswith("data:"):
        try:
            with open(obj, "rb") as fh:
                return _jpeg_size(fh)
        except OSError:
            return None
    return None


def image_size(obj: ImageInput) -> tuple[int, int]:
    """(width, height) from the header, without decoding pixels."""
    size = _fast_size(obj)
    if size is not None:
        return size
    try:
        with _open(obj) if not isinstance(obj, Image.Image) else _nullctx(obj) as img:
            return img.size
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise unreadable(obj, exc) from exc


class _nullctx:
    def __init__(self, img: Image.Image) -> None:
        self.img = img

    def __enter__(self) -> Image.Image:
        return self.img

    def __exit__(self, *exc: object) -> None:
        return None


def load_image(obj: ImageInput) -> Image.Image:
    """Decode to an RGB PIL image; errors name the file."""
    try:
        img = _open(obj)
        img.load()
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise unreadable(obj, exc) from exc
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def scaled_size(
    width: int, height: int, max_pixels: int | None = None, min_pixels: int | None = None
) -> tuple[int, int]:
    """The size :func:`resize_image` produces, computed without touching pixels."""
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        factor = math.sqrt(max_pixels / pixels)
        width, height = max(1, int(width * factor)), max(1, int(height * factor))
    elif min_pixels is not None and pixels < min_pixels:
        factor = math.sqrt(min_pixels / pixels)
        width, height = max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))
    return width, height


def resize_image(
    image: Image.Image, max_pixels: int | None = None, min_pixels: int | None = None
) -> Image.Image:
    """Keep the aspect ratio while bringing the pixel count inside [min_pixels, max_pixels]."""
    size = scaled_size(image.width, image.height, max_pixels, min_pixels)
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    return image
