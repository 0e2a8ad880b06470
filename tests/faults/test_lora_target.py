"""``lora_target`` and the ``freeze_*`` switches (issue "Bad input and faults"): every name in
``lora_target`` must reach a linear layer outside the frozen parts, or the run stops with one
line naming it and the nearest names, before the weights load; LoRA never ends up wrapping
nothing while another part trains in full; ``freeze_vision_tower: no`` (and ``off``, ``false``,
``0``, in the YAML or on the command line) really trains the tower and the projector."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from mmtune.config import ConfigError, FinetuningArguments, ModelArguments
from mmtune.model.adapters import init_adapter, lora_plan
from mmtune.model.composite import COMPOSITE_MODELS, has_prefix


@functools.cache
def _tiny(family: str) -> torch.nn.Module:
    from mmtune.model.loader import model_class_for
    from mmtune.testing import get_fixture

    config = get_fixture(family).tiny_config()
    torch.manual_seed(0)
    return model_class_for(config).from_config(config)


def _fresh(family: str) -> torch.nn.Module:
    return copy.deepcopy(_tiny(family))


def _lora(family: str, **flags) -> torch.nn.Module:
    return init_adapter(_fresh(family), ModelArguments(), FinetuningArguments(finetuning_type="lora", **flags))


def _lora_modules(model: torch.nn.Module) -> set[str]:
    """The modules LoRA wrapped (their names without peft's prefix)."""
    return {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for n, _ in model.named_modules()
            if n.endswith(".lora_A")}


# ---------------------------------------------------------------- through `mmtune train`
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from mmtune.demo import build_model_dir, make_dataset

    root = tmp_path_factory.mktemp("lora_target")
    data, _ = make_dataset(str(root / "data"), n_train=4, n_test=1, size=56)
    return {"root": root, "data": data, "model": build_model_dir(str(root), hidden=64)}


def _yaml(ws, tmp_path, **keys) -> str:
    cfg = dict(model_name_or_path=ws["model"], dataset=ws["data"], output_dir=str(tmp_path / "out"), lora_rank=4,
               torch_dtype="fp32", per_device_train_batch_size=2, max_steps=1, use_cpu=True, disable_tqdm=True,
               plot_loss=False, dataloader_num_workers=0, save_strategy="no", report_to="none")
    cfg.update(keys)
    if cfg.get("finetuning_type", "lora") != "lora":
        cfg.pop("lora_rank")  # only LoRA reads it: a full or freeze run refuses it
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return str(path)


@pytest.fixture
def no_weights(monkeypatch):
    """Loading the model's weights fails the test: the check must come before them."""
    from transformers import AutoModelForImageTextToText

    def loaded(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", loaded)


def _train_error(ws, tmp_path, capsys, *overrides, **keys) -> str:
    from mmtune.cli import main

    assert main(["train", _yaml(ws, tmp_path, **keys), *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err  # one line (progress bars aside), no traceback
    assert errors[0].startswith("mmtune train: error: ") and errors[0] == err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()  # nothing written
    return errors[0]


def test_a_misspelt_name_beside_a_good_one_stops_the_run_before_the_weights_load(ws, tmp_path, capsys, no_weights):
    """`q_projj,v_proj` trained v_proj alone, without a word."""
    line = _train_error(ws, tmp_path, capsys, lora_target="q_projj,v_proj")
    assert "lora_target: no module named 'q_projj' in the qwen2_vl model (nearest: q_proj" in line
    assert "LoRA can wrap down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all)" in line


def test_a_missing_name_with_a_training_projector_is_an_error_not_a_full_projector_run(ws, tmp_path, capsys,
                                                                                        no_weights):
    """`nonexistent_module` with a trainable projector trained the projector alone and saved a whole
    model instead of an adapter."""
    line = _train_error(ws, tmp_path, capsys, "freeze_multi_modal_projector=no", lora_target="nonexistent_module")
    assert line.endswith("lora_target: no module named 'nonexistent_module' in the qwen2_vl model; LoRA can wrap "
                         "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all)")  # not the projector


def test_a_name_of_the_frozen_tower_names_its_switch(ws, tmp_path, capsys, no_weights):
    line = _train_error(ws, tmp_path, capsys, lora_target="q_proj,qkv")
    assert ("lora_target: 'qkv' names only the frozen vision tower (freeze_vision_tower: true) "
            "(e.g. model.visual.blocks.0.attn.qkv)") in line


# ---------------------------------------------------------------- the plan itself, on tiny models
def test_the_default_all_wraps_the_language_model_and_trains_no_frozen_part():
    model = _lora("qwen2_vl")
    wrapped = _lora_modules(model)
    assert wrapped and all(has_prefix(n, ["model.language_model"]) for n in wrapped)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "visual" in n)


def test_named_targets_land_where_named_and_a_path_end_names_a_module():
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(_lora("llava", lora_target="q_proj,v_proj"))} == {"q_proj",
                                                                                                          "v_proj"}
    wrapped = _lora_modules(_lora("llava", lora_target="self_attn.q_proj"))  # peft's suffix form
    assert wrapped == {f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(2)}  # not the tower's


def test_a_name_of_the_unfrozen_tower_is_wrapped():
    wrapped = _lora_modules(_lora("qwen2_vl", lora_target="q_proj,qkv", freeze_vision_tower=False))
    assert "model.visual.blocks.0.attn.qkv" in wrapped


def test_names_of_the_training_projector_alone_are_an_error():
    with pytest.raises(ConfigError, match=r"lora_target: linear_1,linear_2 names only layers of the multi-modal "
                                          r"projector, which trains in full \(freeze_multi_modal_projector: false\), "
                                          r"so LoRA would wrap nothing and the run would save a whole model"):
        lora_plan(_tiny("llava"), FinetuningArguments(lora_target="linear_1,linear_2",
                                                      freeze_multi_modal_projector=False))


def test_the_output_head_and_non_linear_modules_are_named_as_such():
    with pytest.raises(ConfigError, match=r"'lm_head' names only the output head, which mmtune never wraps"):
        lora_plan(_tiny("llava"), FinetuningArguments(lora_target="q_proj,lm_head"))
    with pytest.raises(ConfigError, match=r"'embed_tokens' names Embedding modules \(e.g. "
                                          r"model.language_model.embed_tokens\), not linear layers"):
        lora_plan(_tiny("llava"), FinetuningArguments(lora_target="embed_tokens"))


def test_everything_frozen_is_an_error_and_an_empty_target_too():
    with pytest.raises(ConfigError, match=r"lora_target: all leaves LoRA nothing to wrap and nothing else trains "
                                          r"\(freeze_vision_tower: true, freeze_multi_modal_projector: true, "
                                          r"freeze_language_model: true\)"):
        lora_plan(_tiny("llava"), FinetuningArguments(freeze_language_model=True))
    with pytest.raises(ConfigError, match="lora_target is empty"):
        lora_plan(_tiny("llava"), FinetuningArguments(lora_target=" , "))


def test_the_projector_alone_only_where_the_settings_ask_for_it(caplog):
    entry = COMPOSITE_MODELS["llava"]
    stage1 = FinetuningArguments(train_mm_proj_only=True, lora_target="q_proj")  # lora_target is not read
    assert lora_plan(_tiny("llava"), stage1) == ([], [entry.projector_key])
    frozen = FinetuningArguments(freeze_language_model=True, freeze_multi_modal_projector=False)
    with caplog.at_level("WARNING", logger="mmtune.model.adapters"):
        assert lora_plan(_tiny("llava"), frozen) == ([], [entry.projector_key])
    assert "the run saves a whole model, not an adapter" in caplog.text
    with pytest.raises(ConfigError, match=r"'q_proj' names only the frozen language model \(freeze_language_model: "
                                          r"true\)"):
        lora_plan(_tiny("llava"), FinetuningArguments(lora_target="q_proj", freeze_language_model=True,
                                                      freeze_multi_modal_projector=False))


def test_the_check_runs_on_the_meta_device_before_loading():
    from mmtune.model.loader import check_lora_target_before_loading, model_class_for
    from mmtune.testing import get_fixture

    config = get_fixture("qwen2_vl").tiny_config()
    args = ModelArguments(model_name_or_path="unused")
    with pytest.raises(ConfigError, match="no module named 'q_projj'"):
        check_lora_target_before_loading(model_class_for(config), config, args,
                                         FinetuningArguments(lora_target="q_projj"))
    assert check_lora_target_before_loading(model_class_for(config), config, args,
                                            FinetuningArguments(lora_target="q_proj"))
    assert not check_lora_target_before_loading(model_class_for(config), config, args, FinetuningArguments())
    assert config.dtype is None or isinstance(config.dtype, torch.dtype)  # the caller's config is not built on


# ---------------------------------------------------------------- freeze_*: no / off / false / 0
FORMS = [("yaml", "no"), ("cli", "no"), ("cli", "off"), ("cli", "false"), ("cli", "0")]


@pytest.mark.parametrize("where,word", FORMS, ids=[f"{w}-{v}" for w, v in FORMS])
def test_freeze_switches_set_to_no_reach_the_model_and_train_tower_and_projector(ws, tmp_path, monkeypatch, where,
                                                                                 word):
    """The strings "no" / "off" were truthy: the tower and the projector stayed frozen."""
    import mmtune.train.recipe as recipe
    from mmtune.cli import main
    from mmtune.model.loader import load_model

    seen = {}

    class Reached(Exception):
        pass

    def capture(model_args, finetuning_args, **kwargs):
        seen["args"] = finetuning_args
        raise Reached

    monkeypatch.setattr(recipe, "load_model", capture)
    keys = {"freeze_vision_tower": word, "freeze_multi_modal_projector": word} if where == "yaml" else {}
    overrides = [f"freeze_vision_tower={word}", f"freeze_multi_modal_projector={word}"] if where == "cli" else []
    with pytest.raises(Reached):
        main(["train", _yaml(ws, tmp_path, **keys), *overrides])
    args = seen["args"]
    assert args.freeze_vision_tower is False and args.freeze_multi_modal_projector is False
    assert args.finetuning_type == "lora" and args.freeze_language_model is False  # the defaults otherwise

    config = _tiny("qwen2_vl").config
    model = load_model(ModelArguments(), args, config=copy.deepcopy(config), speed_levers=False)
    entry = COMPOSITE_MODELS["qwen2_vl"]
    trainable = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n and has_prefix(n, entry.vision_model_keys) for n in trainable)  # LoRA on the tower
    projector = {n for n, _ in _tiny("qwen2_vl").named_parameters() if has_prefix(n, [entry.projector_key])}
    saved = entry.projector_key + ".modules_to_save.default."
    assert projector and {n.replace(saved, entry.projector_key + ".") for n in trainable
                          if n.startswith(saved)} == projector  # the projector trains in full (peft's modules_to_save)
    full = load_model(ModelArguments(), dataclasses.replace(args, finetuning_type="full"), config=copy.deepcopy(config),
                      speed_levers=False)
    for name, param in full.named_parameters():
        if has_prefix(name, entry.vision_model_keys + [entry.projector_key]):
            assert param.requires_grad, name



def test_a_misspelt_name_stops_the_run_before_the_data_is_read(ws, tmp_path, capsys, monkeypatch):
    """The check comes before tokenising too: a large dataset is not read for a run that cannot start."""
    import mmtune.train.recipe as recipe

    def refuse(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(recipe, "build_dataset", refuse)
    monkeypatch.setattr(recipe, "load_tokenizer_and_processor", refuse)
    line = _train_error(ws, tmp_path, capsys, lora_target="q_projj,v_proj")
    assert "lora_target: no module named 'q_projj'" in line
