"""Offline stand-ins for the qwen3_omni family (:mod:`mmtune.families.qwen3_omni`): its tiny
tokenizer (the checkpoint's multimodal tokens as named attributes), processor (Qwen2-VL image
and video processors with 16-px patches, a Whisper feature extractor) and thinker config."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.qwen2_vl import build_qwen_tokenizer

#: the tokenizer attributes Qwen3OmniMoeProcessor reads, with the checkpoint's tokens
OMNI3_NAMED = {"image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
               "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
               "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}


def build_tokenizer() -> Any:
    return build_qwen_tokenizer(extra_named=OMNI3_NAMED)


def _build(path: str) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor, WhisperFeatureExtractor

    Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16),
                          video_processor=Qwen2VLVideoProcessor(patch_size=16),
                          feature_extractor=WhisperFeatureExtractor(feature_size=128),
                          tokenizer=build_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    """A tiny Qwen3-Omni thinker: a two-layer MoE text model, a two-block vision tower with one
    deepstack merger, a one-layer audio encoder."""
    from transformers import AutoConfig

    tok = build_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in OMNI3_NAMED.items()}
    return AutoConfig.for_model(
        "qwen3_omni_moe_thinker",
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                          output_dim=64, n_window=50, n_window_infer=400, downsample_hidden_size=16),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[1]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"], audio_token_id=ids["audio_token"],
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
        audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
        position_id_per_seconds=13,
    )


register_fixture(FamilyFixture("qwen3_omni_moe_thinker", build=_build, tiny_config=tiny_config, plugin="qwen3_omni_moe",
                               modalities=("image", "video", "audio")))
