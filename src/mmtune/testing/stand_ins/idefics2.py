"""Offline stand-ins for the idefics2 family (:mod:`mmtune.families.idefics2`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture


def tiny_config() -> Any:
    from transformers import Idefics2Config

    return Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        perceiver_config=dict(hidden_act="silu", resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=16, num_key_value_heads=1),
        text_config=dict(model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=255,
    )


register_fixture(FamilyFixture("idefics2", build=lambda path: None, tiny_config=tiny_config, plugin=None))
