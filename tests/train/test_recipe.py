"""mmtune.train.recipe: build() assembles one consistent pipeline, and every entry point goes through it."""

import importlib.util
import json
import pathlib

import pytest
import torch

import mmtune.train.recipe as recipe
from mmtune.config import parse_config
from mmtune.demo import build_model_dir, make_dataset

ROOT = pathlib.Path(__file__).parents[2]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    data, _ = make_dataset(str(root / "data"), n_train=8, n_test=1, size=56)
    return {"root": root, "data": data, "model": build_model_dir(str(root), hidden=64)}


def _cfg(ws, out, **extra):
    cfg = dict(model_name_or_path=ws["model"], dataset=ws["data"], finetuning_type="lora", lora_rank=4,
               torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=2, max_steps=1,
               save_strategy="no", use_cpu=True, disable_tqdm=True, plot_loss=False, dataloader_num_workers=0,
               packing=False)  # no template: the model type's declared one
    cfg.update(extra)
    return cfg


class Called(Exception):
    """Raised by a stand-in for build / build_saved: the entry point reached it."""


def _record(calls, name):
    def stand_in(*args, **kwargs):
        calls.append((name, args, kwargs))
        raise Called(name)

    return stand_in


def test_build_gives_parts_that_fit_together(ws, tmp_path):
    model_args, data_args, finetuning_args, mm_args, training_args = parse_config(None, extra=_cfg(ws, tmp_path))
    parts = recipe.build(model_args, data_args, finetuning_args, training_args, mm_args=mm_args)
    assert data_args.template is None and parts.data_args.template == "qwen2_vl" == parts.template.name
    assert parts.model_type == "qwen2_vl" and parts.plugin_name == parts.template.plugin
    assert type(parts.plugin).__name__ == "Qwen2VLPlugin"
    assert parts.processor is not None and parts.tokenizer is not None
    rows = len(json.load(open(ws["data"])))
    assert len(parts.datasets["train"]) == rows and parts.train_dataset is parts.datasets["train"]  # packing off
    collator = parts.collator
    assert collator.plugin is parts.plugin and collator.tokenizer is parts.tokenizer
    assert collator.processor is parts.processor and collator.model is parts.model
    assert hasattr(parts.model, "peft_config")  # the LoRA the config asks for
    batch = collator([parts.train_dataset[i] for i in range(2)])
    assert torch.isfinite(parts.model(**batch).loss)


def test_build_without_model_or_data_reads_neither(ws, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr(recipe, "load_model", refuse)
    monkeypatch.setattr(recipe, "build_dataset", refuse)
    model_args, data_args, finetuning_args, mm_args, _ = parse_config(None, extra=_cfg(ws, tmp_path))
    parts = recipe.build(model_args, data_args, finetuning_args, mm_args=mm_args, datasets=False, model=False)
    assert parts.model is None and parts.collator is None and parts.datasets == {}
    assert parts.template.name == "qwen2_vl" and parts.tokenizer is not None


def test_build_saved_reopens_with_the_parts_build_gives(ws, tmp_path):
    model_args, data_args, finetuning_args, mm_args, _ = parse_config(None, extra=_cfg(ws, tmp_path))
    built = recipe.build(model_args, data_args, finetuning_args, mm_args=mm_args, datasets=False, model=False)
    saved = recipe.build_saved(ws["model"], dtype="fp32")
    assert saved.template is built.template and saved.plugin_name == built.plugin_name
    assert type(saved.plugin) is type(built.plugin) and saved.plugin.media == built.plugin.media
    assert saved.template_source == "the default of model type 'qwen2_vl'"
    assert saved.collator.padding_side == "left" and not saved.collator.build_position_ids
    assert saved.collator.plugin is saved.plugin and not saved.model.training


def test_inference_goes_to_the_accelerator_when_there_is_one(ws, monkeypatch):
    import torch

    assert recipe.inference_device("cpu") == "cpu" and recipe.inference_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert recipe.inference_device() == "cuda"  # chat, predict and serve: the GPU, not the CPU, by default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert recipe.inference_device() == "cpu"
    # the model is moved where inference_device says (meta stands in for an accelerator here)
    saved = recipe.build_saved(ws["model"], dtype="fp32", device="meta")
    assert {p.device.type for p in saved.model.parameters()} == {"meta"}
    assert {p.device.type for p in recipe.build_saved(ws["model"], dtype="fp32").model.parameters()} == {"cpu"}


def test_train_goes_through_build(ws, tmp_path, monkeypatch, capsys):
    import yaml

    from mmtune.cli import main
    from mmtune.train import run_sft

    calls = []
    monkeypatch.setattr(recipe, "build", _record(calls, "build"))
    with pytest.raises(Called):
        run_sft(*parse_config(None, extra=_cfg(ws, tmp_path / "a")))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_cfg(ws, tmp_path / "b")))
    with pytest.raises(Called):
        main(["train", str(config)])
    assert [name for name, *_ in calls] == ["build", "build"]
    _, args, kwargs = calls[0]
    assert args[0].model_name_or_path == ws["model"] and args[3].output_dir == str(tmp_path / "a")
    assert kwargs["mm_args"] is not None


def test_check_data_goes_through_build_without_model_or_data(ws, tmp_path, monkeypatch):
    import yaml

    from mmtune.cli import main

    calls = []
    monkeypatch.setattr(recipe, "build", _record(calls, "build"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_cfg(ws, tmp_path / "out")))
    with pytest.raises(Called):
        main(["check-data", str(config)])
    (_, _, kwargs), = calls
    assert kwargs["model"] is False and kwargs["datasets"] is False


def test_chat_and_export_go_through_build_saved(ws, tmp_path, monkeypatch):
    from mmtune.infer import ChatEngine, export_model

    calls = []
    monkeypatch.setattr(recipe, "build_saved", _record(calls, "build_saved"))
    with pytest.raises(Called):
        ChatEngine(ws["model"], template="qwen2_vl", dtype="fp32")
    with pytest.raises(Called):
        export_model(ws["model"], str(tmp_path / "export"))
    assert [name for name, *_ in calls] == ["build_saved", "build_saved"]
    assert calls[0][2]["template"] == "qwen2_vl" and calls[1][2]["template_required"] is False


def test_demo_trains_and_reopens_through_the_recipe(tmp_path, monkeypatch):
    from mmtune import demo

    calls = []
    monkeypatch.setattr(recipe, "build", _record(calls, "build"))
    with pytest.raises(Called):
        demo.run_demo(output_dir=str(tmp_path / "demo"), n_train=4, n_test=1, max_steps=1)
    assert [name for name, *_ in calls] == ["build"]


@pytest.mark.parametrize("script", ["step_anatomy", "train_speed"])
def test_benchmarks_build_through_the_recipe(ws, tmp_path, monkeypatch, script):
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{script}", ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(recipe, "build", _record(calls, "build"))
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(Called):
        module.main(["--model", ws["model"], "--data", ws["data"], "--cpu", "--steps", "1", "--batch", "2",
                     *(["--output-dir", str(tmp_path / "o")] if script == "train_speed" else [])])
    assert calls and calls[0][0] == "build"
