"""Tiny native-LLaVA models (CLIP tower 56 px -> 16 patches, 2-layer Llama), fp32, seeded, and
checkpoints written the way the original LLaVA code writes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch


def make_model(seed: int = 0, **changes):
    from mmtune.testing.stand_ins.llava_llama import tiny_llava_llama_config
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


# ---------------------------------------------------------------- checkpoints of the original LLaVA code
#: the keys haotian-liu/LLaVA's train.py leaves in config.json (transformers 4.37 Llama keys + its own)
ORIGINAL_MM_KEYS = dict(
    mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
    mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_projector_lr=None,
    image_aspect_ratio="pad", tokenizer_model_max_length=2048, tokenizer_padding_side="right",
    tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, use_mm_proj=True, unfreeze_mm_vision_tower=False,
)
LLAMA_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)


@dataclass
class OriginalCheckpoint:
    """A folder as the original LLaVA code writes one, and the plain parts to check it against:
    ``lm`` (a ``LlamaForCausalLM`` with the language weights, LoRA merged), ``projector``
    (``mlp2x_gelu`` tensors), ``tower`` (the CLIP tower's state) and the ``clip`` folder."""

    path: str
    base: str | None
    clip: str
    lm: Any
    projector: dict[str, torch.Tensor]
    tower: dict[str, torch.Tensor]


def _original_config(tok, clip: str, **changes) -> dict:
    config = dict(_name_or_path="lmsys/vicuna-7b-v1.5", architectures=["LlavaLlamaForCausalLM"],
                  model_type="llava_llama",
                  attention_bias=False, attention_dropout=0.0, hidden_act="silu", initializer_range=0.02,
                  pretraining_tp=1, rope_scaling=None, tie_word_embeddings=False, torch_dtype="float32",
                  transformers_version="4.37.2", use_cache=True, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, mm_vision_tower=clip,
                  **LLAMA_SIZES, **ORIGINAL_MM_KEYS)
    config.update(changes)
    return config


def write_original_checkpoint(root, kind: str = "full", tower_in_checkpoint: bool = True, tower_shift: float = 0.0,
                              weights_file: str = "model.safetensors", **config_changes) -> OriginalCheckpoint:
    """Write ``root/<kind>`` as haotian-liu/LLaVA's ``train.py`` does: ``full`` (config.json, the
    whole state dict with ``model.mm_projector.*`` and, unless ``tower_in_checkpoint`` is false,
    ``model.vision_tower.vision_tower.vision_model.*`` shifted by ``tower_shift``; the tokenizer), ``lora``
    (config.json, a PEFT adapter, ``non_lora_trainables.bin``) or ``projector`` (config.json,
    ``mm_projector.bin``); the last two over ``root/base``, a plain Llama LM. No tokenizer has
    ``<image>``: the original never adds it; each adds BOS, as Vicuna's does."""
    import json
    import os

    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmtune.testing.stand_ins.llava import build_llama_tokenizer
    from mmtune.testing.stand_ins.llava_llama import clip_tower_dir

    root = str(root)
    clip = os.path.join(root, "clip")
    if not os.path.isdir(clip):
        clip_tower_dir(root)
    tok = build_llama_tokenizer(())
    tok.add_bos_token = True  # as Vicuna's and Llama's: tokenizer_image_token's BOS comes from the tokenizer
    torch.manual_seed(11)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **LLAMA_SIZES)).eval()
    projector = {"0.weight": torch.randn(64, 32) * 0.2, "0.bias": torch.randn(64) * 0.2,
                 "2.weight": torch.randn(64, 64) * 0.1, "2.bias": torch.randn(64) * 0.1}
    tower = {k: v + tower_shift for k, v in CLIPVisionModel.from_pretrained(clip).state_dict().items()}
    out = os.path.join(root, kind)
    os.makedirs(out, exist_ok=True)
    base = None
    if kind != "full":
        base = os.path.join(root, "base")
        if not os.path.isdir(base):
            lm.save_pretrained(base)
            tok.save_pretrained(base)
    if kind == "full":
        state = {k: v.contiguous() for k, v in lm.state_dict().items()}
        state.update({f"model.mm_projector.{k}": v for k, v in projector.items()})
        if tower_in_checkpoint:
            # transformers 4.x's CLIPVisionModel (the original's) nests its weights under vision_model
            state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.items()})
        if weights_file.endswith(".safetensors"):
            save_file(state, os.path.join(out, weights_file), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(out, weights_file))
        tok.save_pretrained(out)
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        # the original's target list is every Linear's last name outside the projector and
        # tower; PEFT then also wraps the tower's q/k/v_proj on loading (zero LoRA: init_lora_weights)
        peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj"]))
        torch.manual_seed(12)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        peft_model.save_pretrained(out)
        torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()},
                   os.path.join(out, "non_lora_trainables.bin"))
        lm = peft_model.merge_and_unload().eval()
    elif kind == "projector":
        config_changes.setdefault("tune_mm_mlp_adapter", True)
        torch.save({f"model.mm_projector.{k}": v for k, v in projector.items()}, os.path.join(out, "mm_projector.bin"))
    else:
        raise ValueError(kind)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(_original_config(tok, clip, **config_changes), f, indent=2)
    return OriginalCheckpoint(path=out, base=base, clip=clip, lm=lm, projector=projector, tower=tower)


