"""MiniCPM-V 2.5 / 2.6 (remote code: the authors ship their processor with the checkpoint).

transformers has no MiniCPM-V 2.x processor, so this file implements the authors' documented
slicing rule itself, for the text and for the pixels (it needs no remote code to train):

* grid: ``ratio = W*H / scale_resolution^2``; ``multiple = min(ceil(ratio), max_slice_nums)``;
  ``multiple <= 1`` means no slices. Candidate slice counts ``multiple-1, multiple,
  multiple+1`` (dropping 1 and > max); every factorisation ``cols x rows`` is scored by
  ``|log(W/H) - log(cols/rows)|``; the first best wins (fewest columns on ties).
* source image: scaled to keep its ratio at about ``scale_resolution^2`` area
  (``h = int(S / sqrt(W/H))``, ``w = int(h * W/H)``; upscaled only when not sliced), each side
  rounded to a multiple of ``patch_size`` (at least one patch).
* slices: the image is resized to ``grid x`` a slice size (each slice sized like a source
  image of ``W/cols x H/rows``, upscaling allowed) and cut row by row.
* text: ``<image_id>i</image_id>`` (per-sample index, when ``use_image_id``) + ``<image>`` +
  ``<unk>`` x query_num + ``</image>``, then ``rows`` lines joined by ``\\n``, each ``cols`` x
  (``<slice>`` + ``<unk>`` x query_num + ``</slice>``).
* pixels: RGB / 255, normalised (mean = std = 0.5), each slice reshaped to
  ``[3, patch, H*W/patch]``; ``tgt_sizes`` is each slice's ``(H/patch, W/patch)``.

The token count depends only on the size, so tokenising reads image headers only. Videos are
fed as their frames, each an image block without id and with at most
``video_max_slice_nums`` slices, as the authors' video example does.

transformers' MiniCPM-V 4.6 image processor ships the same grid rule and the same resize
steps with a coarser rounding (patch x merge); the tests cross-check against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmtune.media import MediaError
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


def ensure_divide(length: float, divisor: int) -> int:
    """``length`` rounded to the nearest multiple of ``divisor``, at least one ``divisor``."""
    return max(round(length / divisor) * divisor, divisor)


def sliced_grid(width: int, height: int, max_slice_nums: int = 9, scale_resolution: int = 448) -> tuple[int, int] | None:
    """(cols, rows) of slices for an image of ``width`` x ``height``, or None (no slicing)."""
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_error = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            error = abs(log_ratio - math.log(cols / (count // cols)))
            if error < best_error:
                best, best_error = (cols, count // cols), error
    return best


def best_resize(
    width: float, height: float, scale_resolution: int = 448, patch_size: int = 14, allow_upscale: bool = False
) -> tuple[int, int]:
    """(width, height) of an image scaled to about ``scale_resolution^2`` area (keeping its
    ratio; only shrunk unless ``allow_upscale``), each side a multiple of ``patch_size``."""
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def refine_size(
    width: int, height: int, grid: tuple[int, int], scale_resolution: int = 448, patch_size: int = 14
) -> tuple[int, int]:
    """(width, height) the image is resized to before it is cut into ``grid`` (cols, rows)."""
    cols, rows = grid
    slice_w = ensure_divide(width, cols) / cols
    slice_h = ensure_divide(height, rows) / rows
    best_w, best_h = best_resize(slice_w, slice_h, scale_resolution, patch_size, allow_upscale=True)
    return best_w * cols, best_h * rows


@dataclass(frozen=True)
class SliceSettings:
    """The authors' image-processor settings (MiniCPM-V 2.6 defaults)."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True

    def grid(self, width: int, height: int) -> tuple[int, int] | None:
        return sliced_grid(width, height, self.max_slice_nums, self.scale_resolution) if self.slice_mode else None

    def slice_image(self, image: Image.Image) -> list[Image.Image]:
        """The source image, then the slices row by row (bicubic, as the authors' processor)."""
        width, height = image.size
        grid = self.grid(width, height)
        source = image.resize(best_resize(width, height, self.scale_resolution, self.patch_size, grid is None),
                              resample=Image.Resampling.BICUBIC)
        if grid is None:
            return [source]
        refined = image.resize(refine_size(width, height, grid, self.scale_resolution, self.patch_size),
                               resample=Image.Resampling.BICUBIC)
        cols, rows = grid
        slice_w, slice_h = refined.width // cols, refined.height // rows
        return [source] + [refined.crop((c * slice_w, r * slice_h, (c + 1) * slice_w, (r + 1) * slice_h))
                           for r in range(rows) for c in range(cols)]


