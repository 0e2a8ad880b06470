"""Offline stand-ins for the internvl family (:mod:`mmtune.families.internvl`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture


INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>",
                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def _tokenizer() -> Any:
    from .qwen2_vl import build_qwen_tokenizer

    return build_qwen_tokenizer(extra_named=INTERNVL_NAMED)


def _build(path: str) -> None:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    ip = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=6)
    vp = InternVLVideoProcessor(size={"height": 448, "width": 448})
    InternVLProcessor(image_processor=ip, video_processor=vp, tokenizer=_tokenizer(), image_seq_length=256).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import InternVLConfig

    tok = _tokenizer()
    return InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[448, 448], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )


register_fixture(FamilyFixture("internvl", build=_build, tiny_config=tiny_config, plugin="internvl",
                               modalities=("image", "video")))
