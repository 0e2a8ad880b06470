"""Config values: types, aliases, choices and one-line errors, checked before anything loads."""

import dataclasses
import logging
import os
import tomllib
import warnings

import pytest

from mmtune.config import ConfigError
from mmtune.config.aliases import ALIASES, UNSUPPORTED
from mmtune.config import parsing as args_module
from mmtune.config import parse_config
from mmtune.config.parsing import describe_options, option_groups

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def transformers_records():
    """Records of transformers' own loggers (they do not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Keep(level=logging.DEBUG)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# ---------------------------------------------------------------- item 2: values take their field's type
def test_float_override_in_exponent_form_is_a_float():
    *_, training = parse_config(None, ["learning_rate=2e-4", "max_steps=1e3", "weight_decay=1"])
    assert training.learning_rate == 2e-4 and isinstance(training.learning_rate, float)
    assert training.max_steps == 1000 and isinstance(training.max_steps, int)
    assert training.weight_decay == 1


def test_float_in_exponent_form_in_a_yaml_file_is_a_float(tmp_path):
    path = _yaml(tmp_path, "learning_rate: 2e-4\nlora_dropout: 5e-2\nprojector_lr: 1E-5\n")
    _, _, finetuning, mm, training = parse_config(path)
    assert training.learning_rate == 2e-4 and isinstance(training.learning_rate, float)
    assert finetuning.lora_dropout == 0.05 and mm.projector_lr == 1e-5


@pytest.mark.parametrize("word, expected", [
    ("no", False), ("No", False), ("off", False), ("OFF", False), ("false", False), ("0", False), ("n", False),
    ("yes", True), ("on", True), ("True", True), ("1", True), ("y", True),
])
def test_boolean_words_on_the_command_line_and_in_yaml(tmp_path, word, expected):
    _, _, finetuning, _, _ = parse_config(None, [f"freeze_vision_tower={word}"])
    assert finetuning.freeze_vision_tower is expected
    _, _, finetuning, _, _ = parse_config(_yaml(tmp_path, f"freeze_vision_tower: {word}\n"))
    assert finetuning.freeze_vision_tower is expected


def test_the_defaults_a_user_gets_without_flags():
    model, data, finetuning, mm, training = parse_config(None)
    assert finetuning.finetuning_type == "lora" and finetuning.freeze_vision_tower is True
    assert finetuning.lora_alpha == 16 and model.attn_implementation == "sdpa"
    assert training.report_to in ("none", []) and training.remove_unused_columns is False
    assert training.output_dir == "outputs/run" and training.logging_nan_inf_filter is False
    assert mm.plot_loss is True and data.mix_strategy == "concat"


def test_none_words_give_none_where_the_field_allows_it(tmp_path):
    model, _, finetuning, _, _ = parse_config(None, ["lora_alpha=none", "quantization_bit=null", "lora_rank=4"])
    assert finetuning.lora_alpha == 8  # None: the documented default of 2 x rank
    assert model.quantization_bit is None
    model, *_ = parse_config(_yaml(tmp_path, "quantization_bit: ~\ncache_dir: null\n"))
    assert model.quantization_bit is None and model.cache_dir is None


def test_union_fields_prefer_their_non_text_type():
    model, *_ = parse_config(None, ["gradient_checkpointing_layers=3", "compile_cpp_wrapper=all"])
    assert model.gradient_checkpointing_layers == 3 and model.compile_cpp_wrapper == "all"
    model, *_ = parse_config(None, ["gradient_checkpointing_layers=auto", "compile_cpp_wrapper=no"])
    assert model.gradient_checkpointing_layers == "auto" and model.compile_cpp_wrapper is False


def test_enum_fields_of_training_arguments(tmp_path):
    *_, training = parse_config(_yaml(tmp_path, "save_strategy: no\nlr_scheduler_type: cosine\n"))
    assert str(getattr(training.save_strategy, "value", training.save_strategy)) == "no"
    assert str(getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)) == "cosine"
    with pytest.raises(ConfigError, match=r"lr_scheduler_type: 'cosin' is not one of .*cosine"):
        parse_config(None, ["lr_scheduler_type=cosin"])


def test_lists_and_mappings_from_the_command_line():
    *_, training = parse_config(None, ["accelerator_config={non_blocking: false}", "label_names=[labels, x]"])
    assert training.accelerator_config.non_blocking is False
    assert training.label_names == ["labels", "x"]
    model, *_ = parse_config(None, ["image_grid_pinpoints=[[336, 672], [672, 336]]"])
    assert model.image_grid_pinpoints == [[336, 672], [672, 336]]


def test_training_arguments_values_beyond_their_type_hints_pass_to_transformers():
    """transformers' hints are narrower than what TrainingArguments takes (fsdp: true, an
    AcceleratorConfig object); mmtune's own fields and scalar fields stay strict."""
    from transformers.trainer_pt_utils import AcceleratorConfig

    *_, training = parse_config(None, extra={"accelerator_config": AcceleratorConfig(non_blocking=False),
                                             "use_cpu": True})
    assert training.accelerator_config.non_blocking is False
    assert parse_config(None, extra={"fsdp": True, "use_cpu": True})[4].fsdp is True
    with pytest.raises(ConfigError, match=r"^config: Unknown `fsdp` option: maybe"):  # transformers judged it
        parse_config(None, extra={"fsdp": ["maybe"]})
    with pytest.raises(ConfigError, match=r"config: learning_rate: \[0.1\] is not a number"):
        parse_config(None, extra={"learning_rate": [0.1]})
    with pytest.raises(ConfigError, match=r"config: lora_target: \['q_proj'\] is not text"):
        parse_config(None, extra={"lora_target": ["q_proj"]})