def reshape_by_patch(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[C, patch, H*W/patch]``: patches laid side by side (the resampler's layout)."""
    channels = image.shape[0]
    patches = torch.nn.functional.unfold(image[None], (patch_size, patch_size), stride=(patch_size, patch_size))
    patches = patches.reshape(channels, patch_size, patch_size, -1)
    return patches.permute(0, 1, 3, 2).reshape(channels, patch_size, -1)


class MiniCPMVPlugin(BasePlugin):
    default_image_token = "<image>"
    default_video_token = "<video>"
    #: MiniCPM-V 2.6 defaults; a loaded processor's own values win
    query_num = 64
    max_slice_nums = 9
    video_max_slice_nums = 2
    scale_resolution = 448
    patch_size = 14
    use_image_id = True
    slice_mode = True
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def _setting(self, processor: Any, name: str) -> Any:
        """A setting from the authors' image processor or processor when loaded, else ours."""
        aliases = {"query_num": ("image_feature_size", "query_num")}.get(name, (name,))
        for owner in (getattr(processor, "image_processor", None), processor):
            for alias in aliases:
                value = getattr(owner, alias, None) if owner is not None else None
                if value is not None:
                    return value
        return getattr(self, name)

    def slice_settings(self, processor: Any, video: bool = False) -> SliceSettings:
        max_slices = self.video_max_slice_nums if video else self._setting(processor, "max_slice_nums")
        return SliceSettings(int(max_slices), int(self._setting(processor, "scale_resolution")),
                             int(self._setting(processor, "patch_size")), bool(self._setting(processor, "slice_mode")))

    def image_text(self, processor: Any, index: int | None, width: int, height: int, video: bool = False) -> str:
        """One image's (or video frame's, ``index=None``) block of tokens."""
        unk = "<unk>" * int(self._setting(processor, "query_num"))
        text = f"<image>{unk}</image>"
        if index is not None and self._setting(processor, "use_image_id"):
            text = f"<image_id>{index}</image_id>{text}"
        grid = self.slice_settings(processor, video).grid(width, height)
        if grid is not None:
            cols, rows = grid
            text += "\n".join("".join(f"<slice>{unk}</slice>" for _ in range(cols)) for _ in range(rows))
        return text

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_messages(messages, images, videos, audios)
        if images and videos:
            raise MediaError("MiniCPM-V takes images or videos in one sample, not both (its authors' code cannot either)")
        sizes = self.image_sizes(images)
        messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER,
                                             lambda i: self.image_text(processor, i, *sizes[i]))
        if videos:
            texts = ["".join(self.image_text(processor, None, *frame.size, video=True) for frame in clip.frames)
                     for clip in self._regularize_videos(videos)]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: texts[i])
        return messages

    @staticmethod
    def image_bounds(ids: Sequence[int], tokenizer: Any) -> torch.Tensor:
        """(start, end) spans of ``<unk>`` query tokens inside each image/slice, for the model."""
        starts = {tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<slice>")}
        ends = {tokenizer.convert_tokens_to_ids("</image>"), tokenizer.convert_tokens_to_ids("</slice>")}
        opens = [i + 1 for i, t in enumerate(ids) if t in starts]
        closes = [i for i, t in enumerate(ids) if t in ends]
        if len(opens) != len(closes):
            raise ValueError(f"unbalanced image markers: {len(opens)} openings, {len(closes)} closings")
        return torch.tensor(list(zip(opens, closes)), dtype=torch.long).reshape(-1, 2)

    def slice_tensors(self, image: Image.Image, settings: SliceSettings, processor: Any) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Normalised, patch-reshaped slices of one image and their (H, W) in patches."""
        mean = np.asarray(self._setting(processor, "mean"), dtype=np.float32)
        std = np.asarray(self._setting(processor, "std"), dtype=np.float32)
        pixels, sizes = [], []
        for piece in settings.slice_image(image):
            array = (np.asarray(piece, dtype=np.float32) / 255 - mean) / std
            pixels.append(reshape_by_patch(torch.from_numpy(array.transpose(2, 0, 1)), settings.patch_size))
            sizes.append([piece.height // settings.patch_size, piece.width // settings.patch_size])
        return pixels, sizes

    def get_mm_inputs(
        self,
        images: Sequence[Any],
        videos: Sequence[Any],
        audios: Sequence[Any],
        imglens: Sequence[int],
        vidlens: Sequence[int],
        audlens: Sequence[int],
        batch_ids: Sequence[list[int]],
        processor: Any,
    ) -> dict[str, Any]:
        """Per sample (the model's layout): a list of slice tensors, their ``tgt_sizes`` and the
        ``image_bound`` spans the resampler's outputs are written into."""
        out: dict[str, Any] = {"image_bound": [self.image_bounds(ids, processor.tokenizer) for ids in batch_ids]}
        decoded = self._regularize_images(images)
        clips = self._regularize_videos(videos)
        image_settings, video_settings = self.slice_settings(processor), self.slice_settings(processor, video=True)
        pixel_values, tgt_sizes, next_image, next_video = [], [], 0, 0
        for n_images, n_videos in zip(imglens, vidlens or [0] * len(imglens)):
            visuals = [(img, image_settings) for img in decoded[next_image:next_image + n_images]]
            visuals += [(frame, video_settings) for clip in clips[next_video:next_video + n_videos] for frame in clip.frames]
            next_image, next_video = next_image + n_images, next_video + n_videos
            sample_pixels, sample_sizes = [], []
            for visual, settings in visuals:
                pixels, sizes = self.slice_tensors(visual, settings, processor)
                sample_pixels += pixels
                sample_sizes += sizes
            pixel_values.append(sample_pixels)
            tgt_sizes.append(torch.tensor(sample_sizes, dtype=torch.long).reshape(-1, 2))
        out.update(pixel_values=pixel_values, tgt_sizes=tgt_sizes)
        return out


register_mm_plugin("minicpmv", MiniCPMVPlugin)
register_composite_model(
    CompositeModel(
        model_type="minicpmv",  # the authors' remote-code layout: SigLIP "vpm", "resampler", Qwen2 "llm"
        template="minicpmv",
        projector_key="resampler",
        vision_model_keys=["vpm"],
        language_model_keys=["llm"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=False),
    )
)

# MiniCPM-V 2.6 (Qwen2) trains with its tokenizer's chat template (finetune/dataset.py): plain ChatML, no default
# system. MiniCPM-Llama3-V 2.5 trains with the Llama 3 format.
register_template(TEMPLATES["chatml"].bind("minicpmv", plugin="minicpmv"))
register_template(TEMPLATES["llama3"].bind("minicpmv2_5", plugin="minicpmv"))
