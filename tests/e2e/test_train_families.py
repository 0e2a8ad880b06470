"""`mmtune train` runs, saves, resumes exactly, exports, and `mmtune chat` answers from the export,
on tiny models of several families (their collator paths differ: token types, audio features,
anyres image sizes). qwen2_vl and llava_llama have their own end-to-end files."""

import json
import os

import pytest

from mmtune.testing import make_audio_file, make_image_file, tiny_model_dir
from mmtune.config import parse_config
from mmtune.train import run_sft

CASES = {  # fixture -> (template, media kind)
    "llava": ("llava", "image"),
    "gemma3": ("gemma3", "image"),
    "qwen2_audio": ("qwen2_audio", "audio"),
    "llava_next": ("llava", "image"),
    "qwen3_5": ("qwen3_5", "image"),  # hybrid linear attention (Gated DeltaNet), the PyTorch fallback here
    "gemma4": ("gemma4", "image"),
    "glm46v": ("glm46v", "image"),
    "qwen3_omni_moe_thinker": ("qwen3_omni", "audio"),
    "lfm2_vl": ("lfm2_vl", "image"),  # hybrid short-convolution layers
}
try:  # both newer than transformers 5.17 (whose MiniCPM-V 4.6 takes one image size per batch)
    import transformers.models.minicpmv4_7  # noqa: F401

    CASES["minicpmv4_6"] = ("minicpmv4_6", "image")  # NaViT-packed slices, a Qwen3.5 language model
    CASES["minicpmv4_7"] = ("minicpmv4_7", "image")  # canvas M-RoPE from mm_token_type_ids
except ImportError:
    pass


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "trainer_log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_resume_export_chat_tiny_family(name, tmp_path, capsys):
    from mmtune.cli import main

    template, kind = CASES[name]
    rows = []
    for i in range(4):
        if kind == "image":
            path = make_image_file(str(tmp_path / f"m{i}.png"), 80 + 20 * i, 60, seed=i)
            rows.append({"messages": [{"role": "user", "content": "<image>What is this?"},
                                      {"role": "assistant", "content": "a circle"}], "images": [os.path.basename(path)]})
        else:
            path = make_audio_file(str(tmp_path / f"m{i}.wav"), seconds=0.5 + 0.25 * i)
            rows.append({"messages": [{"role": "user", "content": "<audio>What is this?"},
                                      {"role": "assistant", "content": "a tone"}], "audios": [os.path.basename(path)]})
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    model = tiny_model_dir(name, str(tmp_path))
    out = tmp_path / "out"

    def train(output_dir, **extra):
        return run_sft(*parse_config(None, extra=dict(
            model_name_or_path=model, dataset=str(data), template=template, finetuning_type="lora", lora_rank=4,
            torch_dtype="fp32", output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=4,
            learning_rate=1e-3, save_strategy="steps", save_steps=2, logging_steps=1, seed=0, data_seed=0,
            use_cpu=True, disable_tqdm=True, plot_loss=False, cutoff_len=4096, freeze_multi_modal_projector=False,
            **extra)))

    metrics = train(out)
    assert metrics["train_loss"] > 0 and os.path.exists(out / "adapter_model.safetensors")
    train(tmp_path / "resumed", resume_from_checkpoint=str(out / "checkpoint-2"))
    full, resumed = _losses(out), _losses(tmp_path / "resumed")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, full, resumed)
    assert main(["export", str(out), str(tmp_path / "merged")]) == 0
    flag = "--image" if kind == "image" else "--audio"
    assert main(["chat", str(tmp_path / "merged"), "--template", template, flag, path, "--prompt", "What is this?",
                 "--max-new-tokens", "3"]) == 0
    assert "assistant>" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "merged" / "config.json")
