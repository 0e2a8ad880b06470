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
from mmtune.testing import FamilyFixture, build_bpe_tokenizer, register_fixture

GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                        "<start_of_image>", "<end_of_image>", "<image_soft_token>")


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


def build_gemma_tokenizer(extra_special: Sequence[str] = (), extra_named: dict[str, str] | None = None) -> Any:
    """A tiny byte-level BPE in Gemma's tokenizer class with Gemma 3's special tokens."""
    from transformers import GemmaTokenizerFast

    specials = list(GEMMA_SPECIAL_TOKENS) + list(extra_special)
    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    named.update(extra_named or {})
    return GemmaTokenizerFast(
        tokenizer_object=build_bpe_tokenizer(specials, vocab_size=400),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        add_bos_token=False, add_eos_token=False,
        extra_special_tokens=named,
    )


def _build(path: str) -> None:
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    ip = Gemma3ImageProcessor(size={"height": 224, "width": 224})
    Gemma3Processor(image_processor=ip, tokenizer=build_gemma_tokenizer(), image_seq_length=64).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import Gemma3Config

    tok = build_gemma_tokenizer()
    return Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=14),
        mm_tokens_per_image=64,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )


register_fixture(FamilyFixture("gemma3", build=_build, tiny_config=tiny_config, plugin="gemma3"))

register_template(TEMPLATES["gemma"].bind("gemma3", plugin="gemma3"))
