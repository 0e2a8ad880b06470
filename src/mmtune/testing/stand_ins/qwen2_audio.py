"""Offline stand-ins for the qwen2_audio family (:mod:`mmtune.families.qwen2_audio`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.qwen2_vl import build_qwen_tokenizer


AUDIO_SPECIALS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")


def _tokenizer() -> Any:
    return build_qwen_tokenizer(extra_special=AUDIO_SPECIALS)


def _build(path: str) -> None:
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import Qwen2AudioConfig

    tok = _tokenizer()
    return Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )


register_fixture(FamilyFixture("qwen2_audio", build=_build, tiny_config=tiny_config, plugin="qwen2_audio", modalities=("audio",)))
