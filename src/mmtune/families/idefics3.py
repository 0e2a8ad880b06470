"""Idefics3 and SmolVLM: images split into a rows x cols grid of sub-images, each
``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x seq, then a global image.
Rows and cols come from the header size through the image processor's own size-only
``get_number_of_image_patches``; the text from the processor's ``replace_image_token``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.media import MediaError
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import Template, register_template


class Idefics3Plugin(BasePlugin):
    default_image_token = "<image>"

    def image_texts(self, images: Sequence[Any], processor: Any) -> list[str]:
        if not self.expand_mm_tokens:
            return [processor.image_token] * len(images)
        ip = processor.image_processor
        kwargs = self.processor_defaults(processor)
        grids = [ip.get_number_of_image_patches(h, w, kwargs)[1:] for (w, h) in self.image_sizes(images)]
        inputs = {"rows": [[r for r, _ in grids]], "cols": [[c for _, c in grids]]}
        return [processor.replace_image_token(inputs, i) for i in range(len(images))]

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        texts = self.image_texts(images, processor)
        return self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: texts[i])

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
        """Images grouped per sample (the processor pads samples to the same sub-image count)."""
        self._validate_input(processor, images, videos, audios)
        if not images:
            return {}
        nested = self.split_per_sample(self._regularize_images(images), imglens)
        out = processor.image_processor(nested, return_tensors="pt", **self.processor_defaults(processor))
        return {k: v for k, v in out.items() if k in ("pixel_values", "pixel_attention_mask")}


class SmolVLMPlugin(Idefics3Plugin):
    """SmolVLM adds videos: an intro line, then per frame a timestamp and one global-image
    block, from the processor's own ``replace_video_token`` fed the frame count and timing.
    Like the processor, a batch holds images or videos, not both (both use ``pixel_values``)."""

    default_video_token = "<video>"

    def _regularize_videos(self, videos: Sequence[Any]) -> list[Any]:
        vp = getattr(getattr(self, "_processor", None), "video_processor", None)
        clips = super()._regularize_videos(videos)
        if vp is not None and getattr(vp, "num_frames", None):
            for clip in clips:  # the processor's frame budget
                if len(clip.frames) > vp.num_frames:
                    keep = torch.linspace(0, len(clip.frames) - 1, vp.num_frames).round().long().tolist()
                    clip.frames = [clip.frames[i] for i in keep]
                    clip.indices = [clip.indices[i] for i in keep]
        return clips

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        from transformers.video_utils import VideoMetadata

        from mmtune.plugins import VIDEO_PLACEHOLDER

        self._processor = processor
        messages = super().process_messages(messages, images, videos, audios, processor)
        if not videos:
            return messages
        texts = []
        for clip in self._regularize_videos(videos):
            if not self.expand_mm_tokens:
                texts.append(self.video_token)
                continue
            meta = VideoMetadata(**{k: v for k, v in clip.metadata().items() if k != "video_backend"})
            stand_in = {"pixel_values": torch.empty(1, len(clip.frames), 0), "video_metadata": [meta]}
            texts.append(processor.replace_video_token(stand_in, 0))
        return self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: texts[i])

    def get_mm_inputs(self, images, videos, audios, imglens, vidlens, audlens, batch_ids, processor):  # type: ignore[no-untyped-def]
        if images and videos:
            raise MediaError("SmolVLM takes images or videos in one batch, not both (its processor cannot either)")
        if not videos:
            return super().get_mm_inputs(images, videos, audios, imglens, vidlens, audlens, batch_ids, processor)
        self._processor = processor
        clips = self._regularize_videos(videos)
        out = processor.video_processor(videos=[c.frames for c in clips], video_metadata=[c.metadata() for c in clips],
                                        do_sample_frames=False, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("pixel_values", "pixel_attention_mask")}


register_mm_plugin("idefics3", Idefics3Plugin)
register_mm_plugin("smolvlm", SmolVLMPlugin)
for _model_type in ("idefics3", "smolvlm"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            packing="causal",
            template=_model_type,  # idefics3 and smolvlm each have their template
            projector_key="model.connector",
            vision_model_keys=["model.vision_model"],
            language_model_keys=["model.text_model", "lm_head"],
            lora_conflict_keys=[],
            speed=SpeedCapabilities(fusable_head=True),
        )
    )


# Idefics3's chat template: "<|begin_of_text|>", then "System: ", "User: ", "Assistant: " turns each closed by
# "<end_of_utterance>\n"; the generation prompt is "Assistant:". SmolVLM's only differs in its BOS.
IDEFICS3_TEMPLATE = register_template(Template(
    name="idefics3", plugin="idefics3", prefix="<|begin_of_text|>", system="System: {content}<end_of_utterance>\n",
    user="User: {content}<end_of_utterance>\nAssistant:", assistant=" {content}<end_of_utterance>\n",
    stop_words=("<end_of_utterance>",)))
register_template(IDEFICS3_TEMPLATE.bind("smolvlm", plugin="smolvlm", prefix="<|im_start|>"))
