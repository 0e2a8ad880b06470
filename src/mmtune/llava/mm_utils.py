"""Image preprocessing and prompt tokenisation as LLaVA trains them.

* ``square``: the tower's image processor as it is (resize + centre crop);
* ``pad``: pad to a square with the processor's mean colour first, so nothing is cropped;
* ``anyres``: LLaVA-NeXT tiling by ``image_grid_pinpoints`` (transformers'
  ``LlavaNextImageProcessor`` with the tower's statistics): a base view plus the tiles of
  the best-fitting grid, ``[N, tiles, 3, H, W]`` with ``image_sizes`` (height, width).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

ASPECT_RATIOS = ("square", "pad", "anyres")


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square canvas of its longer side, filled with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def parse_pinpoints(pinpoints: Any, tile: int) -> list[list[int]]:
    """``[[h, w], ...]`` from a list, its string form, or LLaVA's ``"(1x1),...,(3x3)"`` range
    (grid multiples of the tower's ``tile`` size)."""
    if pinpoints is None:
        raise ValueError("image_aspect_ratio=anyres needs image_grid_pinpoints")
    if isinstance(pinpoints, str):
        text = pinpoints.strip()
        if "x" in text and text.startswith("("):
            cells = [tuple(int(v) for v in part.strip("() ").split("x")) for part in text.split(",")]
            (r0, c0), (r1, c1) = cells[0], cells[-1]
            return [[r * tile, c * tile] for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
        pinpoints = ast.literal_eval(text)
    return [[int(h), int(w)] for h, w in pinpoints]


def background_colour(image_processor: Any) -> tuple[int, ...]:
    return tuple(int(round(x * 255)) for x in image_processor.image_mean)


def tile_size(image_processor: Any) -> int:
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    if isinstance(crop, dict):
        return int(crop.get("height") or crop.get("shortest_edge"))
    return int(getattr(crop, "height", None) or getattr(crop, "shortest_edge"))


def anyres_processor(image_processor: Any, pinpoints: Any) -> Any:
    """A ``LlavaNextImageProcessor`` tiling at the tower's resolution with its statistics."""
    from transformers import LlavaNextImageProcessor

    side = tile_size(image_processor)
    return LlavaNextImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=parse_pinpoints(pinpoints, side),
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        do_pad=True,
    )


def process_images(images: Sequence[Image.Image], image_processor: Any, aspect_ratio: str = "square",
                   pinpoints: Any = None) -> dict[str, Any]:
    """Model inputs for ``images``: ``{"images": tensor, "image_sizes": [[h, w], ...]}``."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, not {aspect_ratio!r}")
    images = [image.convert("RGB") for image in images]
    sizes = [[image.height, image.width] for image in images]
    if aspect_ratio == "anyres":
        out = anyres_processor(image_processor, pinpoints)(images, return_tensors="pt")
        return {"images": out["pixel_values"], "image_sizes": torch.as_tensor(out["image_sizes"])}
    if aspect_ratio == "pad":
        fill = background_colour(image_processor)
        images = [expand2square(image, fill) for image in images]
    out = image_processor(images, return_tensors="pt")
    return {"images": out["pixel_values"], "image_sizes": torch.tensor(sizes)}


def tokenizer_image_token(prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX,
                          add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``prompt`` with every ``<image>`` as ``image_token_index`` (one id per
    image): the text between placeholders is tokenised piece by piece."""
    pieces = prompt.split(DEFAULT_IMAGE_TOKEN)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(image_token_index)
        if piece:
            ids += tokenizer(piece, add_special_tokens=add_special_tokens and i == 0)["input_ids"]
        elif i == 0 and add_special_tokens and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
    return ids
