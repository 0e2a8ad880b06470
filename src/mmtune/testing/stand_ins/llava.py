"""Offline stand-ins for the llava family (:mod:`mmtune.families.llava`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture
from mmtune.testing.fixtures import CORPUS


LLAMA_BASE_TOKENS = ("<unk>", "<s>", "</s>")


def build_llama_tokenizer(extra_special: Sequence[str] = ("<image>", "<video>"), vocab_size: int = 600) -> Any:
    """A tiny SentencePiece-style BPE (Metaspace ``▁``, byte fallback) in Llama's tokenizer
    class, as the LLaVA / Vicuna checkpoints ship it, with ``extra_special`` and ``<pad>``
    added after the vocabulary as in llava-hf. A byte-level BPE would reload as
    ``TokenizersBackend`` (transformers refuses ByteLevel under ``LlamaTokenizer``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    base = list(LLAMA_BASE_TOKENS) + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base, show_progress=False)
    bpe.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizerFast(vocab=model["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>",
                             eos_token="</s>", add_bos_token=False, add_eos_token=False)
    tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def llama_token_ids(tok: Any) -> dict[str, int]:
    """Config fields naming LLaVA's media tokens for a tiny model matching ``tok``."""
    ids = {"image_token_id": tok.convert_tokens_to_ids("<image>")}
    if "<video>" in tok.get_vocab():
        ids["video_token_id"] = tok.convert_tokens_to_ids("<video>")
    return ids


def tiny_vision_text(tok: Any, vision: str = "clip_vision_model", image_size: int = 336,
                     text: str = "llama") -> dict[str, Any]:
    """Tiny tower + tiny 2-layer text config dicts shared by the LLaVA family fixtures."""
    return {
        "vision_config": dict(model_type=vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32),
        "text_config": dict(model_type=text, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
    }


def _build_llava(path: str) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=ip, tokenizer=build_llama_tokenizer(("<image>",)), patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


def _tiny_llava() -> Any:
    from transformers import LlavaConfig

    tok = build_llama_tokenizer(("<image>",))
    return LlavaConfig(**tiny_vision_text(tok), **llama_token_ids(tok), vision_feature_select_strategy="default",
                       vision_feature_layer=-2)


def _tiny_vipllava() -> Any:
    from transformers import VipLlavaConfig

    tok = build_llama_tokenizer(("<image>",))
    return VipLlavaConfig(**tiny_vision_text(tok), **llama_token_ids(tok), vision_feature_layers=[-2, -1])


register_fixture(FamilyFixture("llava", build=_build_llava, tiny_config=_tiny_llava, plugin="llava",
                               extra={"vipllava_config": _tiny_vipllava}))
