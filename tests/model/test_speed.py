"""Speed levers (mmtune.model.speed) change no result: each lever on gives the losses (and
gradients) of the lever off over several optimiser steps, on tiny random models."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from mmtune.hparams import FinetuningArguments, ModelArguments
from mmtune.model import speed
from mmtune.model.adapters import init_adapter

from .conftest import tiny_configs, tiny_model

IGNORE = -100


# ------------------------------------------------------------------ helpers
def _batch(model_type, seed=0, answer_lens=(3, 7)):
    """Two samples of different lengths (one image each), right-padded, prompt unlabelled."""
    from mmtune.plugins import get_mm_plugin
    from mmtune.testing import load_processor, make_image
    from mmtune.testing.parity import MMSample, plugin_ids

    processor = load_processor(model_type)
    plugin = get_mm_plugin(model_type)
    words = "red blue green circle square star cross the a shape".split()
    g = torch.Generator().manual_seed(seed)
    images, ids, labels = [], [], []
    for i, n in enumerate(answer_lens):
        img = make_image(64 + 8 * i, 48, seed=seed + i)
        answer = " ".join(words[j] for j in torch.randint(0, len(words), (n,), generator=g).tolist())
        prompt = MMSample([{"role": "user", "content": "<image>what is it"}], [img])
        full = MMSample([{"role": "user", "content": "<image>what is it"}, {"role": "assistant", "content": answer}], [img])
        p, f = plugin_ids(plugin, processor, prompt), plugin_ids(plugin, processor, full)
        images.append(img)
        ids.append(f)
        labels.append([IGNORE] * len(p) + f[len(p):])
    width = max(map(len, ids))
    pad = processor.tokenizer.pad_token_id or 0
    batch = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels]),
    }
    batch.update(plugin.get_mm_inputs(images, [], [], [1, 1], [0, 0], [0, 0], ids, processor))
    if plugin.token_type_key:
        batch[plugin.token_type_key] = plugin.mm_token_type_ids(batch["input_ids"], processor)
    return batch


def _model(model_type, method="lora", **flags):
    base = copy.deepcopy(tiny_model(model_type))
    torch.manual_seed(0)
    args = FinetuningArguments(finetuning_type=method, lora_rank=4, **flags)
    model = init_adapter(base, ModelArguments(), args)
    with torch.no_grad():  # LoRA B starts at 0: make every adapter matter from step 1
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def _train(model, batches, steps=3, lr=0.5):
    """Losses of ``steps`` SGD steps, and the gradients of the first step."""
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=lr)
    losses, first = [], None
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        if first is None:
            first = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, first


def _assert_same(ref, new, rel=1e-5, atol=1e-6):
    (ref_losses, ref_grads), (losses, grads) = ref, new
    assert losses == pytest.approx(ref_losses, rel=rel, abs=atol)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=atol), (name, (grads[name] - g).abs().max())


# ------------------------------------------------------------------ frozen tower without autograd
def _tower_output_requires_grad(model):
    seen = []
    base = speed.unwrap_model(model)
    base.model.visual.blocks[-1].register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    model.train()
    model(**_batch("qwen2_vl"))
    return seen[-1]


def test_frozen_tower_without_autograd_keeps_losses_and_grads():
    from mmtune.model.loader import enable_gradient_checkpointing

    def build(lever):
        model = _model("qwen2_vl", freeze_multi_modal_projector=False)  # the projector (merger) trains
        enable_gradient_checkpointing(speed.unwrap_model(model))  # makes the tower record a graph
        if lever:
            assert speed.run_frozen_towers_without_grad(model) == ["model.visual.patch_embed", "model.visual.blocks"]
        return model

    batches = [_batch("qwen2_vl", seed=s) for s in (0, 1)]
    _assert_same(_train(build(False), batches), _train(build(True), batches))
    assert _tower_output_requires_grad(build(False)) and not _tower_output_requires_grad(build(True))
    # a tower that trains, even in part, is left alone
    assert speed.run_frozen_towers_without_grad(_model("qwen2_vl", "full", freeze_vision_tower=False)) == []


# ------------------------------------------------------------------ selective activation checkpointing
def test_choose_checkpoint_layers_from_a_memory_budget():
    assert speed.choose_checkpoint_layers(28, 1.0, 0.1, 40.0) == 0  # everything fits
    assert speed.choose_checkpoint_layers(28, 1.0, 0.1, 0.0) == 28  # nothing fits
    n = speed.choose_checkpoint_layers(28, 1.0, 0.1, 20.0)
    assert (28 - n) * 1.0 + n * 0.1 <= 20.0 < (28 - n + 1) * 1.0 + (n - 1) * 0.1
    per_token, ckpt = speed.activation_bytes_per_token(tiny_model("qwen2_vl").config)
    assert per_token > ckpt > 0
    model = _model("qwen2_vl")
    kw = dict(device_type="cpu", batch_tokens=1000)
    assert speed.resolve_checkpoint_layers("auto", model, gradient_checkpointing=True, **kw) == 2
    assert speed.resolve_checkpoint_layers("auto", model, gradient_checkpointing=False, **kw) == 0
    assert speed.resolve_checkpoint_layers(1, model, gradient_checkpointing=False, **kw) == 1
    assert speed.resolve_checkpoint_layers("9", model, gradient_checkpointing=False, **kw) == 2
    with pytest.raises(ValueError):
        speed.resolve_checkpoint_layers(-1, model, gradient_checkpointing=False, **kw)


def test_selective_checkpointing_keeps_losses_and_recomputes_only_n_layers():
    batches = [_batch("qwen2_vl", seed=s) for s in (0, 1)]
    ref = _train(_model("qwen2_vl"), batches)
    for n in (0, 1, 2):  # none, half, all of the 2 decoder layers
        model = _model("qwen2_vl")
        assert speed.set_checkpointed_layers(model, n) == n
        layers = speed.decoder_layers(model)
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):
            layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        _assert_same(ref, _train(model, batches, steps=3))
        # a checkpointed layer runs its forward (so its MLP) again in the backward
        assert calls == [6 if i < n else 3 for i in range(len(layers))], (n, calls)


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
    assert speed.compile_repeated_blocks(model, dynamic=True, backend=backend, **levers) == 2
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
    assert speed.compile_repeated_blocks(model, cpp_wrapper=True, lean_guard_checks=True) == 4
    vision = [kw for name, kw in seen if "Vision" in name]
    layers = [kw for name, kw in seen if "Decoder" in name]
    assert len(vision) == 2 and len(layers) == 2
    assert all(kw["options"] == {"guard_filter_fn": speed.lean_guards} for kw in vision)
    assert all(kw["options"] == {"cpp_wrapper": True, "guard_filter_fn": speed.lean_guards} for kw in layers)
    seen.clear()
    speed.compile_repeated_blocks(model, mode="max-autotune-no-cudagraphs", cpp_wrapper=True)
    mode_options = torch._inductor.list_mode_options("max-autotune-no-cudagraphs")
    assert [kw["options"] for name, kw in seen if "Decoder" in name] == [{**mode_options, "cpp_wrapper": True}] * 2
    assert all("mode" not in kw for name, kw in seen if "Decoder" in name)
    assert [kw for name, kw in seen if "Vision" in name] == [{"dynamic": True, "backend": "inductor",
                                                               "mode": "max-autotune-no-cudagraphs"}] * 2
    seen.clear()
    speed.compile_repeated_blocks(model, backend="aot_eager", cpp_wrapper=True)  # inductor's option only
    assert all("options" not in kw for _, kw in seen)


def test_cpp_wrapper_falls_back_without_a_compiler(monkeypatch, caplog):
    import logging

    import torch._inductor.cpp_builder as builder

    def missing():
        raise builder.exc.InvalidCxxCompiler()

    monkeypatch.setattr(builder, "get_cpp_compiler", missing)
    assert not speed.cpp_compiler_available()
    model = _model("qwen2_vl")
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    with caplog.at_level(logging.WARNING, logger="mmtune.model.speed"):
        assert speed.compile_repeated_blocks(model, cpp_wrapper=True) == 4
    assert seen == [{"dynamic": True, "backend": "inductor"}] * 4 and "no C++ compiler" in caplog.text


def test_lean_guards_drop_module_guards_but_keep_the_training_flag():
    """eval() after train() still recompiles (dropout, checkpointing read ``training``); fewer
    guards are checked a call."""
    import torch._dynamo

    kept = {}

    def counting(name):
        def fn(entries):
            flags = speed.lean_guards(entries) if name == "lean" else [True] * len(entries)
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
    assert speed.compile_repeated_blocks(model, mode="max-autotune-no-cudagraphs") == 4
    assert seen == [{"dynamic": True, "backend": "inductor", "mode": "max-autotune-no-cudagraphs"}] * 4
    with pytest.raises(ValueError, match="reduce-overhead"):
        speed.compile_repeated_blocks(model, mode="reduce-overhead")


def test_repeated_blocks_are_decoder_layers_and_vision_blocks():
    names = [n for n, _ in speed.repeated_blocks(_model("qwen2_vl"))]
    assert names == ["model.visual.blocks.0", "model.visual.blocks.1", "model.language_model.layers.0",
                     "model.language_model.layers.1"]


# ------------------------------------------------------------------ wiring
def test_load_model_applies_the_default_levers_on_cpu(caplog):
    import logging

    from mmtune.model.loader import load_model
    from mmtune.train import parse_config

    from mmtune.speed.result import Applied

    config = copy.deepcopy(tiny_model("qwen2_vl").config)
    levers = {}
    with caplog.at_level(logging.INFO, logger="mmtune"):
        model = load_model(ModelArguments(torch_dtype="fp32"), FinetuningArguments(), config=config, device_type="cpu",
                           levers_out=levers)
    base = speed.unwrap_model(model)
    assert isinstance(levers["fused_cross_entropy"], Applied)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in base.modules())  # compile: CUDA only
    text = caplog.text
    assert "fused linear cross-entropy on" in text and "frozen tower runs without autograd" in text
    off = ModelArguments(torch_dtype="fp32", fused_cross_entropy=False, frozen_tower_no_grad=False)
    levers_off = {}
    load_model(off, FinetuningArguments(), config=config, device_type="cpu", levers_out=levers_off)
    assert not levers_off.get("fused_cross_entropy")
    model_args = parse_config(None, extra={"compile": False, "gradient_checkpointing_layers": 3,
                                           "memory_budget_gib": 20, "liger_kernels": False})[0]
    assert model_args.compile is False and model_args.gradient_checkpointing_layers == 3


def test_liger_absence_is_logged(caplog, monkeypatch):
    import logging
    import sys

    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when not installed
    with caplog.at_level(logging.INFO, logger="mmtune.model.speed"):
        assert speed.apply_liger_kernels(_model("qwen2_vl")) is False
    assert "liger-kernel not installed" in caplog.text


def test_mmtune_train_with_levers_gives_the_losses_of_levers_off(tmp_path, caplog):
    """The real path (dataset on disk, collator, HF Trainer with gradient accumulation, so
    num_items_in_batch): fused cross-entropy + frozen tower without autograd + one of two
    layers checkpointed + the sync-free forward log the losses of all levers off, step for step."""
    import json

    from transformers import set_seed

    from mmtune.demo import build_model_dir, make_dataset
    from mmtune.train import parse_config, run_sft

    data, _ = make_dataset(str(tmp_path / "data"), n_train=16, n_test=0, size=56)
    model = build_model_dir(str(tmp_path), hidden=64)

    def losses(name, **levers):
        out = tmp_path / name
        set_seed(0)  # LoRA's init draws before the Trainer seeds
        run_sft(*parse_config(None, extra=dict(
            model_name_or_path=model, dataset=data, template="qwen2_vl", finetuning_type="lora", lora_rank=4,
            torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=4, learning_rate=5e-3, logging_steps=1, save_strategy="no", seed=0, data_seed=0, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, plot_loss=False, cutoff_len=256, gradient_checkpointing=True,
            packing=False, **levers)))
        rows = [json.loads(line) for line in open(out / "trainer_log.jsonl")]
        return [r["loss"] for r in rows if "loss" in r]

    off = losses("off", fused_cross_entropy=False, frozen_tower_no_grad=False, gradient_checkpointing_layers="auto",
                 sync_free_forward=False)
    caplog.clear()
    with caplog.at_level("INFO", logger="mmtune"):
        on = losses("on", gradient_checkpointing_layers=1)
    for applied in ("fused linear cross-entropy on", "frozen tower runs without autograd",
                    "activation checkpointing: 1 of 2 decoder layers", "sync-free forward on"):
        assert applied in caplog.text
    assert len(off) == 4 and on == pytest.approx(off, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ packed vision attention (varlen)
def _block_diagonal_attention(q, k, v, cu, scale):
    """Reference: full attention under a block-diagonal mask (tokens, heads, dim)."""
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    mask = seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.transpose(0, 1)


def test_segment_attention_equals_a_block_diagonal_mask():
    torch.manual_seed(0)
    cu = torch.tensor([0, 16, 32, 48, 72, 72, 80, 96, 112], dtype=torch.int32)  # runs of equal sizes, an empty one
    q, k, v = (torch.randn(112, 4, 8, dtype=torch.float64) for _ in range(3))
    ours = speed.segment_attention(q, k, v, cu, 0.3)
    assert torch.allclose(ours, _block_diagonal_attention(q, k, v, cu, 0.3), atol=1e-10)


def test_varlen_attention_calls_the_kernel_once_and_falls_back_to_sdpa(monkeypatch):
    calls = []

    def fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        calls.append((tuple(q.shape), cu_q.dtype, max_q))
        return speed.segment_attention(q, k, v, cu_q, scale)

    monkeypatch.setattr(speed, "_varlen_kernel_for", lambda q, aten=False: fake_kernel)
    torch.manual_seed(0)
    cu = torch.tensor([0, 16, 40], dtype=torch.int64)
    q, k, v = (torch.randn(1, 4, 40, 8) for _ in range(3))  # as transformers hands them: (1, heads, tokens, dim)
    out, _ = speed.varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.5, cu_seq_lens_q=cu,
                                            cu_seq_lens_k=cu, max_length_q=24, max_length_k=24, is_causal=False)
    assert calls == [((40, 4, 8), torch.int32, 24)] and out.shape == (1, 40, 4, 8)
    ref = _block_diagonal_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 0.5)
    assert torch.allclose(out[0], ref, atol=1e-6)
    # a causal or masked call is not ours: transformers' sdpa, the kernel untouched
    module = torch.nn.Module()
    module.is_causal = True
    causal, _ = speed.varlen_attention_forward(module, q, k, v, None, scaling=0.5, is_causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    assert len(calls) == 1 and torch.allclose(causal, expected, atol=1e-6)


def test_aten_varlen_kernel_is_chosen_where_the_cpp_wrapper_runs_the_block(monkeypatch):
    """``compile_cpp_wrapper: all``: the varlen kernel as the aten op (C shim, autograd), picked
    per attention module; its plumbing checked on meta tensors (the kernel itself is CUDA's)."""
    import types

    q = torch.empty(100, 4, 64, device="meta", dtype=torch.bfloat16)
    cu = torch.tensor([0, 40, 100], dtype=torch.int32, device="meta")
    assert speed.aten_flash_varlen(q, q, q, cu, cu, 60, 60, scale=0.125).shape == (100, 4, 64)
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert speed._varlen_kernel_for(cuda_like, aten=True) is speed.aten_flash_varlen
    assert speed._varlen_kernel_for(cuda_like) is speed._torch_varlen_attn()
    assert speed._varlen_kernel_for(types.SimpleNamespace(is_cuda=True, dtype=torch.float32), aten=True) is None
    assert speed._varlen_kernel_for(torch.zeros(2, 2, dtype=torch.bfloat16), aten=True) is None  # CPU: reference
    seen = []
    monkeypatch.setattr(speed, "_varlen_kernel_for", lambda q, aten=False: seen.append(aten))
    module = torch.nn.Module()
    setattr(module, speed.ATEN_VARLEN_FLAG, True)
    x = torch.randn(1, 2, 10, 4)
    cu = torch.tensor([0, 4, 10])
    speed.varlen_attention_forward(module, x, x, x, None, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    speed.varlen_attention_forward(torch.nn.Module(), x, x, x, None, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert seen == [True, False]


def test_cpp_wrapper_all_takes_the_vision_blocks_and_their_attention(monkeypatch):
    model = _model("qwen2_vl")
    assert speed.enable_vision_varlen_attention(model)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    flagged = lambda: sorted({getattr(m, speed.ATEN_VARLEN_FLAG) for m in model.modules()  # noqa: E731
                              if hasattr(m, speed.ATEN_VARLEN_FLAG)})
    assert speed.compile_repeated_blocks(model, cpp_wrapper="all") == 4
    assert all(kw["options"] == {"cpp_wrapper": True} for kw in seen) and flagged() == [True]
    seen.clear()
    assert speed.compile_repeated_blocks(model, cpp_wrapper=True) == 4
    assert sum("options" in kw for kw in seen) == 2 and flagged() == [False]  # decoder layers only
    with pytest.raises(ValueError, match="compile_cpp_wrapper"):
        speed.compile_repeated_blocks(model, cpp_wrapper="vision")


def test_cpp_wrapper_setting_from_the_config():
    import types

    setting = lambda v, device: speed._cpp_wrapper_setting(types.SimpleNamespace(compile_cpp_wrapper=v), device)  # noqa
    assert setting(None, "cuda") is True and setting(None, "cpu") is False
    assert setting("all", "cpu") == "all" and setting("ALL", "cuda") == "all" and setting(False, "cuda") is False
    from mmtune.train import parse_config

    assert parse_config(None, extra={"compile_cpp_wrapper": "all"})[0].compile_cpp_wrapper == "all"


def _varlen_types():
    from mmtune.testing import FIXTURES

    return [t for t in ("glm4v", "qwen2_vl", "qwen2_5_vl", "qwen3_vl") if t in tiny_configs() and t in FIXTURES]


@pytest.mark.parametrize("model_type", _varlen_types())
def test_vision_varlen_attention_keeps_losses_and_grads(model_type, monkeypatch):
    """The tower trains here (gradients flow through the attention), images of different sizes."""
    calls = []

    def counting_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        calls.append(max_q)
        return speed.segment_attention(q, k, v, cu_q, scale)

    monkeypatch.setattr(speed, "_varlen_kernel_for", lambda q, aten=False: counting_kernel)

    def build(lever):
        model = _model(model_type, "full", freeze_vision_tower=False)
        if lever:
            assert speed.enable_vision_varlen_attention(model)
        return model

    batches = [_batch(model_type, seed=s) for s in (0, 1)]
    ref = _train(build(False), batches)
    assert not calls
    _assert_same(ref, _train(build(True), batches))
    assert calls and all(isinstance(m, int) for m in calls)


def test_vision_varlen_attention_declines_towers_it_does_not_fit():
    for model_type in ("llava", "gemma3", "qwen2_audio"):
        if model_type in tiny_configs():
            assert speed.enable_vision_varlen_attention(_model(model_type)) == []


def test_vision_varlen_attention_is_not_saved_with_the_model(tmp_path):
    """A checkpoint saved from a model with the lever on loads anywhere: the registered
    attention name stays out of config.json."""
    model = copy.deepcopy(tiny_model("qwen2_vl"))
    assert speed.enable_vision_varlen_attention(model)
    model.save_pretrained(tmp_path)
    text = open(tmp_path / "config.json").read()
    assert speed.VARLEN_ATTENTION not in text
