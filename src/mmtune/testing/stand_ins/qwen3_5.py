"""Offline stand-ins for the qwen3_5 family (:mod:`mmtune.families.qwen3_5`): its tiny tokenizer,
processor and model configs (dense and MoE), built without the Hub for tests, benchmarks and the
demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.qwen2_vl import build_qwen_tokenizer, qwen_token_ids

#: Qwen3.5's reasoning markers: added tokens of its tokenizer (not special: decoding keeps them)
THINK_TOKENS = ("<think>", "</think>")


def build_tokenizer() -> Any:
    tok = build_qwen_tokenizer()
    tok.add_tokens(list(THINK_TOKENS))
    return tok


def _build(path: str) -> None:
    """Qwen3.5 checkpoints ship Qwen3-VL's processor: Qwen2-VL's image processor with 16-px
    patches and a 64k..16M pixel range, and Qwen3-VL's video processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    ip = Qwen2VLImageProcessor(patch_size=16, size={"shortest_edge": 65536, "longest_edge": 16777216})
    Qwen3VLProcessor(image_processor=ip, video_processor=Qwen3VLVideoProcessor(),
                     tokenizer=build_tokenizer()).save_pretrained(path)


def tiny_config(model_type: str = "qwen3_5") -> Any:
    """A tiny Qwen3.5 (or, with ``model_type="qwen3_5_moe"``, Qwen3.5-MoE): one Gated DeltaNet
    layer and one full-attention layer, as the real ones interleave them."""
    from transformers import AutoConfig

    tok = build_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                layer_types=["linear_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if model_type == "qwen3_5_moe":
        text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    else:
        text.update(intermediate_size=128)
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, num_position_embeddings=2304),
        tie_word_embeddings=False,
        **qwen_token_ids(tok),
    )


register_fixture(FamilyFixture("qwen3_5", build=_build, tiny_config=tiny_config, plugin="qwen3_5",
                               modalities=("image", "video"), extra={"moe_config": lambda: tiny_config("qwen3_5_moe")}))
