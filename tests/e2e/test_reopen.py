"""Every folder mmtune writes reopens: each checkpoint-N and the final folder carry the processor
and mmtune_config.json (LoRA and full fine-tuning), chat / export / resume work from a
checkpoint-N, an export reopens without flags, the final save is complete before a Hub push,
and a family other than Qwen2-VL (Gemma 3) gets its own template with no --template given."""

import json
import logging
import os
import shutil

import pytest
import torch

from mmtune.demo import build_model_dir, make_dataset
from mmtune.model.saved import read_mmtune_config
from mmtune.config import parse_config
from mmtune.train import run_sft

PROMPT = ["--prompt", "What shape is this?", "--max-new-tokens", "3"]


def _config(model, data, out, **extra):
    cfg = dict(model_name_or_path=model, dataset=data, lora_rank=4, torch_dtype="fp32", output_dir=str(out),
               per_device_train_batch_size=4, max_steps=2, save_strategy="steps", save_steps=1, logging_steps=1,
               learning_rate=1e-3, seed=0, data_seed=0, use_cpu=True, disable_tqdm=True, plot_loss=False,
               dataloader_num_workers=0)  # no template: the model type's declared one
    cfg.update(extra)
    if cfg.get("finetuning_type", "lora") != "lora":
        cfg.pop("lora_rank")  # only LoRA reads it: a full or freeze run refuses it
    return parse_config(None, extra=cfg)


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "trainer_log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("reopen")
    data, items = make_dataset(str(root / "data"), n_train=8, n_test=1, size=56)
    model = build_model_dir(str(root), hidden=64)
    for ft in ("lora", "full"):
        run_sft(*_config(model, data, root / ft, finetuning_type=ft))
    return {"root": root, "data": data, "model": model,
            "image": os.path.join(str(root / "data"), items[0]["images"][0])}


@pytest.mark.parametrize("ft", ["lora", "full"])
def test_every_checkpoint_and_the_final_folder_carry_processor_and_config(ws, ft):
    from transformers import AutoProcessor

    out = ws["root"] / ft
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        processor = AutoProcessor.from_pretrained(folder)
        assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor"), folder
        record = read_mmtune_config(str(folder))
        assert record["template"] == "qwen2_vl" and record["plugin"] == "qwen2_vl", folder
        assert record["finetuning_type"] == ft and record["model_type"] == "qwen2_vl", folder
        assert record["model_name_or_path"] == ws["model"] and "video_fps" in record["media"], folder
        weights = "adapter_config.json" if ft == "lora" else "config.json"
        assert (folder / weights).exists(), folder


@pytest.mark.parametrize("ft", ["lora", "full"])
def test_chat_and_export_from_a_checkpoint(ws, ft, capsys):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmtune.cli import main

    checkpoint = ws["root"] / ft / "checkpoint-1"
    assert main(["chat", str(checkpoint), "--image", ws["image"], *PROMPT]) == 0
    assert "assistant>" in capsys.readouterr().out
    export = ws["root"] / f"export_{ft}"
    assert main(["export", str(checkpoint), str(export)]) == 0
    processor = AutoProcessor.from_pretrained(export)
    assert processor.image_processor is not None and processor.tokenizer is not None
    merged = AutoModelForImageTextToText.from_pretrained(export).eval()
    if ft == "lora":
        reference = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(ws["model"]), checkpoint)
    else:
        reference = AutoModelForImageTextToText.from_pretrained(checkpoint)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, atol=1e-5)
    record = read_mmtune_config(str(export))
    assert record["finetuning_type"] == "full" and record["template"] == "qwen2_vl"
    assert record["exported_from"] == str(checkpoint)
    assert main(["chat", str(export), "--image", ws["image"], *PROMPT]) == 0


@pytest.mark.parametrize("ft", ["lora", "full"])
def test_resume_from_a_checkpoint(ws, ft):
    resumed = ws["root"] / f"{ft}_resumed"
    run_sft(*_config(ws["model"], ws["data"], resumed, finetuning_type=ft,
                     resume_from_checkpoint=str(ws["root"] / ft / "checkpoint-1")))
    assert 1 not in _losses(resumed)  # step 1 came from the checkpoint
    assert _losses(resumed)[2] == pytest.approx(_losses(ws["root"] / ft)[2], rel=1e-5, abs=1e-6)
    assert read_mmtune_config(str(resumed / "checkpoint-2"))["finetuning_type"] == ft


