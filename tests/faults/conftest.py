"""Builders the checkpoint and interrupt tests share: one LoRA run configuration on the tiny
Qwen2-VL workspace, and the per-step losses a run logged."""

import json
import os


def lora_run_config(ws, out, **extra):
    """A six-step LoRA run on ``ws``'s tiny model and data into ``out``, saving every two steps;
    ``extra`` overrides any key (a ``finetuning_type`` other than lora drops LoRA's rank, which
    only LoRA reads and a full or freeze run refuses)."""
    cfg = dict(model_name_or_path=ws["model"], dataset=ws["data"], template="qwen2_vl", finetuning_type="lora",
               lora_rank=4, freeze_multi_modal_projector=False, torch_dtype="fp32", output_dir=str(out),
               per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3, logging_steps=1, save_steps=2,
               save_strategy="steps", seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0,
               disable_tqdm=True, cutoff_len=256, plot_loss=False)
    cfg.update(extra)
    if cfg["finetuning_type"] != "lora":
        cfg.pop("lora_rank")
    return cfg


def logged_losses(out):
    """{step: loss} from ``out``'s trainer_log.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(out, "trainer_log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
