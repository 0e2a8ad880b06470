"""CUDA graphs of frozen blocks (mmtune.speed.block_graphs): the buffer and signature logic, run on the
CPU through a backend whose "graph" re-runs the captured function on the static buffers, as a
replay re-runs the recorded kernels on them. The CUDA backend itself needs a GPU: see
benchmarks/README.md for the device check (same tower outputs, same losses)."""

import pytest
import torch

from mmtune.config import ModelArguments
from mmtune.model.layers import unwrap_model
from mmtune.speed import block_graphs, tower_no_grad
from mmtune.speed.block_graphs import BlockGraphs, GraphedBlock, GraphShare, graphed, signature
from mmtune.speed.config import resolve_speed_config
from mmtune.speed.levers import apply_levers

from ..helpers import assert_same as _assert_same
from ..helpers import make_batch as _batch
from ..helpers import make_model as _model
from ..helpers import train_steps as _train


class _Replay:
    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run()


class FakeGraphs:
    """The CUDA backend's contract on the CPU: ``capture(run)`` records ``run``, ``replay()``
    runs it again (on the same static buffers, as a CUDA graph's kernels would)."""

    device_type = "cpu"

    def __init__(self):
        self.warm_ups = 0

    def ready(self):
        return True

    def warm_up(self, run):
        self.warm_ups += 1
        return run()

    def capture(self, run):
        run()  # a capture records without computing; running here must not matter either
        return _Replay(run)


class _Block(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.drop = torch.nn.Dropout(dropout)
        self.calls = 0

    def forward(self, x, cu_seqlens=None, max_seqlen=None, position_embeddings=None):
        self.calls += 1
        cos, sin = position_embeddings
        return self.drop(self.lin(x) * cos + sin + (max_seqlen or 0) + cu_seqlens.sum())


def _args(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=g),), {
        "cu_seqlens": torch.tensor([0, n], dtype=torch.int32), "max_seqlen": n,
        "position_embeddings": (torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g))}


def _graphed(*blocks, share=None, **share_kw):
    """The share and the graphed replacements of ``blocks`` (what a model's lists then hold)."""
    share = share or GraphShare(backend=FakeGraphs(), **share_kw)
    return (share, *[graphed(block, share) for block in blocks])


@torch.no_grad()
def test_a_signature_is_captured_on_its_second_call_and_replayed_after():
    torch.manual_seed(0)
    share, block = _graphed(_Block())
    args, kwargs = _args()
    expected = block.forward(*args, **kwargs)
    outs = [block(*args, **kwargs) for _ in range(4)]
    for out in outs:
        assert torch.equal(out, expected)
    wrapper = block.block_graphs
    assert isinstance(wrapper, BlockGraphs) and share.captures == 1 and share.replays == 3
    (graph,) = wrapper.graphs.values()
    assert graph.replays == 3  # call 2 right after its capture, then calls 3 and 4
    # results are copies: a later replay does not change what an earlier call returned
    outs[1].add_(1.0)
    assert torch.equal(block(*args, **kwargs), expected)


@torch.no_grad()
def test_new_inputs_of_one_signature_are_copied_in():
    torch.manual_seed(0)
    _, block = _graphed(_Block())
    for seed in range(4):  # same shapes, new values every call (the rotary tables too)
        args, kwargs = _args(seed=seed)
        assert torch.equal(block(*args, **kwargs), block.forward(*args, **kwargs))
    args, kwargs = _args(seed=9)
    block(*args, **kwargs)
    kwargs["position_embeddings"][0].mul_(2.0)  # the same tensor object, changed in place
    assert torch.equal(block(*args, **kwargs), block.forward(*args, **kwargs))


@torch.no_grad()
def test_blocks_share_buffers_and_skip_unchanged_inputs():
    torch.manual_seed(0)
    blocks = [_Block(), _Block(), _Block()]
    share, *blocks = _graphed(*blocks)
    copies = []
    original = torch.Tensor.copy_

    def spy(self, src, *a, **kw):
        copies.append(src.shape)
        return original(self, src, *a, **kw)

    for step in range(3):
        args, kwargs = _args(seed=step)
        x_ref, x = args[0], args[0]
        for block in blocks:
            x_ref = block.forward(x_ref, **kwargs)
        torch.Tensor.copy_ = spy
        try:
            for block in blocks:
                x = block(x, **kwargs)
        finally:
            torch.Tensor.copy_ = original
        assert torch.equal(x, x_ref)
    assert len(share.buffers) == 1 and share.captures == 3  # one signature; a graph per block
    # the last forward (all replays): copied in, the hidden state for each block but cos, sin
    # and cu_seqlens once; plus each replay's copy of its result into the shared output
    last = copies[-(3 + 3 + 3):]
    assert sorted(map(tuple, last)) == sorted([(2,)] + [(3, 4)] * (3 + 2 + 3))
    assert len(copies) == 3 + 3 + 3 + (3 + 3 + 3 + 3)  # + the second forward: copies in, captures' copies out


