"""Offline stand-ins for the aya_vision family (:mod:`mmtune.families.aya_vision`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture


#: the special tokens of Cohere's tokenizer that Aya Vision's template and processor use
AYA_SPECIAL_TOKENS = ("<PAD>", "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
                      "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<image>",
                      "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")


def build_aya_tokenizer() -> Any:
    """A tiny byte-level BPE carrying Aya Vision's special tokens (Cohere's turn tokens and the
    processor's image tokens), so the template's text and a tiny model's ids agree."""
    from transformers import PreTrainedTokenizerFast

    from mmtune.testing.fixtures import build_bpe_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(AYA_SPECIAL_TOKENS, vocab_size=400),
                                   bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>", pad_token="<PAD>",
                                   additional_special_tokens=list(AYA_SPECIAL_TOKENS[2:]))


def _build(path: str) -> None:
    """Aya Vision's processor (GOT-OCR2's image processor, 64-px tiles) over the tiny tokenizer."""
    from transformers import AyaVisionProcessor, GotOcr2ImageProcessor

    image_processor = GotOcr2ImageProcessor(size={"height": 64, "width": 64}, crop_to_patches=False)
    AyaVisionProcessor(image_processor=image_processor, tokenizer=build_aya_tokenizer(), patch_size=16, img_size=64,
                       downsample_factor=2).save_pretrained(path)


def tiny_config() -> Any:
    """A tiny Aya Vision (SigLIP tower, Cohere2 LM) whose vocabulary is the tiny tokenizer's."""
    from transformers import AyaVisionConfig

    tok = build_aya_tokenizer()
    return AyaVisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=64, patch_size=16),
        text_config=dict(model_type="cohere2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        downsample_factor=2, adapter_layer_norm_eps=1e-6, alignment_intermediate_size=64,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )


register_fixture(FamilyFixture("aya_vision", build=_build, tiny_config=tiny_config, plugin=None))
