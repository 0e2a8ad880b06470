"""Offline stand-ins for the minicpmv4_6 family (:mod:`mmtune.families.minicpmv4_6`): a tiny
Qwen-style tokenizer with MiniCPM-V's named media tokens (the checkpoint's
``extra_special_tokens``: ``<|image_pad|>``, ``<image>``, ``<slice>``, ``<image_id>`` ...), its
processor (small ``scale_resolution`` so slices appear at test sizes) and tiny model configs for
4.6 and, where transformers has it, 4.7 (one Gated DeltaNet layer and one attention layer)."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.stand_ins.qwen2_vl import build_qwen_tokenizer

NAMED_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
    "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
}
#: image processor settings small enough for test images to be sliced (the checkpoint's: 448, 9)
SLICING = dict(scale_resolution=112, max_slice_nums=4)


def build_tokenizer() -> Any:
    return build_qwen_tokenizer(extra_special=("<think>", "</think>"), extra_named=NAMED_TOKENS)


def _build(path: str, model_type: str = "minicpmv4_6") -> None:
    import transformers
    from transformers import MiniCPMV4_6ImageProcessor, MiniCPMV4_6VideoProcessor

    cls = getattr(transformers, "MiniCPMV4_7Processor" if model_type == "minicpmv4_7" else "MiniCPMV4_6Processor")
    cls(image_processor=MiniCPMV4_6ImageProcessor(**SLICING), video_processor=MiniCPMV4_6VideoProcessor(**SLICING),
        tokenizer=build_tokenizer()).save_pretrained(path)


def tiny_config(model_type: str = "minicpmv4_6") -> Any:
    from transformers import AutoConfig

    tok = build_tokenizer()
    text = dict(model_type="qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                max_position_embeddings=4096, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    extra: dict[str, Any] = {}
    if model_type == "minicpmv4_7":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "mrope_section": [2, 1, 1], "mrope_interleaved": True}
        ids = tok.convert_tokens_to_ids
        extra = dict(image_start_id=ids("<image>"), image_end_id=ids("</image>"), slice_start_id=ids("<slice>"),
                     slice_end_id=ids("</slice>"), newline_id=tok("\n", add_special_tokens=False)["input_ids"][0])
    else:
        extra = dict(drop_vision_last_layer=False)
    return AutoConfig.for_model(
        model_type, text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=14, image_size=112),
        insert_layer_id=0, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"), **extra)


register_fixture(FamilyFixture("minicpmv4_6", build=_build, tiny_config=tiny_config, plugin="minicpmv4_6",
                               modalities=("image", "video")))


def _has_47() -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return "minicpmv4_7" in CONFIG_MAPPING_NAMES


if _has_47():  # newer than transformers 5.17, where the family refuses its checkpoints instead
    register_fixture(FamilyFixture("minicpmv4_7", build=lambda path: _build(path, "minicpmv4_7"),
                                   tiny_config=lambda: tiny_config("minicpmv4_7"), plugin="minicpmv4_7",
                                   modalities=("image", "video")))
