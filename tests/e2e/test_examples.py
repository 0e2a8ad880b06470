"""Every example runs as shipped: each YAML under examples/ names only options mmtune knows, names
the bundled data in examples/data (which `mmtune demo --export-data` reproduces), and trains for two
steps through the real `mmtune train` from the repository root with its own defaults (no bf16 or
device flags), on a tiny stand-in of its model family in place of the hub id."""

import glob
import json
import math
import os
import re

import numpy as np
import pytest

from mmtune.config import parse_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))
DISTRIBUTED = os.path.join(REPO, "examples", "distributed")
DATA = os.path.join(REPO, "examples", "data")
#: example -> the tiny fixture that stands in for its hub model (same family, same template)
STAND_INS = {"qwen2_vl_lora.yaml": "qwen2_vl", "qwen2_vl_dpo.yaml": "qwen2_vl", "gemma3_lora.yaml": "gemma3", "llava_full.yaml": "llava",
             "qwen2_audio_lora.yaml": "qwen2_audio"}
LLAVA_STAGES = ("llava_llama_stage1_pretrain.yaml", "llava_llama_stage2_finetune.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_config_parses(path, tmp_path):
    model_args, data_args, finetuning_args, _, training_args = parse_config(path, [f"output_dir={tmp_path}"])
    assert model_args.model_name_or_path and data_args.dataset and data_args.template
    assert finetuning_args.finetuning_type in ("lora", "full", "freeze")
    assert "/" in model_args.model_name_or_path and not os.path.exists(model_args.model_name_or_path)  # a hub id


def test_llava_examples_are_the_two_stages():
    stage1 = parse_config(os.path.join(REPO, "examples", LLAVA_STAGES[0]))
    stage2 = parse_config(os.path.join(REPO, "examples", LLAVA_STAGES[1]))
    assert stage1[2].train_mm_proj_only and stage1[2].freeze_language_model
    assert not stage2[2].freeze_language_model and not stage2[2].freeze_multi_modal_projector
    assert stage2[2].freeze_vision_tower
    assert stage2[0].pretrain_mm_mlp_adapter.endswith("mm_projector.safetensors")
    # stage 2 starts from the projector stage 1 writes
    assert stage2[0].pretrain_mm_mlp_adapter == os.path.join(stage1[4].output_dir, "mm_projector.safetensors")


def test_every_example_has_a_stand_in():
    assert {os.path.basename(p) for p in EXAMPLES} == set(STAND_INS) | set(LLAVA_STAGES)


def _rows(path):
    with open(path) as fh:
        return json.load(fh)


def _media(row):
    for key in ("images", "image", "videos", "video", "audios", "audio"):
        value = row.get(key)
        yield from ([value] if isinstance(value, str) else value or [])


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_data_is_bundled(path, monkeypatch):
    """The dataset of each example exists from the repository root, inside examples/data, and every
    media file its rows name is there (relative to the json file)."""
    monkeypatch.chdir(REPO)
    data_args = parse_config(path)[1]
    for entry in data_args.dataset.split(","):
        assert os.path.isfile(entry) and os.path.abspath(entry).startswith(DATA + os.sep), entry
        rows = _rows(entry)
        assert rows
        for row in rows:
            for item in _media(row):
                assert os.path.isfile(os.path.join(os.path.dirname(entry), item)), (entry, item)


def test_bundled_data_has_every_kind_of_media():
    rows = [row for name in os.listdir(DATA) if name.endswith(".json") for row in _rows(os.path.join(DATA, name))]
    kinds = {kind for row in rows for kind in ("images", "image", "videos", "audios") if row.get(kind)}
    assert kinds >= {"images", "image", "videos", "audios"}
    text_only = [row for row in _rows(os.path.join(DATA, "conversations.json")) if not list(_media(row))]
    assert text_only  # the LLaVA instruction mix has text-only rows beside image rows
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DATA) for f in files]
    assert sum(sizes) < 300_000


