"""Video-LLaVA: CLIP-size images and 8-frame videos, every frame's patches kept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmtune.families.llava import LlavaPlugin
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class VideoLlavaPlugin(LlavaPlugin):
    """Videos get :attr:`fixed_video_frames` frames (8, what its tower was trained on)
    unless the video processor's config names its own ``num_frames``."""

    default_video_token = "<video>"
    fixed_video_frames = 8

    def video_tokens_per_frame(self, processor: Any, height: int, width: int) -> int:
        """Every patch plus CLS: the video tower's features are kept whole, whatever the
        strategy for images."""
        return self.patch_tokens(processor, height, width) + processor.num_additional_image_tokens

    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        """Fixed-size crops: every image gets the same count (its processor has no size-only counter)."""
        height, width = self.processed_frame_size(processor.image_processor)
        per_image = self.patch_tokens(processor, height, width) + processor.num_additional_image_tokens
        if processor.vision_feature_select_strategy == "default":
            per_image -= 1
        return [per_image] * len(images)


register_mm_plugin("video_llava", VideoLlavaPlugin)
register_composite_model(
    CompositeModel(
        model_type="video_llava",
        packing="causal",
        template="video_llava",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.image_tower", "model.video_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# Video-LLaVA-7B is Vicuna-based and trained with LLaVA's v1 conversation (BOS first).
register_template(TEMPLATES["vicuna_v1"].bind("video_llava", plugin="video_llava", prefix="<s>"))