@torch.no_grad()
def test_signatures_follow_shapes_and_values_and_are_capped():
    torch.manual_seed(0)
    share, block = _graphed(_Block(), max_signatures=2)
    for n in (3, 3, 5, 5, 7, 7, 7):  # a third signature is over the cap: it runs as usual
        args, kwargs = _args(n)
        assert torch.equal(block(*args, **kwargs), block.forward(*args, **kwargs))
    assert share.captures == 2 and len(share.buffers) == 2
    from torch.utils._pytree import tree_flatten

    args, kwargs = _args(3)
    other = dict(kwargs, max_seqlen=2)  # a value the kernels were launched with: its own signature
    assert signature(*tree_flatten((args, kwargs)), "cpu") != signature(*tree_flatten((args, other)), "cpu")


def test_calls_that_cannot_be_graphed_run_as_usual():
    torch.manual_seed(0)
    share, block = _graphed(_Block())
    args, kwargs = _args()
    for _ in range(3):  # autograd on: never graphed
        out = block(*args, **kwargs)
        assert out.requires_grad
    assert share.captures == 0
    from torch.utils._pytree import tree_flatten

    with torch.no_grad():
        leaves, spec = tree_flatten((args, kwargs))
        assert signature(leaves, spec, "cuda") is None  # a tensor off the backend's device
        assert signature([*leaves, object()], spec, "cpu") is None  # an argument that is no scalar
        needs_grad = [torch.zeros(2, requires_grad=True)]
        assert signature(needs_grad, spec, "cpu") is None
        assert signature(leaves, spec, "cpu") == signature(*tree_flatten(_args()), "cpu")  # same shapes, same key


def test_autocast_state_is_part_of_the_signature():
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(_args())
    plain = signature(leaves, spec, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert signature(leaves, spec, "cpu") != plain


def test_dropout_while_training_runs_as_usual():
    torch.manual_seed(0)
    share, block = _graphed(_Block(dropout=0.5))
    args, kwargs = _args()
    with torch.no_grad():
        block.train()
        for _ in range(3):
            block(*args, **kwargs)
        assert share.captures == 0
        block.eval()
        for _ in range(3):
            assert torch.equal(block(*args, **kwargs), block.forward(*args, **kwargs))
        assert share.captures == 1


def test_frozen_tower_blocks_graphed_keep_losses_and_grads():
    """The tiny Qwen2-VL trained with its frozen tower's blocks graphed: the losses and
    gradients of the tower run as usual, and every later step replays the blocks."""
    batches = [_batch("qwen2_vl", seed=s) for s in (0, 1)]

    def build(graphs):
        model = _model("qwen2_vl", "full")
        keys = tower_no_grad.run_frozen_towers_without_grad(model).detail
        share = GraphShare(backend=FakeGraphs())
        if graphs:
            assert block_graphs.graph_frozen_blocks(model, keys, share=share) == 2  # the two vision blocks
        return model, share

    ref, _ = build(False)
    model, share = build(True)
    keys_before = list(_model("qwen2_vl", "full").state_dict())
    _assert_same(_train(ref, batches, steps=6), _train(model, batches, steps=6))
    assert list(model.state_dict()) == keys_before  # state-dict keys unchanged
    assert len(share.buffers) == 1  # both batches' images have the same sizes: one signature
    assert share.captures == 2 and share.replays == 2 * 5  # captured at step 2, replayed from then on
    assert all(isinstance(b, GraphedBlock) for b in unwrap_model(model).model.visual.blocks)


def test_graphed_blocks_save_the_same_weights(tmp_path):
    """Module replacement shares the block's parameters: the saved files hold the same keys and
    tensors as the model's without the lever, and load into a plain model."""
    from safetensors.torch import load_file

    plain, model = _model("qwen2_vl", "full"), _model("qwen2_vl", "full")
    keys = tower_no_grad.run_frozen_towers_without_grad(model).detail
    assert block_graphs.graph_frozen_blocks(model, keys, share=GraphShare(backend=FakeGraphs())) == 2
    plain.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "graphed")
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "graphed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_lever_is_on_by_default_with_cuda_for_frozen_towers(monkeypatch):
    seen = []
    monkeypatch.setattr(block_graphs, "graph_frozen_blocks", lambda model, keys: seen.append(keys) or 2)
    levers = dict(compile=False, liger_kernels=False, vision_varlen_attention=False)

    def run(model, args, device_type):
        return apply_levers(model, resolve_speed_config(args, device_type=device_type))

    on = ModelArguments(frozen_block_cuda_graphs=True, **levers)
    applied = run(_model("qwen2_vl", "full"), on, "cuda")
    assert applied["frozen_block_cuda_graphs"].detail == 2
    assert seen == [["model.visual.patch_embed", "model.visual.blocks"]]
    default = ModelArguments(**levers)
    assert default.frozen_block_cuda_graphs is None
    assert run(_model("qwen2_vl", "full"), default, "cuda")["frozen_block_cuda_graphs"].detail == 2
    off = ModelArguments(frozen_block_cuda_graphs=False, **levers)
    assert not run(_model("qwen2_vl", "full"), off, "cuda")["frozen_block_cuda_graphs"]
    assert not run(_model("qwen2_vl", "full"), default, "cpu")["frozen_block_cuda_graphs"]
    # a tower that trains runs with autograd: nothing to graph
    trains = _model("qwen2_vl", "full", freeze_vision_tower=False)
    assert not run(trains, on, "cuda")["frozen_block_cuda_graphs"]
    assert len(seen) == 2


