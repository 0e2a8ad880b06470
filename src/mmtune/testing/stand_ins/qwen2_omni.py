"""Offline stand-ins for the qwen2_omni family (:mod:`mmtune.families.qwen2_omni`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.qwen2_vl import build_qwen_tokenizer


#: the tokenizer attributes Qwen2_5OmniProcessor reads, with the real checkpoint's tokens
OMNI_NAMED = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


def _tokenizer() -> Any:
    return build_qwen_tokenizer(extra_named=OMNI_NAMED)


def _build(path: str) -> None:
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor

    Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                         feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import Qwen2_5OmniThinkerConfig

    tok = _tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in OMNI_NAMED.items()}
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                          output_dim=64, max_source_positions=1500, n_window=100),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=112),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        image_token_index=ids["image_token"], video_token_index=ids["video_token"], audio_token_index=ids["audio_token"],
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
        audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
        position_id_per_seconds=25, seconds_per_chunk=2,
    )


register_fixture(FamilyFixture("qwen2_omni", build=_build, tiny_config=tiny_config, plugin="qwen2_omni",
                               modalities=("image", "video", "audio")))
