"""Offline stand-ins for the paligemma family (:mod:`mmtune.families.paligemma`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.gemma3 import build_gemma_tokenizer


def _tokenizer() -> Any:
    return build_gemma_tokenizer(extra_special=("<image>",), extra_named={"image_token": "<image>"})


def _build(path: str) -> None:
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    ip = SiglipImageProcessor(size={"height": 224, "width": 224})
    ip.image_seq_length = 256
    PaliGemmaProcessor(image_processor=ip, tokenizer=_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import PaliGemmaConfig

    tok = _tokenizer()
    return PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=14, projection_dim=64),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
    )


register_fixture(FamilyFixture("paligemma", build=_build, tiny_config=tiny_config, plugin="paligemma"))
