"""LLaVA-NeXT-Video: LLaVA-NeXT images plus videos whose frame features are 2x2 pooled."""

from __future__ import annotations

from typing import Any

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import register_mm_plugin
from mmtune.templates import TEMPLATES, register_template
from mmtune.testing import FamilyFixture, register_fixture

from .llava import build_llama_tokenizer, llama_token_ids, tiny_vision_text
from .llava_next import TINY_PINPOINTS, LlavaNextPlugin


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
    )
)


def _build(path: str) -> None:
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=TINY_PINPOINTS)
    vp = LlavaNextVideoVideoProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaNextVideoProcessor(image_processor=ip, video_processor=vp, tokenizer=build_llama_tokenizer(), patch_size=14,
                            vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import LlavaNextVideoConfig

    tok = build_llama_tokenizer()
    return LlavaNextVideoConfig(**tiny_vision_text(tok), **llama_token_ids(tok), image_grid_pinpoints=TINY_PINPOINTS,
                                vision_feature_select_strategy="default", vision_feature_layer=-2)


register_fixture(FamilyFixture("llava_next_video", build=_build, tiny_config=tiny_config, plugin="llava_next_video",
                               modalities=("image", "video")))

# LLaVA-NeXT-Video-7B is Vicuna-based and trained with LLaVA's vicuna_v1 conversation (BOS first).
register_template(TEMPLATES["vicuna_v1"].bind("llava_next_video", plugin="llava_next_video", prefix="<s>"))