@pytest.mark.parametrize("override, expected", [
    ("learning_rate=fast", r"command line: learning_rate: 'fast' is not a number"),
    ("lora_rank=2.5", r"command line: lora_rank: 2.5 is not an integer"),
    ("freeze_vision_tower=maybe", r"command line: freeze_vision_tower: 'maybe' is not true or false"),
    ("max_steps=none", r"command line: max_steps: 'none' is not an integer"),
    ("finetuning_type=qlora", r"command line: finetuning_type: 'qlora' is not one of lora, freeze, full"),
    ("torch_dtype=fp8", r"command line: torch_dtype: 'fp8' is not one of auto, bf16"),
    ("attn_implementation=flash", r"attn_implementation: 'flash' is not one of sdpa, eager, flash_attention_2"),
    ("quantization_bit=3", r"quantization_bit: 3 is not one of 4, 8"),
    ("mix_strategy=interleave", r"mix_strategy: 'interleave' is not one of concat, interleave_under"),
    ("mm_projector_type=mlp2x_relu", r"mm_projector_type: 'mlp2x_relu' is not one of linear, identity or mlp<N>x_gelu"),
    ("stage=ppo", r"stage: 'ppo' is not one of sft, pretrain, finetune, dpo, kto"),
    ("pref_loss=kto", r"pref_loss: 'kto' is not one of sigmoid, ipo, hinge, orpo, simpo"),
    ("gradient_checkpointing_layers=most", r"gradient_checkpointing_layers: 'most' is not one of auto"),
    ("template=qwen2vl", r"template: 'qwen2vl' is not a template; did you mean 'qwen2_vl'\?"),
    ("plugin=qwen2vl", r"plugin: 'qwen2vl' is not a multimodal plugin; did you mean 'qwen2_vl'\?"),
    ("learning_rate", r"command line: 'learning_rate' is not key=value"),
])
def test_a_value_that_does_not_fit_is_one_line_naming_key_value_and_type(override, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        parse_config(None, [override])
    assert "\n" not in str(info.value)


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = _yaml(tmp_path, "lora_rank: eight\n")
    with pytest.raises(ConfigError, match=rf"^{path}: lora_rank: 'eight' is not an integer$"):
        parse_config(path)


def test_accepted_names_beyond_the_choices():
    model, *_ = parse_config(None, ["attn_implementation=kernels-community/flash-attn", "mm_projector_type=mlp3x_gelu",
                                    "torch_dtype=bfloat16", "template=qwen2_5_vl", "plugin=qwen2_vl"])
    assert model.attn_implementation == "kernels-community/flash-attn" and model.mm_projector_type == "mlp3x_gelu"


def test_a_combination_training_arguments_refuses_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="load_best_model_at_end") as info:
        parse_config(None, ["load_best_model_at_end=true", "eval_strategy=steps", "save_strategy=epoch"])
    assert "\n" not in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"c.yaml:2: not valid YAML"):
        parse_config(_yaml(tmp_path, "lora_rank: 8\n  learning_rate: 1\n"))
    with pytest.raises(ConfigError, match="flat mapping"):
        parse_config(_yaml(tmp_path, "- lora_rank\n", name="list.yaml"))


