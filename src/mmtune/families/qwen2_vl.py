"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images and videos with M-RoPE.

Token counts come from the image header and the installed image processor's own
``get_number_of_image_patches`` (its smart-resize rule), so tokenising never decodes
pixels. User pixel caps are handed to the processor (applied once, by it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.testing import FamilyFixture, build_bpe_tokenizer, register_fixture

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


class Qwen2VLPlugin(BasePlugin):
    """``<image>`` -> ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``."""

    default_image_token = "<|image_pad|>"
    default_video_token = "<|video_pad|>"
    vision_start = "<|vision_start|>"
    vision_end = "<|vision_end|>"
    video_frame_factor = 2
    token_type_key = "mm_token_type_ids"

    # ---- caps: handed to the processor, never applied twice
    def _user_image_caps(self) -> tuple[int | None, int | None]:
        return None, None

    def _user_video_caps(self) -> tuple[int | None, int | None]:
        return None, None

    @staticmethod
    def _size_kwargs(sub: Any, max_pixels: int | None, min_pixels: int | None) -> dict[str, Any]:
        if max_pixels is None and min_pixels is None:
            return {}
        size = dict(sub.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        return {"size": size}

    def image_kwargs(self, processor: Any) -> dict[str, Any]:
        return self._size_kwargs(processor.image_processor, self.media.image_max_pixels, self.media.image_min_pixels)

    def video_kwargs(self, processor: Any) -> dict[str, Any]:
        kwargs = self._size_kwargs(processor.video_processor, self.media.video_max_pixels, self.media.video_min_pixels)
        kwargs["do_sample_frames"] = False  # frames are sampled once, by mmtune.media
        return kwargs

    @staticmethod
    def _patch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        size = kwargs.get("size")
        return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]} if size else {}

    # ---- counts
    def image_token_counts(self, images: Sequence[Any], processor: Any) -> list[int]:
        """Tokens per image from header sizes and the processor's own resize rule."""
        ip = processor.image_processor
        kwargs = self._patch_kwargs(self.image_kwargs(processor))
        merge = ip.merge_size**2
        return [ip.get_number_of_image_patches(h, w, kwargs) // merge for (w, h) in self.image_sizes(images)]

    def video_grids(self, clips: Sequence[VideoClip], processor: Any) -> list[tuple[int, int]]:
        """(temporal groups, patches per group) per video, from frame count and size alone."""
        vp = processor.video_processor
        kwargs = self._patch_kwargs(self.video_kwargs(processor))
        grids = []
        for clip in clips:
            w, h = clip.frames[0].size
            patches = vp.get_num_of_video_patches(len(clip.frames), h, w, kwargs)
            grid_t = -(-len(clip.frames) // vp.temporal_patch_size)
            grids.append((grid_t, patches // grid_t))
        return grids

    def video_token_counts(self, clips: Sequence[VideoClip], processor: Any) -> list[int]:
        merge = processor.video_processor.merge_size**2
        return [t * hw // merge for t, hw in self.video_grids(clips, processor)]

    # ---- expansion
    def _wrap(self, token: str | None, count: int) -> str:
        body = token * (count if self.expand_mm_tokens else 1)
        return f"{self.vision_start}{body}{self.vision_end}"

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
            messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self._wrap(self.image_token, counts[i]))
        if videos:
            clips = self._regularize_videos(videos)
            grids = self.video_grids(clips, processor)
            texts = [self.video_text(processor, clip, grid) for clip, grid in zip(clips, grids)]
            messages = self.replace_placeholders(messages, VIDEO_PLACEHOLDER, lambda i: texts[i])
        return messages

    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        """The tokens one video becomes (families with per-frame timestamps override this)."""
        merge = processor.video_processor.merge_size**2
        return self._wrap(self.video_token, grid[0] * grid[1] // merge)

    def processor_video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        """The processor's own ``replace_video_token`` fed the grid and timing computed here:
        per-frame timestamp text stays exactly the processor's, with no pixel processing."""
        from transformers.video_utils import VideoMetadata

        meta = VideoMetadata(**{k: v for k, v in clip.metadata().items() if k != "video_backend"})
        inputs = {"video_grid_thw": torch.tensor([[grid[0], grid[1], 1]]), "video_metadata": [meta]}
        return processor.replace_video_token(inputs, 0)

    # ---- tensors
    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            out.update(
                processor.image_processor(
                    self._regularize_images(images), return_tensors="pt", **self.image_kwargs(processor)
                )
            )
        if videos:
            clips = self._regularize_videos(videos)
            out.update(
                processor.video_processor(
                    videos=[c.frames for c in clips],
                    video_metadata=[c.metadata() for c in clips],
                    return_tensors="pt",
                    **self.video_kwargs(processor),
                )
            )
            out.pop("video_metadata", None)
            if "second_per_grid_ts" in processor.model_input_names:  # Qwen2.5-VL: seconds per temporal patch
                temporal = processor.video_processor.temporal_patch_size
                out["second_per_grid_ts"] = torch.tensor([temporal / c.sample_fps for c in clips])
        return dict(out)


register_mm_plugin("qwen2_vl", Qwen2VLPlugin)
register_mm_plugin("qwen2_5_vl", Qwen2VLPlugin)

for _model_type in ("qwen2_vl", "qwen2_5_vl"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            projector_key="model.visual.merger",
            vision_model_keys=["model.visual.patch_embed", "model.visual.blocks"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=["patch_embed"],
        )
    )


# ---------------------------------------------------------------- tiny offline fixture
def build_qwen_tokenizer(
    path: str | None = None, extra_special: Sequence[str] = (), extra_named: dict[str, str] | None = None
) -> Any:
    """A tiny byte-level BPE with Qwen's special tokens in Qwen2's tokenizer class;
    ``extra_named`` become named special-token attributes (e.g. ``start_image_token``)."""
    from transformers import Qwen2TokenizerFast

    specials = list(QWEN_SPECIAL_TOKENS) + list(extra_special) + [t for t in (extra_named or {}).values() if t not in extra_special]
    kwargs: dict[str, Any] = {"extra_special_tokens": dict(extra_named)} if extra_named else {}
    tok = Qwen2TokenizerFast(
        tokenizer_object=build_bpe_tokenizer(specials, vocab_size=400),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        **kwargs,
    )
    if path:
        tok.save_pretrained(path)
    return tok


def _build_processor(path: str, cls_name: str) -> None:
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = build_qwen_tokenizer()
    cls = getattr(transformers, cls_name)
    proc = cls(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(), tokenizer=tok)
    proc.save_pretrained(path)


def tiny_qwen2_vl_config(model_type: str = "qwen2_vl", vocab_size: int | None = None) -> Any:
    """A ~1M-parameter Qwen2-VL with the real layout (token ids match the tiny tokenizer)."""
    from transformers import AutoConfig

    tok = build_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=vocab_size or len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
    )
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    if model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


register_fixture(
    FamilyFixture(
        name="qwen2_vl",
        build=lambda path: _build_processor(path, "Qwen2VLProcessor"),
        tiny_config=lambda: tiny_qwen2_vl_config("qwen2_vl"),
        plugin="qwen2_vl",
        modalities=("image", "video"),
    )
)
register_fixture(
    FamilyFixture(
        name="qwen2_5_vl",
        build=lambda path: _build_processor(path, "Qwen2_5_VLProcessor"),
        tiny_config=lambda: tiny_qwen2_vl_config("qwen2_5_vl"),
        plugin="qwen2_5_vl",
        modalities=("image", "video"),
    )
)
