"""Shared builders for the tests: tiny random models of every registered family, a labelled
two-image batch, a few SGD steps, and the comparison of two runs' losses and gradients. Test
modules import these from here, never from one another."""

import copy
import functools
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from mmtune.config import FinetuningArguments, ModelArguments
from mmtune.model.adapters import init_adapter
from mmtune.testing import FIXTURES

IGNORE = -100


def _configs_by_type():
    out = {}
    for fixture in FIXTURES.values():
        builders = [fixture.tiny_config] + [v for k, v in fixture.extra.items() if k.endswith("_config")]
        for build in builders:
            if build is None:
                continue
            config = build()
            out.setdefault(config.model_type, config)
    return out


@functools.cache
def tiny_configs():
    return _configs_by_type()


@functools.cache
def tiny_model(model_type):
    from mmtune.compat import apply_mends
    from mmtune.model.loader import model_class_for

    config = tiny_configs()[model_type]
    torch.manual_seed(0)
    cls = model_class_for(config)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    apply_mends(model_type, model)  # built without the loader: the mends this transformers needs, as it applies them
    return model


def make_batch(model_type, seed=0, answer_lens=(3, 7)):
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


def make_model(model_type, method="lora", **flags):
    base = copy.deepcopy(tiny_model(model_type))
    torch.manual_seed(0)
    args = FinetuningArguments(finetuning_type=method, lora_rank=4, **flags)
    model = init_adapter(base, ModelArguments(), args)
    with torch.no_grad():  # LoRA B starts at 0: make every adapter matter from step 1
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def train_steps(model, batches, forward=None, steps=3, lr=0.5):
    """Losses of ``steps`` SGD steps (through ``forward``, a training forward, when given, else
    the model's own loss), and the gradients of the first step."""
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=lr)
    losses, first = [], None
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = (forward(model, batch) if forward is not None else model(**batch)).loss
        loss.backward()
        if first is None:
            first = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, first


def switches(fused=True, sync_free_forward=True, device_type="cpu"):
    """The ``cfg`` the fused-loss and sync-free levers read."""
    return SimpleNamespace(fused_cross_entropy=fused, sync_free_forward=sync_free_forward, device_type=device_type)


def apply_forward_levers(model, fused=True, sync=True):
    """Apply the fused loss, then (when ``sync``) the sync-free forward, as loading does;
    returns their results by key."""
    from mmtune.speed import fused_loss, sync_free

    cfg = switches(fused, sync)
    results = {}
    if fused:
        results["fused_cross_entropy"] = fused_loss.apply(model, cfg, results)
    if sync:
        results["sync_free_forward"] = sync_free.apply(model, cfg, results)
    return results


def fused_forward(model):
    """The training forward of the fused loss on ``model`` (asserting the lever applied)."""
    from mmtune.speed import fused_loss
    from mmtune.speed.forward import TrainingForward
    from mmtune.speed.result import Applied

    result = fused_loss.apply(model, switches(sync_free_forward=False), {})
    assert isinstance(result, Applied), result
    return TrainingForward(fused=result.state)


def fast_forward(model):
    """The training forward of both levers and the collator's precompute (asserting both applied)."""
    from mmtune.speed.forward import TrainingForward
    from mmtune.speed.result import Applied

    results = apply_forward_levers(model)
    assert all(isinstance(r, Applied) for r in results.values()), results
    forward = TrainingForward.from_levers(results)
    assert forward.precompute is results["sync_free_forward"].state.precompute
    return forward, forward.precompute


def unwrap(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def with_positions(model, batch):
    """``batch`` with the M-RoPE positions the collator builds (the model's own rope index on
    the CPU), which let the training forward merge the media itself."""
    import inspect

    from mmtune.speed.sync_free import _merge_owner

    rope = _merge_owner(unwrap(model)).get_rope_index
    params = inspect.signature(rope).parameters
    with torch.no_grad():
        position_ids, _ = rope(**{k: v for k, v in batch.items() if k in params})
    return {**batch, "position_ids": position_ids}


def assert_same(ref, new, rel=1e-5, atol=1e-6):
    (ref_losses, ref_grads), (losses, grads) = ref, new
    assert losses == pytest.approx(ref_losses, rel=rel, abs=atol)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=atol), (name, (grads[name] - g).abs().max())


class FakeLigerRMSNorm(torch.nn.Module):
    """Stands in for liger's ``LigerRMSNorm`` (its constructor's keywords, its computation in
    PyTorch), so the replacement is tested without liger-kernel."""

    built = []

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="llama", init_fn="ones", in_place=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon, self.offset, self.casting_mode = eps, offset, casting_mode
        FakeLigerRMSNorm.built.append(casting_mode)

    def forward(self, hidden):
        dtype = hidden.dtype
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.casting_mode == "gemma":
            return (x * (self.offset + self.weight.float())).to(dtype)
        return (self.offset + self.weight) * x.to(dtype)


class FakeLigerSwiGLUMLP(torch.nn.Module):
    """Stands in for liger's ``LigerSwiGLUMLP``."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = torch.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def install_fake_liger(monkeypatch):
    """liger-kernel's module classes: the stand-ins above, for one test (monkeypatch undoes it)."""
    package = types.ModuleType("liger_kernel")
    module = types.ModuleType("liger_kernel.transformers")
    module.LigerRMSNorm, module.LigerSwiGLUMLP = FakeLigerRMSNorm, FakeLigerSwiGLUMLP
    package.transformers = module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    FakeLigerRMSNorm.built.clear()
    return module


#: a system prompt and two user/assistant turns (the template tests render it)
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Colour?"},
    {"role": "assistant", "content": "Red"},
]


def force_token_model(model_dir, out_dir, token_id):
    """A copy of the saved model at ``model_dir`` whose language model emits ``token_id`` at
    every step, whatever the input: the attention and MLP outputs are zeroed (the last hidden
    state is the last token's embedding), the final norm keeps only dimension 0, every
    embedding's dimension 0 is positive, and only ``token_id``'s output row reads it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    language = model.model.language_model
    with torch.no_grad():
        for name, param in language.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        language.norm.weight.zero_()
        language.norm.weight[0] = 1.0
        language.embed_tokens.weight[:, 0] = 1.0
        head = model.get_output_embeddings().weight
        assert head.data_ptr() != language.embed_tokens.weight.data_ptr(), "tied embeddings: not supported here"
        head.zero_()
        head[token_id, 0] = 1.0
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
    return str(out_dir)
