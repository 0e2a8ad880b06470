"""Gemma 3n: Gemma 3's fixed-length image runs plus audio as a fixed run of
``audio_seq_length`` soft tokens between ``<start_of_audio>`` / ``<end_of_audio>``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class Gemma3nPlugin(BasePlugin):
    default_image_token = "<image_soft_token>"
    default_audio_token = "<audio_soft_token>"
    token_type_key = "token_type_ids"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        image = processor.full_image_sequence if self.expand_mm_tokens else processor.image_token
        audio = processor.full_audio_sequence if self.expand_mm_tokens else processor.audio_token
        messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: image)
        return self.replace_placeholders(messages, AUDIO_PLACEHOLDER, lambda i: audio)

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            out["pixel_values"] = processor.image_processor(self._regularize_images(images), return_tensors="pt")["pixel_values"]
        if audios:
            kwargs = self.processor_defaults(processor, "audio")
            features = processor.feature_extractor(self._regularize_audios(audios), return_tensors="pt", **kwargs)
            out.update({k: features[k] for k in ("input_features", "input_features_mask")})
        return out


register_mm_plugin("gemma3n", Gemma3nPlugin)
register_composite_model(
    CompositeModel(
        model_type="gemma3n",
        template="gemma3n",
        projector_key="model.embed_vision",
        vision_model_keys=["model.vision_tower", "model.audio_tower", "model.embed_audio"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=["timm_model", "subsample_conv_projection"],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


register_template(TEMPLATES["gemma"].bind("gemma3n", plugin="gemma3n"))
