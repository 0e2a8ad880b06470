"""LLaVA 1.5 (transformers ``llava``), and the shared base of the LLaVA families.

Every LLaVA-style processor repeats one placeholder token per visual feature; only the
count differs by family. Image counts come from the processor's own size-only counter
(``_get_num_multimodal_tokens``) on header sizes; video counts from the processed frame
size and frame count, with the family's pooling rule in :meth:`video_tokens_per_frame`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template
from mmtune.testing import FamilyFixture, build_bpe_tokenizer, register_fixture


class LlavaPlugin(BasePlugin):
    """``<image>`` -> n x ``<image>`` (n from the processor); videos likewise per family."""

    default_image_token = "<image>"
    #: a fixed number of frames per video (Video-LLaVA's tower expects 8); None = fps sampling
    fixed_video_frames: int | None = None

    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        return self.processor_image_token_counts(processor, images)

    def video_tokens_per_frame(self, processor: Any, height: int, width: int) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not take videos")

    def video_token_count(self, processor: Any, clip: VideoClip) -> int:
        height, width = self.processed_frame_size(processor.video_processor)
        return self.video_tokens_per_frame(processor, height, width) * len(clip.frames)

    def _regularize_videos(self, videos: Sequence[Any]) -> list[VideoClip]:
        if self.fixed_video_frames is None:
            return super()._regularize_videos(videos)
        from mmtune.media import load_video

        clips = []
        for v in videos:
            clip = load_video(v, fps=0, maxlen=10**9)  # every frame, then an even pick of N
            n = self.fixed_video_frames
            picks = torch.linspace(0, len(clip.frames) - 1, n).round().long().tolist()
            clip.frames = [clip.frames[i] for i in picks]
            clip.indices = [clip.indices[i] for i in picks]
            clips.append(clip)
        return clips

    def _repeat(self, token: str | None, count: int) -> str:
        return token * (count if self.expand_mm_tokens else 1)

    def process_messages(
        self,
        messages: Sequence[Message],
        images: Sequence[Any],
        videos: Sequence[Any],
        audios: Sequence[Any],
        processor: Any,
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        messages = list(messages)
        if images:
            counts = self.image_token_counts(images, processor)
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self._repeat(self.image_token, counts[i]))
        if videos:
            vcounts = [self.video_token_count(processor, c) for c in self._regularize_videos(videos)]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: self._repeat(self.video_token, vcounts[i]))
        return messages

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            out.update(processor.image_processor(self._regularize_images(images), return_tensors="pt"))
        if videos:
            clips = self._regularize_videos(videos)
            out.update(
                processor.video_processor(videos=[c.frames for c in clips], do_sample_frames=False, return_tensors="pt")
            )
        return dict(out)


register_mm_plugin("llava", LlavaPlugin)

register_composite_model(
    CompositeModel(
        model_type="llava",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
    )
)
register_composite_model(
    CompositeModel(
        model_type="vipllava",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
    )
)


# ---------------------------------------------------------------- tiny offline fixtures
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<video>", "<pad>")


def build_llama_tokenizer(extra_special: Sequence[str] = ()) -> Any:
    """A tiny byte-level BPE in Llama's tokenizer class with LLaVA's special tokens."""
    from transformers import LlamaTokenizerFast

    specials = list(LLAMA_SPECIAL_TOKENS) + list(extra_special)
    tok = LlamaTokenizerFast(
        tokenizer_object=build_bpe_tokenizer(specials, vocab_size=400),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=False,
        additional_special_tokens=["<image>", "<video>"] + list(extra_special),
    )
    return tok


def tiny_vision_text(tok: Any, vision: str = "clip_vision_model", image_size: int = 336) -> dict[str, Any]:
    """Tiny tower + tiny Llama text config dicts shared by the LLaVA family fixtures."""
    return {
        "vision_config": dict(model_type=vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32),
        "text_config": dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=8192, pad_token_id=tok.pad_token_id),
    }


def _build_llava(path: str) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=ip, tokenizer=build_llama_tokenizer(), patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


def _tiny_llava() -> Any:
    from transformers import LlavaConfig

    tok = build_llama_tokenizer()
    return LlavaConfig(**tiny_vision_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def _tiny_vipllava() -> Any:
    from transformers import VipLlavaConfig

    tok = build_llama_tokenizer()
    return VipLlavaConfig(**tiny_vision_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layers=[-2, -1])


register_fixture(FamilyFixture("llava", build=_build_llava, tiny_config=_tiny_llava, plugin="llava",
                               extra={"vipllava_config": _tiny_vipllava}))

register_template(TEMPLATES["vicuna_v1"].bind("llava", plugin="llava"))
