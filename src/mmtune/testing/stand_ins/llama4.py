"""Offline stand-ins for the llama4 family (:mod:`mmtune.families.llama4`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture


LLAMA4_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>",
                   "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                   "<|tile_y_separator|>", "<|finetune_right_pad|>")


def _tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(LLAMA4_SPECIALS, vocab_size=400),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot|>", pad_token="<|finetune_right_pad|>",
                                   additional_special_tokens=list(LLAMA4_SPECIALS[2:]))


def _build(path: str) -> None:
    from transformers import Llama4ImageProcessor, Llama4Processor

    ip = Llama4ImageProcessor(size={"height": 112, "width": 112}, max_patches=6)
    Llama4Processor(image_processor=ip, tokenizer=_tokenizer(), patch_size=14, pixel_shuffle_ratio=0.5).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import Llama4Config

    tok = _tokenizer()
    return Llama4Config(
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                           projector_output_dim=64, pixel_shuffle_ratio=0.5),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
                         pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<|patch|>"),
    )


register_fixture(FamilyFixture("llama4", build=_build, tiny_config=tiny_config, plugin="llama4"))
