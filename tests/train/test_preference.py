"""Preference training: losses, rewards and gradients equal TRL's on the same batch; the LoRA
reference by disabling the adapter equals a frozen copy; a pair's media are encoded once; the
fused per-token log-probabilities equal the full logits'; the cached reference; whole runs.

TRL's trainers are built on a tiny text model (they cannot be pointed at our tiny VLM offline:
they tokenise through the processor's own chat template, which the stand-in has none of). Their
loss code then runs on the VLM's per-token log-probabilities, computed from its full logits, fed
through a stand-in model that returns them (the output of TRL's fused head, ``log_probs``):
so the comparison is TRL's loss on the full-logit log-probabilities against ours (fused head,
paired media, adapter-disabled or cached reference), and the gradients reach the VLM's weights
on both sides."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from mmtune.config import parse_config
from mmtune.demo import build_model_dir, make_preference_dataset
from mmtune.train import recipe
from mmtune.train.preference import (SHARED_MEDIA, FusedTokenLogps, PairedMedia, encoder_roots, logps_from_logits,
                                     precompute_reference)
from mmtune.train.sft import preference_forward




@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    pairs, _ = make_preference_dataset(str(root / "data"), n_train=6, n_test=0, size=56)
    rows = json.load(open(pairs))
    kto = [{"messages": r["messages"] + [r["chosen" if i % 3 else "rejected"]], "images": r["images"],
            "kto_tag": bool(i % 3)} for i, r in enumerate(rows)]
    kto_path = root / "data" / "kto.json"
    kto_path.write_text(json.dumps(kto))
    return {"root": root, "pairs": pairs, "kto": str(kto_path), "model": build_model_dir(str(root), hidden=64)}


def _build(ws, tmp_path, **extra):
    cfg = dict(model_name_or_path=ws["model"], dataset=ws["pairs"], finetuning_type="lora", lora_rank=4,
               torch_dtype="fp32", output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1,
               save_strategy="no", use_cpu=True, disable_tqdm=True, plot_loss=False, dataloader_num_workers=0,
               stage="dpo", template="qwen2_vl")
    cfg.update(extra)
    if cfg["finetuning_type"] != "lora":
        cfg.pop("lora_rank")
    model_args, data_args, finetuning_args, mm_args, training_args = parse_config(None, extra=cfg)
    parts = recipe.build(model_args, data_args, finetuning_args, training_args, mm_args=mm_args)
    with torch.no_grad():  # LoRA B starts at 0: the policy must differ from the reference
        for name, param in parts.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return parts, finetuning_args, training_args


def _batch(parts, n=3):
    return parts.collator([parts.train_dataset[i] for i in range(n)])


def _inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", SHARED_MEDIA, "kto_label", "kl")
            and not k.startswith("ref_")}


def _token_logps(model, batch):
    """TRL's per-token log-probabilities (``log_probs`` of its fused head) from the full logits:
    position t scores token t+1 where it is an answer token, 0 elsewhere."""
    logits = model(**_inputs(batch), use_cache=False).logits.float()
    ids = batch["input_ids"]
    mask = (batch["labels"] != -100)[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp * mask


def _fused_out(log_probs):
    zeros = torch.zeros_like(log_probs)
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None)


class _Stub(torch.nn.Module):
    """Stands for the model TRL calls: returns the given per-token log-probabilities, by the
    ``input_ids`` tensor it is called with."""

    def __init__(self, by_ids):
        super().__init__()
        self.by_ids = by_ids

    def forward(self, input_ids=None, **kwargs):
        return _fused_out(self.by_ids[id(input_ids)])


def _grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads(ours, theirs, rel=1e-4):
    assert ours.keys() == theirs.keys() and ours
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, rtol=rel, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tiny_text():
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from mmtune.testing.fixtures import build_bpe_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(["<pad>", "<eos>"]), pad_token="<pad>",
                                  eos_token="<eos>")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return Qwen2ForCausalLM(config), tok


def _dpo_trainer(tiny_text, tmp_path, loss_type, beta):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = tiny_text
    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type], beta=beta, report_to="none",
                     use_cpu=True)
    data = Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]})
    return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                      processing_class=tok)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_rewards_and_gradients_equal_trl(ws, tmp_path, tiny_text, loss):
    parts, fargs, _ = _build(ws, tmp_path, pref_loss=loss, pref_beta=0.3)
    model, batch = parts.model, _batch(parts)
    model.train()
    ours = preference_forward(parts, fargs)(model, batch)
    ours.loss.backward()
    our_grads = _grads(model)

    trainer = _dpo_trainer(tiny_text, tmp_path, loss, 0.3)
    policy = _token_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        reference = _token_logps(model, batch)
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "completion_mask": (batch["labels"] != -100).long()}
    trainer.ref_model = _Stub({id(batch["input_ids"]): reference})
    theirs = trainer._compute_loss(_Stub({id(batch["input_ids"]): policy}), trl_batch, False)
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    _assert_grads(our_grads, _grads(model))
    metrics = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert ours.metrics[key] == pytest.approx(metrics[key][-1], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("loss, smoothing", [("orpo", 0.0), ("simpo", 0.0), ("simpo", 0.2), ("sigmoid", 0.2)])
def test_orpo_simpo_and_smoothed_sigmoid_equal_trl(ws, tmp_path, loss, smoothing):
    """ORPO against TRL's ``ORPOTrainer.odds_ratio_loss`` (plus the chosen tokens' NLL, as its
    ``get_batch_loss_metrics``); SimPO and conservative DPO against ``CPOTrainer.cpo_loss``
    (loss_type simpo on mean log-probabilities; sigmoid on the log-ratios to the reference)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    extra = {"pref_label_smoothing": smoothing} if smoothing else {}
    if loss == "simpo":
        extra["simpo_gamma"] = 0.7
    parts, fargs, _ = _build(ws, tmp_path, pref_loss=loss, pref_beta=0.4, **extra)
    model, batch = parts.model, _batch(parts)
    model.train()
    ours = preference_forward(parts, fargs)(model, batch)
    ours.loss.backward()
    our_grads = _grads(model)

    n = batch["input_ids"].shape[0] // 2
    tokens = _token_logps(model, batch)
    counts = (batch["labels"] != -100)[:, 1:].sum(-1)
    sums = tokens.sum(-1)
    self = SimpleNamespace(beta=0.4, accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0,
                           label_smoothing=smoothing, simpo_gamma=0.7, loss_type="simpo" if loss == "simpo" else "sigmoid")
    if loss == "orpo":
        avg = sums / counts
        losses, chosen_r, rejected_r, _, _ = ORPOTrainer.odds_ratio_loss(self, avg[:n], avg[n:])
        nll = -tokens[:n].sum() / counts[:n].sum()
        theirs = nll - losses.mean()
    elif loss == "simpo":
        avg = sums / counts
        losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(self, avg[:n], avg[n:])
        theirs = losses.mean()
    else:
        with torch.no_grad(), model.disable_adapter():
            ref = _token_logps(model, batch).sum(-1)
        losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(self, sums[:n] - ref[:n], sums[n:] - ref[n:])
        theirs = losses.mean()
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs.float(), rtol=1e-5, atol=1e-6)
    _assert_grads(our_grads, _grads(model))
    torch.testing.assert_close(ours.chosen_rewards, chosen_r.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r.float(), rtol=1e-4, atol=1e-5)


