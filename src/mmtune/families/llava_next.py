"""LLaVA-NeXT (1.6): any-resolution tiles; the count follows from the original size,
the grid pinpoints and unpadding, all inside the processor's size-only counter."""

from __future__ import annotations

from mmtune.families.llava import LlavaPlugin
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import register_mm_plugin
from mmtune.templates import TEMPLATES, Template, register_template


class LlavaNextPlugin(LlavaPlugin):
    """Images only; ``image_sizes`` travels with ``pixel_values`` (from the image processor,
    called with the processor's ``do_pad`` default so tiles batch as the processor's do)."""


register_mm_plugin("llava_next", LlavaNextPlugin)
register_composite_model(
    CompositeModel(
        model_type="llava_next",
        packing="causal",
        template="llava_next",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower", "model.image_newline"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# LLaVA-NeXT trains each checkpoint in its LLM's own format; Vicuna (llava-v1.6-vicuna) is the default.
# BOS opens every LLaVA sequence: llava-hf's tokenizer adds it, as LLaVA's tokenizer_image_token does.
register_template(TEMPLATES["vicuna_v1"].bind("llava_next", plugin="llava_next", prefix="<s>"))
# llava-hf/llava-v1.6-mistral-7b-hf's chat template: a <<SYS>> block before the first "[INST] ... [/INST]",
# every answer " ... </s> " (the trailing space is the template's own).
register_template(Template(name="llava_next_mistral", plugin="llava_next", prefix="<s>",
                           system="<<SYS>>\n{content}\n<</SYS>>\n\n", user="[INST] {content} [/INST]",
                           assistant=" {content}</s> "))
