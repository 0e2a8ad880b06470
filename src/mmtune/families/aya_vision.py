"""Aya Vision: composite layout (vision tower, pixel-shuffle SwiGLU projector, Cohere2 LM).

Freezing and LoRA targeting work for it, and text-only runs train; its placeholder plugin is
not written yet. Its LM scales the logits (``logit_scale``), which the fused cross-entropy
reproduces where the installed transformers applies it."""

from __future__ import annotations

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import Template, register_template

register_composite_model(
    CompositeModel(
        model_type="aya_vision",
        template="aya_vision",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# Aya Vision's chat template: Cohere turns after BOS and a fixed Aya Vision preamble that is always there (a
# sample's system prompt becomes a second system turn); answers sit in <|START_RESPONSE|> ... <|END_RESPONSE|>,
# which the model writes itself after the generation prompt (Cohere's scripts end it at <|CHATBOT_TOKEN|>).
# No plugin of its own yet: media placeholders are not expanded.
AYA_VISION_PREAMBLE = (
    "You are Aya Vision, a brilliant, sophisticated, AI-assistant chatbot trained to assist human users by providing "
    "thorough responses. You are a large vision language model built by the Cohere For AI. You are capable of "
    "interpreting images, including describing them, answering questions about their contents, extracting textual "
    "information, and analyzing visual context.")
register_template(Template(
    name="aya_vision", plugin="base",
    prefix=f"<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{AYA_VISION_PREAMBLE}<|END_OF_TURN_TOKEN|>",
    system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
    user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    assistant="<|START_RESPONSE|>{content}<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
    stop_words=("<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>")))