# ---------------------------------------------------------------- item 6: unknown keys
def test_unknown_key_is_one_line_with_did_you_mean_naming_the_file(tmp_path):
    path = _yaml(tmp_path, "lerning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as info:
        parse_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown option 'lerning_rate'; did you mean 'learning_rate'?")
    assert "\n" not in message and "mmtune options" in message


def test_cli_prints_config_errors_in_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    import mmtune.train
    from mmtune.cli import main

    monkeypatch.setattr(mmtune.train, "run_sft", lambda *a: pytest.fail("training started despite a config error"))
    path = _yaml(tmp_path, "freeze_vision_towr: no\n")
    assert main(["train", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mmtune train: error: {path}: unknown option 'freeze_vision_towr'; did you mean "
                   f"'freeze_vision_tower'? (`mmtune options` lists every key)")
    assert main(["train", _yaml(tmp_path, "lora_rank: 8\n", "ok.yaml"), "learning_rate=fast"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "learning_rate: 'fast' is not a number" in err


# ---------------------------------------------------------------- aliases
ALIAS_CASES = [
    ("dtype", "bfloat16", "torch_dtype", "bfloat16"),
    ("enable_liger_kernel", "true", "liger_kernels", True),
    ("use_liger_kernel", "false", "liger_kernels", False),
    ("torch_compile", "true", "compile", True),
    ("torch_compile_backend", "eager", "compile_backend", "eager"),
    ("torch_compile_mode", "max-autotune-no-cudagraphs", "compile_mode", "max-autotune-no-cudagraphs"),
    ("flash_attn", "fa2", "attn_implementation", "flash_attention_2"),
    ("model_revision", "v1", "revision", "v1"),
    ("interleave_probs", "0.7,0.3", "dataset_ratios", "0.7,0.3"),
    ("neat_packing", "yes", "packing", True),
    ("lora_r", "16", "lora_rank", 16),
    ("target_modules", "[q_proj, v_proj]", "lora_target", "q_proj,v_proj"),
    ("lora_target_modules", "q_proj", "lora_target", "q_proj"),
    ("warmup_ratio", "0.1", "warmup_steps", 0.1),
    ("evaluation_strategy", "no", "eval_strategy", "no"),
    ("no_cuda", "true", "use_cpu", True),
    ("max_seq_length", "1024", "cutoff_len", 1024),
    ("model_max_length", "512", "cutoff_len", 512),
    ("tune_mm_mlp_adapter", "true", "train_mm_proj_only", True),
    ("freeze_backbone", "true", "freeze_language_model", True),
    ("mm_projector_lr", "2e-5", "projector_lr", 2e-5),
    ("data_path", "data/llava.json", "dataset", "data/llava.json"),
    ("image_folder", "data/images", "media_dir", "data/images"),
]


def _value(parsed, key):
    for group in parsed:
        if hasattr(group, key):
            value = getattr(group, key)
            return getattr(value, "value", value)
    raise AssertionError(key)


def test_every_alias_has_a_case():
    assert sorted(name for name, *_ in ALIAS_CASES) == sorted(ALIASES)


@pytest.mark.parametrize("alias, text, key, expected", ALIAS_CASES, ids=[c[0] for c in ALIAS_CASES])
def test_alias_sets_mmtunes_key_with_one_info_line(alias, text, key, expected, caplog):
    with caplog.at_level(logging.INFO, logger="mmtune.config.aliases"):
        parsed = parse_config(None, [f"{alias}={text}"])
    lines = [r.getMessage() for r in caplog.records if r.name == "mmtune.config.aliases"]
    assert len(lines) == 1 and alias in lines[0]
    if key is not None:
        assert _value(parsed, key) == expected
        assert key in lines[0]


def test_alias_values_that_have_no_equivalent_are_refused():
    with pytest.raises(ConfigError, match=r"flash_attn: 'fa4' is not one of auto"):
        parse_config(None, ["flash_attn=fa4"])
    with pytest.raises(ConfigError, match=r"warmup_ratio: 3 is not a ratio"):
        parse_config(None, ["warmup_ratio=3"])


def test_torch_compile_no_longer_reaches_training_arguments():
    """TrainingArguments' own switch would compile the whole model; the alias leaves it off."""
    model, *_, training = parse_config(None, ["torch_compile=true"])
    assert model.compile is True and training.torch_compile is False


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_names_without_an_equivalent_fail_naming_our_nearest_key(name):
    with pytest.raises(ConfigError, match=rf"^command line: {name} \(.+\) has no mmtune equivalent: ") as info:
        parse_config(None, [f"{name}=1"])
    known = {f.name for _, cls in option_groups() for f in dataclasses.fields(cls)}
    named = [word.strip("`:") for word in str(info.value).split("`")[1::2]]
    assert any(word.split(":")[0].strip() in known or word.startswith("mmtune ") for word in named), named


def test_a_llamafactory_config_runs_through_its_aliases(tmp_path):
    path = _yaml(tmp_path, "model_name_or_path: m\nflash_attn: sdpa\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
                           "lora_rank: 8\nlora_target: all\ndataset: d.json\ntemplate: qwen2_vl\ncutoff_len: 1024\n"
                           "overwrite_output_dir: true\nplot_loss: false\nreport_to: none\nlearning_rate: 1.0e-4\n"
                           "lr_scheduler_type: cosine\nwarmup_steps: 0.1\nenable_liger_kernel: true\nsave_strategy: 'no'\n")
    model, data, finetuning, mm, training = parse_config(path)
    assert model.attn_implementation == "sdpa" and model.liger_kernels is True and training.warmup_steps == 0.1


# ---------------------------------------------------------------- options listing
def test_options_lists_every_key_grouped_with_type_default_and_help():
    text = describe_options()
    titles = [title for title, _ in option_groups()]
    assert [line.split(" (")[0] for line in text.splitlines() if line and not line.startswith(" ")][:5] == titles
    for _, cls in option_groups():
        for f in dataclasses.fields(cls):
            if f.init:
                assert f"\n  {f.name} (" in text, f.name
    assert "  learning_rate (float; default 5e-05)\n      The initial learning rate" in text
    assert "  lora_rank (int; default 8)\n      LoRA's rank r." in text
    assert "  report_to (None | str | list[str]; default 'none')" in text  # mmtune's default, not transformers'
    assert "  flash_attn -> attn_implementation  (LLaMA-Factory" in text


def test_every_mmtune_field_has_help():
    missing = [f.name for _, cls in option_groups()[:4] for f in dataclasses.fields(cls)
               if not f.metadata.get("help") and f.name != "template"]  # template: another change's field
    assert missing == []


def test_options_filter_and_cli(capsys):
    from mmtune.cli import main

    text = describe_options("lora")
    keys = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert "lora_rank" in keys and "lora_dropout" in keys and "learning_rate" not in keys
    assert main(["options", "LORA_R"]) == 0
    out = capsys.readouterr().out
    assert "lora_rank (int; default 8)" in out and "lora_r -> lora_rank" in out
    assert main(["options", "no-such-key-anywhere"]) == 1
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "mmtune options" in capsys.readouterr().out


# ---------------------------------------------------------------- precision follows the device
def test_bf16_true_in_a_yaml_on_a_machine_without_bf16_warns_once_and_trains_in_fp32(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(args_module, "_bf16_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mmtune.config.parsing"):
        model, *_, training = parse_config(_yaml(tmp_path, "bf16: true\n"))
    assert training.bf16 is False and model.torch_dtype == "fp32"
    assert len([r for r in caplog.records if "bf16" in r.getMessage()]) == 1


def test_bf16_default_follows_the_device():
    *_, training = parse_config(None)
    assert training.bf16 is args_module._bf16_available()


@pytest.mark.parametrize("given, model_given, bf16_device, use_cpu, expected_bf16, expected_dtype", [
    ({}, {}, True, False, True, "auto"),            # a bf16 GPU: mixed precision on, checkpoint dtype
    ({}, {}, False, False, None, "fp32"),           # a CPU: fp32, whatever the checkpoint stores
    ({"bf16": True}, {}, False, False, False, "fp32"),  # the user's bf16 on a CPU: off, with a warning
    ({"bf16": True}, {}, True, True, True, "fp32"),  # bf16 autocast on the CPU, asked for with use_cpu
    ({"fp16": True}, {}, True, False, None, "auto"),  # the user's fp16 stands
    ({"bf16": False}, {}, True, False, False, "auto"),
    ({}, {"torch_dtype": "fp16"}, True, False, None, "fp16"),
])
def test_device_defaults(given, model_given, bf16_device, use_cpu, expected_bf16, expected_dtype):
    training = dict(given, use_cpu=use_cpu)
    model = dict(model_given)
    args_module._device_defaults(training, model, set(given) | set(model_given), cuda=bf16_device, bf16=bf16_device,
                                 accelerator=bf16_device)
    assert training.get("bf16") is expected_bf16
    assert model.get("torch_dtype", "auto") == expected_dtype


# ---------------------------------------------------------------- non_blocking only with CUDA
def test_non_blocking_is_set_when_cuda_is_reported_available(monkeypatch):
    monkeypatch.setattr(args_module, "_cuda_available", lambda: True)
    monkeypatch.setattr(args_module, "_any_accelerator", lambda: True)
    *_, training = parse_config(None)
    assert training.accelerator_config.non_blocking is True and training.dataloader_pin_memory is True


@pytest.mark.parametrize("use_cpu", [True, False])
def test_no_non_blocking_warning_on_a_cpu(tmp_path, monkeypatch, transformers_records, use_cpu):
    import torch

    from mmtune.train.sft import MMTrainer

    monkeypatch.setattr(args_module, "_cuda_available", lambda: False)
    monkeypatch.setattr(args_module, "_any_accelerator", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *_, training = parse_config(None, [f"output_dir={tmp_path}", f"use_cpu={use_cpu}"])
        MMTrainer(model=torch.nn.Linear(2, 2), args=training)
    assert training.accelerator_config.non_blocking is False and training.dataloader_pin_memory is False
    said = [str(w.message) for w in caught] + [r.getMessage() for r in transformers_records]
    assert not [m for m in said if "non_blocking" in m or "pin_memory" in m], said


# ---------------------------------------------------------------- item 8: report_to checked before loading
def test_report_to_an_integration_that_is_not_installed_fails_in_one_line(tmp_path, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    path = _yaml(tmp_path, "report_to: tensorboard\n")
    with pytest.raises(ConfigError, match=rf"^{path}: report_to: tensorboard needs `pip install 'mmtune\[tensorboard\]'`"):
        parse_config(path)
    with pytest.raises(ConfigError, match=r"report_to: wandb needs `pip install 'mmtune\[wandb\]'`"):
        parse_config(None, ["report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"report_to: 'tensorbord' is not one of .*; did you mean 'tensorboard'\?"):
        parse_config(None, ["report_to=tensorbord"])
    *_, training = parse_config(None, ["report_to=none"])
    assert training.report_to in ("none", [])


def test_report_to_an_installed_integration_passes(monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations",
                        lambda: ["tensorboard", "wandb"])
    *_, training = parse_config(None, ["report_to=tensorboard,wandb"])
    assert training.report_to == ["tensorboard", "wandb"]


def test_report_to_checks_this_environment():
    from transformers.integrations import is_tensorboard_available

    if is_tensorboard_available():
        assert parse_config(None, ["report_to=tensorboard"])[4].report_to == ["tensorboard"]
    else:
        with pytest.raises(ConfigError, match="mmtune\\[tensorboard\\]"):
            parse_config(None, ["report_to=tensorboard"])


def test_logging_extras_are_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    assert any(req.startswith("tensorboard") for req in extras["tensorboard"])
    assert any(req.startswith("wandb") for req in extras["wandb"])


# ---------------------------------------------------------------- torch_dtype: no deprecation warning
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mmtune.demo import build_model_dir, make_dataset

    root = tmp_path_factory.mktemp("config_run")
    data, _ = make_dataset(str(root / "data"), n_train=8, n_test=0, size=56)
    return {"root": root, "data": data, "model": build_model_dir(str(root), hidden=64)}


def _deprecations(records, caught):
    said = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    return [m for m in said if "torch_dtype" in m]


def test_loading_a_model_raises_no_torch_dtype_deprecation(tiny_run, transformers_records):
    from transformers.utils import logging as hf_logging

    from mmtune.config import FinetuningArguments, ModelArguments
    from mmtune.model.loader import load_model

    hf_logging.warning_once.cache_clear()  # an earlier test's warning must not hide this one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(ModelArguments(model_name_or_path=tiny_run["model"]), FinetuningArguments(), is_trainable=False)
    assert _deprecations(transformers_records, caught) == []


def test_readme_override_trains_on_a_cpu_with_a_gpu_config(tiny_run, tmp_path, monkeypatch, capsys,
                                                            transformers_records):
    """`mmtune train config.yaml learning_rate=2e-4` with a GPU config's `bf16: true`: it trains."""
    from transformers.utils import logging as hf_logging

    from mmtune.cli import main

    monkeypatch.setattr(args_module, "_bf16_available", lambda: False)
    path = _yaml(tmp_path, f"model_name_or_path: {tiny_run['model']}\ndataset: {tiny_run['data']}\ntemplate: qwen2_vl\n"
                           f"per_device_train_batch_size: 4\nmax_steps: 2\nsave_strategy: 'no'\nbf16: true\n"
                           f"output_dir: {tmp_path / 'out'}\nfreeze_vision_tower: no\nplot_loss: off\n")
    hf_logging.warning_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", path, "learning_rate=2e-4"]) == 0
    assert os.path.exists(tmp_path / "out" / "all_results.json")
    assert _deprecations(transformers_records, caught) == []
    assert not [r for r in transformers_records if "non_blocking" in r.getMessage()]


# ---------------------------------------------------------------- settings that contradict each other
CONTRADICTIONS = [
    (["stage=pretrain", "freeze_vision_tower=false"], "stage: pretrain", "freeze_vision_tower: false"),
    (["stage=pretrain", "freeze_language_model=false"], "stage: pretrain", "freeze_language_model: false"),
    (["stage=pretrain", "freeze_multi_modal_projector=true"], "stage: pretrain", "freeze_multi_modal_projector: true"),
    (["stage=pretrain", "train_mm_proj_only=false"], "stage: pretrain", "train_mm_proj_only: false"),
    (["stage=finetune", "freeze_language_model=true"], "stage: finetune", "freeze_language_model: true"),
    (["stage=finetune", "freeze_multi_modal_projector=yes"], "stage: finetune", "freeze_multi_modal_projector: true"),
    (["stage=finetune", "train_mm_proj_only=true"], "stage: finetune", "train_mm_proj_only: true"),
    (["train_mm_proj_only=true", "freeze_vision_tower=no"], "train_mm_proj_only: true", "freeze_vision_tower: false"),
    (["train_mm_proj_only=true", "freeze_multi_modal_projector=true"], "train_mm_proj_only: true",
     "freeze_multi_modal_projector: true"),
    (["tune_mm_mlp_adapter=true", "freeze_backbone=false"], "tune_mm_mlp_adapter (train_mm_proj_only): true",
     "freeze_backbone (freeze_language_model): false"),
    (["finetuning_type=full", "lora_rank=4"], "finetuning_type: full", "lora_rank: 4"),
    (["finetuning_type=freeze", "lora_target=q_proj"], "finetuning_type: freeze", "lora_target: q_proj"),
    (["finetuning_type=full", "lora_alpha=16"], "finetuning_type: full", "lora_alpha: 16"),
    (["finetuning_type=full", "lora_dropout=0.1"], "finetuning_type: full", "lora_dropout: 0.1"),
    (["finetuning_type=freeze", "use_dora=true"], "finetuning_type: freeze", "use_dora: true"),
    (["finetuning_type=full", "adapter_fp32=true"], "finetuning_type: full", "adapter_fp32: true"),
    (["finetuning_type=full", "lora_r=8"], "finetuning_type: full", "lora_r (lora_rank): 8"),
    (["finetuning_type=full", "freeze_trainable_layers=1"], "finetuning_type: full", "freeze_trainable_layers: 1"),
    (["freeze_trainable_layers=1"], "finetuning_type: lora", "freeze_trainable_layers: 1"),
]


@pytest.mark.parametrize("overrides, first, second", CONTRADICTIONS, ids=[" ".join(c[0]) for c in CONTRADICTIONS])
def test_contradicting_settings_are_one_line_naming_both_keys(overrides, first, second):
    with pytest.raises(ConfigError) as info:
        parse_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith("command line: ")
    assert f"{first} contradicts {second}" in message or f"{second} contradicts {first}" in message, message


def test_a_contradiction_in_a_file_names_the_file(tmp_path):
    path = _yaml(tmp_path, "stage: pretrain\nfreeze_language_model: false\n")
    with pytest.raises(ConfigError, match=rf"^{path}: stage: pretrain contradicts freeze_language_model: false "
                                          r"\(stage pretrain sets freeze_language_model to true\); remove one of them$"):
        parse_config(path)
    path = _yaml(tmp_path, "finetuning_type: full\nlora_rank: 16\n", name="full.yaml")
    with pytest.raises(ConfigError, match=rf"^{path}: finetuning_type: full contradicts lora_rank: 16 \(only "
                                          r"finetuning_type lora reads lora_rank\)"):
        parse_config(path)


def test_the_cli_prints_a_contradiction_in_one_line(tmp_path, capsys):
    from mmtune.cli import main

    assert main(["train", _yaml(tmp_path, "finetuning_type: full\n"), "lora_target=q_proj"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmtune train: error: command line: finetuning_type: full contradicts lora_target: q_proj (only "
                   "finetuning_type lora reads lora_target); remove one of them"]


# (overrides, the finetuning arguments that result: what these settings did before contradictions were checked)
AGREEING = [
    ([], dict(finetuning_type="lora", freeze_vision_tower=True, freeze_multi_modal_projector=True,
              freeze_language_model=False, train_mm_proj_only=False)),
    (["stage=pretrain"], dict(train_mm_proj_only=True, freeze_vision_tower=True, freeze_language_model=True,
                              freeze_multi_modal_projector=False)),
    (["stage=pretrain", "freeze_vision_tower=true", "train_mm_proj_only=true", "freeze_multi_modal_projector=false"],
     dict(train_mm_proj_only=True, freeze_vision_tower=True, freeze_language_model=True,
          freeze_multi_modal_projector=False)),
    (["stage=finetune"], dict(freeze_multi_modal_projector=False, freeze_language_model=False, freeze_vision_tower=True)),
    (["stage=finetune", "freeze_vision_tower=false", "freeze_language_model=false"],
     dict(freeze_multi_modal_projector=False, freeze_language_model=False, freeze_vision_tower=False)),
    (["train_mm_proj_only=true", "freeze_language_model=true"],
     dict(train_mm_proj_only=True, freeze_vision_tower=True, freeze_language_model=True,
          freeze_multi_modal_projector=False)),
    (["stage=sft", "freeze_vision_tower=false", "freeze_language_model=true"],
     dict(freeze_vision_tower=False, freeze_language_model=True, freeze_multi_modal_projector=True)),
    (["finetuning_type=full", "freeze_vision_tower=false"], dict(finetuning_type="full", freeze_vision_tower=False)),
    (["finetuning_type=freeze", "freeze_trainable_layers=1"], dict(finetuning_type="freeze", freeze_trainable_layers=1)),
    (["finetuning_type=lora", "lora_rank=4", "lora_target=q_proj", "use_dora=true"],
     dict(lora_rank=4, lora_alpha=8, lora_target="q_proj", use_dora=True)),
    (["stage=finetune", "finetuning_type=lora", "lora_rank=16"], dict(lora_rank=16, freeze_language_model=False)),
]


@pytest.mark.parametrize("overrides, expected", AGREEING, ids=[" ".join(a[0]) or "defaults" for a in AGREEING])
def test_settings_that_agree_still_parse_as_before(overrides, expected):
    finetuning = parse_config(None, overrides)[2]
    assert {key: getattr(finetuning, key) for key in expected} == expected


def test_the_examples_contradict_nothing():
    import glob

    examples = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))
    assert examples
    for path in examples:
        assert parse_config(path)[2] is not None, path


# ---------------------------------------------------------------- no dead fields
DEAD = ("config_dict", "extra", "supports_no_expand", "pad_to_multiple_of")


def test_no_option_is_a_field_nothing_reads():
    names = {f.name for _, cls in option_groups()[:4] for f in dataclasses.fields(cls)}
    assert not names & set(DEAD)
    text = describe_options()
    for name in ("config_dict", "supports_no_expand", "pad_to_multiple_of"):
        assert name not in text
    with pytest.raises(ConfigError, match="unknown option 'config_dict'"):
        parse_config(None, extra={"config_dict": {}})


def test_no_plugin_or_collator_carries_a_dead_field():
    from mmtune.data import MultiModalCollator
    from mmtune.plugins import PLUGINS, BasePlugin

    assert "pad_to_multiple_of" not in {f.name for f in dataclasses.fields(MultiModalCollator)}
    for cls in [BasePlugin, *PLUGINS.values()]:
        assert not any("supports_no_expand" in vars(klass) for klass in cls.__mro__), cls


def test_every_argument_dataclass_lives_in_mmtune_config():
    import mmtune.config as config

    for _, cls in option_groups()[:4]:
        assert cls.__module__.startswith("mmtune.config."), cls
        assert getattr(config, cls.__name__) is cls
    src = os.path.join(ROOT, "src", "mmtune")
    assert not os.path.exists(os.path.join(src, "hparams")) and not os.path.exists(os.path.join(src, "train", "args.py"))
