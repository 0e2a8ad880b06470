"""MiniCPM-V 4.6 and 4.7 (model types ``minicpmv4_6``, ``minicpmv4_7``): a SigLIP tower with a
window-attention merger inside it, a 2x2 merger MLP as projector, and a Qwen3.5 language model
(Gated DeltaNet layers interleaved with full attention).

Images: the image processor slices each image (a source image plus up to ``max_slice_nums``
slices); the text is the processor's own ``replace_image_token`` on that output (``<image>`` +
``<|image_pad|>`` x tokens + ``</image>``, then the slices row by row, each ``<slice>`` ...
``</slice>``, rows joined by ``\\n``), preceded by ``<image_id>i</image_id>`` (``i`` counting the
sample's images) when the image processor's ``use_image_id`` is on, as the processor's
``_prepend_local_ids`` does. Videos: mmtune's frames go to the video processor with
``do_sample_frames=False``, one video per call (its batch output is each video's, concatenated),
the text is the processor's ``replace_video_token``; MiniCPM-V 4.6
numbers videos too, 4.7 does not. Token counts depend on the pixels' slicing only, but come from
running the image processor on the sample (it decides each slice's size), so they always match
the installed release (whose rounding and grid choice changed between 5.17 and 5.25).

Tensors: every image of the batch is one NaViT-packed ``pixel_values`` ``[1, 3, patch, L]`` with
``target_sizes`` per source image and slice, as the processor packs a batch; videos the same as
``pixel_values_videos`` / ``target_sizes_videos``.

MiniCPM-V 4.7 places media with a "canvas" M-RoPE read from ``mm_token_type_ids``, which the
collator builds with the processor's ``create_mm_token_type_ids`` (4.6 uses plain 1-D positions).

Chat templates: ChatML with Qwen3.5's reasoning turns (the transformers model page: a Qwen3.5
backbone, thinking switched by ``enable_thinking``; the authors' fine-tuning guide, MiniCPM-V
cookbook ``finetune_minicpmv46``: answers are trained after ``<think>\\n\\n</think>\\n\\n``, or
after ``<think>\\n`` for thinking data). ``minicpmv4_6`` trains answers without reasoning,
``minicpmv4_6_thinking`` trains the reasoning too.

Packing is not declared: the Qwen3.5 language model's linear-attention state runs across the
row (see :mod:`mmtune.families.qwen3_5`).

transformers 5.17's window merger takes only batches whose source images and slices share one
size; there a batch of mixed sizes is refused with that reason (:func:`check_uniform_sizes`)
instead of failing inside the model.

``minicpmv4_7`` arrived in transformers after 5.17: with an older release its checkpoints are
refused before loading, with the version named (``mmtune.model.folders.check_model_args``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.families.qwen3_5 import NO_PACKING
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import TEMPLATES, register_template


def _divisor(sub_processor: Any) -> int:
    """Tokens per patch divisor, as the processor's ``_process_images`` derives it."""
    return 4 if getattr(sub_processor, "downsample_mode", "16x") == "4x" else 16


#: transformers releases whose window merger takes one (height, width) for the whole batch
UNIFORM_SIZES_ONLY = "<5.25"


def check_uniform_sizes(target_sizes: torch.Tensor, key: str) -> None:
    """Under :data:`UNIFORM_SIZES_ONLY` (transformers 5.17's ``MiniCPMV4_6ViTWindowAttentionMerger``
    views the packed batch as images of one size), a batch whose source images and slices differ
    in size would fail inside the model with a bare reshape error: refuse it here, saying why."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from mmtune.compat import transformers_version
    from mmtune.media import MediaError

    version = transformers_version()
    if len(torch.unique(target_sizes, dim=0)) > 1 and Version(version) in SpecifierSet(UNIFORM_SIZES_ONLY):
        sizes = sorted({tuple(map(int, t)) for t in target_sizes.tolist()})
        raise MediaError(f"MiniCPM-V 4.6 on transformers {version}: this batch's images or slices have different "
                         f"sizes in patches ({key} {sizes}), which the window merger of this release cannot take "
                         f"(it assumes one size per batch); transformers 5.25 takes them: upgrade transformers")


class MiniCPMV46Plugin(BasePlugin):
    default_image_token = "<|image_pad|>"
    default_video_token = "<|video_pad|>"
    #: whether videos are numbered with ``<image_id>`` too (4.6 yes, 4.7 no)
    number_videos = True

    def _images(self, images: Sequence[Any], processor: Any) -> Any:
        return processor.image_processor(self._regularize_images(images), return_tensors="pt")

    def _videos(self, videos: Sequence[Any], processor: Any) -> list[Any]:
        """The video processor's output per video (transformers 5.17's cannot batch videos of
        different frame counts; one at a time, each output is what a batch holds for it)."""
        return [processor.video_processor(videos=[clip.frames], do_sample_frames=False, return_tensors="pt")
                for clip in self._regularize_videos(videos)]

    @staticmethod
    def _image_id(processor: Any, index: int) -> str:
        if not processor.image_processor.use_image_id:
            return ""
        return f"{processor.image_id_start_token}{index}{processor.image_id_end_token}"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any],
        processor: Any,
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        messages = list(messages)
        if not self.expand_mm_tokens:
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_token)
            return self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: self.video_token)
        if images:
            out = self._images(images, processor)
            div = _divisor(processor.image_processor)
            texts = [self._image_id(processor, i) + processor.replace_image_token(out, i, image_token_divisor=div)
                     for i in range(len(images))]
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: texts[i])
        if videos:
            out = self._videos(videos, processor)
            div = _divisor(processor.video_processor)
            vtexts = [(self._image_id(processor, i) if self.number_videos else "")
                      + processor.replace_video_token(one, 0, video_token_divisor=div) for i, one in enumerate(out)]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: vtexts[i])
        return messages

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            data = self._images(images, processor)
            out.update(pixel_values=data["pixel_values"], target_sizes=data["target_sizes"])
        if videos:
            parts = self._videos(videos, processor)
            out.update(pixel_values_videos=torch.cat([p["pixel_values_videos"] for p in parts], dim=-1),
                       target_sizes_videos=torch.cat([p["target_sizes_videos"] for p in parts]))
        for key in ("target_sizes", "target_sizes_videos"):
            if key in out:
                check_uniform_sizes(out[key], key)
        return out


class MiniCPMV47Plugin(MiniCPMV46Plugin):
    token_type_key = "mm_token_type_ids"
    number_videos = False


register_mm_plugin("minicpmv4_6", MiniCPMV46Plugin)
register_mm_plugin("minicpmv4_7", MiniCPMV47Plugin)

for _model_type in ("minicpmv4_6", "minicpmv4_7"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            packing=None,
            no_packing=NO_PACKING,
            template=_model_type,
            projector_key="model.merger",
            vision_model_keys=["model.vision_tower"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=["patch_embedding"],
            speed=SpeedCapabilities(fusable_head=True),
        )
    )

_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
for _name in ("minicpmv4_6", "minicpmv4_7"):  # each with its own plugin (4.7: token types, unnumbered videos)
    register_template(TEMPLATES["chatml"].bind(
        _name, plugin=_name, last_user=_USER + "<think>\n\n</think>\n\n", split_reasoning=True))
    register_template(TEMPLATES["chatml"].bind(
        f"{_name}_thinking", plugin=_name, last_user=_USER + "<think>", generation_tail="\n",
        last_assistant="\n{reasoning}\n</think>\n\n{content}<|im_end|>\n", split_reasoning=True))