def test_kto_loss_rewards_and_gradients_equal_trl(ws, tmp_path, tiny_text):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    parts, fargs, _ = _build(ws, tmp_path, stage="kto", dataset=ws["kto"], pref_beta=0.2,
                             kto_undesirable_weight=1.5)
    model, batch = parts.model, _batch(parts, n=3)
    assert batch["kto_label"].tolist() == [False, True, True] and "kl" in batch
    model.train()
    ours = preference_forward(parts, fargs)(model, batch)
    ours.loss.backward()
    our_grads = _grads(model)

    text, tok = tiny_text
    trainer = KTOTrainer(model=text, ref_model=copy.deepcopy(text), processing_class=tok,
                         args=KTOConfig(output_dir=str(tmp_path / "kto"), beta=0.2, undesirable_weight=1.5,
                                        report_to="none", use_cpu=True),
                         train_dataset=Dataset.from_dict({"prompt": ["a b", "a"], "completion": [" c", " d"],
                                                          "label": [True, False]}))
    kl = batch["kl"]
    with torch.no_grad():
        kl_policy = _token_logps(model, kl)
        with model.disable_adapter():
            kl_ref, ref = _token_logps(model, kl), _token_logps(model, batch)
    policy = _token_logps(model, batch)
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "completion_mask": (batch["labels"] != -100).long(), "label": batch["kto_label"],
                 "KL_input_ids": kl["input_ids"], "KL_attention_mask": kl["attention_mask"],
                 "KL_completion_mask": (kl["labels"] != -100).long()}
    trainer.ref_model = _Stub({id(kl["input_ids"]): kl_ref, id(batch["input_ids"]): ref})
    theirs = trainer._compute_loss(_Stub({id(kl["input_ids"]): kl_policy, id(batch["input_ids"]): policy}),
                                   trl_batch, False)
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    _assert_grads(our_grads, _grads(model))
    metrics = trainer._metrics["train"]
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours.metrics[key] == pytest.approx(metrics[key][-1], rel=1e-4, abs=1e-5), key


