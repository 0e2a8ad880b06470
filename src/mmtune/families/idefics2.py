"""Idefics2: composite layout (SigLIP tower, perceiver-resampler connector, Mistral LM).

Freezing and LoRA targeting work for it; its placeholder plugin is not written yet (Idefics3
covers the successor layout)."""

from __future__ import annotations

from typing import Any

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import register_template
from mmtune.testing import FamilyFixture, register_fixture

from .idefics3 import IDEFICS3_TEMPLATE

register_composite_model(
    CompositeModel(
        model_type="idefics2",
        template="idefics2",
        projector_key="model.connector",
        vision_model_keys=["model.vision_model"],
        language_model_keys=["model.text_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


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

# Idefics2's chat template is Idefics3's without a BOS in the text (its Mistral tokenizer adds "<s>").
register_template(IDEFICS3_TEMPLATE.bind("idefics2", plugin="base", prefix="<s>"))
