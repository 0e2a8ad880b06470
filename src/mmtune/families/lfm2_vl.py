"""LFM2-VL (model type ``lfm2_vl``): a SigLIP2 NaFlex vision tower, a pixel-unshuffle projector and
an LFM2 language model whose layers mix short gated convolutions with full attention.

Images: each becomes ``<|image_start|>`` + (large images: per tile ``<|img_row_R_col_C|>`` and
its tokens, then ``<|img_thumbnail|>`` and the thumbnail's tokens; small ones: one run of
``<image>`` tokens) + ``<|image_end|>``. The tiling is the image processor's (run once on the
image for ``image_rows`` / ``image_cols`` / ``image_sizes``), the text the processor's own
``replace_image_token`` on that output, so both match the installed release.

Chat template: ChatML after the tokenizer's ``<|startoftext|>`` (no default system prompt).

Packing is not declared: the convolution layers carry a state (the last ``conv_L_cache`` inputs)
across the row, which packed position ids do not reset, so one sample would leak into the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import TEMPLATES, register_template

#: why packed rows are not exact for LFM2's hybrid layers (see the module docstring)
NO_PACKING = ("its short-convolution layers carry the last inputs across the row, which packed position ids do "
              "not reset, so packed samples would leak into one another")


class Lfm2VlPlugin(BasePlugin):
    default_image_token = "<image>"

    def _image_outputs(self, images: Sequence[Any], processor: Any) -> Any:
        return processor.image_processor(self._regularize_images(images), return_row_col_info=True, return_tensors="pt")

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any],
        processor: Any,
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        if not images:
            return list(messages)
        if not self.expand_mm_tokens:
            return self.replace_placeholders(list(messages), IMAGE_PLACEHOLDER, lambda i: self.image_token)
        out = self._image_outputs(images, processor)
        texts = [processor.replace_image_token(out, i, use_image_special_tokens=True) for i in range(len(images))]
        return self.replace_placeholders(list(messages), IMAGE_PLACEHOLDER, lambda i: texts[i])

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        out = self._image_outputs(images, processor)
        return {k: out[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


register_mm_plugin("lfm2_vl", Lfm2VlPlugin)
register_composite_model(
    CompositeModel(
        model_type="lfm2_vl",
        packing=None,
        no_packing=NO_PACKING,
        template="lfm2_vl",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)

register_template(TEMPLATES["chatml"].bind("lfm2_vl", plugin="lfm2_vl", prefix="<|startoftext|>"))
