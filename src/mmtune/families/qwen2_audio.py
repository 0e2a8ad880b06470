"""Qwen2-Audio: Whisper log-mel features; ``<audio>`` -> ``<|audio_bos|>`` + n x
``<|AUDIO|>`` + ``<|audio_eos|>`` with n from the mel length through the encoder's
conv (stride 2) and pooling (stride 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import AUDIO_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class WhisperAudioMixin:
    """Whisper-style features as the Qwen audio processors build them (padded to 30 s,
    ``feature_attention_mask`` marking the real frames)."""

    media: Any
    audio_token: str
    expand_mm_tokens: bool
    audio_bos = "<|audio_bos|>"
    audio_eos = "<|audio_eos|>"

    def audio_features(self, waves: Sequence[np.ndarray], processor: Any) -> dict[str, torch.Tensor]:
        out = processor.feature_extractor(
            list(waves),
            sampling_rate=processor.feature_extractor.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    @staticmethod
    def mel_frames(wave: np.ndarray, processor: Any) -> int:
        """Real (unpadded) mel frames the extractor marks for ``wave``: one per started hop
        (its mask is the sample mask taken every ``hop_length``), capped at 30 s."""
        fe = processor.feature_extractor
        return min(-(-len(wave) // fe.hop_length), fe.nb_max_frames)

    @staticmethod
    def audio_tokens_for_frames(frames: int) -> int:
        """Encoder outputs for ``frames`` mel frames: the conv of stride 2, then the pooling of
        stride 2 (the processors' own ``(((l - 1) // 2 + 1) - 2) // 2 + 1``)."""
        return (((frames - 1) // 2 + 1) - 2) // 2 + 1

    def audio_token_count(self, wave: np.ndarray, processor: Any) -> int:
        """Audio tokens for one regularised clip, from its length alone (no mel is computed)."""
        return self.audio_tokens_for_frames(self.mel_frames(wave, processor))

    def expand_audio(self, messages: Sequence[Message], audios: Sequence[Any], processor: Any) -> list[Message]:
        """``<audio>`` -> ``<|audio_bos|>`` + n x ``<|AUDIO|>`` + ``<|audio_eos|>`` (one token with
        ``expand_mm_tokens=False``, which the processor then expands itself)."""
        if not audios:
            return list(messages)
        counts = [self.audio_token_count(w, processor) for w in self._regularize_audios(audios)]
        return self.replace_placeholders(
            messages, AUDIO_PLACEHOLDER, lambda i: self.audio_bos + self.audio_token * self._shown(counts[i]) + self.audio_eos
        )

    def _shown(self, count: int) -> int:
        return count if self.expand_mm_tokens else 1


class Qwen2AudioPlugin(WhisperAudioMixin, BasePlugin):
    default_audio_token = "<|AUDIO|>"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        return self.expand_audio(messages, audios, processor)

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        return self.audio_features(self._regularize_audios(audios), processor) if audios else {}


register_mm_plugin("qwen2_audio", Qwen2AudioPlugin)
register_composite_model(
    CompositeModel(
        model_type="qwen2_audio",
        model_class="Qwen2AudioForConditionalGeneration",  # behind no image-text Auto class
        packing="causal",
        template="qwen2_audio",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.audio_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=False),
    )
)


register_template(TEMPLATES["chatml"].bind("qwen2_audio", plugin="qwen2_audio", default_system="You are a helpful assistant."))
