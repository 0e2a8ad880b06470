"""Offline stand-ins for the llava_onevision family (:mod:`mmtune.families.llava_onevision`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.llava import tiny_vision_text
from mmtune.testing.stand_ins.qwen2_vl import build_qwen_tokenizer


PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768]]


def _tokenizer() -> Any:
    return build_qwen_tokenizer(extra_special=("<image>", "<video>"))


def _build(path: str) -> None:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    ip = LlavaOnevisionImageProcessor(image_grid_pinpoints=PINPOINTS)
    vp = LlavaOnevisionVideoProcessor()
    LlavaOnevisionProcessor(image_processor=ip, video_processor=vp, tokenizer=_tokenizer(), num_image_tokens=729,
                            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9").save_pretrained(path)


def tiny_config() -> Any:
    from transformers import LlavaOnevisionConfig

    tok = _tokenizer()
    parts = tiny_vision_text(tok, vision="siglip_vision_model", image_size=384, text="qwen2")
    return LlavaOnevisionConfig(**parts, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS,
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                vision_aspect_ratio="anyres_max_9")


register_fixture(FamilyFixture("llava_onevision", build=_build, tiny_config=tiny_config, plugin="llava_onevision",
                               modalities=("image", "video")))