def _decoded(path):
    """What a file holds, compared by content (pixels, samples, frames, parsed json) so that another
    encoder build writing other bytes for the same content does not count as a difference."""
    if path.endswith(".json"):
        return _rows(path)
    if path.endswith(".png"):
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    if path.endswith(".wav"):
        import soundfile

        return soundfile.read(path, dtype="int16")[0]
    if path.endswith(".mp4"):
        import av

        with av.open(path) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    raise AssertionError(f"unexpected file in examples/data: {path}")


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_export_data_reproduces_the_bundled_data(tmp_path, capsys):
    from mmtune.cli import main

    out = tmp_path / "data"
    assert main(["demo", "--export-data", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.relpath(p, out) for p in printed) == _files(out) == _files(DATA)
    for name in _files(DATA):
        mine, bundled = _decoded(str(out / name)), _decoded(os.path.join(DATA, name))
        if name.endswith(".mp4"):  # lossy: another codec build may round a few levels differently
            assert mine.shape == bundled.shape and np.abs(mine.astype(int) - bundled).mean() < 2, name
        elif isinstance(bundled, np.ndarray):
            assert np.array_equal(mine, bundled), name
        else:
            assert mine == bundled, name


def test_distributed_examples_parse_and_name_files_that_exist(monkeypatch):
    """The launcher configs load in accelerate (no unknown keys), their DeepSpeed files exist and
    parse, and every examples/ path their comments and README name exists, each training config
    naming data that exists."""
    from accelerate.commands.config.config_args import ClusterConfig

    monkeypatch.chdir(REPO)
    configs = sorted(glob.glob(os.path.join(DISTRIBUTED, "*.yaml")))
    assert configs
    named: set[str] = set()
    for path in configs:
        config = ClusterConfig.from_yaml_file(path)
        assert config.num_processes >= 2, path
        ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
        if ds_file:
            with open(ds_file) as fh:
                assert "zero_optimization" in json.load(fh), ds_file
    for path in [*configs, os.path.join(DISTRIBUTED, "README.md")]:
        with open(path) as fh:
            named |= set(re.findall(r"examples/[\w./-]+\.(?:yaml|json|py|sh)", fh.read()))
    assert "examples/qwen2_vl_lora.yaml" in named
    for name in sorted(named):
        assert os.path.isfile(name), name
        if name.endswith(".yaml") and "/distributed/" not in name:
            dataset = parse_config(name)[1].dataset
            assert all(os.path.isfile(entry) for entry in dataset.split(",")), (name, dataset)


# ---- every example trains: `mmtune train examples/X.yaml` with only the model swapped for a tiny one


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny models built on first use, once per module."""
    from mmtune.testing.stand_ins.llava_llama import clip_tower_dir, plain_llama_dir
    from mmtune.testing import tiny_model_dir

    root = str(tmp_path_factory.mktemp("stand_ins"))
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = {"lm": lambda: plain_llama_dir(root), "clip": lambda: clip_tower_dir(root)}.get(
                name, lambda: tiny_model_dir(name, root))()
        return built[name]

    return get


def _train(example, overrides, output_dir, capsys):
    """`mmtune check-data` then `mmtune train` on ``example`` from the repository root; returns the
    metrics `mmtune train` printed."""
    from mmtune.cli import main

    path = os.path.join("examples", example)
    data_args = parse_config(path)[1]
    samples = sum(len(_rows(entry)) for entry in data_args.dataset.split(","))
    capsys.readouterr()
    assert main(["check-data", path, *overrides]) == 0
    assert f"{samples} samples read, 0 with errors, 0 over cutoff_len" in capsys.readouterr().out
    assert main(["train", path, *overrides, f"output_dir={output_dir}", "max_steps=2"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(re.search(r"^\{$.*", out, re.M | re.S).group())  # after the Trainer's own lines
    assert metrics["train_samples_per_second"] > 0 and 0 < metrics["train_loss"] < math.inf
    with open(os.path.join(output_dir, "trainer_log.jsonl")) as fh:
        logged = [json.loads(line) for line in fh]
    assert max(row["step"] for row in logged) == 2
    with open(os.path.join(output_dir, "mmtune_config.json")) as fh:
        assert json.load(fh)["template"] == data_args.template
    return metrics


@pytest.mark.parametrize("example", sorted(STAND_INS))
def test_example_trains_as_shipped(example, stand_ins, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    model = stand_ins(STAND_INS[example])
    _train(example, [f"model_name_or_path={model}"], tmp_path / "out", capsys)
    finetuning_type = parse_config(os.path.join("examples", example))[2].finetuning_type
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    assert (tmp_path / "out" / weights).is_file()


def test_llava_llama_examples_train_as_shipped(stand_ins, tmp_path, capsys, monkeypatch):
    """Stage 1 writes the projector; stage 2, given that file in place of the example's path,
    loads it and trains LoRA."""
    monkeypatch.chdir(REPO)
    stage1_out = tmp_path / "stage1"
    overrides = [f"model_name_or_path={stand_ins('lm')}", f"vision_tower={stand_ins('clip')}"]
    _train(LLAVA_STAGES[0], overrides, stage1_out, capsys)
    projector = stage1_out / "mm_projector.safetensors"
    assert projector.is_file() and (stage1_out / "model.safetensors").is_file()
    stage2_out = tmp_path / "stage2"
    _train(LLAVA_STAGES[1], [*overrides, f"pretrain_mm_mlp_adapter={projector}"], stage2_out, capsys)
    assert (stage2_out / "adapter_model.safetensors").is_file()