def test_graphing_wraps_the_compiled_call():
    """Block graphs run before regional compile, which compiles the graphed block with
    ``Module.compile()``: a call that is not replayed runs that compiled call; graphing a graphed
    block gives it back (wrapped once); nothing is assigned on the instance but compile's own."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(1)
        return gm.forward

    share, block = _graphed(_Block())
    assert graphed(block, share) is block  # twice: wrapped once
    block.compile(backend=backend)
    with torch.no_grad():
        out = block(*_args()[0], **_args()[1])
    assert compiled == [1] and torch.equal(out, _Block.forward(block, *_args()[0], **_args()[1]))
    assert not isinstance(block.block_graphs.call, BlockGraphs)  # not wrapped twice
    assert {"forward", "__call__", "_call_impl"}.isdisjoint(vars(block))


class _FailingCapture(FakeGraphs):
    def capture(self, run):
        raise RuntimeError("operation not permitted when stream is capturing")


@torch.no_grad()
def test_a_failed_capture_leaves_the_block_running_as_usual(caplog):
    import logging

    torch.manual_seed(0)
    share, block = _graphed(_Block(), share=GraphShare(backend=_FailingCapture()))
    args, kwargs = _args()
    with caplog.at_level(logging.WARNING, logger="mmtune.speed"):
        outs = [block(*args, **kwargs) for _ in range(4)]
    assert all(torch.equal(o, block.forward(*args, **kwargs)) for o in outs)
    assert share.captures == 0 and block.block_graphs.failed
    assert share.buffers == {}  # no graph reads them: not kept, not counted against the cap
    assert caplog.text.count("capturing a _Block failed") == 1  # tried once, then left alone


@torch.no_grad()
def test_failed_captures_of_several_blocks_warn_once(caplog):
    import logging

    share, *blocks = _graphed(*[_Block() for _ in range(3)], share=GraphShare(backend=_FailingCapture()))
    args, kwargs = _args()
    with caplog.at_level(logging.WARNING, logger="mmtune.speed"):
        for _ in range(3):
            for block in blocks:
                block(*args, **kwargs)
    assert share.failed_captures == 3 and all(b.block_graphs.failed for b in blocks)
    assert caplog.text.count("CUDA graphs of frozen blocks: capturing") == 1


class _Other(_Block):
    def forward(self, x, **kwargs):
        return super().forward(x, **kwargs)[:, :2]  # same inputs, another output shape


@torch.no_grad()
def test_blocks_of_different_classes_keep_their_own_buffers():
    torch.manual_seed(0)
    share, a, b = _graphed(_Block(), _Other())
    args, kwargs = _args()
    for _ in range(3):
        assert torch.equal(a(*args, **kwargs), a.forward(*args, **kwargs))
        assert torch.equal(b(*args, **kwargs), b.forward(*args, **kwargs))
    assert len(share.buffers) == 2 and share.captures == 2


# ------------------------------------------------------------------ quantised towers (QLoRA)
class Linear4bit(torch.nn.Linear):
    """A stand-in for bitsandbytes' class of that name (not installed here): found by name."""


@pytest.mark.parametrize("flag", ["hf_quantizer", "is_loaded_in_4bit", "quantization_config", "linear4bit"])
def test_quantised_towers_are_not_graphed(flag, caplog):
    """A model loaded with a quantization_config (flagged as transformers flags one) or a tower
    block holding a bitsandbytes linear: no block is graphed, one info line says why."""
    import logging
    from types import SimpleNamespace

    model = _model("qwen2_vl", "lora")
    keys = tower_no_grad.run_frozen_towers_without_grad(model).detail
    base = unwrap_model(model)
    if flag == "hf_quantizer":
        base.hf_quantizer = SimpleNamespace(quantization_config=None)
    elif flag == "is_loaded_in_4bit":
        base.is_loaded_in_4bit = True
    elif flag == "quantization_config":
        base.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    else:
        mlp = base.model.visual.blocks[1].mlp
        mlp.fc1 = Linear4bit(mlp.fc1.in_features, mlp.fc1.out_features)
    with caplog.at_level(logging.INFO, logger="mmtune.speed"):
        assert block_graphs.graph_frozen_blocks(model, keys, share=GraphShare(backend=FakeGraphs())) == 0
    assert not any(isinstance(b, GraphedBlock) for b in base.model.visual.blocks)
    lines = [r.getMessage() for r in caplog.records if "CUDA graphs" in r.getMessage()]
    assert len(lines) == 1 and "skipped" in lines[0] and "quantised" in lines[0]
    assert ("Linear4bit" in lines[0]) == (flag == "linear4bit")


def test_quantisation_is_none_for_a_plain_model():
    from mmtune.speed.block_graphs import quantisation

    model = _model("qwen2_vl", "lora")
    assert quantisation(model, list(unwrap_model(model).model.visual.blocks)) is None
