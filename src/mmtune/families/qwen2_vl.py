"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images and videos with M-RoPE.

Token counts come from the image header and the installed processor's own size-only
counters (``get_number_of_image_patches`` / ``get_num_of_video_patches``, the smart-resize
rule vLLM relies on), so tokenising never decodes an image's pixels. Videos are decoded
(their frame count is needed) but never run through the video processor to be counted.
User pixel caps are handed to the processor as its ``size`` (applied once, by it).

Qwen3-VL, GLM-4V and Qwen2.5-Omni subclass :class:`Qwen2VLPlugin`; everything a subclass may
change (the wrapper tokens, the text of one image / one video, the counting kwargs) is a
method or class attribute.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class Qwen2VLPlugin(BasePlugin):
    """``<image>`` -> ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``,
    n = grid_t * grid_h * grid_w / merge_size**2; ``<video>`` likewise with ``<|video_pad|>``."""

    default_image_token = "<|image_pad|>"
    default_video_token = "<|video_pad|>"
    vision_start = "<|vision_start|>"
    vision_end = "<|vision_end|>"
    #: the processor's temporal_patch_size; refreshed from the processor before videos are sampled
    video_frame_factor = 2
    token_type_key = "mm_token_type_ids"

    # ------------------------------------------------------------------ caps
    # User caps are handed to the processor (its ``size``), never applied by resizing first.
    def _user_image_caps(self) -> tuple[int | None, int | None]:
        return None, None

    def _user_video_caps(self) -> tuple[int | None, int | None]:
        return None, None

    @staticmethod
    def _size_kwargs(sub: Any, max_pixels: int | None, min_pixels: int | None) -> dict[str, Any]:
        """``{"size": ...}`` overriding the sub-processor's min/max pixels, or ``{}`` (its own)."""
        if max_pixels is None and min_pixels is None:
            return {}
        size = dict(sub.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        return {"size": size}

    def image_kwargs(self, processor: Any) -> dict[str, Any]:
        """Kwargs for the image processor (the user's caps, if any)."""
        return self._size_kwargs(processor.image_processor, self.media.image_max_pixels, self.media.image_min_pixels)

    def video_kwargs(self, processor: Any) -> dict[str, Any]:
        """Kwargs for the video processor: the user's caps; frames are sampled once, by mmtune.media.

        The caps mean what the processor's ``size`` means: pixels per frame for Qwen2-VL,
        the whole clip's budget (frames x pixels) for Qwen3-VL and GLM-4V."""
        kwargs = self._size_kwargs(processor.video_processor, self.media.video_max_pixels, self.media.video_min_pixels)
        kwargs["do_sample_frames"] = False
        return kwargs

    @staticmethod
    def _count_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        """The kwargs for the size-only counters. They read the caps under different names
        across families and transformers versions (``size`` in GLM-4V and 5.2x videos,
        ``min_pixels``/``max_pixels`` in Qwen2-VL images and 5.17 videos): give both."""
        out = {k: v for k, v in kwargs.items() if k != "do_sample_frames"}
        size = kwargs.get("size")
        if size:
            out.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return out

    @staticmethod
    @contextlib.contextmanager
    def _quiet_count_kwargs() -> Iterator[None]:
        """Releases that read ``size`` warn that ``min_pixels``/``max_pixels`` are deprecated;
        :meth:`_count_kwargs` gives both names on purpose (older releases read only those), and
        both carry the same caps, so that one warning is silenced around the counters alone."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Passing `min_pixels` and `max_pixels`", category=FutureWarning)
            yield

    # ------------------------------------------------------------------ counts
    def image_grids(self, images: Sequence[Any], processor: Any) -> list[int]:
        """Patches (grid_h * grid_w) per image, from header sizes through the image processor's
        own ``get_number_of_image_patches`` (its smart-resize rule); no pixel is decoded."""
        ip = processor.image_processor
        kwargs = self._count_kwargs(self.image_kwargs(processor))
        sizes = self.image_sizes(images)
        with self._quiet_count_kwargs():
            return [int(ip.get_number_of_image_patches(h, w, kwargs)) for (w, h) in sizes]

    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        """Tokens per image: patches / merge_size**2."""
        merge = processor.image_processor.merge_size ** 2
        return [n // merge for n in self.image_grids(images, processor)]

    @staticmethod
    def video_patch_count(vp: Any, num_frames: int, height: int, width: int, kwargs: dict[str, Any]) -> int:
        """grid_t * grid_h * grid_w for one video, by the video processor's own counter; where
        an installed version lacks it (GLM-4V in transformers 5.17), by the ``smart_resize``
        of the video processor's own module, as its ``resize`` calls it."""
        if hasattr(vp, "get_num_of_video_patches"):
            with Qwen2VLPlugin._quiet_count_kwargs():
                return int(vp.get_num_of_video_patches(num_frames, height, width, dict(kwargs)))
        size = kwargs.get("size") or vp.size
        patch, merge, temporal = vp.patch_size, vp.merge_size, vp.temporal_patch_size
        smart_resize = sys.modules[type(vp).__module__].smart_resize
        bounds = dict(factor=patch * merge, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        if "num_frames" in inspect.signature(smart_resize).parameters:
            h, w = smart_resize(num_frames=num_frames, height=height, width=width, temporal_factor=temporal, **bounds)
        else:
            h, w = smart_resize(height, width, **bounds)
        return -(-num_frames // temporal) * (h // patch) * (w // patch)

    def video_grids(self, clips: Sequence[VideoClip], processor: Any) -> list[tuple[int, int]]:
        """(temporal groups, patches per group) per video, from frame count and size alone."""
        vp = processor.video_processor
        kwargs = self._count_kwargs(self.video_kwargs(processor))
        grids = []
        for clip in clips:
            w, h = clip.frames[0].size
            patches = self.video_patch_count(vp, len(clip.frames), h, w, kwargs)
            grid_t = -(-len(clip.frames) // vp.temporal_patch_size)
            grids.append((grid_t, patches // grid_t))
        return grids

    def video_token_counts(self, clips: Sequence[VideoClip], processor: Any) -> list[int]:
        merge = processor.video_processor.merge_size ** 2
        return [t * hw // merge for t, hw in self.video_grids(clips, processor)]

    # ------------------------------------------------------------------ text of one medium
    def _wrap(self, token: str | None, count: int) -> str:
        body = token * (count if self.expand_mm_tokens else 1)
        return f"{self.vision_start}{body}{self.vision_end}"

    def image_text(self, processor: Any, count: int) -> str:
        """The tokens one image becomes."""
        return self._wrap(self.image_token, count)

    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        """The tokens one video becomes (families with per-frame timestamps override this)."""
        merge = processor.video_processor.merge_size ** 2
        return self._wrap(self.video_token, grid[0] * grid[1] // merge)

    def processor_video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        """The processor's own ``replace_video_token`` fed the grid and timing computed here:
        per-frame timestamp text stays exactly the processor's, with no pixel processing."""
        from transformers.video_utils import VideoMetadata

        meta = VideoMetadata(**{k: v for k, v in clip.metadata().items() if k != "video_backend"})
        inputs = {"video_grid_thw": torch.tensor([[grid[0], grid[1], 1]]), "video_metadata": [meta]}
        return processor.replace_video_token(inputs, 0)

    # ------------------------------------------------------------------ videos
    def _clips(self, videos: Sequence[Any], processor: Any) -> list[VideoClip]:
        """Decode and sample videos, frame counts rounded to the processor's temporal patch."""
        vp = getattr(processor, "video_processor", None)
        if vp is not None and getattr(vp, "temporal_patch_size", None):
            self.video_frame_factor = int(vp.temporal_patch_size)
        return self._regularize_videos(videos)

    # ------------------------------------------------------------------ public hooks
    def process_messages(
        self,
        messages: Sequence[Message],
        images: Sequence[Any],
        videos: Sequence[Any],
        audios: Sequence[Any],
        processor: Any,
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        return self.expand_visual(messages, images, videos, processor)

    def expand_visual(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], processor: Any
    ) -> list[Message]:
        """Expand image and video placeholders (inputs already validated)."""
        messages = list(messages)
        if images:
            counts = self.image_token_counts(images, processor)
            texts = [self.image_text(processor, n) for n in counts]
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: texts[i])
        if videos:
            clips = self._clips(videos, processor)
            grids = self.video_grids(clips, processor)
            texts = [self.video_text(processor, clip, grid) for clip, grid in zip(clips, grids)]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: texts[i])
        return messages

    def image_inputs(self, images: Sequence[Any], processor: Any) -> dict[str, torch.Tensor]:
        """pixel_values + image_grid_thw from the image processor (the user's caps as its size)."""
        return dict(
            processor.image_processor(self._regularize_images(images), return_tensors="pt", **self.image_kwargs(processor))
        )

    def video_inputs(self, videos: Sequence[Any], processor: Any) -> dict[str, torch.Tensor]:
        """pixel_values_videos + video_grid_thw (+ Qwen2.5-VL's second_per_grid_ts)."""
        from transformers.video_utils import VideoMetadata

        clips = self._clips(videos, processor)
        out = dict(
            processor.video_processor(
                videos=[c.frames for c in clips],
                video_metadata=[c.metadata() for c in clips],
                return_tensors="pt",
                **self.video_kwargs(processor),
            )
        )
        out.pop("video_metadata", None)
        if "second_per_grid_ts" in processor.model_input_names:  # seconds per temporal patch
            temporal = processor.video_processor.temporal_patch_size
            fps = [VideoMetadata(**{k: v for k, v in c.metadata().items() if k != "video_backend"}).sampled_fps
                   for c in clips]
            out["second_per_grid_ts"] = torch.tensor([temporal / f for f in fps])
        return out

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            out.update(self.image_inputs(images, processor))
        if videos:
            out.update(self.video_inputs(videos, processor))
        return out

    def batch_token_type_ids(self, batch_ids: Sequence[list[int]], processor: Any) -> torch.Tensor | None:
        """``mm_token_type_ids`` for the batch padded as the processor pads it (to the longest,
        on the tokenizer's padding side, with text type 0), where the processor returns them.
        A collator that pads further pads these with 0 alongside."""
        if self.token_type_key not in getattr(processor, "model_input_names", ()) or not batch_ids:
            return None
        longest = max(len(ids) for ids in batch_ids)
        pad_id = processor.tokenizer.pad_token_id or 0
        left = getattr(processor.tokenizer, "padding_side", "right") == "left"
        padded = [
            ([pad_id] * (longest - len(ids)) + list(ids)) if left else (list(ids) + [pad_id] * (longest - len(ids)))
            for ids in batch_ids
        ]
        return self.mm_token_type_ids(torch.tensor(padded, dtype=torch.long), processor)

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
        out = super().get_mm_inputs(images, videos, audios, imglens, vidlens, audlens, batch_ids, processor)
        types = self.batch_token_type_ids(batch_ids, processor)
        if types is not None:
            out[self.token_type_key] = types
        return out


register_mm_plugin("qwen2_vl", Qwen2VLPlugin)
register_mm_plugin("qwen2_5_vl", Qwen2VLPlugin)

def qwen2_vl_tower_inputs(tower: Any, grid: torch.Tensor) -> dict[str, Any]:
    """What a Qwen2-VL-style vision tower derives from its grid (rotary positions, ``cu_seqlens``,
    ``max_seqlen``), by the keyword it takes them under, computed on the host by transformers'
    own ``vision_utils`` functions (the sync-free forward's ``tower_inputs``)."""
    from transformers import vision_utils

    position_ids = vision_utils.get_vision_position_ids(grid, tower.spatial_merge_size)
    cu_seqlens, max_seqlen = vision_utils.get_vision_attention_seqlens(grid, tower.config)
    return {"position_ids": position_ids, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}


def qwen2_5_vl_tower_inputs(tower: Any, grid: torch.Tensor) -> dict[str, Any]:
    """:func:`qwen2_vl_tower_inputs` and the window attention's indices and ``cu_window_seqlens``
    (Qwen2.5-VL, Qwen2.5-Omni)."""
    from transformers import vision_utils
    from transformers.utils.generic import get_max_seqlen

    window_index, cu_window_seqlens = vision_utils.get_vision_window_index(
        grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size, patch_size=tower.patch_size)
    max_window_seqlen = get_max_seqlen(cu_window_seqlens, tower.config, kwarg_name="max_window_seqlen")
    return {**qwen2_vl_tower_inputs(tower, grid), "window_index": window_index, "cu_window_seqlens": cu_window_seqlens,
            "max_window_seqlen": max_window_seqlen}


_TOWER_INPUTS = {"qwen2_vl": qwen2_vl_tower_inputs, "qwen2_5_vl": qwen2_5_vl_tower_inputs}

for _model_type in ("qwen2_vl", "qwen2_5_vl"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            packing="mrope",
            template=_model_type,  # qwen2_vl and qwen2_5_vl each have their template
            projector_key="model.visual.merger",
            vision_model_keys=["model.visual.patch_embed", "model.visual.blocks"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=["patch_embed"],
            speed=SpeedCapabilities(fusable_head=True, varlen_attention_classes=("VisionAttention", "Qwen2_5_VLVisionAttention"),
                                    tower_inputs=_TOWER_INPUTS[_model_type], grid_on_host=True),
        )
    )


register_template(TEMPLATES["chatml"].bind("qwen2_vl", plugin="qwen2_vl", default_system="You are a helpful assistant."))
register_template(TEMPLATES["chatml"].bind("qwen2_5_vl", plugin="qwen2_5_vl", default_system="You are a helpful assistant."))
