"""Regional compile (mmtune.speed.compile): the same losses without recompiles, the C++ wrapper
and lean guards where asked, dynamo's limits raised only while the model runs."""

import pytest
import torch

from mmtune.model.layers import repeated_blocks
from mmtune.speed import compile as regional

from ..helpers import assert_same as _assert_same
from ..helpers import make_batch as _batch
from ..helpers import make_model as _model
from ..helpers import train_steps as _train


# ------------------------------------------------------------------ regional compile
def _tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))


def _compiled_losses(backend, **levers):
    import torch._dynamo

    torch._dynamo.reset()
    ref, model = _tiny_lm(), _tiny_lm()
    assert regional.compile_repeated_blocks(model, dynamic=True, backend=backend, **levers) == 2
    batches = []
    for length in (12, 9, 15):  # new lengths must not recompile
        ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
        batches.append({"input_ids": ids, "labels": ids})
    ref_run = _train(ref, batches, steps=3, lr=0.1)
    model.train()
    model(**batches[0]).loss.backward()  # the one compile
    model.zero_grad()
    torch._dynamo.config.error_on_recompile = True
    try:
        new = _train(model, batches, steps=3, lr=0.1)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert [k for k, _ in model.state_dict().items()] == [k for k, _ in ref.state_dict().items()]
    return ref_run, new


def test_regional_compile_keeps_losses_without_recompiles():
    """aot_eager traces each block and its backward like inductor does, minus code generation
    (~25 s on 2 CPU cores; inductor's C++ build adds ~60 s, in the test below)."""
    _assert_same(*_compiled_losses("aot_eager"))


def test_regional_compile_inductor_keeps_losses():
    """The real backend (CUDA's default): inductor's C++ build costs ~60 s on 2 CPU cores."""
    _assert_same(*_compiled_losses("inductor"), rel=1e-4, atol=1e-5)


def test_cpp_wrapper_and_lean_guards_keep_losses(monkeypatch):
    """CUDA's defaults: inductor's C++ wrapper (forward and backward graphs) and lean guards;
    the same losses and gradients, still no recompile across lengths (~60 s on 2 CPU cores)."""
    import torch._functorch.config
    import torch._inductor.config
    import torch._inductor.graph as graph

    wrappers = []
    init = graph.GraphLowering.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        wrappers.append((bool(kwargs.get("is_backward")), self.cpp_wrapper))

    monkeypatch.setattr(graph.GraphLowering, "__init__", recording_init)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cache hit lowers nothing
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    _assert_same(*_compiled_losses("inductor", cpp_wrapper=True, lean_guard_checks=True), rel=1e-4, atol=1e-5)
    assert {False, True} <= {bw for bw, _ in wrappers} and all(cpp for _, cpp in wrappers), wrappers


def test_cpp_wrapper_goes_to_decoder_layers_only(monkeypatch):
    """Vision blocks keep the Python wrapper (the varlen op's list arguments); a mode is merged
    into the options (torch.compile takes one of the two)."""
    import torch._inductor

    model = _model("qwen2_vl")
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    assert regional.compile_repeated_blocks(model, cpp_wrapper=True, lean_guard_checks=True) == 4
    vision = [kw for name, kw in seen if "Vision" in name]
    layers = [kw for name, kw in seen if "Decoder" in name]
    assert len(vision) == 2 and len(layers) == 2
    assert all(kw["options"] == {"guard_filter_fn": regional.lean_guards} for kw in vision)
    assert all(kw["options"] == {"cpp_wrapper": True, "guard_filter_fn": regional.lean_guards} for kw in layers)
    seen.clear()
    regional.compile_repeated_blocks(model, mode="max-autotune-no-cudagraphs", cpp_wrapper=True)
    mode_options = torch._inductor.list_mode_options("max-autotune-no-cudagraphs")
    assert [kw["options"] for name, kw in seen if "Decoder" in name] == [{**mode_options, "cpp_wrapper": True}] * 2
    assert all("mode" not in kw for name, kw in seen if "Decoder" in name)
    assert [kw for name, kw in seen if "Vision" in name] == [{"dynamic": True, "backend": "inductor",
                                                               "mode": "max-autotune-no-cudagraphs"}] * 2
    seen.clear()
    regional.compile_repeated_blocks(model, backend="aot_eager", cpp_wrapper=True)  # inductor's option only
    assert all("options" not in kw for _, kw in seen)


