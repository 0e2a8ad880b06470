"""InternVL (transformers ``internvl``): dynamic tiling; each image becomes ``<img>`` +
``<IMG_CONTEXT>`` x (seq x tiles) + ``</img>``, each video frame a ``Frame{i}:`` block. The
tile count comes from the header size through the processor's size-only counter. The model
takes one ``pixel_values`` tensor with every visual's tiles in order of appearance."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class InternVLPlugin(BasePlugin):
    default_image_token = "<IMG_CONTEXT>"
    default_video_token = "<video>"

    def image_texts(self, images: Sequence[Any], processor: Any) -> list[str]:
        if not self.expand_mm_tokens:
            return [processor.image_token] * len(images)
        sizes = [[h, w] for (w, h) in self.image_sizes(images)]
        patches = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_patches"]
        return [processor.replace_image_token({"num_patches": patches}, i) for i in range(len(images))]

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        texts = self.image_texts(images, processor)
        messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: texts[i])
        if videos:
            frames = [len(c.frames) for c in self._regularize_videos(videos)]
            stand_in = {"pixel_values_videos": [np.empty((n, 0)) for n in frames]}
            vtexts = [processor.replace_video_token(stand_in, i) if self.expand_mm_tokens else processor.video_token
                      for i in range(len(videos))]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: vtexts[i])
        return messages

    def _order(self, ids: Sequence[int], processor: Any) -> list[str]:
        """'image' / 'frame' for each ``<img>`` segment of one sample, in order: video frames
        are the segments preceded by their ``Frame{i}:`` label. Unexpanded ids (the processor
        expands later) hold one image token per image and one video token per video."""
        tok = processor.tokenizer
        if not self.expand_mm_tokens:
            kinds = {processor.image_token_id: "image", tok.convert_tokens_to_ids(processor.video_token): "video"}
            return [kinds[t] for t in ids if t in kinds]
        start = processor.start_image_token_id
        kinds = []
        for pos, token in enumerate(ids):
            if token == start:
                before = tok.decode(list(ids[max(0, pos - 8):pos]))
                kinds.append("frame" if re.search(r"Frame\d+: ?$", before) else "image")
        return kinds

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
        self._validate_input(processor, images, videos, audios)
        image_tiles: list[torch.Tensor] = []
        frame_tiles: list[torch.Tensor] = []
        video_tiles: list[torch.Tensor] = []
        if images:
            defaults = self.processor_defaults(processor)
            out = processor.image_processor(self._regularize_images(images), return_tensors="pt", **defaults)
            bounds = np.cumsum([0] + [int(n) for n in out["num_patches"]])
            image_tiles = [out["pixel_values"][bounds[i]:bounds[i + 1]] for i in range(len(images))]
        if videos:
            clips = self._regularize_videos(videos)
            out = processor.video_processor(videos=[c.frames for c in clips], return_tensors="pt")
            video_tiles = list(out["pixel_values_videos"])
            frame_tiles = [frame[None] for video in video_tiles for frame in video]
        if not images and not videos:
            return {}
        ordered, next_image, next_frame, next_video = [], 0, 0, 0
        for ids in batch_ids:
            for kind in self._order(ids, processor):
                if kind == "image":
                    ordered.append(image_tiles[next_image])
                    next_image += 1
                elif kind == "video":
                    ordered.append(video_tiles[next_video])
                    next_video += 1
                else:
                    ordered.append(frame_tiles[next_frame])
                    next_frame += 1
        return {"pixel_values": torch.cat(ordered)}


register_mm_plugin("internvl", InternVLPlugin)
register_composite_model(
    CompositeModel(
        model_type="internvl",
        packing="causal",
        template="internvl",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# InternVL2.5 / InternVL3 train with their "internvl2_5" conversation: ChatML with this default system prompt
# (the -hf chat template renders the same turns but adds no default system).
INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
register_template(TEMPLATES["chatml"].bind("internvl", plugin="internvl", default_system=INTERNVL_SYSTEM))