def reference_logits(checkpoint: OriginalCheckpoint, ids: list[int], images: torch.Tensor) -> torch.Tensor:
    """Logits from the plain parts: CLIP's second-to-last layer without CLS -> Linear, GELU,
    Linear -> spliced at each -200 into the Llama embeddings."""
    import torch.nn.functional as F
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(checkpoint.clip)).eval()
    clip.load_state_dict(checkpoint.tower)
    p = checkpoint.projector
    with torch.no_grad():
        feats = clip(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = F.linear(F.gelu(F.linear(feats, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])
        embed = checkpoint.lm.get_input_embeddings()
        pieces, k, start = [], 0, 0
        for i, t in enumerate(ids):
            if t == -200:
                pieces += [embed(torch.tensor(ids[start:i])), feats[k]]
                k += 1
                start = i + 1
        pieces.append(embed(torch.tensor(ids[start:])))
        return checkpoint.lm(inputs_embeds=torch.cat(pieces)[None]).logits


# ---------------------------------------------------------------- the original's token algorithms, restated
#: conv_vicuna_v1's system prompt: the conversation LLaVA-1.5 trains with (``--version v1``)
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def original_image_token_ids(prompt: str, tokenizer) -> list[int]:
    """haotian-liu/LLaVA's ``tokenizer_image_token``, step by step: every chunk between
    ``<image>`` placeholders tokenised with the tokenizer's special tokens; when the first chunk
    opens with BOS, BOS is kept once and stripped from every chunk; chunks joined by -200."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(-200)
        ids += chunk[offset:]
    return ids


def original_plain_ids_and_labels(human: str, caption: str, tokenizer) -> tuple[list[int], list[int]]:
    """``preprocess_plain`` of one (human, gpt) pair: the human turn replaced by ``<image>``
    alone, the caption and conv_llava_plain's separator ``\n`` appended; labels ignore the
    tokens of ``<image>`` (BOS and -200)."""
    assert "<image>" in human
    ids = original_image_token_ids("<image>" + caption + "\n", tokenizer)
    masked = len(original_image_token_ids("<image>", tokenizer))
    return ids, [-100] * masked + ids[masked:]


def reference_greedy(checkpoint: OriginalCheckpoint, ids: list[int], images: torch.Tensor, steps: int,
                     eos: int | None = None) -> list[int]:
    """Greedy tokens from the plain parts (``reference_logits``), one full forward a token."""
    out: list[int] = []
    for _ in range(steps):
        token = int(reference_logits(checkpoint, ids + out, images)[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
    return out
