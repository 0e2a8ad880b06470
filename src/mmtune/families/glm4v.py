"""GLM-4.1V / GLM-4.5V (model types ``glm4v`` / ``glm4v_moe``): Qwen2-VL-style grids (GLM's own
smart-resize, read through its processor); images as ``<|begin_of_image|>`` + n x ``<|image|>``
+ ``<|end_of_image|>``; each video as ``<|begin_of_video|>`` + per temporal group such an image
block followed by its integer timestamp + ``<|end_of_video|>`` (the processor's own
``replace_video_token``). Several videos in one sample each use their own frame count."""

from __future__ import annotations

from typing import Any

from mmtune.media import VideoClip
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import register_mm_plugin
from mmtune.templates import Template, register_template
from mmtune.testing import FamilyFixture, build_bpe_tokenizer, register_fixture

from .qwen2_vl import Qwen2VLPlugin, qwen2_vl_tower_inputs

GLM_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                      "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                      "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>")


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
for _model_type in ("glm4v", "glm4v_moe"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            template="glm4v",
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
    )


def build_glm_tokenizer() -> Any:
    """A tiny byte-level BPE with GLM-4.1V's special tokens (GLM ships a plain fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(GLM_SPECIAL_TOKENS, vocab_size=400),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(GLM_SPECIAL_TOKENS[1:]))


def _build(path: str) -> None:
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    Glm4vProcessor(image_processor=Glm4vImageProcessor(), video_processor=Glm4vVideoProcessor(),
                   tokenizer=build_glm_tokenizer()).save_pretrained(path)


def tiny_config(model_type: str = "glm4v") -> Any:
    """A tiny GLM-4.1V (or, with ``model_type="glm4v_moe"``, GLM-4.5V)."""
    from transformers import AutoConfig

    tok = build_glm_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "partial_rotary_factor": 0.5},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if model_type == "glm4v_moe":
        text.update(moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                    first_k_dense_replace=1, head_dim=16)
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, image_size=336),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )


register_fixture(FamilyFixture("glm4v", build=_build, tiny_config=tiny_config, plugin="glm4v",
                               modalities=("image", "video"), extra={"moe_config": lambda: tiny_config("glm4v_moe")}))

# GLM-4.1V-9B-Thinking's chat template: "[gMASK]<sop>", then "<|system|>\n", "<|user|>\n", "<|assistant|>\n"
# turns with no end marker: a turn ends where the next role starts. GLM's fine-tuning closes the
# conversation with EOS and trains it (LLaMA-Factory: efficient_eos), so the model learns to stop.
register_template(Template(name="glm4v", plugin="glm4v", prefix="[gMASK]<sop>", system="<|system|>\n{content}",
                           user="<|user|>\n{content}<|assistant|>\n", assistant="{content}", suffix="<|endoftext|>",
                           stop_words=("<|endoftext|>", "<|user|>", "<|observation|>")))
