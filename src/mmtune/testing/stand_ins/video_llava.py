"""Offline stand-ins for the video_llava family (:mod:`mmtune.families.video_llava`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.llava import build_llama_tokenizer, llama_token_ids, tiny_vision_text


def _build(path: str) -> None:
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor, VideoLlavaVideoProcessor

    VideoLlavaProcessor(image_processor=VideoLlavaImageProcessor(), video_processor=VideoLlavaVideoProcessor(),
                        tokenizer=build_llama_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
                        num_additional_image_tokens=1).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import VideoLlavaConfig

    tok = build_llama_tokenizer()
    return VideoLlavaConfig(**tiny_vision_text(tok, image_size=224), **llama_token_ids(tok),
                            vision_feature_select_strategy="default",
                            vision_feature_layer=-2)


register_fixture(FamilyFixture("video_llava", build=_build, tiny_config=tiny_config, plugin="video_llava",
                               modalities=("image", "video")))
