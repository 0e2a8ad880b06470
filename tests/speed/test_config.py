"""SpeedConfig (mmtune.speed.config): every speed switch resolved once for the device a run trains
on, frozen, logged once."""

import dataclasses
import logging

import pytest

from mmtune.config import ModelArguments
from mmtune.speed.config import ALL_LAYERS, FIT_MEMORY, SpeedConfig, resolve_speed_config


def test_cpp_wrapper_setting_from_the_config():
    def setting(v, device):
        return resolve_speed_config(ModelArguments(compile_cpp_wrapper=v), device_type=device).compile_cpp_wrapper

    assert setting(None, "cuda") is True and setting(None, "cpu") is False
    assert setting("all", "cpu") == "all" and setting("ALL", "cuda") == "all" and setting(False, "cuda") is False
    from mmtune.config import parse_config

    assert parse_config(None, extra={"compile_cpp_wrapper": "all"})[0].compile_cpp_wrapper == "all"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_defaults_resolve_per_device(device):
    cfg = resolve_speed_config(ModelArguments(), device_type=device)
    on_cuda = device == "cuda"
    assert cfg.device_type == device
    for switch in ("compile", "liger_kernels", "compile_lean_guards", "frozen_block_cuda_graphs"):
        assert getattr(cfg, switch) is on_cuda, switch
    assert cfg.compile_cpp_wrapper is on_cuda
    assert cfg.fused_cross_entropy and cfg.frozen_tower_no_grad and cfg.sync_free_forward  # on everywhere
    assert {"compile", "liger_kernels", "frozen_block_cuda_graphs"} <= cfg.from_default
    assert "fused_cross_entropy" not in cfg.from_default
    for value in dataclasses.asdict(cfg).values():
        assert value is not None or value is cfg.memory_budget_gib or value is cfg.batch_tokens \
            or value is cfg.compile_mode  # nothing left to decide but the optional figures


def test_explicit_switches_win_and_graphs_need_cuda():
    cfg = resolve_speed_config(ModelArguments(compile=True, liger_kernels=False, frozen_block_cuda_graphs=True),
                               device_type="cpu")
    assert cfg.compile is True and cfg.liger_kernels is False and "compile" not in cfg.from_default
    assert cfg.frozen_block_cuda_graphs is False  # CUDA graphs capture CUDA kernels only


def test_checkpoint_layers_are_resolved():
    def plan(spec, device="cpu", gc=False, tokens=None):
        args = ModelArguments(gradient_checkpointing_layers=spec)
        return resolve_speed_config(args, device_type=device, gradient_checkpointing=gc,
                                    batch_tokens=tokens).gradient_checkpointing_layers

    assert plan("auto") == 0 and plan("auto", gc=True) == ALL_LAYERS
    assert plan("auto", device="cuda", tokens=4096) == FIT_MEMORY
    assert plan("auto", device="cuda", gc=True) == ALL_LAYERS  # no batch size: no estimate
    assert plan(3) == 3 and plan("5") == 5
    with pytest.raises(ValueError, match="gradient_checkpointing_layers"):
        plan(-1)


def test_the_config_is_frozen_and_refuses_cuda_graph_modes():
    cfg = resolve_speed_config(ModelArguments(), device_type="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.compile = True
    assert resolve_speed_config(ModelArguments(compile_mode="max-autotune"), device_type="cpu").compile_mode \
        == "max-autotune"
    with pytest.raises(ValueError, match="reduce-overhead"):
        resolve_speed_config(dataclasses.replace(ModelArguments(), compile_mode="reduce-overhead"), device_type="cpu")
    assert isinstance(cfg, SpeedConfig)


def test_resolution_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="mmtune.speed"):
        resolve_speed_config(ModelArguments(), device_type="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "mmtune.speed.config"]
    assert len(lines) == 1 and lines[0].startswith("speed config (cpu): ") and "compile=False" in lines[0]


def test_loading_resolves_the_config_once(caplog):
    import copy

    from mmtune.config import FinetuningArguments
    from mmtune.model.loader import load_model

    from ..helpers import tiny_model

    config = copy.deepcopy(tiny_model("qwen2_vl").config)
    with caplog.at_level(logging.INFO, logger="mmtune.speed"):
        load_model(ModelArguments(torch_dtype="fp32"), FinetuningArguments(), config=config, device_type="cpu")
    assert sum(r.name == "mmtune.speed.config" for r in caplog.records) == 1
