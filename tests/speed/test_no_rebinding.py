"""No method of a model, module or accelerator is reassigned on an instance by mmtune: tiny models
of several families get every lever that runs on the CPU (switches forced on), an MMTrainer runs
a training step, then every module, the model and the accelerator are walked."""

import copy
import pathlib
import re

import pytest
import torch

from mmtune.config import FinetuningArguments, ModelArguments
from mmtune.model.adapters import init_adapter
from mmtune.speed import levers
from mmtune.speed.config import SpeedConfig
from mmtune.speed.forward import TrainingForward

from ..helpers import make_batch, tiny_configs, tiny_model

#: instance attributes holding callables that torch and transformers set through their own APIs:
#: ``Module.compile()``'s compiled call, ``gradient_checkpointing_enable()``'s checkpoint function
TORCH_OWN = {"_compiled_call_impl", "_gradient_checkpointing_func"}

CASES = [("qwen2_vl", "lora"), ("qwen2_vl", "full"), ("llava", "lora"), ("gemma3", "lora")]


def _build(model_type, method):
    base = copy.deepcopy(tiny_model(model_type))
    torch.manual_seed(0)
    return init_adapter(base, ModelArguments(), FinetuningArguments(finetuning_type=method, lora_rank=4))


def _forced() -> SpeedConfig:
    """Every lever's switch on, as far as the CPU runs it (CUDA graphs fall back to the plain call)."""
    return SpeedConfig(device_type="cpu", liger_kernels=True, fused_cross_entropy=True, frozen_tower_no_grad=True,
                       vision_varlen_attention=True, gradient_checkpointing_layers=1, gradient_checkpointing=True,
                       compile=True, compile_backend="eager", compile_lean_guards=True, sync_free_forward=True,
                       frozen_block_cuda_graphs=True)


def _callables(obj):
    """(name, value) of the instance attributes of ``obj`` that hold callables."""
    return {name for name, value in vars(obj).items() if callable(value) and not isinstance(value, type)}


def _shadowing(obj):
    """Instance attributes that shadow a method (or any callable) of ``obj``'s class."""
    return {name for name in vars(obj) if callable(getattr(type(obj), name, None))}


def _walk(model):
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        found.setdefault(name, (_callables(module), _shadowing(module)))
    return found


@pytest.mark.parametrize("model_type,method", CASES)
def test_levers_and_trainer_assign_no_method_on_an_instance(model_type, method, tmp_path, fake_liger):
    from transformers import TrainingArguments

    from mmtune.train.trainer import MMTrainer

    if model_type not in tiny_configs():
        pytest.fail(f"{model_type}'s tiny config is missing")
    baseline = _walk(_build(model_type, method))  # what transformers and peft themselves hold
    model = _build(model_type, method)
    report = levers.apply_levers(model, _forced())
    assert report["frozen_tower_no_grad"] and report["compile"] and report["gradient_checkpointing_layers"]
    assert report["fused_cross_entropy"]
    forward = TrainingForward.from_levers(report)
    batch = make_batch(model_type)
    if forward.precompute is not None:  # the collator's part of the sync-free forward
        batch = forward.precompute(dict(batch))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                             per_device_train_batch_size=1, max_grad_norm=1.0, save_strategy="no",
                             learning_rate=1e-3, disable_tqdm=True)
    trainer = MMTrainer(model=model, args=args, train_dataset=[0, 1], data_collator=lambda rows: dict(batch),
                        training_forward=forward)
    trainer.train()
    assert trainer.state.global_step == 1

    after = _walk(model)
    for name, (callables, shadowing) in after.items():
        before_callables, before_shadowing = baseline.get(name, (set(), set()))
        assert not (shadowing - before_shadowing - TORCH_OWN), (name, shadowing)
        assert not (callables - before_callables - TORCH_OWN), (name, callables)
    for obj in (model, trainer.model, trainer.accelerator, trainer):
        assert not (_shadowing(obj) - TORCH_OWN - {"model"}), (type(obj).__name__, _shadowing(obj))
    assert "clip_grad_norm_" not in vars(trainer.accelerator)
    assert not any(name.startswith("_mmtune") for m in model.modules() for name in vars(m))


SRC = pathlib.Path(__file__).parents[2] / "src" / "mmtune"


def test_no_source_text_of_another_library_is_parsed():
    """No ``inspect.getsource`` and no ``ast`` walk of code in src/ (a lever reads what a family
    declares); ``ast.literal_eval`` of a config value reads no code."""
    pattern = re.compile(r"\bgetsource\b|\bgetsourcelines\b|\bast\.(parse|walk|unparse|NodeVisitor)\b")
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if pattern.search(path.read_text()):
            offenders.append(rel)
    assert not offenders, offenders
