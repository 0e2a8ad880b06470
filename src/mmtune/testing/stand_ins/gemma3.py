"""Offline stand-ins for the gemma3 family (:mod:`mmtune.families.gemma3`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture


GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                        "<start_of_image>", "<end_of_image>", "<image_soft_token>")


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
