"""Gemma 3n: Gemma 3's fixed-length image runs plus audio as a fixed run of
``audio_seq_length`` soft tokens between ``<start_of_audio>`` / ``<end_of_audio>``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template
from mmtune.testing import FamilyFixture, register_fixture

from .gemma3 import build_gemma_tokenizer

GEMMA3N_NAMED = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                 "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}


class Gemma3nPlugin(BasePlugin):
    default_image_token = "<image_soft_token>"
    default_audio_token = "<audio_soft_token>"
    token_type_key = "token_type_ids"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        image = processor.full_image_sequence if self.expand_mm_tokens else processor.image_token
        audio = processor.full_audio_sequence if self.expand_mm_tokens else processor.audio_token
        messages = self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: image)
        return self.replace_placeholders(messages, AUDIO_PLACEHOLDER, lambda i: audio)

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            out["pixel_values"] = processor.image_processor(self._regularize_images(images), return_tensors="pt")["pixel_values"]
        if audios:
            kwargs = self.processor_defaults(processor, "audio")
            features = processor.feature_extractor(self._regularize_audios(audios), return_tensors="pt", **kwargs)
            out.update({k: features[k] for k in ("input_features", "input_features_mask")})
        return out


register_mm_plugin("gemma3n", Gemma3nPlugin)
register_composite_model(
    CompositeModel(
        model_type="gemma3n",
        template="gemma3n",
        projector_key="model.embed_vision",
        vision_model_keys=["model.vision_tower", "model.audio_tower", "model.embed_audio"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=["timm_model", "subsample_conv_projection"],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


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

register_template(TEMPLATES["gemma"].bind("gemma3n", plugin="gemma3n"))
