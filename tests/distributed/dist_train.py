"""One rank of a distributed test: train (and resume) through ``run_sft``.

Launched by tests/distributed/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/dist_train.py SPEC.json

SPEC.json holds ``{"runs": [{"config": {...}, "env": {...}, "lift_cpu_fsdp_gate": false}, ...]}``. Each
config is the flat dict ``parse_config`` takes; ``env`` is set for that run only (the variables
``accelerate launch --config_file X`` exports); the runs go one after the other in this process (train,
resume from its checkpoint, ...), so torch and transformers import once per rank.

Each rank writes ``probe_rank{R}.jsonl`` into the run's output_dir: one line per training forward with
what its batch held, whether the parameters are sharded, and how often the vision tower ran, so the test
can check that rank 0 saw real images, rank 1 only text (plus the collator's masked dummy image), and that
the tower ran on both.

``lift_cpu_fsdp_gate``: accelerate 1.15 turns FSDP on only for accelerator ranks (MULTI_GPU, MULTI_XPU,
...); on CPU ranks (MULTI_CPU) it drops the plugin and trains DDP. With the flag, the run sets what that
branch sets (``distributed_type = FSDP`` in AcceleratorState and PartialState, and ``fsdp_plugin``);
everything after it (accelerate's fsdp2_prepare_model, torch's fully_shard over gloo, DCP checkpoints)
runs unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

T0 = time.perf_counter()

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, TrainerCallback

from mmtune.config import parse_config
from mmtune.train import run_sft

IMAGE_TOKEN = "<|image_pad|>"


def _tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower (``...visual``), through peft / FSDP wrappers."""
    for name, module in model.named_modules():
        if name == "visual" or name.endswith(".visual"):
            return module
    raise LookupError("no vision tower in model")


class Probe(TrainerCallback):
    """Per-rank record of every training forward: real image tokens attended, dummy image present,
    vision tower calls. Hooks go on at train begin (the model the Trainer really runs)."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self.tower_calls = 0
        self.handles: list[Any] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.path = os.path.join(args.output_dir, f"probe_rank{args.process_index}.jsonl")
        os.makedirs(args.output_dir, exist_ok=True)
        open(self.path, "w").close()
        self.distributed_type = str(AcceleratorState().distributed_type.value)
        self.handles.append(_tower(model).register_forward_hook(self._on_tower))
        self.handles.append(model.register_forward_pre_hook(self._on_model, with_kwargs=True))

    def _on_tower(self, module: Any, inputs: Any, output: Any) -> None:
        self.tower_calls += 1

    def _on_model(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        image = ids == self.image_token_id
        row = {"rows": int(ids.shape[0]), "attended_image_tokens": int((image & (mask == 1)).sum()),
               "masked_image_tokens": int((image & (mask == 0)).sum()),
               # the fused loss's training forward calls the model without labels (it computes the loss itself)
               "labelled_tokens": int((kwargs["labels"] != -100).sum()) if kwargs.get("labels") is not None else None,
               "has_pixel_values": "pixel_values" in kwargs, "tower_calls_before": self.tower_calls,
               "sharded": any(isinstance(p, DTensor) for p in module.parameters()),
               "model_class": type(module).__name__, "distributed_type": self.distributed_type}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"tower_calls_total": self.tower_calls}) + "\n")
        for handle in self.handles:
            handle.remove()


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.load(open(spec_path))
    for run in spec["runs"]:
        config = run["config"]
        saved_env = dict(os.environ)
        os.environ.update(run.get("env", {}))  # e.g. what `accelerate launch --config_file X` exports
        parsed = parse_config(None, extra=config)
        image_token_id = AutoTokenizer.from_pretrained(config["model_name_or_path"]).convert_tokens_to_ids(IMAGE_TOKEN)
        undo = _lift_cpu_fsdp_gate() if run.get("lift_cpu_fsdp_gate") else None
        start = time.perf_counter()
        try:
            run_sft(*parsed, callbacks=[Probe(image_token_id)])
        finally:
            if undo:
                undo()
            os.environ.clear()
            os.environ.update(saved_env)
        print(f"[dist_train] {os.path.basename(config['output_dir'])}: {time.perf_counter() - start:.1f} s "
              f"(process up {time.perf_counter() - T0:.1f} s)", file=sys.stderr, flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        _reset_accelerate()


def _lift_cpu_fsdp_gate() -> Any:
    """Make AcceleratorState keep an FSDP plugin on CPU ranks (see the module docstring); returns the undo."""
    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what accelerate's own branch does for GPU ranks (state.py: distributed_type, fsdp_plugin,
            # and the copy into PartialState that every later AcceleratorState() reads back)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init

    def undo() -> None:
        AcceleratorState.__init__ = original
        if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU

    return undo


def _reset_accelerate() -> None:
    """Let the next run in this process build a fresh Accelerator (FSDP plugin state is a singleton);
    the process group stays."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


if __name__ == "__main__":
    main(sys.argv[1])
