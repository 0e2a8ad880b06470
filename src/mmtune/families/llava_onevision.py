"""LLaVA-OneVision: anyres-max tiles for a lone image, one base crop per image in a
multi-image sample, and 2x2-pooled video frames plus one newline token."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mmtune.families.llava import LlavaPlugin
from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class LlavaOnevisionPlugin(LlavaPlugin):
    """A sample with several images skips anyres tiling (the processor and the model both
    key this on ``batch_num_images``), so counts depend on the sample's image count and the
    image processor gets the batch's images nested per sample."""

    default_video_token = "<video>"

    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        if len(images) == 1:
            return super().image_token_counts(images, processor)
        per_image = processor.num_image_tokens + 1  # base crop + image_newline
        if processor.vision_feature_select_strategy == "default":
            per_image -= 1
        return [per_image] * len(images)

    def video_token_count(self, processor: Any, clip: VideoClip) -> int:
        """Each frame's patch grid (side sqrt(num_image_tokens)) bilinearly halved, rounding
        up, plus one image_newline per video. (transformers 5.17's size-only counter ignores
        ``video_sizes``, so the processor's replacement rule is followed here.)"""
        side = math.ceil(math.isqrt(processor.num_image_tokens) / 2)
        return len(clip.frames) * side * side + 1

    def image_batch(self, images: list[Any], imglens: Sequence[int]) -> list[Any]:
        """Images nested per sample (samples without images left out), as the processor groups them."""
        return [group for group in self.split_per_sample(images, imglens) if group]


register_mm_plugin("llava_onevision", LlavaOnevisionPlugin)
register_composite_model(
    CompositeModel(
        model_type="llava_onevision",
        packing="causal",
        template="llava_onevision",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower", "model.image_newline"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# LLaVA-OneVision (Qwen2) trains with LLaVA-NeXT's "qwen_1_5" conversation: ChatML with Qwen's default system.
register_template(TEMPLATES["chatml"].bind("llava_onevision", plugin="llava_onevision",
                                           default_system="You are a helpful assistant."))
