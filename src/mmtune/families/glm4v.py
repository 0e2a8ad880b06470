"""GLM-4.1V / GLM-4.5V (model types ``glm4v`` / ``glm4v_moe``): Qwen2-VL-style grids (GLM's own
smart-resize, read through its processor); images as ``<|begin_of_image|>`` + n x ``<|image|>``
+ ``<|end_of_image|>``; each video as ``<|begin_of_video|>`` + per temporal group such an image
block followed by its integer timestamp + ``<|end_of_video|>`` (the processor's own
``replace_video_token``). Several videos in one sample each use their own frame count."""

from __future__ import annotations

from typing import Any

from mmtune.families.qwen2_vl import Qwen2VLPlugin, qwen2_vl_tower_inputs
from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import register_mm_plugin
from mmtune.templates import Template, register_template


class Glm4vPlugin(Qwen2VLPlugin):
    default_image_token = "<|image|>"
    default_video_token = "<|video|>"
    vision_start = "<|begin_of_image|>"
    vision_end = "<|end_of_image|>"
    video_start = "<|begin_of_video|>"
    video_end = "<|end_of_video|>"

    def video_text(self, processor: Any, clip: VideoClip, grid: tuple[int, int]) -> str:
        body = self.processor_video_text(processor, clip, grid) if self.expand_mm_tokens else self.video_token
        return f"{self.video_start}{body}{self.video_end}"


register_mm_plugin("glm4v", Glm4vPlugin)
register_mm_plugin("glm4v_moe", Glm4vPlugin)
def glm4v_composite(model_type: str, template: str) -> CompositeModel:
    """The composite entry of a GLM-4V-architecture model (GLM-4.1V, GLM-4.5V, GLM-4.6V): the same
    tower, merger and language-model keys, and the same speed capabilities."""
    return CompositeModel(
        model_type=model_type,
        packing="mrope",
        template=template,
        projector_key="model.visual.merger",
        vision_model_keys=["model.visual.patch_embed", "model.visual.embeddings", "model.visual.blocks",
                           "model.visual.post_conv_layernorm", "model.visual.post_layernorm",
                           "model.visual.downsample"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=["patch_embed"],
        speed=SpeedCapabilities(fusable_head=True, varlen_attention_classes=("Glm4vVisionAttention", "Glm4vMoeVisionAttention"),
                                # its embeddings read the grid too: the model keeps the device grid
                                tower_inputs=qwen2_vl_tower_inputs, grid_on_host=False),
    )


for _model_type in ("glm4v", "glm4v_moe"):
    register_composite_model(glm4v_composite(_model_type, "glm4v"))


# GLM-4.1V-9B-Thinking's chat template: "[gMASK]<sop>", then "<|system|>\n", "<|user|>\n", "<|assistant|>\n"
# turns with no end marker: a turn ends where the next role starts. GLM's fine-tuning closes the
# conversation with EOS and trains it (LLaMA-Factory: efficient_eos), so the model learns to stop.
register_template(Template(name="glm4v", plugin="glm4v", prefix="[gMASK]<sop>", system="<|system|>\n{content}",
                           user="<|user|>\n{content}<|assistant|>\n", assistant="{content}", suffix="<|endoftext|>",
                           stop_words=("<|endoftext|>", "<|user|>", "<|observation|>")))
