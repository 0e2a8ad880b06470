"""Offline stand-ins for the gemma4 family (:mod:`mmtune.families.gemma4`): its tiny tokenizer,
processor (image, video and audio) and model config (an E2B-like layout: text, vision and audio
towers), built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.gemma3 import build_gemma_tokenizer

#: the tokenizer's named multimodal tokens, as the checkpoints' tokenizer_config.json names them
GEMMA4_NAMED = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
GEMMA4_SPECIAL = ("<|turn>", "<turn|>", "<|video|>", *GEMMA4_NAMED.values())


def build_tokenizer() -> Any:
    return build_gemma_tokenizer(extra_special=GEMMA4_SPECIAL, extra_named=GEMMA4_NAMED)


def _build(path: str) -> None:
    """The checkpoints' processor classes; images at the smallest soft-token budget the models
    take (70, as their video processor uses) to keep tests short."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor, Gemma4VideoProcessor

    Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(max_soft_tokens=70),
                    tokenizer=build_tokenizer(), video_processor=Gemma4VideoProcessor()).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import Gemma4Config

    tok = build_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in GEMMA4_NAMED.items()}
    n = len(tok)
    return Gemma4Config(
        text_config=dict(vocab_size=n, vocab_size_per_layer_input=n, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         global_head_dim=16, hidden_size_per_layer_input=8, sliding_window=32,
                         layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16),
        audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=32,
                          subsampling_conv_channels=[128, 4]),  # [0] is tied to the 128 mel bins
        image_token_id=ids["image_token"], boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
        audio_token_id=ids["audio_token"], boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"],
        video_token_id=tok.convert_tokens_to_ids("<|video|>"),
    )


register_fixture(FamilyFixture("gemma4", build=_build, tiny_config=tiny_config, plugin="gemma4",
                               modalities=("image", "video", "audio")))