def test_cpp_wrapper_falls_back_without_a_compiler(monkeypatch, caplog):
    import logging

    import torch._inductor.cpp_builder as builder

    def missing():
        raise builder.exc.InvalidCxxCompiler()

    monkeypatch.setattr(builder, "get_cpp_compiler", missing)
    assert not regional.cpp_compiler_available()
    model = _model("qwen2_vl")
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    with caplog.at_level(logging.WARNING, logger="mmtune.speed"):
        assert regional.compile_repeated_blocks(model, cpp_wrapper=True) == 4
    assert seen == [{"dynamic": True, "backend": "inductor"}] * 4 and "no C++ compiler" in caplog.text


def test_lean_guards_drop_module_guards_but_keep_the_training_flag():
    """eval() after train() still recompiles (dropout, checkpointing read ``training``); fewer
    guards are checked a call."""
    import torch._dynamo

    kept = {}

    def counting(name):
        def fn(entries):
            flags = regional.lean_guards(entries) if name == "lean" else [True] * len(entries)
            kept[name] = (sum(flags), [e.name for e, f in zip(entries, flags) if f and e.name.endswith(".training")])
            return flags
        return fn

    for name in ("all", "lean"):
        torch._dynamo.reset()
        model = _tiny_lm()
        model.model.layers[0].compile(backend="eager", options={"guard_filter_fn": counting(name)})
        ids = torch.randint(0, 64, (2, 6))
        model.train()
        ref = model(input_ids=ids).logits
        torch._dynamo.config.error_on_recompile = True
        try:
            assert torch.equal(model(input_ids=ids).logits, ref)  # the guards pass: no recompile
            model.eval()
            with pytest.raises(Exception, match="[Rr]ecompil"):
                model(input_ids=ids)
        finally:
            torch._dynamo.config.error_on_recompile = False
    assert kept["lean"][0] < kept["all"][0]
    assert kept["lean"][1]  # the training flags stay


def test_compile_mode_is_passed_on_and_cuda_graphs_are_refused(monkeypatch):
    model = _model("qwen2_vl")
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    assert regional.compile_repeated_blocks(model, mode="max-autotune-no-cudagraphs") == 4
    assert seen == [{"dynamic": True, "backend": "inductor", "mode": "max-autotune-no-cudagraphs"}] * 4
    with pytest.raises(ValueError, match="reduce-overhead"):
        regional.compile_repeated_blocks(model, mode="reduce-overhead")


def test_repeated_blocks_are_decoder_layers_and_vision_blocks():
    names = [n for n, _ in repeated_blocks(_model("qwen2_vl"))]
    assert names == ["model.visual.blocks.0", "model.visual.blocks.1", "model.language_model.layers.0",
                     "model.language_model.layers.1"]




def test_dynamo_limits_are_raised_only_while_the_compiled_model_runs(monkeypatch):
    """Regional compile no longer sets dynamo's recompile limits for the whole process: they are
    raised inside the model's forward (hooks) and restored after, also when the forward raises."""
    import torch._dynamo

    from mmtune.speed.config import SpeedConfig

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    model = _model("qwen2_vl")
    result = regional.apply(model, SpeedConfig(compile=True), {})
    assert result and result.detail == 4 and getattr(config, name) == before
    seen = []
    block = repeated_blocks(model)[-1][1]
    block.register_forward_pre_hook(lambda m, a: seen.append(getattr(config, name)))
    model.train()
    model(**_batch("qwen2_vl"))
    assert seen and all(v >= regional.RECOMPILE_LIMIT for v in seen) and getattr(config, name) == before
    with pytest.raises(TypeError):
        model(input_ids=None, not_an_argument=1)
    assert getattr(config, name) == before
