"""``mmtune train CONFIG`` in a subprocess, with one test hook, for the fault tests that need a real
process to kill or to signal (tests/faults/test_checkpoints.py, test_interrupt.py).

    python tests/faults/train_driver.py CONFIG.yaml HOOK STEP READY_FILE

HOOK says where the run stops to let the test act, deterministically; it writes READY_FILE when
it is there, then waits:

- ``block_in_save``: inside the Trainer's save of checkpoint-STEP, after the weights, optimizer,
  scheduler and RNG states are written and before ``trainer_state.json`` (the test SIGKILLs the
  process there); the file holds the folder being written.
- ``handshake``: at the end of step STEP, until READY_FILE + ".sent" exists (the test signals the
  process group, then creates it): the signal has then been handled before the step goes on. Under
  torchrun, rank 0 waits (the others wait for it in the next collective).
- ``raise_at_step``: a RuntimeError at the end of step STEP (READY_FILE unused): training that
  fails with dataloader workers alive.
- ``block_in_load`` / ``block_in_tokenise``: in place of model loading / tokenising, before
  training (the test sends Ctrl-C there).

The exit status is the CLI's.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

from transformers import TrainerCallback

import mmtune.train
import mmtune.train.recipe as recipe
import mmtune.train.sft as sft
from mmtune.cli import main

WAIT_S = 120


def _ready(path: str, text: str = "") -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def _block(ready: str, text: str = "") -> None:
    _ready(ready, text)
    time.sleep(WAIT_S)
    raise SystemExit(f"train_driver: nobody acted within {WAIT_S} s")


class Handshake(TrainerCallback):
    def __init__(self, step: int, ready: str) -> None:
        self.step, self.ready = step, ready

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.step or args.process_index != 0:  # several ranks: rank 0 waits
            return
        _ready(self.ready)
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(self.ready + ".sent"):
            if time.monotonic() > deadline:
                raise SystemExit(f"train_driver: no signal within {WAIT_S} s")
            time.sleep(0.01)


def install(hook: str, step: int, ready: str) -> None:
    if hook == "block_in_save":
        class BlockingTrainer(sft.MMTrainer):
            def _save_rng_state(self, output_dir: str) -> None:
                super()._save_rng_state(output_dir)
                if self.state.global_step == step:
                    _block(ready, output_dir)

        sft.MMTrainer = BlockingTrainer
    elif hook == "handshake":
        mmtune.train.run_sft = functools.partial(sft.run_sft, callbacks=[Handshake(step, ready)])
    elif hook == "raise_at_step":
        class Raise(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == step:
                    raise RuntimeError(f"train_driver: raised at step {step}")

        mmtune.train.run_sft = functools.partial(sft.run_sft, callbacks=[Raise()])
    elif hook == "block_in_load":
        recipe.load_model = lambda *a, **kw: _block(ready)
    elif hook == "block_in_tokenise":
        recipe.build_dataset = lambda *a, **kw: _block(ready)
    else:
        raise SystemExit(f"train_driver: unknown hook {hook!r}")


if __name__ == "__main__":
    config, hook, step, ready = sys.argv[1:5]
    install(hook, int(step), ready)
    sys.exit(main(["train", config]))
