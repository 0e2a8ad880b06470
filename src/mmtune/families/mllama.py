"""Mllama (Llama 3.2 Vision): one ``<|image|>`` token per image, no expansion; images reach
the language model through cross-attention, masked by ``cross_attention_mask`` built from
the token ids and each image's tile count (the processor module's own helpers)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class MllamaPlugin(BasePlugin):
    default_image_token = "<|image|>"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        return self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_token)

    def get_mm_inputs(
        self,
        images: Sequence[Any],
        videos: Sequence[Any],
        audios: Sequence[Any],
        imglens: Sequence[int],
        vidlens: Sequence[int],
        audlens: Sequence[int],
        batch_ids: Sequence[list[int]],
        processor: Any,
    ) -> dict[str, Any]:
        """Pixel tiles grouped per sample plus the dense cross-attention mask for right-padded ids."""
        self._validate_input(processor, images, videos, audios)
        if not images:
            return {}
        nested = self.split_per_sample(self._regularize_images(images), imglens)
        out = dict(processor.image_processor(nested, return_tensors="pt"))
        num_tiles = out.pop("num_tiles")
        helpers = sys.modules[type(processor).__module__]
        image_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)
        sparse = [helpers.get_cross_attention_token_mask(list(ids), image_id) for ids in batch_ids]
        dense = helpers.convert_sparse_cross_attention_mask_to_dense(
            sparse, num_tiles=num_tiles, max_num_tiles=processor.image_processor.max_image_tiles,
            length=max(len(ids) for ids in batch_ids),
        )
        out["cross_attention_mask"] = torch.as_tensor(dense)
        return out


register_mm_plugin("mllama", MllamaPlugin)
register_composite_model(
    CompositeModel(
        model_type="mllama",
        template="mllama",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_model"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


register_template(TEMPLATES["llama3"].bind("mllama", plugin="mllama"))
