"""Offline stand-ins for the mllama family (:mod:`mmtune.families.mllama`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|image|>", "<|finetune_right_pad_id|>", "<|python_tag|>")


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
