"""Offline stand-ins for the gemma3n family (:mod:`mmtune.families.gemma3n`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.gemma3 import build_gemma_tokenizer


GEMMA3N_NAMED = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                 "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}


def _tokenizer() -> Any:
    return build_gemma_tokenizer(extra_special=("<audio_soft_token>", "<start_of_audio>", "<end_of_audio>"),
                                 extra_named=GEMMA3N_NAMED)


def _build(path: str) -> None:
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    ip = SiglipImageProcessor(size={"height": 224, "width": 224})
    Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=ip, tokenizer=_tokenizer(),
                     image_seq_length=256, audio_seq_length=188).save_pretrained(path)


def tiny_config() -> Any:
    """Tiny text and audio towers; the vision tower is timm's MobileNetV5 at its real size
    (its architecture is named, not sized, in the config): ~295M parameters, built in seconds."""
    from transformers import Gemma3nConfig

    tok = _tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in GEMMA3N_NAMED.items()}
    n = len(tok)
    return Gemma3nConfig(
        text_config=dict(vocab_size=n, vocab_size_per_layer_input=n, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=8, altup_num_inputs=2,
                         activation_sparsity_pattern=[0.0, 0.0], layer_types=["sliding_attention", "full_attention"],
                         sliding_window=32),
        audio_config=dict(hidden_size=32, conf_num_hidden_layers=1, conf_num_attention_heads=2, vocab_size=128,
                          vocab_offset=n + 128),
        vision_config=dict(vocab_size=128, vocab_offset=n),
        image_token_id=ids["image_token"], audio_token_id=ids["audio_token"], boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"], boa_token_id=ids["boa_token"], eoa_token_id=ids["eoa_token"],
    )


register_fixture(FamilyFixture("gemma3n", build=_build, tiny_config=tiny_config, plugin="gemma3n",
                               modalities=("image", "audio")))
