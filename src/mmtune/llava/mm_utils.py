"""Image preprocessing and prompt tokenisation as LLaVA trains them.

Sizes follow LLaVA's own convention throughout: an image's size and each
``image_grid_pinpoints`` entry are ``(width, height)``, as PIL's ``Image.size`` is, and
``image_sizes`` carries ``[width, height]`` per image. Checkpoints trained with the original
code hold their grids in that order; reading them as (height, width) picks another grid for
square images and for pinpoint lists that are not symmetric.

* ``square``: the tower's image processor as it is (resize + centre crop);
* ``pad``: pad to a square first, so nothing is cropped, with the background colour LLaVA
  trains with: each channel's mean times 255, truncated to an integer;
* ``anyres``: the best-fitting pinpoint resolution, the image resized into it (aspect kept,
  centred on black), cut into tower-sized tiles row by row, after a base view of the whole
  image resized to the tower's input: ``[N, tiles, 3, H, W]`` (zero tiles pad the shorter
  stacks; the model keeps as many as each image's grid has).

Two entry points: :func:`preprocess_images` (mmtune's: the aspect rule and pinpoints given
directly, a dict of ``images`` and ``image_sizes``, what ``LlavaLlamaProcessor`` returns) and
:func:`process_images`, :func:`tokenizer_image_token` and :func:`get_model_name_from_path` with
the original ``llava.mm_utils`` contracts, so its inference scripts run unchanged on mmtune.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

ASPECT_RATIOS = ("square", "pad", "anyres")
_RANGE = re.compile(r"\((\d+)x(\d+)\)")


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square canvas of its longer side, filled with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def parse_pinpoints(pinpoints: Any, tile: int) -> list[tuple[int, int]]:
    """``[(width, height), ...]`` from a list, its string form, or the ``"(1x1),...,(3x3)"``
    range of LLaVA-NeXT's configs (grid multiples of the tower's ``tile`` size, width first).
    Each entry must be a whole number of tiles: the model reassembles the tiles into that grid."""
    if pinpoints is None:
        raise ValueError("image_aspect_ratio=anyres needs image_grid_pinpoints (a list of [width, height] pairs)")
    if isinstance(pinpoints, str):
        ranges = _RANGE.findall(pinpoints)
        if ranges:
            (w0, h0), (w1, h1) = (tuple(int(v) for v in ranges[0]), tuple(int(v) for v in ranges[-1]))
            return [(w * tile, h * tile) for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
        pinpoints = ast.literal_eval(pinpoints.strip())
    pairs = [(int(w), int(h)) for w, h in pinpoints]
    odd = [pair for pair in pairs if pair[0] % tile or pair[1] % tile or min(pair) <= 0]
    if odd:
        raise ValueError(f"image_grid_pinpoints {odd} are not positive multiples of the vision tower's image size "
                         f"{tile}: use [width, height] pairs made of whole tiles")
    return pairs


def select_best_resolution(size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The candidate ``(width, height)`` that keeps the most of an image of ``size``
    ``(width, height)`` when it is scaled to fit, then wastes the least area; the first on ties.

    transformers' function of the same name does this arithmetic with both pairs read as
    (height, width); passing both as (width, height) gives LLaVA's choice exactly."""
    from transformers.image_processing_utils import select_best_resolution as best

    width, height = best(tuple(size), [tuple(c) for c in candidates])
    return int(width), int(height)


def anyres_grid(size: Any, pinpoints: Any, tile: int) -> tuple[int, int]:
    """``(columns, rows)`` of tiles an image of ``size`` (width, height) is cut into."""
    width, height = select_best_resolution(image_size(size), parse_pinpoints(pinpoints, tile))
    return width // tile, height // tile


def image_size(size: Any) -> tuple[int, int]:
    """``(width, height)`` from a pair, a list or a tensor row."""
    values = size.tolist() if hasattr(size, "tolist") else list(size)
    return int(values[0]), int(values[1])


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """``image`` scaled (bicubic, aspect kept, the scaled side rounded up and capped at the
    target) and centred on a black ``target`` (width, height) canvas."""
    width, height = image.size
    target_width, target_height = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), target_width), target_height
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, tile: int) -> list[Image.Image]:
    """``tile`` x ``tile`` crops of ``image``, row by row, left to right."""
    width, height = image.size
    return [image.crop((left, top, left + tile, top + tile))
            for top in range(0, height, tile) for left in range(0, width, tile)]


def background_colour(image_processor: Any) -> tuple[int, ...]:
    """LLaVA's ``pad`` fill: each channel's mean times 255, truncated (not rounded): CLIP's
    mean gives (122, 116, 104)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def _side(size: Any, *keys: str) -> int | None:
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def tile_size(image_processor: Any) -> int:
    """The side of one tile: the processor's crop height (CLIP) or its output height (SigLIP)."""
    crop = getattr(image_processor, "crop_size", None)
    side = _side(crop, "height") if crop else None
    side = side or _side(image_processor.size, "height", "shortest_edge")
    if side is None:
        raise ValueError(f"{type(image_processor).__name__} states no crop or output size to tile with")
    return side


