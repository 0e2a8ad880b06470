"""Offline stand-ins for the lfm2_vl family (:mod:`mmtune.families.lfm2_vl`): its tiny tokenizer
(the checkpoint's image, tile and ChatML tokens), processor and model config (one convolution
layer and one attention layer, as LFM2 interleaves them)."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture

LFM2_SPECIAL = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>",
                *(f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)))


def build_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(LFM2_SPECIAL, vocab_size=600),
                                   bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=list(LFM2_SPECIAL[3:]))


def _build(path: str) -> None:
    from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor

    Lfm2VlProcessor(image_processor=Lfm2VlImageProcessor(), tokenizer=build_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import AutoConfig

    tok = build_tokenizer()
    return AutoConfig.for_model(
        "lfm2_vl",
        text_config=dict(model_type="lfm2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         layer_types=["conv", "full_attention"], max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, patch_size=16, num_patches=256),
        image_token_id=tok.convert_tokens_to_ids("<image>"), projector_hidden_size=64,
    )


register_fixture(FamilyFixture("lfm2_vl", build=_build, tiny_config=tiny_config, plugin="lfm2_vl"))
