"""Qwen2.5-Omni (thinker): Qwen2-VL images and videos, Whisper audio, and with
``MediaConfig.use_audio_in_video`` a video's own audio track interleaved with its frames in
chunks of ``seconds_per_chunk`` (positions at ``position_id_per_seconds`` per second), as the
processor does. Image and video counts are :class:`Qwen2VLPlugin`'s (header sizes, no pixel
decoding); audio counts are :class:`WhisperAudioMixin`'s (clip lengths, no mel)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmtune.families.qwen2_audio import WhisperAudioMixin
from mmtune.families.qwen2_vl import Qwen2VLPlugin, qwen2_5_vl_tower_inputs
from mmtune.media import MediaError, VideoClip, load_audio
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import Message, register_mm_plugin
from mmtune.templates import TEMPLATES, register_template

logger = logging.getLogger(__name__)


class Qwen2OmniPlugin(WhisperAudioMixin, Qwen2VLPlugin):
    """``<image>``/``<video>`` as Qwen2-VL (``<|vision_bos|>`` n x ``<|IMAGE|>``/``<|VIDEO|>``
    ``<|vision_eos|>``), ``<audio>`` as Qwen2-Audio. With ``use_audio_in_video`` a video with an
    audio track becomes ``<|vision_bos|><|audio_bos|>`` + per time chunk its video tokens then
    its audio tokens + ``<|audio_eos|><|vision_eos|>``, and the track's features join
    ``input_features`` in order of appearance in the text (the order the model consumes them)."""

    default_image_token = "<|IMAGE|>"
    default_video_token = "<|VIDEO|>"
    default_audio_token = "<|AUDIO|>"
    vision_start = "<|vision_bos|>"
    vision_end = "<|vision_eos|>"

    # ------------------------------------------------------------------ settings
    def video_kwargs(self, processor: Any) -> dict[str, Any]:
        """Qwen2-VL's, plus the Omni processor's own call-time video pixel range, which its
        video processor does not know when called directly."""
        kwargs = super().video_kwargs(processor)
        size = self.processor_defaults(processor, "videos").get("size")
        if "size" not in kwargs and size:
            kwargs["size"] = dict(size)
        return kwargs

    def chunking(self, processor: Any) -> tuple[float, float]:
        """(position_id_per_seconds, seconds_per_chunk): class attributes of the processor in
        transformers >= 5.2x, its ``videos_kwargs`` defaults in 5.17."""
        defaults = self.processor_defaults(processor, "videos")
        per_second = getattr(processor, "position_id_per_seconds", None) or defaults.get("position_id_per_seconds", 25)
        per_chunk = getattr(processor, "seconds_per_chunk", None) or defaults.get("seconds_per_chunk", 2.0)
        return per_second, per_chunk

    def seconds_per_grid(self, clip: VideoClip, processor: Any) -> float:
        """Seconds one temporal patch spans: ``temporal_patch_size / fps`` with the fps the
        frames were really sampled at (the processor's ``video_second_per_grid``)."""
        return processor.video_processor.temporal_patch_size / clip.sample_fps

    # ------------------------------------------------------------------ videos' own audio
    def _clips(self, videos: Sequence[Any], processor: Any) -> list[VideoClip]:
        """Already-decoded clips pass through, so one batch decodes each video once."""
        if videos and all(isinstance(v, VideoClip) for v in videos):
            return list(videos)
        return super()._clips(videos, processor)

    def video_audio(self, clip: VideoClip) -> np.ndarray | None:
        """The audio track of ``clip``'s file at the audio sampling rate, or ``None`` for a file
        without one (the processor then treats the video as silent: plain video tokens)."""
        if not os.path.isfile(clip.source):
            raise MediaError(f"use_audio_in_video needs a video file to read the audio track from, got {clip.source}")
        import av

        with av.open(clip.source) as container:
            if not container.streams.audio:
                logger.debug("%s has no audio track; taken as a silent video", clip.source)
                return None
        return load_audio(clip.source, self.media.audio_sampling_rate)

    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        merge = processor.video_processor.merge_size**2
        n_video = grid[0] * grid[1] // merge
        wave = self.video_audio(clip) if self.media.use_audio_in_video and self.expand_mm_tokens else None
        if wave is None:  # also the unexpanded form with audio: the processor interleaves it itself
            return self._wrap(self.video_token, n_video)
        n_audio = self.audio_token_count(wave, processor)
        per_second, seconds_per_chunk = self.chunking(processor)
        video_pos = np.repeat(np.arange(grid[0]), grid[1] // merge) * self.seconds_per_grid(clip, processor) * per_second
        per_chunk = int(per_second * seconds_per_chunk)
        vchunks = processor.get_chunked_index(video_pos, per_chunk)
        achunks = processor.get_chunked_index(np.arange(n_audio), per_chunk)
        body = []
        for j in range(max(len(vchunks), len(achunks))):
            if j < len(vchunks):
                body.append(self.video_token * (vchunks[j][1] - vchunks[j][0]))
            if j < len(achunks):
                body.append(self.audio_token * (achunks[j][1] - achunks[j][0]))
        return f"{self.vision_start}{self.audio_bos}{''.join(body)}{self.audio_eos}{self.vision_end}"

    # ------------------------------------------------------------------ public hooks
    def _validate_input(self, processor: Any, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any]) -> None:
        super()._validate_input(processor, images, videos, audios)
        if videos and self.media.use_audio_in_video and getattr(processor, "feature_extractor", None) is None:
            raise MediaError("use_audio_in_video is on but the processor has no feature extractor for the audio track")

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        return self.expand_visual(self.expand_audio(messages, audios, processor), images, videos, processor)

    def _get_mm_inputs(
        self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> dict[str, torch.Tensor]:
        """Images and videos as Qwen2-VL, plus ``video_second_per_grid`` (audio: see get_mm_inputs)."""
        clips = self._clips(videos, processor) if videos else []
        out = super()._get_mm_inputs(images, clips, [], processor)
        out.pop("second_per_grid_ts", None)
        if clips:
            out["video_second_per_grid"] = torch.tensor([self.seconds_per_grid(c, processor) for c in clips])
        return out

    def _audio_in_text_order(
        self, waves: list[np.ndarray], tracks: list[np.ndarray | None], batch_ids: Sequence[list[int]], processor: Any
    ) -> list[np.ndarray]:
        """Standalone clips and videos' tracks in the order their tokens appear, sample by
        sample. A standalone clip opens with ``<|audio_bos|>`` not after ``<|vision_bos|>``; a
        video opens with ``<|vision_bos|>`` then ``<|audio_bos|>`` (expanded) or ``<|VIDEO|>``."""
        tok = processor.tokenizer
        a_bos, v_bos, video = (tok.convert_tokens_to_ids(t) for t in (self.audio_bos, self.vision_start, self.video_token))
        ordered: list[np.ndarray] = []
        a = v = 0
        for ids in batch_ids:
            for i, t in enumerate(ids):
                if t == a_bos and not (i and ids[i - 1] == v_bos):
                    if a < len(waves):
                        ordered.append(waves[a])
                    a += 1
                elif t == v_bos and i + 1 < len(ids) and ids[i + 1] in (a_bos, video):
                    if v < len(tracks) and tracks[v] is not None:
                        ordered.append(tracks[v])
                    v += 1
        if a != len(waves) or v != len(tracks):
            raise MediaError(
                f"the batch's ids hold {a} audio clip(s) and {v} video(s) but {len(waves)} clip(s) and "
                f"{len(tracks)} video(s) were given"
            )
        return ordered

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
        """The processor's tensors. With ``use_audio_in_video`` the videos' tracks join
        ``input_features`` in text order and ``use_audio_in_video=True`` is added: the thinker's
        forward needs it to lay out the interleaved positions."""
        self._validate_input(processor, images, videos, audios)
        clips = self._clips(videos, processor) if videos else []
        out = super().get_mm_inputs(images, clips, [], imglens, vidlens, [0] * len(audlens), batch_ids, processor)
        waves = self._regularize_audios(audios)
        if self.media.use_audio_in_video and clips:
            tracks = [self.video_audio(c) for c in clips]
            if any(t is not None for t in tracks):
                waves = self._audio_in_text_order(waves, tracks, batch_ids, processor)
                out["use_audio_in_video"] = True
        if waves:
            out.update(self.audio_features(waves, processor))
        return out


register_mm_plugin("qwen2_omni", Qwen2OmniPlugin)
register_mm_plugin("qwen2_5_omni", Qwen2OmniPlugin)


def _thinker_prefix(module: str = "qwen2_5_omni", wrapper: str = "Qwen2_5OmniThinkerModel") -> str:
    """Where the thinker keeps its towers: transformers >= 5.2x wraps them and the text model in
    ``model`` (a ``<wrapper>``), 5.17 keeps them at the top with the text model as ``model``.
    Read from the installed source so that importing mmtune imports no transformers."""
    spec = importlib.util.find_spec("transformers")
    root = os.path.dirname(spec.origin) if spec and spec.origin else ""
    path = os.path.join(root, "models", module, f"modeling_{module}.py")
    try:
        with open(path, encoding="utf-8") as f:
            wrapped = f"class {wrapper}(" in f.read()
    except OSError:
        wrapped = True
    return "model." if wrapped else ""


_P = _thinker_prefix()
register_composite_model(
    CompositeModel(
        model_type="qwen2_5_omni_thinker",
        model_class="Qwen2_5OmniThinkerForConditionalGeneration",  # the thinker alone trains
        template="qwen2_omni",
        projector_key=f"{_P}visual.merger",
        vision_model_keys=[f"{_P}visual.patch_embed", f"{_P}visual.blocks", f"{_P}audio_tower"],
        language_model_keys=[f"{_P}language_model" if _P else "model", "lm_head"],
        lora_conflict_keys=["patch_embed"],
        speed=SpeedCapabilities(fusable_head=True, varlen_attention_classes=("Qwen2_5OmniVisionAttention", "Qwen2_5OmniAudioAttention"),
                                tower_inputs=qwen2_5_vl_tower_inputs, grid_on_host=True),
    )
)


# Qwen2.5-Omni's chat template: ChatML, "You are a helpful assistant." when the sample has no system prompt.
register_template(TEMPLATES["chatml"].bind("qwen2_omni", plugin="qwen2_omni",
                                           default_system="You are a helpful assistant."))
# The system prompt its model card requires for speech output (the talker), as the default.
QWEN_OMNI_SPEECH_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                           "perceiving auditory and visual inputs, as well as generating text and speech.")
register_template(TEMPLATES["chatml"].bind("qwen2_omni_speech", plugin="qwen2_omni",
                                           default_system=QWEN_OMNI_SPEECH_SYSTEM))
