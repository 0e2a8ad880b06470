"""Qwen3.5 (model types ``qwen3_5`` and ``qwen3_5_moe``): natively multimodal hybrid models, whose
language model interleaves Gated DeltaNet (linear-attention) layers with full-attention layers,
behind Qwen3-VL's vision tower without its deepstack mergers. Checkpoints ship Qwen3-VL's
processor (``Qwen3VLProcessor``), so images and videos become tokens exactly as in
:mod:`mmtune.families.qwen3_vl` (per temporal group a ``<t seconds>`` timestamp).

Chat templates, from the checkpoints' own (``chat_template.jinja`` of Qwen/Qwen3.5-*): ChatML turns;
the assistant turn after the last user query opens a ``<think>`` block (empty when the answer has
no reasoning), earlier answers carry none and lose their reasoning. ``qwen3_5`` trains answers
without reasoning (the model's ``enable_thinking=False`` generation prompt, ``<think>\\n\\n</think>\\n\\n``,
is prompt); ``qwen3_5_thinking`` trains the reasoning too (answers written ``<think>R</think>A``;
its generation prompt ends ``<think>\\n``, the model's default).

Packing is not declared: the linear-attention layers carry a recurrent state (and a causal
convolution) along the whole row, and transformers keeps packed samples apart there only
through flash-linear-attention's and causal-conv1d's varlen kernels (``cu_seqlens`` /
``seq_idx``); its PyTorch fallback has no per-sample reset (it refuses ``cu_seqlens``), and the
position-id boundary detection that keeps packed attention exact reaches only the
full-attention layers. Packed rows would leak one sample's state into the next, so packing
stays off for these types. Which kernels run (flash-linear-attention and causal-conv1d when
installed and the inputs are on CUDA, the PyTorch reference otherwise) is transformers' choice
per call; both compute the same unpacked result.
"""

from __future__ import annotations

from mmtune.families.qwen3_vl import Qwen3VLPlugin, qwen3_vl_tower_inputs
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import register_mm_plugin
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.templates import TEMPLATES, register_template

#: why packed rows are not exact for a hybrid linear-attention model (see the module docstring)
NO_PACKING = ("its Gated DeltaNet layers carry a recurrent state across the row, and transformers resets it "
              "per sample only in flash-linear-attention's varlen kernels (not in the PyTorch fallback, nor "
              "from packed position ids), so packed samples would leak into one another")

register_mm_plugin("qwen3_5", Qwen3VLPlugin)
register_mm_plugin("qwen3_5_moe", Qwen3VLPlugin)

for _model_type in ("qwen3_5", "qwen3_5_moe"):
    register_composite_model(
        CompositeModel(
            model_type=_model_type,
            packing=None,
            no_packing=NO_PACKING,
            template="qwen3_5",
            projector_key="model.visual.merger",
            vision_model_keys=["model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks"],
            language_model_keys=["model.language_model", "lm_head"],
            lora_conflict_keys=["patch_embed"],
            speed=SpeedCapabilities(fusable_head=True,
                                    varlen_attention_classes=("Qwen3_5VisionAttention", "Qwen3_5MoeVisionAttention"),
                                    tower_inputs=qwen3_vl_tower_inputs, grid_on_host=True),
        )
    )

_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
register_template(TEMPLATES["chatml"].bind(
    "qwen3_5", plugin="qwen3_5", last_user=_USER + "<think>\n\n</think>\n\n", split_reasoning=True))
register_template(TEMPLATES["chatml"].bind(
    "qwen3_5_thinking", plugin="qwen3_5", last_user=_USER + "<think>", generation_tail="\n",
    last_assistant="\n{reasoning}\n</think>\n\n{content}<|im_end|>\n", split_reasoning=True))
