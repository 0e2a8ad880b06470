"""Qwen3-VL (and Qwen3-VL-MoE): Qwen2-VL's image rule with 16-px patches; each video's
temporal group gets a ``<t seconds>`` timestamp and its own ``<|vision_start|>`` ...
``<|vision_end|>`` block, built by the processor's own ``replace_video_token`` from the grid
and timing computed here (no pixel work), and placed into the chat template's video wrapper by
the processor's own ``get_text_with_replacements``. Several videos in one sample each use their
own frame count and timing."""

from __future__ import annotations

from typing import Any

from mmtune.families.qwen2_vl import Qwen2VLPlugin, qwen2_vl_tower_inputs
from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import register_mm_plugin
from mmtune.templates import TEMPLATES, register_template


class Qwen3VLPlugin(Qwen2VLPlugin):
    """``<video>`` -> what the processor makes of the chat template's
    ``<|vision_start|><|video_pad|><|vision_end|>``: per temporal group ``<t seconds>`` +
    ``<|vision_start|>`` n x ``<|video_pad|>`` ``<|vision_end|>``.

    Whether the template's outer ``<|vision_start|>`` ... ``<|vision_end|>`` pair survives is the
    processor's choice, and it has changed between transformers releases (older ones replace only
    the pad token and keep the pair; newer ones collapse the wrapper). The wrapper is therefore
    passed through the installed processor's own ``get_text_with_replacements`` with the
    replacement computed here, so the ids follow whichever rule is installed.
    """

    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        wrapper = self._wrap(self.video_token, 1)
        if not self.expand_mm_tokens:
            return wrapper
        replacement = self.processor_video_text(processor, clip, grid)
        texts, _ = processor.get_text_with_replacements([wrapper], videos_replacements=[replacement])
        return texts[0]


register_mm_plugin("qwen3_vl", Qwen3VLPlugin)
register_mm_plugin("qwen3_vl_moe", Qwen3VLPlugin)
def qwen3_vl_tower_inputs(tower: Any, grid: Any) -> dict[str, Any]:
    """Qwen2-VL's tower inputs and the position embedding's interpolation indices and weights
    (the sync-free forward's ``tower_inputs``), by transformers' own ``vision_utils``."""
    from transformers import vision_utils

    interp_indices, interp_weights = vision_utils.get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)
    return {**qwen2_vl_tower_inputs(tower, grid), "interp_indices": interp_indices, "interp_weights": interp_weights}


for _model_type in ("qwen3_vl", "qwen3_vl_moe"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            packing="mrope",
            template="qwen3_vl",
            projector_key="model.visual.merger",
            vision_model_keys=["model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks",
                               "model.visual.deepstack_merger_list"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=["patch_embed"],
            speed=SpeedCapabilities(fusable_head=True, varlen_attention_classes=("Qwen3VLVisionAttention", "Qwen3VLMoeVisionAttention"),
                                    tower_inputs=qwen3_vl_tower_inputs, grid_on_host=True),
        )
    )


register_template(TEMPLATES["chatml"].bind("qwen3_vl", plugin="qwen3_vl"))
