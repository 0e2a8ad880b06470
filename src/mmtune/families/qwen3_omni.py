"""Qwen3-Omni (model type ``qwen3_omni_moe``; the thinker, ``qwen3_omni_moe_thinker``, is what
trains): Qwen2-VL-style images and videos with 16-px patches (no per-frame timestamps), audio
through its own encoder's length rule, and with ``MediaConfig.use_audio_in_video`` a video's
own audio track interleaved with its frames by time, as the processor lays it out.

Tokens are the checkpoint's: ``<|vision_start|>`` n x ``<|image_pad|>`` / ``<|video_pad|>``
``<|vision_end|>`` and ``<|audio_start|>`` n x ``<|audio_pad|>`` ``<|audio_end|>``. Counts:

- images and videos: :class:`~mmtune.families.qwen2_vl.Qwen2VLPlugin`'s (header sizes, the
  processors' own counters), videos at the processor's own call-time pixel range;
- audio: mel frames (the feature extractor pads to the batch's longest clip and truncates
  nothing, so a clip's frames are its started hops), then the encoder's windowed rule
  (``_get_feat_extract_output_lengths`` of the processor's module with its ``n_window``);
- audio in video: each video token sits at ``t * video_second_per_grid * position_id_per_seconds``
  (t its temporal group), audio token i at i; the two runs are merged in that order, a video
  token first on a tie, inside ``<|audio_start|>`` ... ``<|audio_end|>`` (the processor's
  ``replace_video_with_audio_token`` in 5.25, its ``replace_multimodal_special_tokens`` in 5.17).
  ``video_second_per_grid`` is ``temporal_patch_size`` over the fps the frames were sampled at;
  the processor takes that fps from its ``fps`` argument (1.0 when none is given).

The chat template is ChatML with no default system prompt (the Instruct checkpoint's).

Packing is not declared: the thinker's M-RoPE positions for audio and audio-in-video come
from its own ``get_rope_index`` over the whole row, not checked to restart per packed sample.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmtune.families.qwen2_omni import Qwen2OmniPlugin, _thinker_prefix
from mmtune.families.qwen3_vl import qwen3_vl_tower_inputs
from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import register_mm_plugin
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import TEMPLATES, register_template


class Qwen3OmniPlugin(Qwen2OmniPlugin):
    default_image_token = "<|image_pad|>"
    default_video_token = "<|video_pad|>"
    default_audio_token = "<|audio_pad|>"
    vision_start = "<|vision_start|>"
    vision_end = "<|vision_end|>"
    audio_bos = "<|audio_start|>"
    audio_eos = "<|audio_end|>"
    #: the processor returns mm_token_type_ids, which the thinker's forward does not take
    token_type_key = None

    # ------------------------------------------------------------------ audio
    @staticmethod
    def _n_window(processor: Any) -> int:
        """The encoder window the processor counts with (a class attribute in 5.25, an
        ``audio_kwargs`` default in 5.17)."""
        return int(getattr(processor, "n_window", None) or Qwen2OmniPlugin.processor_defaults(processor, "audio")
                   .get("n_window", 50))

    def audio_token_count(self, wave: np.ndarray, processor: Any) -> int:
        frames = -(-len(wave) // processor.feature_extractor.hop_length)  # not truncated: no 30 s cap
        lengths = sys.modules[type(processor).__module__]._get_feat_extract_output_lengths
        return int(lengths(np.array(frames), self._n_window(processor)))

    def audio_features(self, waves: Sequence[np.ndarray], processor: Any) -> dict[str, Any]:
        """The processor's own audio call: padded to the longest clip, nothing truncated."""
        kwargs = {k: v for k, v in self.processor_defaults(processor, "audio").items() if k != "n_window"}
        kwargs.update(sampling_rate=processor.feature_extractor.sampling_rate, return_attention_mask=True)
        out = processor.feature_extractor(list(waves), return_tensors="pt", **kwargs)
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    # ------------------------------------------------------------------ videos
    def chunking(self, processor: Any) -> tuple[float, float]:
        per_second, per_chunk = super().chunking(processor)
        return per_second if per_second else 13.0, per_chunk

    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        merge = processor.video_processor.merge_size**2
        wave = self.video_audio(clip) if self.media.use_audio_in_video and self.expand_mm_tokens else None
        if wave is None:
            return self._wrap(self.video_token, grid[0] * grid[1] // merge)
        per_second, _ = self.chunking(processor)
        video_pos = np.repeat(np.arange(grid[0]), grid[1] // merge) * self.seconds_per_grid(clip, processor) * per_second
        audio_pos = np.arange(self.audio_token_count(wave, processor))
        # stable merge, a video token first on a tie: both runs ascend
        order = np.argsort(np.concatenate([video_pos, audio_pos]), kind="stable")
        body = "".join(self.video_token if i < len(video_pos) else self.audio_token for i in order)
        return f"{self.vision_start}{self.audio_bos}{body}{self.audio_eos}{self.vision_end}"


register_mm_plugin("qwen3_omni_moe", Qwen3OmniPlugin)
register_mm_plugin("qwen3_omni_moe_thinker", Qwen3OmniPlugin)

_P = _thinker_prefix("qwen3_omni_moe", "Qwen3OmniMoeThinkerModel")
register_composite_model(
    CompositeModel(
        model_type="qwen3_omni_moe_thinker",
        model_class="Qwen3OmniMoeThinkerForConditionalGeneration",  # the thinker alone trains
        template="qwen3_omni",
        projector_key=f"{_P}visual.merger",
        vision_model_keys=[f"{_P}visual.patch_embed", f"{_P}visual.pos_embed", f"{_P}visual.blocks",
                           f"{_P}visual.merger_list", f"{_P}audio_tower"],
        language_model_keys=[f"{_P}language_model" if _P else "model", "lm_head"],
        lora_conflict_keys=["patch_embed"],
        speed=SpeedCapabilities(fusable_head=True, varlen_attention_classes=("Qwen3OmniMoeVisionAttention",),
                                tower_inputs=qwen3_vl_tower_inputs, grid_on_host=True),
    )
)

register_template(TEMPLATES["chatml"].bind("qwen3_omni", plugin="qwen3_omni_moe"))
