"""MMTrainer's host-time trims change nothing the Trainer reports or computes."""

import torch
from transformers import Trainer, TrainingArguments

from mmtune.train.sft import MMTrainer


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


class _Recorded(torch.Tensor):
    calls: list = []
    pinned = True

    def is_pinned(self, *args, **kwargs):
        return type(self).pinned

    def to(self, *args, **kwargs):
        _Recorded.calls.append((type(self).__name__, args, kwargs))
        return torch.Tensor(self)


class _Pageable(_Recorded):
    pinned = False


def test_pinned_batches_are_copied_without_blocking(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, _Tiny())
    cuda = torch.device("cuda")
    monkeypatch.setattr(type(trainer.args), "device", property(lambda self: cuda))
    batch = {"pinned": torch.Tensor._make_subclass(_Recorded, torch.zeros(2)),
             "pageable": torch.Tensor._make_subclass(_Pageable, torch.zeros(2)), "n": 3}
    out = trainer._prepare_input(batch)
    assert out["n"] == 3
    assert sorted(_Recorded.calls) == [("_Pageable", (), {"device": cuda}), ("_Recorded", (cuda,), {"non_blocking": True})]


def test_trimmed_train_and_zero_grad_do_what_the_originals_do(tmp_path):
    import copy

    from mmtune.train.sft import trim_module_walks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    ref = copy.deepcopy(net)
    trim_module_walks(net)
    for mode_calls in (["eval"], ["train"], ["train", "train"], ["eval", "eval", "train"]):
        for call in mode_calls:
            getattr(net, call)()
            getattr(ref, call)()
            assert [m.training for m in net.modules()] == [m.training for m in ref.modules()]
    net[2][0].eval()  # a submodule switched on its own is switched back, as the original does
    assert net.train() is net and all(m.training for m in net.modules())
    x = torch.randn(5, 3)
    for set_to_none in (True, False):
        net.eval()
        net(x).sum().backward()
        net.zero_grad(set_to_none=set_to_none)
        grads = [p.grad for p in net.parameters()]
        assert all(g is None for g in grads) if set_to_none else all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # an MMTrainer gives its model the trimmed versions
    trainer = _trainer(tmp_path, _Tiny())
    assert "train" in vars(trainer.model) and "zero_grad" in vars(trainer.model)
