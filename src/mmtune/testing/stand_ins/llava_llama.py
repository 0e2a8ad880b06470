"""Offline stand-ins for the llava_llama family (:mod:`mmtune.families.llava_llama`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from mmtune.testing.fixtures import FamilyFixture, register_fixture


TINY_TOWER = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)


def tiny_tokenizer() -> Any:
    from .llava import build_llama_tokenizer

    return build_llama_tokenizer(("<image>",))


def _build_processor(path: str, **options: Any) -> None:
    from transformers import CLIPImageProcessor

    from mmtune.llava import LlavaLlamaProcessor

    side = TINY_TOWER["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    LlavaLlamaProcessor(image_processor, tiny_tokenizer(), **options).save_pretrained(path)


def tiny_llava_llama_config(**changes: Any) -> Any:
    from mmtune.llava import LlavaConfig

    tok = tiny_tokenizer()
    fields = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  mm_vision_tower="tiny-clip", vision_config=dict(TINY_TOWER), mm_hidden_size=TINY_TOWER["hidden_size"],
                  mm_projector_type="mlp2x_gelu")
    fields.update(changes)
    return LlavaConfig(**fields)


register_fixture(FamilyFixture("llava_llama", build=_build_processor, tiny_config=tiny_llava_llama_config,
                               plugin="llava_llama"))


def plain_llama_dir(root: str, seed: int = 5) -> str:
    """A tiny plain Llama LM + tokenizer saved to ``root/lm``: what LLaVA's stage 1 starts from."""
    import os

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    path = os.path.join(root, "lm")
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def clip_tower_dir(root: str, seed: int = 3) -> str:
    """A tiny CLIP vision checkpoint (56 px, 16 patches) + its image processor at ``root/clip``."""
    import os

    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    path = os.path.join(root, "clip")
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_TOWER.items() if k != "model_type"})).save_pretrained(path)
    side = TINY_TOWER["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(path)
    return path