def base_size(image_processor: Any) -> int:
    """The side the whole image is resized to for the base view (the processor's shortest edge)."""
    return _side(image_processor.size, "shortest_edge", "height") or tile_size(image_processor)


def anyres_views(image: Image.Image, image_processor: Any, pinpoints: Any) -> list[Image.Image]:
    """The base view, then the tiles of the best grid, as PIL images."""
    tile = tile_size(image_processor)
    best = select_best_resolution(image.size, parse_pinpoints(pinpoints, tile))
    side = base_size(image_processor)
    base = image.resize((side, side), Image.Resampling.BICUBIC)
    return [base] + divide_to_patches(resize_and_pad(image, best), tile)


def preprocess_images(images: Sequence[Image.Image], image_processor: Any, aspect_ratio: str = "square",
                      pinpoints: Any = None) -> dict[str, Any]:
    """Model inputs for ``images``: ``{"images": tensor, "image_sizes": [[width, height], ...]}``."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, not {aspect_ratio!r}")
    image_processor = as_image_processor(image_processor)
    images = [image.convert("RGB") for image in images]
    sizes = torch.tensor([list(image.size) for image in images], dtype=torch.long)
    if aspect_ratio == "anyres":
        views = [anyres_views(image, image_processor, pinpoints) for image in images]
        pixels = image_processor([v for group in views for v in group], return_tensors="pt")["pixel_values"]
        stacks = pixels.split([len(group) for group in views])
        longest = max(len(s) for s in stacks)
        padded = torch.zeros((len(stacks), longest, *pixels.shape[1:]), dtype=pixels.dtype)
        for i, stack in enumerate(stacks):
            padded[i, : len(stack)] = stack
        return {"images": padded, "image_sizes": sizes}
    if aspect_ratio == "pad":
        fill = background_colour(image_processor)
        images = [expand2square(image, fill) for image in images]
    out = image_processor(images, return_tensors="pt")
    return {"images": out["pixel_values"], "image_sizes": sizes}


def as_image_processor(processor: Any) -> Any:
    """The image processor inside a multimodal processor (``LlavaLlamaProcessor``), or
    ``processor`` itself when it is one already."""
    inner = getattr(processor, "image_processor", None)
    return processor if inner is None else inner


def process_images(images: Sequence[Image.Image], image_processor: Any, model_cfg: Any) -> Any:
    """The original ``llava.mm_utils.process_images``: the images as the model takes them,
    following ``model_cfg.image_aspect_ratio`` (``pad``, ``anyres``; anything else is the
    image processor alone) and ``model_cfg.image_grid_pinpoints``. Returns one tensor, or for
    ``anyres`` images with different tile counts a list of ``[tiles, 3, H, W]`` tensors, as the
    original does; the model takes either. ``image_processor`` may be the tower's image
    processor or the processor :func:`~mmtune.llava.load_pretrained_model` returns.
    The image sizes the model needs for ``anyres`` are the images' own (``image.size``)."""
    if isinstance(model_cfg, str) or model_cfg is None:
        raise TypeError("process_images(images, image_processor, model_cfg) takes the model's config, as the "
                        "original LLaVA's does; to pass the aspect ratio and pinpoints directly use "
                        "preprocess_images(images, image_processor, aspect_ratio, pinpoints)")
    image_processor = as_image_processor(image_processor)
    aspect_ratio = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect_ratio == "anyres":
        pinpoints = getattr(model_cfg, "image_grid_pinpoints", None)
        stacks = [image_processor(anyres_views(image.convert("RGB"), image_processor, pinpoints),
                                  return_tensors="pt")["pixel_values"] for image in images]
        return torch.stack(stacks) if len({s.shape for s in stacks}) == 1 else stacks
    return preprocess_images(images, image_processor, "pad" if aspect_ratio == "pad" else "square")["images"]


def tokenizer_image_token(prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX,
                          return_tensors: str | None = None, *, add_special_tokens: bool = True) -> Any:
    """Token ids of ``prompt`` with every ``<image>`` as ``image_token_index`` (one id per
    image), as the original ``llava.mm_utils.tokenizer_image_token``: the text between
    placeholders is tokenised piece by piece, and the sequence opens with BOS where the
    tokenizer adds one (Vicuna's and Llama's do). ``return_tensors="pt"`` gives a 1-D tensor;
    ``add_special_tokens=False`` leaves BOS out whatever the tokenizer does."""
    if return_tensors not in (None, "pt"):
        raise ValueError(f"tokenizer_image_token: return_tensors must be None or 'pt', not {return_tensors!r}")
    first, *rest = prompt.split(DEFAULT_IMAGE_TOKEN)
    ids: list[int] = list(tokenizer(first, add_special_tokens=add_special_tokens)["input_ids"])
    for piece in rest:
        ids.append(image_token_index)
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long) if return_tensors == "pt" else ids


def get_model_name_from_path(model_path: str) -> str:
    """The original's model name for a checkpoint path: its last folder, or
    ``<run>_checkpoint-N`` for a ``checkpoint-N`` folder (what its scripts pass to
    ``load_pretrained_model`` as ``model_name``)."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]
