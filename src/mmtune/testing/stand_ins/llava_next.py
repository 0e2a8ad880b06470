"""Offline stand-ins for the llava_next family (:mod:`mmtune.families.llava_next`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.llava import build_llama_tokenizer, llama_token_ids, tiny_vision_text


TINY_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _build(path: str) -> None:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=TINY_PINPOINTS)
    LlavaNextProcessor(image_processor=ip, tokenizer=build_llama_tokenizer(("<image>",)), patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import LlavaNextConfig

    tok = build_llama_tokenizer(("<image>",))
    return LlavaNextConfig(**tiny_vision_text(tok), **llama_token_ids(tok),
                           image_grid_pinpoints=TINY_PINPOINTS, vision_feature_select_strategy="default",
                           vision_feature_layer=-2)


register_fixture(FamilyFixture("llava_next", build=_build, tiny_config=tiny_config, plugin="llava_next"))
