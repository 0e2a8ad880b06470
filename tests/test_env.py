"""`mmtune env [MODEL_OR_CONFIG]`: versions against their tested ranges, the device and the speed
levers a run of a tiny saved model (or its YAML config) would get on this machine."""

import importlib.metadata

import pytest
import yaml

from mmtune import env
from mmtune.cli import main
from mmtune.speed.levers import SWITCHES
from mmtune.testing import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir("qwen2_vl", str(tmp_path_factory.mktemp("env")))


def _lever_lines(out):
    rows = {}
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in set(SWITCHES) and line.startswith("  "):
            rows[parts[0]] = parts[1]
    return rows


def test_env_prints_versions_ranges_and_the_device(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    transformers = importlib.metadata.version("transformers")
    line = next(line for line in out.splitlines() if line.startswith("transformers"))
    assert transformers in line and "tested >=5.17,<5.26" in line
    for name in env.CORE_PACKAGES + env.OPTIONAL_PACKAGES:
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    assert "python" in out and ("cpu" in out or "cuda" in out)
    assert "speed levers" not in out  # no model named: no model built


def test_a_package_outside_its_range_is_flagged(monkeypatch):
    real = env.installed_version
    monkeypatch.setattr(env, "installed_version",
                        lambda name: {"transformers": "5.26.0", "bitsandbytes": None}.get(name, real(name)))
    text = env.format_report()
    assert "tested >=5.17,<5.26: OUTSIDE" in text and "outside the tested range: transformers 5.26.0" in text
    assert any(line.split() == ["bitsandbytes", "not", "installed"] for line in text.splitlines())


def test_env_reports_the_levers_a_default_run_of_the_model_gets(model_dir, capsys):
    assert main(["env", model_dir]) == 0
    out = capsys.readouterr().out
    assert f"speed levers for {model_dir} (qwen2_vl: Qwen2VLForConditionalGeneration; lora" in out
    rows = _lever_lines(out)
    assert set(rows) == set(SWITCHES)  # one line per lever of speed.levers.LEVERS and per compile setting
    assert rows["fused_cross_entropy"].startswith("on (checked against the model's own logits")
    assert rows["frozen_tower_no_grad"] == "on: model.visual.patch_embed, model.visual.blocks"
    assert rows["sync_free_forward"] == "on"
    if "training on cpu" in out:  # the CPU defaults
        for switch in ("compile", "frozen_block_cuda_graphs", "vision_varlen_attention", "liger_kernels"):
            assert rows[switch] == "off (its default on cpu)", switch
        assert rows["compile_cpp_wrapper"] == "-"
    assert "fused linear cross-entropy on (chunked PyTorch, vocabulary" in out  # the run's own log line


def test_env_follows_a_yaml_config(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": model_dir, "dataset": "unused.json", "template": "qwen2_vl",
                                      "finetuning_type": "full", "fused_cross_entropy": False, "compile": True,
                                      "sync_free_forward": False, "output_dir": str(tmp_path / "out")}))
    assert main(["env", str(config)]) == 0
    out = capsys.readouterr().out
    rows = _lever_lines(out)
    assert "; full; training on" in out
    assert rows["fused_cross_entropy"] == "off (fused_cross_entropy: false)"
    assert rows["sync_free_forward"] == "off (sync_free_forward: false)"
    assert rows["compile"].startswith("on: ")  # decoder layers and vision blocks, compiled lazily
    assert rows["compile_lean_guards"] in ("true", "false")
    assert "regional compile on" in out


def test_env_on_something_that_is_not_a_model_says_so_in_one_line(tmp_path, capsys):
    from mmtune.config import ConfigError

    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: x\nlearning_rat: 1\n")
    assert main(["env", str(config)]) == 2  # a config mistake: the CLI's one-line error
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises((OSError, ValueError, ConfigError)):
        env.lever_report(str(tmp_path / "no-such-model"))
    assert main(["env", str(tmp_path / "no-such-model")]) == 0  # versions and device, then why no levers
    out = capsys.readouterr().out
    assert "transformers" in out and f"speed levers for {tmp_path / 'no-such-model'}: cannot read its model config" in out


def test_the_cuda_device_line(monkeypatch):
    """The CUDA branch (this machine may have no GPU): cards by name and count, bf16 support."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    (line,) = env.device_lines()
    assert line.startswith("cuda") and "2 x NVIDIA H100 80GB HBM3" in line and line.endswith("bf16: yes")
