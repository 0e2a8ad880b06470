"""LLaVA 1.5 (transformers ``llava``; also VipLLaVA's keys), and the shared base of the
LLaVA families (LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA).

Every LLaVA-style processor repeats one placeholder token per visual feature; only the
count differs by family. Image counts come from the processor's own size-only counter
(``_get_num_multimodal_tokens``) on header sizes, so tokenising never decodes pixels.
Video counts come from the processed frame size and the number of sampled frames, with the
family's pooling rule in :meth:`LlavaPlugin.video_tokens_per_frame`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmtune.media import VideoClip, load_video
from mmtune.media.image import resize_image
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template
from mmtune.testing import FamilyFixture, register_fixture
from mmtune.testing.fixtures import CORPUS


class LlavaPlugin(BasePlugin):
    """``<image>`` -> n x ``<image>`` (n from the processor); videos likewise per family."""

    default_image_token = "<image>"
    #: frames per video when the family's tower expects a fixed number (Video-LLaVA: 8) and
    #: the video processor names none itself; None = sample at ``MediaConfig.video_fps``
    fixed_video_frames: int | None = None

    # ------------------------------------------------------------------ counts
    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        """Tokens per image of one sample (header sizes through the processor's counter)."""
        return self.processor_image_token_counts(processor, images)

    @staticmethod
    def patch_tokens(processor: Any, height: int, width: int) -> int:
        """Patches of one ``height`` x ``width`` crop under the processor's ``patch_size``."""
        return (height // processor.patch_size) * (width // processor.patch_size)

    def video_tokens_per_frame(self, processor: Any, height: int, width: int) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not take videos")

    def video_token_count(self, processor: Any, clip: VideoClip) -> int:
        height, width = self.processed_frame_size(processor.video_processor)
        return self.video_tokens_per_frame(processor, height, width) * len(clip.frames)

    # ------------------------------------------------------------------ frames
    def frames_per_video(self, processor: Any) -> int | None:
        """A fixed frame count: the video processor's own ``num_frames`` when its config sets
        one, else the family's :attr:`fixed_video_frames`; None means fps sampling."""
        video_processor = getattr(processor, "video_processor", None) if processor is not None else None
        return getattr(video_processor, "num_frames", None) or self.fixed_video_frames

    def _regularize_videos(self, videos: Sequence[Any], processor: Any = None) -> list[VideoClip]:
        count = self.frames_per_video(processor)
        if count is None:
            return super()._regularize_videos(videos)
        max_px, min_px = self._user_video_caps()
        clips = []
        for video in videos:
            clip = load_video(video, fps=0, maxlen=10**9)  # every frame, then an even pick of `count`
            picks = np.linspace(0, len(clip.frames) - 1, count).round().astype(int).tolist()
            clip.frames = [resize_image(clip.frames[i], max_px, min_px) for i in picks]
            clip.indices = [clip.indices[i] for i in picks]
            clip.sample_fps = count / clip.duration if clip.duration else clip.sample_fps
            clips.append(clip)
        return clips

    # ------------------------------------------------------------------ expansion
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
        messages = [dict(m) for m in messages]
        if images and self.expand_mm_tokens:
            counts = self.image_token_counts(images, processor)
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_token * counts[i])
        elif images:
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_token)
        if videos and self.expand_mm_tokens:
            vcounts = [self.video_token_count(processor, c) for c in self._regularize_videos(videos, processor)]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: self.video_token * vcounts[i])
        elif videos:
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: self.video_token)
        return messages

    # ------------------------------------------------------------------ tensors
    def _sub_kwargs(self, processor: Any, modality: str) -> dict[str, Any]:
        """The processor's call-time defaults for one sub-processor (e.g. LLaVA-NeXT's
        ``do_pad``), so calling the sub-processor directly equals calling the processor."""
        return {k: v for k, v in self.processor_defaults(processor, modality).items() if k != "return_tensors"}

    def image_batch(self, images: list[Any], imglens: Sequence[int]) -> list[Any]:
        """How the batch's images are handed to the image processor (flat here; OneVision
        nests them per sample because its multi-image samples skip anyres tiling)."""
        return images

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
    ) -> dict[str, torch.Tensor | list[Any]]:
        self._validate_input(processor, images, videos, audios)
        out: dict[str, Any] = {}
        if images:
            batch = self.image_batch(self._regularize_images(images), imglens)
            out.update(processor.image_processor(batch, return_tensors="pt", **self._sub_kwargs(processor, "images")))
        if videos:
            frames = [c.frames for c in self._regularize_videos(videos, processor)]
            kwargs = {**self._sub_kwargs(processor, "videos"), "do_sample_frames": False}
            out.update(processor.video_processor(videos=frames, return_tensors="pt", **kwargs))
        return dict(out)