def test_lora_reference_by_disabling_the_adapter_equals_a_frozen_copy(ws, tmp_path):
    parts, fargs, _ = _build(ws, tmp_path)
    model, batch = parts.model, _batch(parts)
    frozen = copy.deepcopy(model).unload().eval()  # the base weights alone, no adapter layers
    assert not hasattr(frozen, "peft_config") and not any("lora" in n for n, _ in frozen.named_parameters())
    for p in frozen.parameters():
        p.requires_grad_(False)
    model.train()
    forward = preference_forward(parts, fargs)
    (ref,) = forward.reference(model, batch, ("ref_chosen_logps", "ref_rejected_logps"), paired=True)
    expected = logps_from_logits(frozen(**_inputs(batch)).logits, batch["labels"]).logps
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    assert not ref.requires_grad
    policy = forward.logps(model, batch).logps
    assert (policy - ref).abs().max() > 1e-3  # the adapter is back on after the reference


def test_a_pairs_media_are_encoded_once_and_the_result_is_unchanged(ws, tmp_path):
    parts, fargs, _ = _build(ws, tmp_path, finetuning_type="full", pref_loss="simpo")  # reference-free
    model, batch = parts.model, _batch(parts)
    forward = preference_forward(parts, fargs)
    assert isinstance(forward.media, PairedMedia) and forward.media.declined is None
    assert [name for name, _ in encoder_roots(model)] == ["model.visual"]
    tower = model.get_submodule("model.visual")
    seen = []
    handle = tower.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
    model.train()
    try:
        assert batch[SHARED_MEDIA] is True
        shared = forward(model, batch)
        shared.loss.backward()
        shared_grads = _grads(model)
        assert seen == [batch["pixel_values"].shape[0] // 2]  # one tower call, on the chosen half's patches
        separate = forward(model, {**batch, SHARED_MEDIA: False})
        separate.loss.backward()
        assert seen[1:] == [batch["pixel_values"].shape[0]]  # without sharing: every row's media
    finally:
        handle.remove()
    torch.testing.assert_close(shared.loss, separate.loss, rtol=1e-5, atol=1e-6)
    _assert_grads(shared_grads, _grads(model), rel=1e-4)


@pytest.mark.parametrize("scale, softcap, bias", [(None, None, False), (0.5, 3.0, True)])
def test_fused_token_logps_equal_the_full_logits(scale, softcap, bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    target = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g, dtype=torch.float64)
    ours = FusedTokenLogps.apply(hidden, weight, b, target, scale, softcap, 8)
    (ours * upstream).sum().backward()
    mine = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    z = torch.nn.functional.linear(hidden, weight, b) * (scale or 1.0)
    z = torch.tanh(z / softcap) * softcap if softcap else z
    expected = torch.log_softmax(z, -1).gather(1, target[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours, expected)
    for got, want in zip(mine, [t.grad for t in (hidden, weight, b) if t is not None]):
        torch.testing.assert_close(got, want)


def test_cached_reference_is_the_initial_models_and_trains(ws, tmp_path):
    parts, fargs, targs = _build(ws, tmp_path, finetuning_type="freeze", freeze_trainable_layers=1)
    assert fargs.reference == "cached"
    forward = preference_forward(parts, fargs)
    cached = precompute_reference(parts.model, parts.train_dataset, parts.collator, forward, batch_size=2)
    batch = parts.collator([cached[i] for i in range(3)])
    parts.model.eval()
    with torch.no_grad():
        logps = logps_from_logits(parts.model(**_inputs(batch)).logits, batch["labels"]).logps
    torch.testing.assert_close(torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]), logps,
                               rtol=1e-5, atol=1e-5)
    parts.model.train()
    result = forward(parts.model, batch)
    assert result.metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference
    result.loss.backward()
    assert any(p.grad is not None for p in parts.model.parameters())


@pytest.mark.parametrize("extra", [
    dict(finetuning_type="lora", pref_loss="sigmoid"),
    dict(finetuning_type="full", pref_loss="ipo", dataloader_num_workers=0),
    dict(finetuning_type="lora", stage="kto"),
])
def test_whole_run_logs_trls_metrics(ws, tmp_path, extra):
    from mmtune.train import run_sft

    data = ws["kto"] if extra.get("stage") == "kto" else ws["pairs"]
    cfg = dict(model_name_or_path=ws["model"], dataset=data, lora_rank=4, torch_dtype="fp32",
               output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
               save_strategy="no", use_cpu=True, disable_tqdm=True, plot_loss=True, dataloader_num_workers=0,
               stage="dpo", template="qwen2_vl", val_size=2, eval_strategy="steps", eval_steps=2)
    cfg.update(extra)
    if cfg["finetuning_type"] != "lora":
        cfg.pop("lora_rank")
    metrics = run_sft(*parse_config(None, extra=cfg))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "trainer_log.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2
    keys = ("kl", "rewards/chosen") if cfg["stage"] == "kto" else ("rewards/chosen", "rewards/rejected",
                                                                    "rewards/margins", "rewards/accuracies")
    for key in keys:  # (a KTO batch without undesirable answers has no rejected rewards, as in TRL)
        assert all(key in r for r in train), key
    assert "eval_rewards/chosen" in metrics or any("eval_rewards/chosen" in r for r in rows)
    assert (tmp_path / "run" / "training_loss.png").exists()
