"""Offline stand-ins for the glm46v family (:mod:`mmtune.families.glm46v`): its tiny tokenizer
(GLM-4.1V's special tokens), processor and model config, built without the Hub for tests,
benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.glm4v import GLM_SPECIAL_TOKENS, build_glm_tokenizer


def _build(path: str) -> None:
    from transformers import Glm46VImageProcessor, Glm46VProcessor, Glm46VVideoProcessor

    Glm46VProcessor(image_processor=Glm46VImageProcessor(), video_processor=Glm46VVideoProcessor(),
                    tokenizer=build_glm_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    """A tiny GLM-4.6V: GLM-4.1V's vision tower and a two-layer GLM-4 text model."""
    from transformers import AutoConfig

    tok = build_glm_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS}
    return AutoConfig.for_model(
        "glm46v",
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                          "partial_rotary_factor": 0.5},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, image_size=336),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )


register_fixture(FamilyFixture("glm46v", build=_build, tiny_config=tiny_config, plugin="glm46v",
                               modalities=("image", "video")))
