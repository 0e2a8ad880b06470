"""Idefics2: composite layout (SigLIP tower, perceiver-resampler connector, Mistral LM).

Freezing and LoRA targeting work for it; its placeholder plugin is not written yet (Idefics3
covers the successor layout)."""

from __future__ import annotations

from mmtune.families.idefics3 import IDEFICS3_TEMPLATE
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import register_template

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


# Idefics2's chat template is Idefics3's without a BOS in the text (its Mistral tokenizer adds "<s>").
register_template(IDEFICS3_TEMPLATE.bind("idefics2", plugin="base", prefix="<s>"))
