"""Output folders never lose data (issue 17, "Data lost"): training into a finished run, a folder
of other files or a model folder, what overwrite_output_dir removes and keeps, export's target
folder, and which of an adapter and full weights chat / export open. Every error is one line
(exit 2), comes before the model loads, and leaves every file as it was."""

import hashlib
import json
import logging
import os
import shutil

import pytest
import torch

from mmtune.cli import main
from mmtune.demo import build_model_dir, make_dataset
from mmtune.model.saved import read_mmtune_config
from mmtune.config import parse_config
from mmtune.train import run_sft


class Loaded(Exception):
    """Raised by the stand-in loaders: the run got past the output-folder check."""


def _snapshot(*roots):
    """Every file and folder under ``roots``: path -> (size, mtime, sha256) or "dir"."""
    out = {}
    for root in roots:
        root = str(root)
        if not os.path.exists(root):
            out[root] = None
            continue
        for folder, dirs, files in os.walk(root):
            out[folder] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                stat = os.stat(path)
                out[path] = (stat.st_size, stat.st_mtime_ns, digest)
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a tokenizer, processor or model raises :class:`Loaded` (training, chat, export)."""
    def refuse(*args, **kwargs):
        raise Loaded("the model or processor was loaded")

    import mmtune.model.loader
    import mmtune.train.recipe

    for module, name in ((mmtune.train.recipe, "load_tokenizer_and_processor"), (mmtune.train.recipe, "load_model"),
                         (mmtune.model.loader, "load_model"), (mmtune.model.loader, "load_tokenizer_and_processor"),
                         (mmtune.train.recipe, "load_saved_processor")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Qwen2-VL, its data, and one folder trained with LoRA and then, with
    overwrite_output_dir, in full (the issue's "LoRA then full in one folder")."""
    root = tmp_path_factory.mktemp("outputs")
    data, items = make_dataset(str(root / "data"), n_train=8, n_test=1, size=56)
    model = build_model_dir(str(root), hidden=64)
    out = root / "run"
    run_sft(*_config(model, data, out, finetuning_type="lora"))
    lora_listing = sorted(os.listdir(out))
    lora_copy = root / "lora_copy"
    shutil.copytree(out, lora_copy)
    (out / "notes.txt").write_text("mine")
    run_sft(*_config(model, data, out, finetuning_type="full", overwrite_output_dir=True))
    return {"root": root, "data": data, "model": model, "out": out, "lora_listing": lora_listing,
            "lora": lora_copy, "image": os.path.join(str(root / "data"), items[0]["images"][0])}


def _config(model, data, out, **extra):
    cfg = dict(model_name_or_path=model, dataset=data, lora_rank=4, torch_dtype="fp32", output_dir=str(out),
               per_device_train_batch_size=4, max_steps=2, save_strategy="steps", save_steps=1, logging_steps=1,
               learning_rate=1e-3, seed=0, data_seed=0, use_cpu=True, disable_tqdm=True, plot_loss=False,
               dataloader_num_workers=0)
    cfg.update(extra)
    if cfg.get("finetuning_type", "lora") != "lora":
        cfg.pop("lora_rank")  # only LoRA reads it: a full or freeze run refuses it
    return parse_config(None, extra=cfg)


def _train_cli(ws, tmp_path, out, *overrides):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {ws['model']}\ndataset: {ws['data']}\nfinetuning_type: lora\n"
                   f"torch_dtype: fp32\nuse_cpu: true\nmax_steps: 1\n")
    return main(["train", str(cfg), f"output_dir={out}", *overrides])


def _one_line(capsys, command):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"mmtune {command}: error: "), err
    return err


def _earlier_run(folder):
    """A finished LoRA run's files, as an earlier run leaves them."""
    os.makedirs(folder / "checkpoint-2")
    for name in ("adapter_config.json", "adapter_model.safetensors", "mmtune_config.json", "trainer_log.jsonl",
                 "all_results.json", "training_loss.png", "tokenizer.json", "checkpoint-2/trainer_state.json",
                 "checkpoint-2/adapter_model.safetensors"):
        (folder / name).write_text("{}")
    (folder / "README.md").write_text("---\nbase_model: m\nlibrary_name: peft\n---\n# Model Card\n")


