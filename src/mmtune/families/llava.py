"""LLaVA 1.5 (transformers ``llava``; also VipLLaVA's keys), and the shared base of the
LLaVA families (LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA).

Every LLaVA-style processor repeats one placeholder token per visual feature; only the
count differs by family. Image counts come from the processor's own size-only counter
(``_get_num_multimodal_tokens``) on header sizes, so tokenising never decodes pixels.
Video counts come from the processed frame size and the number of sampled frames, with the
family's pooling rule in :meth:`LlavaPlugin.video_tokens_per_frame`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmtune.media import VideoClip, load_video
from mmtune.media.image import resize_image
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class LlavaPlugin(BasePlugin):
    """``<image>`` -> n x ``<image>`` (n from the processor); videos likewise per family."""

    default_image_token = "<image>"
    #: frames per video when the family's tower expects a fixed number (Video-LLaVA: 8) and
    #: the video processor names none itself; None = sample at ``MediaConfig.video_fps``
    fixed_video_frames: int | None = None

    # ------------------------------------------------------------------ counts
    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        """Tokens per image of one sample (header sizes through the processor's counter)."""
        return self.processor_image_token_counts(processor, images)

    @staticmethod
    def patch_tokens(processor: Any, height: int, width: int) -> int:
        """Patches of one ``height`` x ``width`` crop under the processor's ``patch_size``."""
        return (height // processor.patch_size) * (width // processor.patch_size)

    def video_tokens_per_frame(self, processor: Any, height: int, width: int) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not take videos")

    def video_token_count(self, processor: Any, clip: VideoClip) -> int:
        height, width = self.processed_frame_size(processor.video_processor)
        return self.video_tokens_per_frame(processor, height, width) * len(clip.frames)

    # ------------------------------------------------------------------ frames
    def frames_per_video(self, processor: Any) -> int | None:
        """A fixed frame count: the video processor's own ``num_frames`` when its config sets
        one, else the family's :attr:`fixed_video_frames`; None means fps sampling."""
        video_processor = getattr(processor, "video_processor", None) if processor is not None else None
        return getattr(video_processor, "num_frames", None) or self.fixed_video_frames

    def _regularize_videos(self, videos: Sequence[Any], processor: Any = None) -> list[VideoClip]:
        count = self.frames_per_video(processor)
        if count is None:
            return super()._regularize_videos(videos)
        max_px, min_px = self._user_video_caps()
        clips = []
        for video in videos:
            clip = load_video(video, fps=0, maxlen=10**9)  # every frame, then an even pick of `count`
            picks = np.linspace(0, len(clip.frames) - 1, count).round().astype(int).tolist()
            clip.frames = [resize_image(clip.frames[i], max_px, min_px) for i in picks]
            clip.indices = [clip.indices[i] for i in picks]
            clip.sample_fps = count / clip.duration if clip.duration else clip.sample_fps
            clips.append(clip)
        return clips

    # ------------------------------------------------------------------ expansion
    def _repeat(self, token: str | None, count: int) -> str:
        return token * (count if self.expand_mm_tokens else 1)

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
        messages = [dict(m) for m in messages]
        if images and self.expand_mm_tokens:
            counts = self.image_token_counts(images, processor)
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_token * counts[i])
        elif images:
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_token)
        if videos and self.expand_mm_tokens:
            vcounts = [self.video_token_count(processor, c) for c in self._regularize_videos(videos, processor)]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: self.video_token * vcounts[i])
        elif videos:
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: self.video_token)
        return messages

    # ------------------------------------------------------------------ tensors
    def _sub_kwargs(self, processor: Any, modality: str) -> dict[str, Any]:
        """The processor's call-time defaults for one sub-processor (e.g. LLaVA-NeXT's
        ``do_pad``), so calling the sub-processor directly equals calling the processor."""
        return {k: v for k, v in self.processor_defaults(processor, modality).items() if k != "return_tensors"}

    def image_batch(self, images: list[Any], imglens: Sequence[int]) -> list[Any]:
        """How the batch's images are handed to the image processor (flat here; OneVision
        nests them per sample because its multi-image samples skip anyres tiling)."""
        return images

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
    ) -> dict[str, torch.Tensor | list[Any]]:
        self._validate_input(processor, images, videos, audios)
        out: dict[str, Any] = {}
        if images:
            batch = self.image_batch(self._regularize_images(images), imglens)
            out.update(processor.image_processor(batch, return_tensors="pt", **self._sub_kwargs(processor, "images")))
        if videos:
            frames = [c.frames for c in self._regularize_videos(videos, processor)]
            kwargs = {**self._sub_kwargs(processor, "videos"), "do_sample_frames": False}
            out.update(processor.video_processor(videos=frames, return_tensors="pt", **kwargs))
        return dict(out)


register_mm_plugin("llava", LlavaPlugin)

for _model_type in ("llava", "vipllava"):  # VipLLaVA: same modules, multi-layer projector input
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            packing={"llava": "causal"}.get(_model_type),  # VipLLaVA: not checked to pack exactly
            template={"llava": "llava"}.get(_model_type),  # VipLLaVA's own format has no template
            projector_key="model.multi_modal_projector",
            vision_model_keys=["model.vision_tower"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=[],
            speed=SpeedCapabilities(fusable_head=True, varlen_attention_classes=("PixtralVisionModel",)),
        )
    )


register_template(TEMPLATES["vicuna_v1"].bind("llava", plugin="llava", prefix="<s>"))  # llava-hf tokenizers add BOS
