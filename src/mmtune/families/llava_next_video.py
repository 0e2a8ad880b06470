"""LLaVA-NeXT-Video: LLaVA-NeXT images plus videos whose frame features are 2x2 pooled."""

from __future__ import annotations

from typing import Any

from mmtune.families.llava_next import LlavaNextPlugin
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class LlavaNextVideoPlugin(LlavaNextPlugin):
    default_video_token = "<video>"

    def video_tokens_per_frame(self, processor: Any, height: int, width: int) -> int:
        """2x2 average pooling of every frame's patches; no CLS (videos always use "default")."""
        return self.patch_tokens(processor, height, width) // 4


register_mm_plugin("llava_next_video", LlavaNextVideoPlugin)
register_composite_model(
    CompositeModel(
        model_type="llava_next_video",
        packing="causal",
        template="llava_next_video",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower", "model.image_newline", "model.vision_resampler"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# LLaVA-NeXT-Video-7B is Vicuna-based and trained with LLaVA's vicuna_v1 conversation (BOS first).
register_template(TEMPLATES["vicuna_v1"].bind("llava_next_video", plugin="llava_next_video", prefix="<s>"))
