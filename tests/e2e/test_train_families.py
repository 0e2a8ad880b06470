"""`mmtune train` runs, saves and exports on tiny models of several families (their collator paths
differ: token types, audio features, anyres image sizes)."""

import json
import os

import pytest

from mmtune.testing import make_audio_file, make_image_file, tiny_model_dir
from mmtune.train import parse_config, run_sft

CASES = {  # fixture -> (template, media kind)
    "llava": ("llava", "image"),
    "gemma3": ("gemma3", "image"),
    "qwen2_audio": ("qwen2_audio", "audio"),
    "llava_next": ("llava", "image"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_and_export_tiny_family(name, tmp_path):
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
    metrics = run_sft(*parse_config(None, extra=dict(
        model_name_or_path=model, dataset=str(data), template=template, finetuning_type="lora", lora_rank=4,
        torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        save_strategy="no", use_cpu=True, disable_tqdm=True, plot_loss=False, cutoff_len=4096,
        freeze_multi_modal_projector=False)))
    assert metrics["train_loss"] > 0 and os.path.exists(out / "adapter_model.safetensors")
    assert main(["export", str(out), str(tmp_path / "merged")]) == 0
    assert os.path.exists(tmp_path / "merged" / "config.json")
