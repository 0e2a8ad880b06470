"""Tiny native-LLaVA models (CLIP tower 56 px -> 16 patches, 2-layer Llama), fp32, seeded."""

from __future__ import annotations

import pytest
import torch


def make_model(seed: int = 0, **changes):
    from mmtune.families.llava_llama import tiny_llava_llama_config
    from mmtune.llava import LlavaLlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llava_llama_config(**changes)
    config._attn_implementation = "eager"
    model = LlavaLlamaForCausalLM(config).eval()
    with torch.no_grad():  # a visible, non-zero projector bias and image_newline
        for p in model.get_model().mm_projector.parameters():
            p.normal_(0, 0.2)
        if getattr(model.get_model(), "image_newline", None) is not None:
            model.get_model().image_newline.normal_(0, 1)
    return model


@pytest.fixture
def tiny():
    return make_model()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 56, 56)
