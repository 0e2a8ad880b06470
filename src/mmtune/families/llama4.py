"""Llama 4: each image is ``<|image_start|>`` + (for multi-tile images) rows of tiles of
``<|patch|>`` separated by x/y separators + ``<|image|>`` + a global tile + ``<|image_end|>``.
The tile grid follows from the header size through the image processor module's own
best-fit rule; the text from the processor's ``_prompt_split_image``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import Template, register_template


class Llama4Plugin(BasePlugin):
    default_image_token = "<|image|>"

    def tile_grid(self, processor: Any, height: int, width: int) -> tuple[int, int]:
        ip = processor.image_processor
        helpers = sys.modules[type(ip).__module__]
        size = ip.size
        resolutions = torch.as_tensor(helpers.find_supported_resolutions(max_num_chunks=ip.max_patches, patch_size=size))
        target = helpers.get_best_fit((height, width), resolutions, resize_to_max_canvas=ip.resize_to_max_canvas)
        return int(target[0]) // size["height"], int(target[1]) // size["width"]

    def image_texts(self, images: Sequence[Any], processor: Any) -> list[str]:
        if not self.expand_mm_tokens:
            return [processor.fake_image_token] * len(images)
        size = processor.image_processor.size
        per_chunk = int((size["height"] // processor.patch_size) * (size["width"] // processor.patch_size)
                        // processor.downsample_ratio)
        return [processor._prompt_split_image(self.tile_grid(processor, h, w), per_chunk) for (w, h) in self.image_sizes(images)]

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
        out = processor.image_processor(self._regularize_images(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}


register_mm_plugin("llama4", Llama4Plugin)


register_composite_model(
    CompositeModel(
        model_type="llama4",
        template="llama4",
        projector_key="multi_modal_projector",  # Llama 4 keeps no inner ``model`` (5.17 and 5.23)
        vision_model_keys=["vision_model"],
        language_model_keys=["language_model"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# Llama 4's chat template (transformers' processing_llama4): BOS, then "<|header_start|>role<|header_end|>\n\n"
# turns closed by "<|eot|>".
register_template(Template(
    name="llama4", plugin="llama4", prefix="<|begin_of_text|>",
    system="<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
    user="<|header_start|>user<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",
    assistant="{content}<|eot|>", stop_words=("<|eot|>",)))
