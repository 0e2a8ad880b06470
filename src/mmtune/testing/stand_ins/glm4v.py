"""Offline stand-ins for the glm4v family (:mod:`mmtune.families.glm4v`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture


GLM_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                      "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                      "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>")


def build_glm_tokenizer() -> Any:
    """A tiny byte-level BPE with GLM-4.1V's special tokens (GLM ships a plain fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(GLM_SPECIAL_TOKENS, vocab_size=400),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(GLM_SPECIAL_TOKENS[1:]))


def _build(path: str) -> None:
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    Glm4vProcessor(image_processor=Glm4vImageProcessor(), video_processor=Glm4vVideoProcessor(),
                   tokenizer=build_glm_tokenizer()).save_pretrained(path)


def tiny_config(model_type: str = "glm4v") -> Any:
    """A tiny GLM-4.1V (or, with ``model_type="glm4v_moe"``, GLM-4.5V)."""
    from transformers import AutoConfig

    tok = build_glm_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "partial_rotary_factor": 0.5},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if model_type == "glm4v_moe":
        text.update(moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                    first_k_dense_replace=1, head_dim=16)
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, image_size=336),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )


register_fixture(FamilyFixture("glm4v", build=_build, tiny_config=tiny_config, plugin="glm4v",
                               modalities=("image", "video"), extra={"moe_config": lambda: tiny_config("glm4v_moe")}))