# ---------------------------------------------------------------- training: a non-empty output_dir
def test_training_into_a_finished_run_is_an_error_before_anything_loads(ws, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    _earlier_run(out)
    before = _snapshot(out)
    assert _train_cli(ws, tmp_path, out) == 2
    err = _one_line(capsys, "train")
    assert f"output_dir {out} holds a finished run (README.md, adapter_config.json, " in err
    assert "pick another output_dir, or set overwrite_output_dir: true" in err
    assert _snapshot(out) == before


def test_training_into_a_folder_of_other_files_is_an_error(ws, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = _snapshot(out)
    assert _train_cli(ws, tmp_path, out) == 2
    err = _one_line(capsys, "train")
    assert f"output_dir {out} is not empty (notes.txt): pick another output_dir, or set overwrite_output_dir: " \
           f"true" in err
    assert _snapshot(out) == before


def test_an_interrupted_runs_checkpoints_are_an_error_that_names_resume(ws, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "trainer_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = _snapshot(out)
    assert _train_cli(ws, tmp_path, out) == 2
    err = _one_line(capsys, "train")
    assert "holds an unfinished run's checkpoints (checkpoint-3, trainer_log.jsonl; resume_from_checkpoint: true " \
           "continues it)" in err
    assert _snapshot(out) == before


def test_tensorboards_runs_folder_counts_as_content(ws, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    (out / "runs" / "Jan01_host").mkdir(parents=True)
    (out / "runs" / "Jan01_host" / "events.out.tfevents.1").write_bytes(b"\0")
    before = _snapshot(out)
    assert _train_cli(ws, tmp_path, out) == 2
    assert "holds an earlier run's files (runs)" in _one_line(capsys, "train")
    assert _snapshot(out) == before


def test_an_output_dir_that_is_a_file_is_an_error(ws, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    out.write_text("not a folder")
    before = _snapshot(out)
    assert _train_cli(ws, tmp_path, out, "overwrite_output_dir=true") == 2
    assert f"output_dir {out} is a file, not a folder: pick another output_dir" in _one_line(capsys, "train")
    assert _snapshot(out) == before


def test_an_empty_or_new_output_dir_trains_by_default(ws, tmp_path, no_loading):
    """The default (no flag) goes on to load the model where the folder is new or empty."""
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(Loaded):
            run_sft(*_config(ws["model"], ws["data"], out))
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "empty") == []


# ---------------------------------------------------------------- training: overwrite_output_dir, resume
def test_overwrite_output_dir_removes_the_earlier_run_and_keeps_other_files(ws, tmp_path, no_loading, caplog):
    out = tmp_path / "out"
    _earlier_run(out)
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    kept = _snapshot(out / "notes.txt")
    with caplog.at_level(logging.INFO, logger="mmtune.model.saved"), pytest.raises(Loaded):
        run_sft(*_config(ws["model"], ws["data"], out, overwrite_output_dir=True))
    assert os.listdir(out) == ["notes.txt"] and _snapshot(out / "notes.txt") == kept
    assert f"overwrite_output_dir: removed 10 file(s) of an earlier run from {out}: README.md, adapter_config.json" \
           in caplog.text
    assert f"overwrite_output_dir: kept 1 file(s) in {out} that mmtune did not write: notes.txt" in caplog.text
    assert [r.levelname for r in caplog.records if "kept 1 file(s)" in r.getMessage()] == ["WARNING"]


def test_overwrite_output_dir_keeps_a_config_json_of_the_users_own(ws, tmp_path, no_loading):
    """Model and processor file names count as a run's only in a folder mmtune wrote (its record)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "README.md").write_text("# my experiments\n")
    before = _snapshot(out)
    with pytest.raises(Loaded):
        run_sft(*_config(ws["model"], ws["data"], out, overwrite_output_dir=True))
    assert _snapshot(out) == before


def test_resuming_in_the_folder_needs_no_flag_and_removes_nothing(ws, tmp_path, no_loading, caplog):
    out = tmp_path / "out"
    _earlier_run(out)
    before = _snapshot(out)
    for resume in ("true", str(out / "checkpoint-2")):
        with pytest.raises(Loaded):
            run_sft(*_config(ws["model"], ws["data"], out, resume_from_checkpoint=resume))
    with caplog.at_level(logging.WARNING), pytest.raises(Loaded):
        run_sft(*_config(ws["model"], ws["data"], out, resume_from_checkpoint="true", overwrite_output_dir=True))
    assert "overwrite_output_dir: ignored, the run resumes from a checkpoint in" in caplog.text
    assert _snapshot(out) == before


def test_resuming_from_a_checkpoint_elsewhere_into_a_non_empty_folder_is_an_error(ws, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    _earlier_run(out)
    other = tmp_path / "other" / "checkpoint-1"
    other.mkdir(parents=True)
    before = _snapshot(out, other)
    assert _train_cli(ws, tmp_path, out, f"resume_from_checkpoint={other}") == 2
    assert f"output_dir {out} holds a finished run" in _one_line(capsys, "train")
    assert _snapshot(out, other) == before


def test_overwrite_output_dir_is_an_option_off_by_default(capsys):
    *_, mm, _ = parse_config(None, [])
    assert mm.overwrite_output_dir is False
    *_, mm, _ = parse_config(None, ["overwrite_output_dir=yes"])
    assert mm.overwrite_output_dir is True
    assert main(["options", "overwrite_output_dir"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("mmtune training (MMTrainingArguments)\n  overwrite_output_dir (bool; default False)\n")
    assert "other files are kept" in text


# ---------------------------------------------------------------- training: output_dir over the inputs
@pytest.mark.parametrize("case", ["is the model", "inside the model", "contains the model", "is the adapter"])
def test_output_dir_over_the_model_or_adapter_is_always_an_error(ws, tmp_path, capsys, no_loading, case):
    model = tmp_path / "base"
    shutil.copytree(ws["model"], model)
    adapter = tmp_path / "adapter"
    shutil.copytree(ws["lora"], adapter)
    out, expected = {
        "is the model": (model, f"output_dir {model} is the model folder (model_name_or_path)"),
        "inside the model": (model / "out", f"output_dir {model / 'out'} is inside the model folder {model} "
                                            f"(model_name_or_path)"),
        "contains the model": (tmp_path, f"output_dir {tmp_path} contains the model folder {model} "
                                         f"(model_name_or_path)"),
        "is the adapter": (adapter, f"output_dir {adapter} is the adapter folder (adapter_name_or_path)"),
    }[case]
    before = _snapshot(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {model}\nadapter_name_or_path: {adapter}\ndataset: {ws['data']}\n")
    after_yaml = _snapshot(tmp_path)
    assert main(["train", str(cfg), f"output_dir={out}", "overwrite_output_dir=true"]) == 2
    err = _one_line(capsys, "train")
    assert expected + ": writing there would overwrite or delete its files; pick another output_dir (no option " \
                      "allows this)" in err
    assert _snapshot(tmp_path) == after_yaml and set(after_yaml) - set(before) == {str(cfg)}


# ---------------------------------------------------------------- a LoRA run, then a full run in one folder
def test_lora_then_full_in_one_folder_leaves_the_full_run_alone(ws):
    out = ws["out"]
    assert "adapter_model.safetensors" in ws["lora_listing"] and "README.md" in ws["lora_listing"]
    names = sorted(os.listdir(out))
    assert not any(n.startswith("adapter_") for n in names) and "README.md" not in names, names
    assert "model.safetensors" in names and "notes.txt" in names
    assert read_mmtune_config(str(out))["finetuning_type"] == "full"
    for checkpoint in ("checkpoint-1", "checkpoint-2"):  # the full run's, not the LoRA run's with weights added
        assert not any(n.startswith("adapter_") for n in os.listdir(out / checkpoint)), checkpoint
    steps = [json.loads(line)["step"] for line in open(out / "trainer_log.jsonl")]
    assert steps == sorted(steps) and steps.count(1) == 1  # the LoRA run's log was not appended to


def test_chat_and_export_open_the_full_model_of_a_lora_then_full_folder(ws, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from mmtune.infer import ChatEngine

    engine = ChatEngine(str(ws["out"]), max_new_tokens=2)
    assert not any("lora" in name for name, _ in engine.model.named_parameters())
    full = AutoModelForImageTextToText.from_pretrained(ws["out"]).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(engine.model(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-6)
    assert main(["chat", str(ws["out"]), "--image", ws["image"], "--prompt", "What shape?", "--max-new-tokens",
                 "2"]) == 0
    export = tmp_path / "export"
    assert main(["export", str(ws["out"]), str(export)]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(export).eval()
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, full(input_ids=ids).logits)
    assert read_mmtune_config(str(export))["finetuning_type"] == "full"


# ---------------------------------------------------------------- which product a folder holds
def _mixed(tmp_path, ws, record):
    """A folder holding the full run's weights and the LoRA run's adapter, as a second run into one
    folder left it before runs cleared their folder; ``record``: its mmtune_config.json's fine-tuning type."""
    folder = tmp_path / "mixed"
    shutil.copytree(ws["out"], folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(ws["lora"] / name, folder / name)
    if record is None:
        (folder / "mmtune_config.json").unlink()
    else:
        cfg = read_mmtune_config(str(folder))
        (folder / "mmtune_config.json").write_text(json.dumps({**cfg, "finetuning_type": record}))
    return folder


@pytest.mark.parametrize("command", ["chat", "export"])
def test_adapter_and_full_weights_without_a_record_are_an_error_naming_both(ws, tmp_path, capsys, no_loading,
                                                                            command):
    folder = _mixed(tmp_path, ws, None)
    target = tmp_path / "export"
    before = _snapshot(folder, target)
    args = ["chat", str(folder), "--prompt", "hi"] if command == "chat" else ["export", str(folder), str(target)]
    assert main(args) == 2
    err = _one_line(capsys, command)
    assert f"{folder} holds both a LoRA adapter (adapter_config.json, adapter_model.safetensors) and full weights " \
           f"(model.safetensors), and no mmtune_config.json says which its run produced: move the one you do not " \
           f"want out of the folder" in err
    assert _snapshot(folder, target) == before


def test_a_full_runs_folder_with_a_stale_adapter_is_an_error_naming_it(ws, tmp_path, capsys, no_loading):
    """transformers would load an adapter found beside full weights on top of them: the folder's own
    run (the record says full) is not what that would give."""
    folder = _mixed(tmp_path, ws, "full")
    before = _snapshot(folder)
    assert main(["chat", str(folder), "--prompt", "hi"]) == 2
    err = _one_line(capsys, "chat")
    assert f"{folder}: its run saved a full model (model.safetensors; mmtune_config.json: finetuning_type full), " \
           f"but a LoRA adapter left by an earlier run sits beside it (adapter_config.json, " \
           f"adapter_model.safetensors), which transformers would load on top of the model: move " in err
    assert _snapshot(folder) == before


def test_a_full_record_beside_only_an_adapter_is_an_error(ws, tmp_path, capsys, no_loading):
    """A full run that never saved its model, in a folder holding an earlier LoRA run's adapter."""
    folder = _mixed(tmp_path, ws, "full")
    for name in os.listdir(folder):
        if name.startswith("model"):
            (folder / name).unlink()
    target = tmp_path / "export"
    before = _snapshot(folder, target)
    assert main(["export", str(folder), str(target)]) == 2
    err = _one_line(capsys, "export")
    assert f"{folder}: its mmtune_config.json records a full fine-tune, but the folder holds no full weights, only " \
           f"a LoRA adapter (adapter_config.json, adapter_model.safetensors) left by another run: point at the " \
           f"folder that holds that run's model, or open the adapter as --adapter {folder} with its base as MODEL" \
           in err
    assert _snapshot(folder, target) == before


def test_a_lora_runs_folder_with_stale_full_weights_opens_the_adapter(ws, tmp_path, caplog):
    from mmtune.model.saved import inspect_folder

    folder = _mixed(tmp_path, ws, "lora")
    with caplog.at_level(logging.INFO, logger="mmtune.model.saved"):
        saved = inspect_folder(str(folder))
    assert (saved.model_path, saved.adapter_path) == (ws["model"], str(folder))
    assert "its run trained a LoRA adapter (mmtune_config.json): loading the adapter, not model.safetensors" \
        in caplog.text


# ---------------------------------------------------------------- export's target folder
def test_export_into_a_non_empty_folder_needs_overwrite(ws, tmp_path, capsys, no_loading):
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    before = _snapshot(target, ws["out"])
    assert main(["export", str(ws["out"]), str(target)]) == 2
    err = _one_line(capsys, "export")
    assert f"export folder {target} is not empty (notes.txt): pick a new or empty folder, or pass --overwrite" in err
    assert _snapshot(target, ws["out"]) == before


@pytest.mark.parametrize("case", ["the model", "the adapter", "the adapter's base", "inside the base",
                                  "the base with --adapter"])
def test_export_never_writes_over_what_it_reads(ws, tmp_path, capsys, no_loading, case):
    base = tmp_path / "base"
    shutil.copytree(ws["model"], base)
    adapter = tmp_path / "adapter"
    shutil.copytree(ws["lora"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    full = tmp_path / "full"
    shutil.copytree(ws["out"], full)
    args, expected = {
        "the model": ([str(full), str(full)], f"export folder {full} is the model folder (MODEL)"),
        "the adapter": ([str(adapter), str(adapter)], f"export folder {adapter} is the adapter folder (MODEL)"),
        "the adapter's base": ([str(adapter), str(base)], f"export folder {base} is the adapter's base model "
                                                          f"(base_model_name_or_path of its adapter_config.json)"),
        "inside the base": ([str(adapter), str(base / "merged")], f"export folder {base / 'merged'} is inside the "
                                                                  f"adapter's base model {base}"),
        "the base with --adapter": ([str(base), str(base), "--adapter", str(adapter)],
                                    f"export folder {base} is the model folder (MODEL)"),
    }[case]
    before = _snapshot(tmp_path)
    assert main(["export", *args, "--overwrite"]) == 2
    err = _one_line(capsys, "export")
    assert expected in err and "pick another export folder (no option allows this)" in err
    assert _snapshot(tmp_path) == before


def test_export_overwrite_replaces_an_earlier_model_and_keeps_other_files(ws, tmp_path, caplog):
    """--overwrite into a LoRA run's folder: its adapter goes (no stale adapter beside the exported
    model), the user's file stays, and the folder then opens as the export."""
    from transformers import AutoModelForImageTextToText

    from mmtune.model.saved import inspect_folder

    target = tmp_path / "target"
    shutil.copytree(ws["lora"], target)
    (target / "notes.txt").write_text("mine")
    kept = _snapshot(target / "notes.txt")
    with caplog.at_level(logging.INFO, logger="mmtune.model.saved"):
        assert main(["export", str(ws["out"]), str(target), "--overwrite"]) == 0
    names = sorted(os.listdir(target))
    assert not any(n.startswith(("adapter_", "checkpoint-")) for n in names) and "trainer_log.jsonl" not in names
    assert "model.safetensors" in names and _snapshot(target / "notes.txt") == kept
    assert "--overwrite: removed " in caplog.text and "kept 1 file(s)" in caplog.text
    assert inspect_folder(str(target)).adapter_path is None
    exported = AutoModelForImageTextToText.from_pretrained(target).eval()
    full = AutoModelForImageTextToText.from_pretrained(ws["out"]).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, full(input_ids=ids).logits)


def test_mmtune_demo_reruns_into_its_own_folder(tmp_path):
    """The demo owns its folder (it draws the data and builds the model anew): a second run
    replaces the first run's files rather than stopping at the non-empty run folder."""
    from mmtune.demo import run_demo

    for _ in range(2):
        result = run_demo(str(tmp_path), n_train=8, n_test=2, max_steps=2, batch_size=4, chat_examples=1)
    with open(os.path.join(result.output_dir, "trainer_log.jsonl")) as fh:
        steps = [json.loads(line)["step"] for line in fh]
    assert steps == [2]  # the second run's log alone (logging_steps 20: its summary line), not appended to
