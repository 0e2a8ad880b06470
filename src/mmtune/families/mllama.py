"""Mllama (Llama 3.2 Vision): one ``<|image|>`` token per image, no expansion; images reach
the language model through cross-attention, masked by ``cross_attention_mask`` built from
the token ids and each image's tile count (the processor module's own helpers)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template
from mmtune.testing import FamilyFixture, build_bpe_tokenizer, register_fixture

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|image|>", "<|finetune_right_pad_id|>", "<|python_tag|>")


class MllamaPlugin(BasePlugin):
    default_image_token = "<|image|>"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        return self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_token)

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
        """Pixel tiles grouped per sample plus the dense cross-attention mask for right-padded ids."""
        self._validate_input(processor, images, videos, audios)
        if not images:
            return {}
        nested = self.split_per_sample(self._regularize_images(images), imglens)
        out = dict(processor.image_processor(nested, return_tensors="pt"))
        num_tiles = out.pop("num_tiles")
        helpers = sys.modules[type(processor).__module__]
        image_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)
        sparse = [helpers.get_cross_attention_token_mask(list(ids), image_id) for ids in batch_ids]
        dense = helpers.convert_sparse_cross_attention_mask_to_dense(
            sparse, num_tiles=num_tiles, max_num_tiles=processor.image_processor.max_image_tiles,
            length=max(len(ids) for ids in batch_ids),
        )
        out["cross_attention_mask"] = torch.as_tensor(dense)
        return out


register_mm_plugin("mllama", MllamaPlugin)
register_composite_model(
    CompositeModel(
        model_type="mllama",
        template="mllama",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_model"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
    )
)


def build_llama3_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(LLAMA3_SPECIALS, vocab_size=400),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>",
                                   additional_special_tokens=list(LLAMA3_SPECIALS[2:]))


def _build(path: str) -> None:
    from transformers import MllamaImageProcessor, MllamaProcessor

    ip = MllamaImageProcessor(size={"height": 112, "width": 112}, max_image_tiles=4)
    MllamaProcessor(image_processor=ip, tokenizer=build_llama3_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import MllamaConfig

    tok = build_llama3_tokenizer()
    return MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           num_attention_heads=2, image_size=112, patch_size=14, max_num_tiles=4,
                           intermediate_layers_indices=[0], vision_output_dim=64),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                         pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )


register_fixture(FamilyFixture("mllama", build=_build, tiny_config=tiny_config, plugin="mllama"))

register_template(TEMPLATES["llama3"].bind("mllama", plugin="mllama"))
