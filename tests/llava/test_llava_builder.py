"""LLaVA's checkpoint kinds through ``load_pretrained_model``: full, LoRA over a base LM
(with non-LoRA trainables), projector-only over a base LM."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmtune.llava import IMAGE_TOKEN_INDEX, LlavaLlamaForCausalLM, load_pretrained_model
from mmtune.testing.stand_ins.llava_llama import TINY_TOWER, plain_llama_dir

from .conftest import make_model

IDS = torch.tensor([[1, 20, IMAGE_TOKEN_INDEX, 30, 31]])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder")
    torch.manual_seed(3)
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_TOWER.items() if k != "model_type"})).save_pretrained(
        root / "clip")
    return root, str(root / "clip"), plain_llama_dir(str(root))


def _assembled(base, clip):
    model = LlavaLlamaForCausalLM.from_pretrained(base)
    model.get_model().initialize_vision_modules(SimpleNamespace(vision_tower=clip, mm_projector_type="mlp2x_gelu"))
    with torch.no_grad():
        for p in model.get_model().mm_projector.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _logits(model, images):
    with torch.no_grad():
        return model(input_ids=IDS, images=images).logits


def test_full_checkpoint(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    from mmtune.testing.fixtures import processor_dir

    from transformers import AutoProcessor
    AutoProcessor.from_pretrained(processor_dir("llava_llama")).save_pretrained(tmp_path)
    tokenizer, loaded, processor, context = load_pretrained_model(str(tmp_path), attn_implementation="eager")
    images = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(_logits(loaded, images), _logits(model, images), atol=1e-6, rtol=0)
    assert type(processor).__name__ == "LlavaLlamaProcessor" and context == 2048
    assert processor.tokenizer is tokenizer


def test_projector_only_checkpoint_over_base(parts, tmp_path):
    from safetensors.torch import save_file

    _, clip, base = parts
    model = _assembled(base, clip)
    model.config.save_pretrained(tmp_path)
    save_file({f"model.mm_projector.{k}": v for k, v in model.get_model().mm_projector.state_dict().items()},
              str(tmp_path / "mm_projector.safetensors"))
    with pytest.raises(ValueError, match="projector-only checkpoint: pass model_base"):
        load_pretrained_model(str(tmp_path))
    tokenizer, loaded, processor, _ = load_pretrained_model(str(tmp_path), model_base=base)
    images = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(_logits(loaded, images), _logits(model, images), atol=1e-6, rtol=0)
    assert len(tokenizer.tokenize("<image>")) == 1  # the base tokenizer got LLaVA's image token


def test_lora_checkpoint_with_non_lora_trainables_over_base(parts, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, clip, base = parts
    model = _assembled(base, clip)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    torch.save({f"base_model.model.model.mm_projector.{k}": v
                for k, v in model.get_model().mm_projector.state_dict().items()}, tmp_path / "non_lora_trainables.bin")
    images = torch.randn(1, 3, 56, 56)
    want = _logits(peft_model, images)
    with pytest.raises(ValueError, match="LoRA checkpoint: pass model_base"):
        load_pretrained_model(str(tmp_path))
    _, loaded, _, _ = load_pretrained_model(str(tmp_path), model_base=base)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())  # merged
    torch.testing.assert_close(_logits(loaded, images), want, atol=1e-5, rtol=0)

    torch.save({"base_model.model.model.unknown.weight": torch.zeros(1)}, tmp_path / "non_lora_trainables.bin")
    with pytest.raises(ValueError, match="match no parameter"):
        load_pretrained_model(str(tmp_path), model_base=base)


def test_quantised_loading_needs_bitsandbytes_and_a_gpu(tmp_path):
    make_model().save_pretrained(tmp_path)
    with pytest.raises((ImportError, RuntimeError), match="bitsandbytes|CUDA GPU"):
        load_pretrained_model(str(tmp_path), load_4bit=True)
    assert os.path.exists(tmp_path / "config.json")
