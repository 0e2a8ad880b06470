"""MMTrainer's host-time trims change nothing the Trainer reports or computes."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from mmtune.train.trainer import MMTrainer


class _Tiny(torch.nn.Module):
    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 3)
        self.counted = 0

    def num_parameters(self, exclude_embeddings=False):
        self.counted += 1
        return sum(p.numel() for n, p in self.named_parameters() if not (exclude_embeddings and n.startswith("embed")))

    def forward(self, input_ids, labels=None):
        return {"loss": self.proj(self.embed(input_ids)).sum()}


def _trainer(tmp_path, model):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return MMTrainer(model=model, args=args)


def test_floating_point_ops_equal_the_trainers_and_count_parameters_once(tmp_path):
    model = _Tiny()
    trainer = _trainer(tmp_path, model)
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert expected == 6 * 10 * 15 and model.counted == 1
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [expected] * 3
    assert model.counted == 2  # once for the Trainer's own call above, once for all of ours
    assert trainer.floating_point_ops({"pixel_values": torch.zeros(1)}) == 0


@pytest.mark.parametrize("given, expected", [
    ({}, True),  # the default: pinned batches, copied without blocking
    ({"accelerator_config": {"non_blocking": False}}, False),  # the user's word stands
    ({"accelerator_config": {"split_batches": False}}, True),
    ({"dataloader_pin_memory": False}, False),  # pageable batches: a copy blocks whatever it is told
])
def test_batches_go_to_the_device_without_blocking_by_default(tmp_path, monkeypatch, given, expected):
    """What parse_config sets when training on CUDA (reported available here) reaches accelerate."""
    from torch.utils.data import DataLoader

    from mmtune.config import parsing as args_module
    from mmtune.config import parse_config

    monkeypatch.setattr(args_module, "_cuda_available", lambda: True)
    monkeypatch.setattr(args_module, "_any_accelerator", lambda: True)
    *_, args = parse_config(None, extra={"output_dir": str(tmp_path), **given})
    trainer = MMTrainer(model=_Tiny(), args=args)
    assert trainer.accelerator.dataloader_config.non_blocking is expected
    loader = trainer.accelerator.prepare(DataLoader([{"input_ids": torch.zeros(3, dtype=torch.long)}] * 2))
    assert loader._non_blocking is expected  # what accelerate's DataLoaderShard hands to send_to_device
    assert next(iter(loader))["input_ids"].shape == (1, 3)


def test_trimmed_train_and_zero_grad_do_what_the_originals_do(tmp_path):
    import copy

    from mmtune.train.trainer import TrainModeSwitch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    ref = copy.deepcopy(net)
    switch = TrainModeSwitch(net)
    for mode_calls in (["eval"], ["train"], ["train", "train"], ["eval", "eval", "train"]):
        for call in mode_calls:
            switch.set(call == "train")
            getattr(ref, call)()
            assert [m.training for m in net.modules()] == [m.training for m in ref.modules()]
    net[2][0].eval()  # a submodule switched on its own is switched back, as the original does
    assert switch.set(True) is net and all(m.training for m in net.modules())
    x = torch.randn(5, 3)
    for set_to_none in (True, False):  # zero_grad has no Trainer seam: torch's own runs, untouched
        net.eval()
        net(x).sum().backward()
        net.zero_grad(set_to_none=set_to_none)
        grads = [p.grad for p in net.parameters()]
        assert all(g is None for g in grads) if set_to_none else all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # an MMTrainer switches its model through the switch in its training_step, assigning nothing on it
    trainer = _trainer(tmp_path, _Tiny())
    trainer.model.eval()
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before a step
    trainer.training_step(trainer.model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    assert all(m.training for m in trainer.model.modules()) and trainer._train_switch.model is trainer.model
    assert "train" not in vars(trainer.model) and "zero_grad" not in vars(trainer.model)


def test_training_step_equals_the_trainers(tmp_path, monkeypatch):
    """MMTrainer.training_step (the plain path) returns the Trainer's loss and leaves the
    Trainer's gradients, with and without num_items_in_batch; other paths take the Trainer's own."""
    from transformers import Trainer

    inputs = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}
    results = []
    for step in (Trainer.training_step, MMTrainer.training_step):
        for items in (None, torch.tensor(4)):
            torch.manual_seed(0)
            trainer = _trainer(tmp_path, _Tiny())
            trainer.create_optimizer_and_scheduler(num_training_steps=1)
            trainer.current_gradient_accumulation_steps = 2  # what the training loop sets before a step
            loss = step(trainer, trainer.model, dict(inputs), items)
            results.append((loss, [p.grad.clone() for p in trainer.model.parameters()]))
    assert trainer._train_switch is not None  # the last step ran MMTrainer's own path, not the fallback
    half = len(results) // 2
    for (a, ga), (b, gb) in zip(results[:half], results[half:]):
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    trainer = _trainer(tmp_path, _Tiny())
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    called = []
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **k: called.append(1) or torch.zeros(()))
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True, raising=False)
    trainer.training_step(trainer.model, dict(inputs))
    assert called == [1]


# ------------------------------------------------------------------ clipping on one device
def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in
              [((7, 5), torch.float32), ((3,), torch.bfloat16), ((4, 4), torch.float32), ((9,), torch.bfloat16)]]
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped by both
    for p in params[:-1]:
        p.grad = (torch.randn(p.shape, generator=g) * 3).to(p.dtype)
    return params


def test_one_device_clipping_equals_torchs_bit_for_bit():
    from mmtune.train.trainer import clip_grad_norm_one_device

    for norm_type in (2.0, 1.0, float("inf")):
        for max_norm in (0.5, 1e6):  # clipping, and a no-op clip
            ref, new = _grads(0), _grads(0)
            ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
            new_norm = clip_grad_norm_one_device(iter(new), max_norm, norm_type)  # a generator, as the Trainer gives
            assert torch.equal(ref_norm, new_norm), (norm_type, max_norm)
            for a, b in zip(ref, new):
                assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    assert float(clip_grad_norm_one_device([torch.nn.Parameter(torch.zeros(2))], 1.0)) == 0.0
    ref, new = _grads(3)[0], _grads(3)[0]  # one tensor, as torch's function also takes
    assert torch.equal(torch.nn.utils.clip_grad_norm_(ref, 0.5), clip_grad_norm_one_device(new, 0.5))
    assert torch.equal(ref.grad, new.grad)


def test_one_device_clipping_hands_other_layouts_to_torch(monkeypatch):
    from mmtune.train import trainer as trainer_module

    params = _grads(1)
    params[0].grad = params[0].grad.to_sparse()
    seen = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, norm_type=2.0: seen.append(len(p)) or 7)
    assert trainer_module.clip_grad_norm_one_device(params, 1.0) == 7 and seen == [4]


def test_trainer_clips_through_the_one_device_path_with_the_same_result(tmp_path, monkeypatch):
    from mmtune.train import trainer as trainer_module

    trainer = _trainer(tmp_path, _Tiny())
    assert "clip_grad_norm_" not in vars(trainer.accelerator)  # accelerate's own, untouched
    assert trainer_module.one_device_clipping(trainer.accelerator)
    used = []
    real = trainer_module.clip_grad_norm_one_device
    monkeypatch.setattr(trainer_module, "clip_grad_norm_one_device", lambda *a: used.append(1) or real(*a))
    ref, new = _grads(2), _grads(2)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    trainer.args.max_grad_norm = 1.0
    assert torch.equal(trainer._clip_grad_norm(torch.nn.ParameterList(new)), expected) and used == [1]
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ref[:-1], new[:-1]))


def test_fsdp_and_deepspeed_keep_accelerates_clipping():
    from accelerate.utils import DistributedType

    from mmtune.train.trainer import one_device_clipping

    class _Acc:
        def __init__(self, kind):
            self.distributed_type = kind

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
        acc = _Acc(kind)
        assert not one_device_clipping(acc) and "clip_grad_norm_" not in vars(acc)
    assert one_device_clipping(_Acc(DistributedType.MULTI_GPU))


def test_host_threads_default_to_one_on_cuda_with_workers_only():
    from mmtune.train.sft import set_host_threads

    before = torch.get_num_threads()
    try:
        assert set_host_threads(None, "cpu", 4) is None and torch.get_num_threads() == before
        assert set_host_threads(None, "cuda", 0) is None and torch.get_num_threads() == before  # batches built here
        assert set_host_threads(None, "cuda", 4) == 1 and torch.get_num_threads() == 1
        assert set_host_threads(2, "cpu", 0) == 2 and torch.get_num_threads() == 2  # asked for: set anywhere
        with pytest.raises(ValueError, match="host_threads"):
            set_host_threads(0, "cuda", 4)
    finally:
        torch.set_num_threads(before)


def test_host_threads_is_a_config_key():
    from mmtune.config import parse_config

    assert parse_config(None, extra={"host_threads": 3})[3].host_threads == 3
    assert parse_config(None)[3].host_threads is None


# ------------------------------------------------------------------ compute_loss and the training forward
class _Recording:
    """A training forward that records its calls and gives a fixed loss."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, inputs, num_items_in_batch=None):
        self.calls.append((sorted(inputs), num_items_in_batch))
        return {"loss": torch.tensor(2.0), "logits": None}