register_mm_plugin("llava", LlavaPlugin)

for _model_type in ("llava", "vipllava"):  # VipLLaVA: same modules, multi-layer projector input
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            packing={"llava": "causal"}.get(_model_type),  # VipLLaVA: not checked to pack exactly
            template={"llava": "llava"}.get(_model_type),  # VipLLaVA's own format has no template
            projector_key="model.multi_modal_projector",
            vision_model_keys=["model.vision_tower"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=[],
        )
    )


# ---------------------------------------------------------------- tiny offline fixtures
LLAMA_BASE_TOKENS = ("<unk>", "<s>", "</s>")


def build_llama_tokenizer(extra_special: Sequence[str] = ("<image>", "<video>"), vocab_size: int = 600) -> Any:
    """A tiny SentencePiece-style BPE (Metaspace ``▁``, byte fallback) in Llama's tokenizer
    class, as the LLaVA / Vicuna checkpoints ship it, with ``extra_special`` and ``<pad>``
    added after the vocabulary as in llava-hf. A byte-level BPE would reload as
    ``TokenizersBackend`` (transformers refuses ByteLevel under ``LlamaTokenizer``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    base = list(LLAMA_BASE_TOKENS) + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base, show_progress=False)
    bpe.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizerFast(vocab=model["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>",
                             eos_token="</s>", add_bos_token=False, add_eos_token=False)
    tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def llama_token_ids(tok: Any) -> dict[str, int]:
    """Config fields naming LLaVA's media tokens for a tiny model matching ``tok``."""
    ids = {"image_token_id": tok.convert_tokens_to_ids("<image>")}
    if "<video>" in tok.get_vocab():
        ids["video_token_id"] = tok.convert_tokens_to_ids("<video>")
    return ids


def tiny_vision_text(tok: Any, vision: str = "clip_vision_model", image_size: int = 336,
                     text: str = "llama") -> dict[str, Any]:
    """Tiny tower + tiny 2-layer text config dicts shared by the LLaVA family fixtures."""
    return {
        "vision_config": dict(model_type=vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32),
        "text_config": dict(model_type=text, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
    }


def _build_llava(path: str) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=ip, tokenizer=build_llama_tokenizer(("<image>",)), patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


def _tiny_llava() -> Any:
    from transformers import LlavaConfig

    tok = build_llama_tokenizer(("<image>",))
    return LlavaConfig(**tiny_vision_text(tok), **llama_token_ids(tok), vision_feature_select_strategy="default",
                       vision_feature_layer=-2)


def _tiny_vipllava() -> Any:
    from transformers import VipLlavaConfig

    tok = build_llama_tokenizer(("<image>",))
    return VipLlavaConfig(**tiny_vision_text(tok), **llama_token_ids(tok), vision_feature_layers=[-2, -1])


register_fixture(FamilyFixture("llava", build=_build_llava, tiny_config=_tiny_llava, plugin="llava",
                               extra={"vipllava_config": _tiny_vipllava}))

register_template(TEMPLATES["vicuna_v1"].bind("llava", plugin="llava", prefix="<s>"))  # llava-hf tokenizers add BOS
