"""Model-folder errors (issue "Bad input and faults"): a missing folder reads as "model folder not
found", not as a Hub repo-id error; a LoRA output folder given as the model says which base and
which keys to use; a vision encoder or another non-VLM says so; a folder with no model in it says
that. Each is one line and exit status 2 from `mmtune train`, `chat` and `export` (a line of the
report from `mmtune env`), before the tokenizer or the model loads, with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from mmtune.cli import main
from mmtune.errors import ModelFolderError
from mmtune.config import ModelArguments
from mmtune.model.folders import check_model_args, check_saved_paths, looks_local


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmtune.demo import build_model_dir, make_dataset
    from mmtune.testing.stand_ins.llava_llama import clip_tower_dir, plain_llama_dir

    root = tmp_path_factory.mktemp("folders")
    data, _ = make_dataset(str(root / "data"), n_train=4, n_test=1, size=56)
    model = build_model_dir(str(root), hidden=64)
    bare = root / "peft_adapter"  # what peft alone saves: no tokenizer
    get_peft_model(AutoModelForImageTextToText.from_pretrained(model), LoraConfig(r=2, target_modules=["q_proj"])) \
        .save_pretrained(str(bare))
    run = root / "lora_run"  # what a LoRA run of mmtune saves: the adapter and the processor
    shutil.copytree(bare, run)
    AutoProcessor.from_pretrained(model).save_pretrained(str(run))
    (run / "mmtune_config.json").write_text(json.dumps({"finetuning_type": "lora", "model_name_or_path": model}))
    vit = root / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    return {"root": root, "data": data, "model": model, "bare": str(bare), "run": str(run),
            "clip": clip_tower_dir(str(root)), "lm": plain_llama_dir(str(root)), "vit": str(vit)}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Reading a tokenizer or loading a model fails the test: the checks come first."""
    import mmtune.train.recipe as recipe
    from transformers import AutoTokenizer

    def loaded(*args, **kwargs):
        raise AssertionError("a tokenizer or a model was loaded")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", loaded)
    monkeypatch.setattr(recipe, "load_model", loaded)


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test (the tokenizer may load)."""
    import mmtune.train.recipe as recipe

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(recipe, "load_model", loaded)


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err  # one line (progress bars aside)
    assert errors[0].startswith(f"mmtune {command}: error: ") and errors[0] == err.strip().splitlines()[-1]
    return errors[0].removeprefix(f"mmtune {command}: error: ")


def _train(ws, tmp_path, capsys, **keys) -> str:
    cfg = dict(dataset=ws["data"], output_dir=str(tmp_path / "out"), torch_dtype="fp32", max_steps=1, use_cpu=True,
               plot_loss=False, report_to="none")
    cfg.update(keys)
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    assert main(["train", str(path)]) == 2
    assert not (tmp_path / "out").exists()  # nothing written
    return _error_line(capsys, "train")


# ---------------------------------------------------------------- mmtune train
@pytest.mark.parametrize("form", ["./missing-model", "{tmp}/missing-model", "outputs/missing-model",
                                  "org/models/missing-model"])
def test_train_on_a_missing_folder_says_not_found_not_a_repo_id_error(ws, tmp_path, capsys, monkeypatch,
                                                                      nothing_loads, form):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # `outputs/x`: one slash, but its first part is a local folder
    path = form.format(tmp=tmp_path)
    line = _train(ws, tmp_path, capsys, model_name_or_path=path)
    assert line.startswith(f"model folder not found: {path} (model_name_or_path")
    assert "Repo id" not in line


def test_train_on_a_hub_id_not_in_the_cache_keeps_transformers_message_after_what_was_tried(ws, tmp_path, capsys,
                                                                                            nothing_loads):
    line = _train(ws, tmp_path, capsys, model_name_or_path="no-such-org/no-such-model")
    assert line.startswith("model_name_or_path no-such-org/no-such-model: no local folder of that name, and loading "
                           "it as a Hub model id failed: ")
    assert "cache" in line.split("failed: ", 1)[1]  # transformers' own words (offline: not in the cache)


@pytest.mark.parametrize("kind", ["run", "bare"])
def test_train_on_a_lora_adapter_folder_names_its_base_and_the_keys(ws, tmp_path, capsys, no_model, monkeypatch,
                                                                    kind):
    """An mmtune LoRA output folder (with its tokenizer) and a bare peft adapter folder."""
    if kind == "bare":  # nothing in it to read a tokenizer from: the error comes before trying
        from transformers import AutoTokenizer

        monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("tokenizer loaded"))
    adapter = ws[kind]
    line = _train(ws, tmp_path, capsys, model_name_or_path=adapter)
    assert line == (f"{adapter} is a LoRA adapter folder (its base is {ws['model']}): use model_name_or_path: "
                    f"{ws['model']} with adapter_name_or_path: {adapter}")


def test_train_with_a_full_model_as_adapter_or_a_missing_adapter(ws, tmp_path, capsys, nothing_loads):
    line = _train(ws, tmp_path, capsys, model_name_or_path=ws["model"], adapter_name_or_path=ws["model"])
    assert line.startswith(f"adapter_name_or_path: {ws['model']} is a full model folder (config.json and weights, "
                           f"no adapter_config.json), not a LoRA adapter: give it as model_name_or_path")
    missing = str(tmp_path / "no-adapter")
    line = _train(ws, tmp_path, capsys, model_name_or_path=ws["model"], adapter_name_or_path=missing)
    assert line == f"adapter folder not found: {missing} (adapter_name_or_path)"


def test_train_on_a_vision_encoder_says_it_is_no_vlm_and_where_it_goes(ws, tmp_path, capsys, nothing_loads):
    line = _train(ws, tmp_path, capsys, model_name_or_path=ws["clip"])
    assert line == (f"{ws['clip']} (model_name_or_path) is not a vision-language model (model_type "
                    f"clip_vision_model) but a vision encoder: give it as vision_tower: {ws['clip']} beside a "
                    f"Llama-architecture language model as model_name_or_path (mmtune's native LLaVA)")


def test_train_on_a_model_mmtune_cannot_build_says_it_is_no_vlm(ws, tmp_path, capsys, nothing_loads):
    line = _train(ws, tmp_path, capsys, model_name_or_path=ws["vit"])
    assert line.startswith(f"{ws['vit']} (model_name_or_path) is not a vision-language model (model_type vit): "
                           f"mmtune trains")


def test_train_on_a_folder_without_a_model(ws, tmp_path, capsys, nothing_loads):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    line = _train(ws, tmp_path, capsys, model_name_or_path=str(folder))
    assert line.startswith(f"not a model folder (no config.json): {folder} (model_name_or_path); a model folder "
                           f"holds config.json and the weights, a LoRA adapter folder adapter_config.json")


def test_what_mmtune_can_train_passes_the_checks(ws):
    """The documented handling: a VLM, a plain causal LM (text alone; with vision_tower, a native
    LLaVA around it) and a base with its adapter are no errors."""
    assert check_model_args(ModelArguments(model_name_or_path=ws["model"])).model_type == "qwen2_vl"
    assert check_model_args(ModelArguments(model_name_or_path=ws["lm"])).model_type == "llama"
    assert check_model_args(ModelArguments(model_name_or_path=ws["lm"], vision_tower=ws["clip"])).kind == "model"
    assert check_model_args(ModelArguments(model_name_or_path=ws["model"], adapter_name_or_path=ws["run"]))
    assert check_model_args(ModelArguments()) is None  # a model built from a config
    assert looks_local("./x") and looks_local("a/b/c") and looks_local("/x") and not looks_local("org/name")


# ---------------------------------------------------------------- mmtune chat / export / env
@pytest.fixture
def no_engine(monkeypatch):
    import mmtune.infer as infer

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(infer, "ChatEngine", loaded)
    monkeypatch.setattr(infer, "export_model", loaded)


def test_chat_and_export_on_a_missing_folder(tmp_path, capsys, no_engine):
    missing = str(tmp_path / "gone")
    assert main(["chat", missing, "--prompt", "hi"]) == 2
    assert _error_line(capsys, "chat") == f"model folder not found: {missing} (MODEL)"
    assert main(["export", missing, str(tmp_path / "out")]) == 2
    assert _error_line(capsys, "export") == f"model folder not found: {missing} (MODEL)"
    assert not (tmp_path / "out").exists()


def test_chat_on_a_hub_id_not_in_the_cache(capsys, no_engine):
    assert main(["chat", "no-such-org/no-such-model", "--prompt", "hi"]) == 2
    assert _error_line(capsys, "chat").startswith("MODEL no-such-org/no-such-model: no local folder of that name, "
                                                  "and loading it as a Hub model id failed: ")


def test_export_of_an_adapter_whose_base_moved_names_the_base_and_the_way_out(ws, tmp_path, capsys, no_engine):
    adapter = tmp_path / "adapter"
    shutil.copytree(ws["run"], adapter)
    moved = str(tmp_path / "moved-base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": moved}))
    assert main(["export", str(adapter), str(tmp_path / "out")]) == 2
    assert _error_line(capsys, "export") == (f"model folder not found: {moved} (the base_model_name_or_path of "
                                             f"{adapter}/adapter_config.json; pass the base as MODEL and {adapter} "
                                             f"as --adapter)")
    assert not (tmp_path / "out").exists()


def test_chat_with_a_full_model_as_adapter_and_on_a_folder_without_a_model(ws, tmp_path, capsys, no_engine):
    assert main(["chat", ws["model"], "--adapter", ws["model"], "--prompt", "hi"]) == 2
    assert _error_line(capsys, "chat").startswith(f"--adapter: {ws['model']} is a full model folder")
    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    assert _error_line(capsys, "chat").startswith(f"not a model folder (no config.json): {tmp_path} (MODEL)")
    assert main(["export", ws["clip"], str(tmp_path / "out")]) == 2
    assert "is not a vision-language model (model_type clip_vision_model)" in _error_line(capsys, "export")
    assert not (tmp_path / "out").exists()


def test_chat_and_export_still_take_an_adapter_folder_alone(ws):
    """What `mmtune chat ADAPTER_FOLDER` loads: the base its adapter_config.json names."""
    assert check_saved_paths(ws["run"]).path == ws["model"]
    assert check_saved_paths(ws["bare"]).path == ws["model"]
    assert check_saved_paths(ws["model"], ws["run"]).path == ws["model"]
    with pytest.raises(ModelFolderError, match="is a LoRA adapter folder and --adapter .* is given too"):
        check_saved_paths(ws["run"], ws["bare"])


def test_env_on_a_missing_folder_reports_it_in_one_line(tmp_path, capsys, monkeypatch):
    import mmtune.model.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was built"))
    missing = str(tmp_path / "gone")
    assert main(["env", missing]) == 0  # the versions and the device are still reported
    out = capsys.readouterr().out
    assert f"speed levers for {missing}: cannot read its model config (model folder not found: {missing} " \
           f"(model_name_or_path))" in out