def test_a_folder_without_processor_takes_its_base_s_or_fails_naming_it(ws, tmp_path, caplog):
    from mmtune.infer import ChatEngine, export_model

    old_lora = tmp_path / "old_lora"  # as checkpoints were written before they carried the processor
    shutil.copytree(ws["root"] / "lora" / "checkpoint-1", old_lora)
    (old_lora / "processor_config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="mmtune.model.saved"):
        engine = ChatEngine(str(old_lora), max_new_tokens=2)
    assert engine.processor is not None and "has no processor" in caplog.text
    assert engine.chat([{"role": "user", "content": "<image>What?"}], images=[ws["image"]]) is not None
    old_full = tmp_path / "old_full"
    shutil.copytree(ws["root"] / "full" / "checkpoint-1", old_full)
    for name in ("processor_config.json", "mmtune_config.json"):
        (old_full / name).unlink()
    with pytest.raises(ValueError, match=f"{old_full} has no multimodal processor for its qwen2_vl model"):
        export_model(str(old_full), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()  # nothing half-written


def test_the_final_folder_is_complete_before_a_hub_push(ws, tmp_path, monkeypatch):
    from transformers import Trainer

    from mmtune.train.sft import MMTrainer

    pushed = []
    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, *a, **k: None)  # no Hub here
    monkeypatch.setattr(MMTrainer, "push_to_hub", lambda self, *a, **k: pushed.append(sorted(os.listdir(
        self.args.output_dir))))
    run_sft(*_config(ws["model"], ws["data"], tmp_path / "out", finetuning_type="lora", max_steps=1,
                     save_strategy="no", push_to_hub=True, hub_model_id="someone/tiny", hub_strategy="end"))
    assert len(pushed) == 1
    for name in ("adapter_model.safetensors", "processor_config.json", "tokenizer.json", "mmtune_config.json"):
        assert name in pushed[0], (name, pushed[0])


def test_gemma3_gets_its_own_template_without_flags(tmp_path, capsys, caplog):
    """Trained with no `template`, exported from a checkpoint, chatted with no --template; and a
    downloaded Gemma 3 (no mmtune_config.json) takes its family's declared template."""
    from transformers import AutoProcessor

    from mmtune.cli import main
    from mmtune.infer import ChatEngine
    from mmtune.testing import make_image_file, tiny_model_dir

    rows = []
    for i in range(4):
        image = make_image_file(str(tmp_path / f"m{i}.png"), 80 + 20 * i, 60, seed=i)
        rows.append({"messages": [{"role": "user", "content": "<image>What is this?"},
                                  {"role": "assistant", "content": "a circle"}], "images": [os.path.basename(image)]})
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    model = tiny_model_dir("gemma3", str(tmp_path))
    out = tmp_path / "out"
    run_sft(*_config(model, str(data), out, finetuning_type="lora", per_device_train_batch_size=2,
                     cutoff_len=4096))
    assert read_mmtune_config(str(out / "checkpoint-1"))["template"] == "gemma3"
    export = tmp_path / "export"
    assert main(["export", str(out / "checkpoint-1"), str(export)]) == 0
    assert type(AutoProcessor.from_pretrained(export)).__name__ == "Gemma3Processor"
    engine = ChatEngine(str(export), max_new_tokens=2)
    assert engine.template.name == "gemma3" and type(engine.plugin).__name__ == "Gemma3Plugin"
    with caplog.at_level(logging.INFO, logger="mmtune.infer.chat"):
        assert main(["chat", str(export), "--image", image, *PROMPT]) == 0
        assert main(["chat", model, "--image", image, *PROMPT]) == 0
    assert "chat: template gemma3 (mmtune_config.json), plugin gemma3" in caplog.text
    assert "chat: template gemma3 (the default of model type 'gemma3'), plugin gemma3" in caplog.text
    assert capsys.readouterr().out.count("assistant>") == 2


def test_an_unknown_model_type_is_a_one_line_error_naming_template(tmp_path, capsys):
    from mmtune.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model type 'bert'" in err and "pass --template NAME" in err
