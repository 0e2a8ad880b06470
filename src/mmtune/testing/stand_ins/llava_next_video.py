"""Offline stand-ins for the llava_next_video family (:mod:`mmtune.families.llava_next_video`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.llava import build_llama_tokenizer, llama_token_ids, tiny_vision_text
from mmtune.testing.stand_ins.llava_next import TINY_PINPOINTS


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
