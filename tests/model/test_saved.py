"""What mmtune writes beside weights and how a folder is read back: declared templates, the
template's resolution order, folder inspection, the config callback, export's record and the
chat's decoding options (no model is built here)."""

import json
import logging
from types import SimpleNamespace

import pytest

from mmtune.config import ConfigError
from mmtune.model.saved import (
    MMTUNE_CONFIG_NAME,
    inspect_folder,
    read_mmtune_config,
    resolve_template,
    write_mmtune_config,
)


def test_every_declared_template_exists_with_its_plugin():
    from mmtune.model.composite import COMPOSITE_MODELS, declared_template
    from mmtune.plugins import PLUGINS
    from mmtune.templates import TEMPLATES

    declared = {t: declared_template(t) for t in COMPOSITE_MODELS}
    for model_type, name in declared.items():
        if name is not None:
            assert name in TEMPLATES, model_type
            assert TEMPLATES[name].plugin in PLUGINS, model_type
    assert declared["gemma3"] == "gemma3" and declared["qwen2_5_vl"] == "qwen2_5_vl"
    assert declared["smolvlm"] == "smolvlm" and declared["qwen2_5_omni_thinker"] == "qwen2_omni"
    assert sum(name is None for name in declared.values()) <= 1  # vipllava alone has no template of its own
    assert declared_template("bert") is None


def test_template_resolution_order_and_error():
    record = {"template": "llava", "plugin": "llava"}
    assert resolve_template("gemma3", "qwen2_vl", record) == ("gemma3", "given")
    assert resolve_template(None, "qwen2_vl", record) == ("llava", MMTUNE_CONFIG_NAME)
    assert resolve_template("auto", "gemma3", {}) == ("gemma3", "the default of model type 'gemma3'")
    with pytest.raises(ConfigError, match=r"/m: no chat template known for model type 'bert' \(no mmtune_config.json, "
                                          r"and no family declares one\); pass --template NAME"):
        resolve_template(None, "bert", {}, where="/m")
    with pytest.raises(ConfigError, match="a model without config.json"):
        resolve_template(None, None)


def test_training_template_defaults_to_the_model_type_and_logs_it(caplog):
    from mmtune.train.recipe import training_template

    with caplog.at_level(logging.INFO, logger="mmtune.train.recipe"):
        assert training_template(None, "gemma3") == "gemma3"
    assert "template: gemma3 (the default of model type 'gemma3'" in caplog.text
    assert training_template("llava", "gemma3") == "llava"
    with pytest.raises(ConfigError, match=r"model type 'bert' \(no family declares one\); pass `template:` in the "
                                          r"config, e.g. template: NAME"):
        training_template(None, "bert")


def test_inspect_folder_reads_adapter_base_record_and_model_type(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    adapter = tmp_path / "checkpoint-4"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    write_mmtune_config(str(adapter), {"template": "gemma3", "model_name_or_path": str(base)})
    folder = inspect_folder(str(adapter))
    assert (folder.model_path, folder.adapter_path, folder.files) == (str(base), str(adapter), str(adapter))
    assert folder.model_type == "gemma3" and folder.record["template"] == "gemma3"
    assert folder.processor_fallbacks() == [str(base)]
    full = inspect_folder(str(base))
    assert full.adapter_path is None and full.record == {} and full.processor_fallbacks() == []
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="names no base_model_name_or_path"):
        inspect_folder(str(adapter))
    (adapter / MMTUNE_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="mmtune_config.json is not valid JSON"):
        read_mmtune_config(str(adapter))


def test_config_callback_writes_checkpoints_and_the_output_folder_before_a_push(tmp_path):
    from mmtune.train.callbacks import MmtuneConfigCallback

    saved_config = []
    model_config = SimpleNamespace(save_pretrained=saved_config.append)
    callback = MmtuneConfigCallback({"template": "gemma3"}, model_config)
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    (tmp_path / "checkpoint-3").mkdir()
    callback.on_save(args, SimpleNamespace(global_step=3), None)
    assert read_mmtune_config(str(tmp_path / "checkpoint-3")) == {"template": "gemma3"}
    assert read_mmtune_config(str(tmp_path)) == {}  # a checkpoint save leaves the output folder alone
    callback.on_push_begin(args, SimpleNamespace(global_step=3), None)
    assert read_mmtune_config(str(tmp_path)) == {"template": "gemma3"}
    assert saved_config == [str(tmp_path / "checkpoint-3"), str(tmp_path), str(tmp_path / "checkpoint-3")]
    (tmp_path / "checkpoint-6").mkdir()
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=False), SimpleNamespace(global_step=6), None)
    assert read_mmtune_config(str(tmp_path / "checkpoint-6")) == {}  # not the saving process


def test_export_record_keeps_family_and_marks_a_merge_full():
    from mmtune.infer.export import export_record

    trained = {"template": "gemma3", "plugin": "gemma3", "finetuning_type": "lora", "media": {"video_fps": 1.0}}
    out = export_record(trained, "gemma3", "gemma3", merged=True, source="/run/checkpoint-2")
    assert out["finetuning_type"] == "full" and out["template"] == "gemma3" and out["plugin"] == "gemma3"
    assert out["model_type"] == "gemma3" and out["media"] == {"video_fps": 1.0}
    assert out["exported_from"] == "/run/checkpoint-2"
    assert export_record(trained, "gemma3", "gemma3", merged=False, source="x")["finetuning_type"] == "lora"
    downloaded = export_record({}, "qwen2_vl", "qwen2_vl", merged=False, source="x")
    assert downloaded["template"] == "qwen2_vl" and downloaded["plugin"] == "qwen2_vl"


def test_generation_options_default_to_greedy_and_override_the_checkpoint():
    from mmtune.infer import GenerationOptions

    greedy = GenerationOptions().generate_kwargs()
    assert greedy == {"max_new_tokens": 256, "repetition_penalty": 1.0, "do_sample": False, "temperature": 1.0,
                      "top_p": 1.0, "top_k": 50}
    sampled = GenerationOptions(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5,
                                repetition_penalty=1.1).generate_kwargs()
    assert sampled == {"max_new_tokens": 8, "repetition_penalty": 1.1, "do_sample": True, "temperature": 0.7,
                       "top_p": 0.9, "top_k": 5}
    assert GenerationOptions(temperature=1.0).generate_kwargs()["top_k"] == 0  # unset: off, not the checkpoint's
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0),
                dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            GenerationOptions(**bad)
