"""Gemma 4 (model type ``gemma4``): images at a variable resolution (the aspect ratio kept within
a soft-token budget), videos as per-frame ``mm:ss`` timestamps each followed by a frame's
tokens, and audio (the E2B/E4B checkpoints) as a run whose length follows the clip's duration.
Every count comes from the installed processor's own rules (``_get_num_multimodal_tokens`` for
images and video frames, ``_compute_audio_num_tokens`` for audio, ``replace_video_token`` for a
video's text), from header sizes and frame counts alone, with no pixel work; the processor's
``mm_token_type_ids`` (0 text, 1 image, 2 video, 3 audio) go with every batch, as the model
reads them for its bidirectional attention inside each image.

Chat template, from the E2B/E4B checkpoints' own ``chat_template.jinja`` with thinking off (its
default): ``<bos>``, then ``<|turn>system\\n...<turn|>\\n``, ``<|turn>user\\n...<turn|>\\n`` and
``<|turn>model\\n...<turn|>\\n`` turns; the generation prompt is ``<|turn>model\\n``. The 26B/31B
checkpoints open their no-thinking generation prompt with an empty thought channel, and thinking
turns (``<|think|>`` in the system turn, ``<|channel>thought`` blocks) are not rendered here.

Packing is not declared: image tokens attend to each other both ways (``mm_token_type_ids``),
which packed rows' position-id boundaries do not carry.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from mmtune.media import MediaError, VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import Template, register_template


def _video_metadata(clip: VideoClip) -> Any:
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(**{k: v for k, v in clip.metadata().items() if k != "video_backend"})


class Gemma4Plugin(BasePlugin):
    """``<image>`` -> ``<|image>`` + n x ``<|image|>`` + ``<image|>``; ``<video>`` -> per frame
    ``mm:ss <|image>`` + n x ``<|video|>`` + ``<image|>`` (space-separated); ``<audio>`` ->
    ``<|audio>`` + n x ``<|audio|>`` + ``<audio|>``."""

    default_image_token = "<|image|>"
    default_video_token = "<|video|>"
    default_audio_token = "<|audio|>"
    token_type_key = "mm_token_type_ids"

    # ------------------------------------------------------------------ counts
    def video_frame_tokens(self, clips: Sequence[VideoClip], processor: Any) -> list[int]:
        """Tokens of one frame of each video: the processor's size-only counter on one frame;
        where an installed release's counter takes no videos (5.17), the video processor
        module's own ``get_aspect_ratio_preserving_size``, as its resize calls it."""
        sizes = [[1, c.frames[0].size[1], c.frames[0].size[0]] for c in clips]
        counts = processor._get_num_multimodal_tokens(video_sizes=sizes,
                                                      videos_kwargs={"do_sample_frames": False})["num_video_tokens"]
        if counts is not None:
            return [int(n) for n in counts]
        vp = processor.video_processor
        resize = sys.modules[type(vp).__module__].get_aspect_ratio_preserving_size
        patch, pool = vp.patch_size, vp.pooling_kernel_size
        out = []
        for _, h, w in sizes:
            th, tw = resize(height=h, width=w, patch_size=patch, max_patches=vp.max_soft_tokens * pool**2,
                            pooling_kernel_size=pool)
            out.append((th // patch) * (tw // patch) // pool**2)
        return out

    def audio_token_counts(self, waves: Sequence[Any], processor: Any) -> list[int]:
        rate = processor.feature_extractor.sampling_rate
        return [int(processor._compute_audio_num_tokens(w, rate)) for w in waves]

    # ------------------------------------------------------------------ text
    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any],
        processor: Any,
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        messages = list(messages)
        expand = self.expand_mm_tokens
        if images:
            counts = self.processor_image_token_counts(processor, images) if expand else [0] * len(images)
            texts = [f"{processor.boi_token}{self.image_token * n}{processor.eoi_token}" if expand else self.image_token
                     for n in counts]
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: texts[i])
        if videos:
            if expand:
                clips = self._regularize_videos(videos)
                per_frame = self.video_frame_tokens(clips, processor)
                texts = [processor.replace_video_token(
                    {"num_soft_tokens_per_video": [n], "video_metadata": [_video_metadata(c)]}, 0)
                    for c, n in zip(clips, per_frame)]
            else:
                texts = [self.video_token] * len(videos)
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: texts[i])
        if audios:
            if expand:
                counts = self.audio_token_counts(self._regularize_audios(audios), processor)
                texts = [f"{processor.boa_token}{self.audio_token * n}{processor.eoa_token}" for n in counts]
            else:
                texts = [self.audio_token] * len(audios)
            messages = self.replace_placeholders(messages, AUDIO_PLACEHOLDER, lambda i: texts[i])
        return messages

    # ------------------------------------------------------------------ tensors
    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            result = processor.image_processor(self._regularize_images(images), return_tensors="pt")
            out.update({k: result[k] for k in ("pixel_values", "image_position_ids")})
        if videos:
            clips = self._regularize_videos(videos)
            vp = processor.video_processor
            # releases whose video processor returns num_frames_per_video lay all frames on one axis
            # (any frame counts); older ones (5.17) stack videos, so a batch's must match
            if "num_frames_per_video" not in vp.model_input_names and len({len(c.frames) for c in clips}) > 1:
                raise MediaError(
                    f"Gemma 4 videos of {sorted({len(c.frames) for c in clips})} frames in one batch: the installed "
                    f"transformers stacks a batch's videos, so their frame counts must match; set video_maxlen (and "
                    f"video_fps) so every video samples as many frames, use batches of one video, or install a "
                    f"transformers whose Gemma 4 video processor returns num_frames_per_video (5.25 does)")
            result = vp(videos=[c.frames for c in clips], video_metadata=[c.metadata() for c in clips],
                        do_sample_frames=False, return_tensors="pt")
            out.update({k: result[k] for k in vp.model_input_names if k in result})
        if audios:
            result = processor.feature_extractor(self._regularize_audios(audios), return_tensors="pt",
                                                 **self.processor_defaults(processor, "audio"))
            out.update({k: result[k] for k in ("input_features", "input_features_mask")})
        return out


register_mm_plugin("gemma4", Gemma4Plugin)
register_composite_model(
    CompositeModel(
        model_type="gemma4",
        template="gemma4",
        projector_key="model.embed_vision",
        vision_model_keys=["model.vision_tower", "model.audio_tower", "model.embed_audio"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
        fixed_attention=(("audio_config", "eager"),),  # its audio tower implements no other
    )
)

register_template(Template(
    name="gemma4", plugin="gemma4", prefix="<bos>", system="<|turn>system\n{content}<turn|>\n",
    user="<|turn>user\n{content}<turn|>\n<|turn>model\n", assistant="{content}<turn|>\n", stop_words=("<turn|>",)))
