"""The levers together (mmtune.speed.levers): loading applies them, a whole training run with them
logs the losses of all of them off."""

import copy

import pytest

from mmtune.config import FinetuningArguments, ModelArguments
from mmtune.model.layers import unwrap_model
from mmtune.speed import levers

from ..helpers import make_model as _model
from ..helpers import tiny_model


def test_load_model_applies_the_default_levers_on_cpu(caplog):
    import logging

    from mmtune.model.loader import load_model
    from mmtune.config import parse_config

    from mmtune.speed.result import Applied

    config = copy.deepcopy(tiny_model("qwen2_vl").config)
    levers = {}
    with caplog.at_level(logging.INFO, logger="mmtune"):
        model = load_model(ModelArguments(torch_dtype="fp32"), FinetuningArguments(), config=config, device_type="cpu",
                           levers_out=levers)
    base = unwrap_model(model)
    assert isinstance(levers["fused_cross_entropy"], Applied)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in base.modules())  # compile: CUDA only
    text = caplog.text
    assert "fused linear cross-entropy on" in text and "frozen tower runs without autograd" in text
    off = ModelArguments(torch_dtype="fp32", fused_cross_entropy=False, frozen_tower_no_grad=False)
    levers_off = {}
    load_model(off, FinetuningArguments(), config=config, device_type="cpu", levers_out=levers_off)
    assert not levers_off.get("fused_cross_entropy")
    model_args = parse_config(None, extra={"compile": False, "gradient_checkpointing_layers": 3,
                                           "memory_budget_gib": 20, "liger_kernels": False})[0]
    assert model_args.compile is False and model_args.gradient_checkpointing_layers == 3


def test_mmtune_train_with_levers_gives_the_losses_of_levers_off(tmp_path, caplog):
    """The real path (dataset on disk, collator, HF Trainer with gradient accumulation, so
    num_items_in_batch): fused cross-entropy + frozen tower without autograd + one of two
    layers checkpointed + the sync-free forward log the losses of all levers off, step for step."""
    import json

    from transformers import set_seed

    from mmtune.demo import build_model_dir, make_dataset
    from mmtune.config import parse_config
    from mmtune.train import run_sft

    data, _ = make_dataset(str(tmp_path / "data"), n_train=16, n_test=0, size=56)
    model = build_model_dir(str(tmp_path), hidden=64)

    def losses(name, **levers):
        out = tmp_path / name
        set_seed(0)  # LoRA's init draws before the Trainer seeds
        run_sft(*parse_config(None, extra=dict(
            model_name_or_path=model, dataset=data, template="qwen2_vl", finetuning_type="lora", lora_rank=4,
            torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=4, learning_rate=5e-3, logging_steps=1, save_strategy="no", seed=0, data_seed=0, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, plot_loss=False, cutoff_len=256, gradient_checkpointing=True,
            packing=False, **levers)))
        rows = [json.loads(line) for line in open(out / "trainer_log.jsonl")]
        return [r["loss"] for r in rows if "loss" in r]

    off = losses("off", fused_cross_entropy=False, frozen_tower_no_grad=False, gradient_checkpointing_layers="auto",
                 sync_free_forward=False)
    caplog.clear()
    with caplog.at_level("INFO", logger="mmtune"):
        on = losses("on", gradient_checkpointing_layers=1)
    for applied in ("fused linear cross-entropy on", "frozen tower runs without autograd",
                    "activation checkpointing: 1 of 2 decoder layers", "sync-free forward on"):
        assert applied in caplog.text
    assert len(off) == 4 and on == pytest.approx(off, rel=1e-5, abs=1e-6)




def test_one_ordered_list_names_every_lever_once():
    names = [lever.NAME for lever in levers.LEVERS]
    switches = [lever.SWITCH for lever in levers.LEVERS]
    assert len(set(names)) == len(names) and len(set(switches)) == len(switches)
    assert all(lever.SUMMARY and callable(lever.apply) for lever in levers.LEVERS)
    order = {lever.SWITCH: i for i, lever in enumerate(levers.LEVERS)}
    # the dependencies `earlier` carries: checkpointing after the fused loss, block graphs after
    # the towers go without autograd and before compile (which compiles the graphed blocks)
    assert order["fused_cross_entropy"] < order["gradient_checkpointing_layers"]
    assert order["frozen_tower_no_grad"] < order["frozen_block_cuda_graphs"] < order["compile"]
    assert order["fused_cross_entropy"] < order["sync_free_forward"]
    assert set(levers.WITHOUT.values()) == set(levers.SWITCHES)


def test_apply_levers_reports_every_lever_and_logs_once(caplog):
    """A LeverReport keyed by switch: Applied or Declined (with its reason), a switched-off lever
    says whether the user or this device's default switched it off; one summary line."""
    import logging

    from mmtune.speed.config import resolve_speed_config
    from mmtune.speed.result import Applied, Declined

    cfg = resolve_speed_config(ModelArguments(sync_free_forward=False), device_type="cpu")
    with caplog.at_level(logging.INFO, logger="mmtune.speed"):
        report = levers.apply_levers(_model("qwen2_vl"), cfg)
    assert list(report) == [lever.SWITCH for lever in levers.LEVERS]
    assert all(isinstance(r, (Applied, Declined)) for r in report.values())
    assert report["frozen_tower_no_grad"].detail == ["model.visual.patch_embed", "model.visual.blocks"]
    assert report["sync_free_forward"].reason == "off (sync_free_forward: false)"
    assert report["compile"].reason == "off (its default on cpu)"
    assert {"sync_free_forward", "compile"} <= report.switched_off
    assert sum("speed levers:" in r.getMessage() for r in caplog.records) == 1


def test_checkpointing_reads_the_fused_loss_from_earlier(monkeypatch):
    """Order dependencies pass as results: the checkpointing lever sizes the loss's memory from
    the fused loss's result it is handed, not from state on the model."""
    from mmtune.speed import checkpointing
    from mmtune.speed.config import SpeedConfig
    from mmtune.speed.result import Applied, Declined

    seen = []
    monkeypatch.setattr(checkpointing, "checkpoint_count", lambda plan, model, **kw: seen.append(kw["fused_ce"]) or 1)
    cfg = SpeedConfig(gradient_checkpointing_layers=1)
    checkpointing.apply(_model("qwen2_vl"), cfg, {"fused_cross_entropy": Applied(True)})
    checkpointing.apply(_model("qwen2_vl"), cfg, {"fused_cross_entropy": Declined("no")})
    assert seen == [True, False]
