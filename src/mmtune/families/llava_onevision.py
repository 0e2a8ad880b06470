"""LLaVA-OneVision: anyres-max images and 2x2-pooled video frames plus one newline token."""

from __future__ import annotations

import math
from typing import Any

from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import register_mm_plugin
from mmtune.testing import FamilyFixture, register_fixture

from .llava import LlavaPlugin, tiny_vision_text
from .qwen2_vl import build_qwen_tokenizer


class LlavaOnevisionPlugin(LlavaPlugin):
    default_video_token = "<video>"

    def video_token_count(self, processor: Any, clip: VideoClip) -> int:
        side = math.ceil(int(math.sqrt(processor.num_image_tokens)) / 2)  # bilinear 2x pooling
        return len(clip.frames) * side * side + 1  # + image_newline


register_mm_plugin("llava_onevision", LlavaOnevisionPlugin)
register_composite_model(
    CompositeModel(
        model_type="llava_onevision",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower", "model.image_newline"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
    )
)

PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768]]


def _tokenizer() -> Any:
    return build_qwen_tokenizer(extra_special=("<image>", "<video>"))


def _build(path: str) -> None:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    ip = LlavaOnevisionImageProcessor(image_grid_pinpoints=PINPOINTS)
    vp = LlavaOnevisionVideoProcessor()
    LlavaOnevisionProcessor(image_processor=ip, video_processor=vp, tokenizer=_tokenizer(), num_image_tokens=729,
                            vision_feature_select_strategy="full").save_pretrained(path)


def tiny_config() -> Any:
    from transformers import LlavaOnevisionConfig

    tok = _tokenizer()
    parts = tiny_vision_text(tok, vision="siglip_vision_model", image_size=384)
    parts["text_config"]["model_type"] = "qwen2"
    return LlavaOnevisionConfig(**parts, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS,
                                vision_feature_select_strategy="full", vision_feature_layer=-1)


register_fixture(FamilyFixture("llava_onevision", build=_build, tiny_config=tiny_config, plugin="llava_onevision",
                               modalities=("image", "video")))
