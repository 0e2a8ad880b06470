"""Offline stand-ins for the qwen2_vl family (:mod:`mmtune.families.qwen2_vl`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture


QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def build_qwen_tokenizer(
    path: str | None = None, extra_special: Sequence[str] = (), extra_named: dict[str, str] | None = None
) -> Any:
    """A tiny byte-level BPE with Qwen's special tokens in Qwen2's tokenizer class;
    ``extra_named`` become named special-token attributes (e.g. ``start_image_token``),
    which InternVL's and Qwen2.5-Omni's processors read from their tokenizer."""
    from transformers import Qwen2TokenizerFast

    named = dict(extra_named or {})
    specials = list(dict.fromkeys(list(QWEN_SPECIAL_TOKENS) + list(extra_special) + list(named.values())))
    kwargs: dict[str, Any] = {"extra_special_tokens": named} if named else {}
    tok = Qwen2TokenizerFast(
        tokenizer_object=build_bpe_tokenizer(specials, vocab_size=400),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        **kwargs,
    )
    if path:
        tok.save_pretrained(path)
    return tok


def qwen_token_ids(tok: Any) -> dict[str, int]:
    """The config fields that name special tokens, for a tiny model matching ``tok``."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _build_processor(path: str, cls_name: str) -> None:
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    cls = getattr(transformers, cls_name)
    proc = cls(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
               tokenizer=build_qwen_tokenizer())
    proc.save_pretrained(path)


def tiny_qwen2_vl_config(model_type: str = "qwen2_vl", vocab_size: int | None = None) -> Any:
    """A ~0.2M-parameter Qwen2-VL / Qwen2.5-VL with the real layout (ids match the tiny tokenizer)."""
    from transformers import AutoConfig

    tok = build_qwen_tokenizer()
    special = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(
        vocab_size=vocab_size or len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
        **special,
    )
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    if model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **qwen_token_ids(tok), **special)


register_fixture(
    FamilyFixture(
        name="qwen2_vl",
        build=lambda path: _build_processor(path, "Qwen2VLProcessor"),
        tiny_config=lambda: tiny_qwen2_vl_config("qwen2_vl"),
        plugin="qwen2_vl",
        modalities=("image", "video"),
    )
)


register_fixture(
    FamilyFixture(
        name="qwen2_5_vl",
        build=lambda path: _build_processor(path, "Qwen2_5_VLProcessor"),
        tiny_config=lambda: tiny_qwen2_vl_config("qwen2_5_vl"),
        plugin="qwen2_5_vl",
        modalities=("image", "video"),
    )
)
