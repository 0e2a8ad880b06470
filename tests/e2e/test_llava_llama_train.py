"""The LLaVA two-stage recipe through `mmtune train` on a tiny native LLaVA assembled from a
plain Llama LM and a CLIP tower: stage 1 trains the projector alone and writes
``mm_projector.safetensors``; stage 2 loads it and trains LoRA + projector; resume is exact;
export merges into a checkpoint transformers loads; chat answers about an image."""

import json
import os

import pytest
import torch

from mmtune.demo import make_dataset
from mmtune.config import parse_config
from mmtune.testing.stand_ins.llava_llama import clip_tower_dir, plain_llama_dir
from mmtune.train import run_sft


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava2")
    data, items = make_dataset(str(root / "data"), n_train=16, n_test=2, size=56)
    return {"root": root, "data": data, "items": items, "lm": plain_llama_dir(str(root)),
            "clip": clip_tower_dir(str(root))}


def _run(ws, out, **extra):
    cfg = dict(model_name_or_path=ws["lm"], vision_tower=ws["clip"], mm_projector_type="mlp2x_gelu",
               dataset=ws["data"], torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=4,
               max_steps=4, learning_rate=5e-3, logging_steps=1, save_strategy="no", seed=0, use_cpu=True,
               disable_tqdm=True, cutoff_len=256, data_seed=0, plot_loss=False)
    cfg.update(extra)
    return run_sft(*parse_config(None, extra=cfg))


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "trainer_log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def stage1(ws):
    out = ws["root"] / "stage1"
    _run(ws, out, stage="pretrain", finetuning_type="full", template="llava_llama_plain")
    return out


def test_stage1_trains_the_projector_alone(ws, stage1):
    from safetensors.torch import load_file

    projector = load_file(str(stage1 / "mm_projector.safetensors"))
    assert sorted(projector) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                 "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    trained = load_file(str(stage1 / "model.safetensors"))
    base = load_file(os.path.join(ws["lm"], "model.safetensors"))
    tower = load_file(os.path.join(ws["clip"], "model.safetensors"))
    for key, value in base.items():  # the LM did not move
        assert torch.equal(trained[key], value), key
    for key, value in tower.items():  # nor did the tower
        assert torch.equal(trained["model.vision_tower.vision_tower." + key.removeprefix("vision_model.")], value), key
    config = json.load(open(stage1 / "config.json"))
    assert config["model_type"] == "llava_llama" and config["mm_hidden_size"] == 32


def test_stage2_loads_the_projector_trains_lora_and_resumes_exactly(ws, stage1, capsys):
    from mmtune.cli import main

    common = dict(stage="finetune", finetuning_type="lora", lora_rank=4, template="llava_llama",
                  pretrain_mm_mlp_adapter=str(stage1 / "mm_projector.safetensors"), max_steps=6, save_steps=3,
                  save_strategy="steps")
    full = ws["root"] / "stage2"
    _run(ws, full, **common)
    assert os.path.exists(full / "adapter_model.safetensors") and os.path.exists(full / "config.json")
    resumed = ws["root"] / "stage2_resumed"
    _run(ws, resumed, resume_from_checkpoint=str(full / "checkpoint-3"), **common)
    a, b = _losses(full), _losses(resumed)
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step

    merged = ws["root"] / "merged"
    assert main(["export", str(full), str(merged)]) == 0
    import mmtune.llava  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "LlavaLlamaForCausalLM" and not any("lora_" in n for n, _ in model.named_parameters())
    image = os.path.join(os.path.dirname(ws["data"]), ws["items"][0]["images"][0])
    assert main(["chat", str(merged), "--template", "llava_llama", "--image", image, "--prompt", "What colour?",
                 "--max-new-tokens", "3"]) == 0
    assert "assistant>" in capsys.readouterr().out
