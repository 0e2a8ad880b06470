"""Qwen3-VL (and Qwen3-VL-MoE): Qwen2-VL's image rule with 16-px patches; each video
frame group gets a ``<t seconds>`` timestamp, built by the processor's own
``replace_video_token`` from the grid and timing computed here (no pixel work)."""

from __future__ import annotations

from typing import Any

from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import register_mm_plugin
from mmtune.testing import FamilyFixture, register_fixture

from .qwen2_vl import QWEN_SPECIAL_TOKENS, Qwen2VLPlugin, build_qwen_tokenizer


class Qwen3VLPlugin(Qwen2VLPlugin):
    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        if not self.expand_mm_tokens:
            return self._wrap(self.video_token, 1)
        return f"{self.vision_start}{self.processor_video_text(processor, clip, grid)}{self.vision_end}"


register_mm_plugin("qwen3_vl", Qwen3VLPlugin)
register_mm_plugin("qwen3_vl_moe", Qwen3VLPlugin)
for _model_type in ("qwen3_vl", "qwen3_vl_moe"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            projector_key="model.visual.merger",
            vision_model_keys=["model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks",
                               "model.visual.deepstack_merger_list", "model.visual.rotary_pos_emb"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=["patch_embed"],
        )
    )


def _build(path: str) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    ip = Qwen2VLImageProcessor(patch_size=16, size={"shortest_edge": 65536, "longest_edge": 16777216})
    Qwen3VLProcessor(image_processor=ip, video_processor=Qwen3VLVideoProcessor(),
                     tokenizer=build_qwen_tokenizer()).save_pretrained(path)


def tiny_config() -> Any:
    from transformers import Qwen3VLConfig

    tok = build_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


register_fixture(FamilyFixture("qwen3_vl", build=_build, tiny_config=tiny_config, plugin="qwen3_vl",
                               modalities=("image", "video")))
