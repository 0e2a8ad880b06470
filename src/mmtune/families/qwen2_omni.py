"""Qwen2.5-Omni (thinker): Qwen2-VL images and videos, Whisper audio, and with
``use_audio_in_video`` a video's own audio track interleaved with its frames in chunks of
``seconds_per_chunk`` (positions at ``position_id_per_seconds`` per second)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmtune.media import VideoClip, load_audio
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import AUDIO_PLACEHOLDER, Message, register_mm_plugin
from mmtune.testing import FamilyFixture, register_fixture

from .qwen2_audio import Qwen2AudioPlugin, WhisperAudioMixin
from .qwen2_vl import Qwen2VLPlugin, build_qwen_tokenizer

OMNI_NAMED = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


def chunk_bounds(positions: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    """(start, end) slices of monotone ``positions`` falling in successive windows of ``per_chunk``."""
    bounds, start, chunk = [], 0, 1
    for i, value in enumerate(positions):
        if value >= chunk * per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(positions)))
    return bounds


class Qwen2OmniPlugin(WhisperAudioMixin, Qwen2VLPlugin):
    default_image_token = "<|IMAGE|>"
    default_video_token = "<|VIDEO|>"
    default_audio_token = "<|AUDIO|>"
    vision_start = "<|vision_bos|>"
    vision_end = "<|vision_eos|>"
    audio_bos = "<|audio_bos|>"
    audio_eos = "<|audio_eos|>"
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2.0

    def video_kwargs(self, processor: Any) -> dict[str, Any]:
        kwargs = super().video_kwargs(processor)
        if "size" not in kwargs and self.processor_defaults(processor, "videos").get("size"):
            kwargs["size"] = dict(self.processor_defaults(processor, "videos")["size"])  # Omni's own video pixel range
        return kwargs

    def audio_count(self, wave: np.ndarray, processor: Any) -> int:
        return Qwen2AudioPlugin.audio_tokens_for_frames(self.mel_frames(wave, processor))

    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        merge = processor.video_processor.merge_size
        if not self.media.use_audio_in_video:
            return self._wrap(self.video_token, grid[0] * grid[1] // merge**2)
        wave = load_audio(clip.source, self.media.audio_sampling_rate)
        n_audio = self.audio_count(wave, processor)
        if not self.expand_mm_tokens:
            return f"{self.vision_start}{self.audio_bos}{self.video_token}{self.audio_eos}{self.vision_end}"
        per_frame = grid[1] // merge**2
        seconds_per_grid = processor.video_processor.temporal_patch_size / clip.sample_fps
        video_pos = np.repeat(np.arange(grid[0]), per_frame) * seconds_per_grid * self.position_id_per_seconds
        per_chunk = int(self.position_id_per_seconds * self.seconds_per_chunk)
        vchunks, achunks = chunk_bounds(video_pos, per_chunk), chunk_bounds(np.arange(n_audio), per_chunk)
        body = ""
        for j in range(max(len(vchunks), len(achunks))):
            if j < len(vchunks):
                body += self.video_token * (vchunks[j][1] - vchunks[j][0])
            if j < len(achunks):
                body += self.audio_token * (achunks[j][1] - achunks[j][0])
        return f"{self.vision_start}{self.audio_bos}{body}{self.audio_eos}{self.vision_end}"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        if audios:
            counts = [self.audio_count(w, processor) for w in self._regularize_audios(audios)]
            body = lambda i: self.audio_token * (counts[i] if self.expand_mm_tokens else 1)  # noqa: E731
            messages = self.replace_placeholders(
                messages, AUDIO_PLACEHOLDER, lambda i: f"{self.audio_bos}{body(i)}{self.audio_eos}"
            )
        return self.expand_visual(messages, images, videos, processor)

    def _audio_order(self, ids: Sequence[int], processor: Any) -> list[str]:
        """'audio' / 'video' for each audio segment of a sample in order of appearance
        (a video's own audio opens right after its ``<|vision_bos|>``)."""
        tok = processor.tokenizer
        bos, vbos = tok.convert_tokens_to_ids(self.audio_bos), tok.convert_tokens_to_ids(self.vision_start)
        return ["video" if i > 0 and ids[i - 1] == vbos else "audio" for i, t in enumerate(ids) if t == bos]

    def get_mm_inputs(
        self,
        images: Sequence[Any],
        videos: Sequence[Any],
        audios: Sequence[Any],
        imglens: Sequence[int],
        vidlens: Sequence[int],
        audlens: Sequence[int],
        batch_ids: Sequence[list[int]],
        processor: Any,
    ) -> dict[str, Any]:
        self._validate_input(processor, images, videos, audios)
        out: dict[str, Any] = dict(Qwen2VLPlugin._get_mm_inputs(self, images, videos, [], processor))
        if videos:
            clips = self._regularize_videos(videos)
            temporal = processor.video_processor.temporal_patch_size
            out.pop("second_per_grid_ts", None)
            out["video_second_per_grid"] = torch.tensor([temporal / c.sample_fps for c in clips])
        waves = self._regularize_audios(audios)
        if self.media.use_audio_in_video and videos:
            video_waves = [load_audio(c.source, self.media.audio_sampling_rate) for c in self._regularize_videos(videos)]
            ordered, a, v = [], 0, 0
            for ids in batch_ids:
                for kind in self._audio_order(ids, processor):
                    if kind == "audio":
                        ordered.append(waves[a])
                        a += 1
                    else:
                        ordered.append(video_waves[v])
                        v += 1
            waves = ordered
        if waves:
            out.update(self.audio_features(waves, processor))
        return out


register_mm_plugin("qwen2_omni", Qwen2OmniPlugin)
register_mm_plugin("qwen2_5_omni", Qwen2OmniPlugin)
register_composite_model(
    CompositeModel(
        model_type="qwen2_5_omni_thinker",
        projector_key="visual.merger",
        vision_model_keys=["visual.patch_embed", "visual.blocks", "audio_tower"],
        language_model_keys=["model", "lm_head"],
        lora_conflict_keys=["patch_embed"],
    )
)


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
