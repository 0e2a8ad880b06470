"""Gemma 3: each image is a fixed ``image_seq_length`` run of soft tokens between
``<start_of_image>`` / ``<end_of_image>`` (blank lines around); ``token_type_ids`` mark them.
Pan-and-scan (off by default) adds crops whose number needs the image processor's decision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class Gemma3Plugin(BasePlugin):
    default_image_token = "<start_of_image>"
    token_type_key = "token_type_ids"

    def __init__(self, *args: Any, pan_and_scan: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pan_and_scan = pan_and_scan

    def _image_kwargs(self, processor: Any) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.processor_defaults(processor).items() if k.startswith("pan_and_scan")}
        kwargs["do_pan_and_scan"] = self.pan_and_scan
        return kwargs

    def _crops(self, images: Sequence[Any], processor: Any) -> list[int]:
        if not self.pan_and_scan:
            return [0] * len(images)
        out = processor.image_processor(self._regularize_images(images), return_tensors="pt", **self._image_kwargs(processor))
        return [int(n) for n in out["num_crops"]]

    def image_text(self, processor: Any, crops: int) -> str:
        if not self.expand_mm_tokens:
            return processor.boi_token
        full = processor.full_image_sequence
        if not crops:
            return full
        return f"Here is the original image {full} and here are some crops to help you see better " + " ".join([full] * crops)

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        crops = self._crops(images, processor)
        return self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_text(processor, crops[i]))

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            result = processor.image_processor(
                self._regularize_images(images), return_tensors="pt", **self._image_kwargs(processor)
            )
            out["pixel_values"] = result["pixel_values"]
        return out


register_mm_plugin("gemma3", Gemma3Plugin)
register_composite_model(
    CompositeModel(
        model_type="gemma3",
        template="gemma3",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


register_template(TEMPLATES["gemma"].bind("gemma3", plugin="gemma3"))
