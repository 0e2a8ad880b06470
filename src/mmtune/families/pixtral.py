"""Pixtral (``llava`` checkpoints with PixtralProcessor) and Mistral 3: each image is rows
of ``[IMG]`` separated by ``[IMG_BREAK]`` and closed by ``[IMG_END]``; the rows follow from
the resized size, computed here from the header with the processor module's own resize rule."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class PixtralPlugin(BasePlugin):
    default_image_token = "[IMG]"

    def resized_size(self, processor: Any, height: int, width: int) -> tuple[int, int]:
        resize = sys.modules[type(processor).__module__].get_resize_output_image_size
        size = processor.image_processor.size
        patch = processor.patch_size * processor.spatial_merge_size
        return resize(np.zeros((height, width, 3)), size=(size["longest_edge"], size["longest_edge"]),
                      patch_size=(patch, patch))

    def image_texts(self, images: Sequence[Any], processor: Any) -> list[str]:
        if not self.expand_mm_tokens:
            return [processor.image_token] * len(images)
        sizes = [self.resized_size(processor, h, w) for (w, h) in self.image_sizes(images)]
        return [processor.replace_image_token({"image_sizes": sizes}, i) for i in range(len(images))]

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        texts = self.image_texts(images, processor)
        return self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: texts[i])

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        kwargs = {"patch_size": processor.patch_size * processor.spatial_merge_size}
        return dict(processor.image_processor(self._regularize_images(images), return_tensors="pt", **kwargs))


register_mm_plugin("pixtral", PixtralPlugin)
register_mm_plugin("mistral3", PixtralPlugin)
register_composite_model(
    CompositeModel(
        model_type="mistral3",
        packing="causal",
        template="mistral3",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True, varlen_attention_classes=("PixtralVisionModel",)),
    )
)


# Pixtral-12B (tekken v3): "<s>[INST]...[/INST]...</s>", the system prompt inside the last user turn
# (mistral-common's encode_user_message; the HF chat template of transformers' converter does the same).
register_template(TEMPLATES["mistral"].bind("pixtral", plugin="pixtral", system_in_user=False,
                                            system_in_last_user=True))
# Mistral Small 3.x (v7): the system prompt in its own [SYSTEM_PROMPT] block after BOS. Its chat template's
# default (a dated Mistral persona) is not injected: a training sample brings its own system prompt or none.
register_template(TEMPLATES["mistral"].bind("mistral3", plugin="mistral3", system_in_user=False,
                                            system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]"))