def test_compute_loss_hands_training_steps_to_the_training_forward_and_evaluation_to_the_trainer(tmp_path):
    from mmtune.speed.sync_free import HOST_KEY, PRECOMPUTED_KEY, HostSide

    forward = _Recording()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = MMTrainer(model=_Tiny(), args=args, training_forward=forward)
    model = trainer.model
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long), PRECOMPUTED_KEY: {}, HOST_KEY: HostSide()}
    model.train()
    assert trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(4)).item() == 2.0
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    assert loss.item() == 2.0 and outputs["logits"] is None
    # _Tiny takes no loss kwargs: the Trainer would not hand it num_items_in_batch, nor does the forward
    assert forward.calls == [(sorted(inputs), None)] * 2
    model.eval()
    own = trainer.compute_loss(model, inputs)  # the model's own forward, without the collator's entries
    assert own.item() == model(input_ids=inputs["input_ids"])["loss"].item() and len(forward.calls) == 2
    with torch.no_grad():  # prediction: the Trainer's own step, on the batch without the collator's entries
        loss, _, _ = trainer.prediction_step(model, {**inputs, "labels": torch.zeros(2, 5)}, prediction_loss_only=True)
    assert loss is not None and len(forward.calls) == 2


def test_compute_loss_equals_the_trainers_around_the_loss(tmp_path, monkeypatch):
    """A real model with both levers: the loss of a training step through the training forward
    is the Trainer's own compute_loss, with num_items_in_batch and the scaling by the number of
    processes (average_tokens_across_devices) applied the same way."""
    import copy

    from mmtune.config import FinetuningArguments, ModelArguments
    from mmtune.model.adapters import init_adapter
    from mmtune.model.loader import model_class_for
    from mmtune.speed import fused_loss, sync_free
    from mmtune.speed.forward import TrainingForward
    from mmtune.testing import FIXTURES

    config = FIXTURES["qwen2_vl"].tiny_config()
    torch.manual_seed(0)
    base = model_class_for(config).from_config(config)
    model = init_adapter(copy.deepcopy(base), ModelArguments(), FinetuningArguments(finetuning_type="lora", lora_rank=4))
    plain = copy.deepcopy(model)
    cfg = type("Cfg", (), {"fused_cross_entropy": True, "sync_free_forward": True, "device_type": "cpu"})()
    results = {"fused_cross_entropy": fused_loss.apply(model, cfg, {})}
    results["sync_free_forward"] = sync_free.apply(model, cfg, results)
    forward = TrainingForward.from_levers(results)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             average_tokens_across_devices=True)
    ours = MMTrainer(model=model, args=args, training_forward=forward)
    theirs = MMTrainer(model=plain, args=args)
    assert ours.model_accepts_loss_kwargs and theirs.model_accepts_loss_kwargs
    monkeypatch.setattr(type(ours.accelerator), "num_processes", property(lambda self: 2))
    for m in (ours.model, theirs.model):
        m.train()
    for items in (None, torch.tensor(9)):
        a = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=items)
        b = theirs.compute_loss(theirs.model, dict(batch), num_items_in_batch=items)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert forward.fused.verified and not forward.fused.declined
