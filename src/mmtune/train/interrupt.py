"""Ctrl-C (SIGINT) and SIGTERM during training: save a checkpoint of the step reached, then stop.

A run stopped by a signal keeps its work: :class:`InterruptCallback` turns the first SIGINT or
SIGTERM into a request that the Trainer honours at the end of the step in progress (a checkpoint of
that step, then the end of training), and ``run_sft`` then raises :class:`TrainingInterrupted`
instead of saving the final model, so the folder does not look like a finished run. The CLI prints
its message as one line and exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM),
as a shell reports a process that a signal ended. A second signal acts as it would have before
training (Ctrl-C raises ``KeyboardInterrupt`` at once, SIGTERM ends the process): the way out when
the step itself hangs.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

#: training processes whose children forked while they train block SIGINT and SIGTERM (see _in_child)
_TRAINING_PIDS: set[int] = set()
_FORK_HOOK: list[bool] = []


def _in_child() -> None:
    """``os.register_at_fork`` hook: a process forked by a training process while it trains (a
    dataloader worker) blocks SIGINT and SIGTERM, so a signal sent to the whole process group (a
    terminal's Ctrl-C; torchrun and Slurm send SIGTERM so) leaves it to the training process.
    Otherwise a worker dies of it (torch's worker handler re-raises SIGTERM) and torch's SIGCHLD
    handler aborts the step in flight, before its checkpoint. The worker still ends with the
    training process: its iterator shuts it down, or torch's watchdog sees the parent gone."""
    if os.getppid() in _TRAINING_PIDS:
        signal.pthread_sigmask(signal.SIG_BLOCK, InterruptCallback.SIGNALS)
    _TRAINING_PIDS.clear()


def _end_blocked_workers() -> None:
    """``atexit`` hook, run before ``multiprocessing``'s own (handlers run last registered first):
    kill the daemonic children still alive. ``multiprocessing`` would end them with SIGTERM and
    wait for them, but a dataloader worker forked during training blocks SIGTERM
    (:func:`_in_child`), so a process whose training raised (its workers kept alive by the
    traceback) would wait for ever. These children are ended at exit either way; SIGKILL only
    makes sure that it happens."""
    import multiprocessing

    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:  # all first: torch's SIGCHLD handler may raise on the first one's death
        try:
            child.kill()
        except Exception:  # already gone
            pass
    for child in children:
        try:
            child.join(5)
        except Exception:  # torch's SIGCHLD handler reporting the kill: expected here
            pass


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint of the step it reached.

    A ``KeyboardInterrupt``, so code between the Trainer and the CLI lets it through as it lets
    Ctrl-C through; ``exit_code`` is the status the CLI exits with."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, latest: str | None = None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + int(signum)
        resume = "; resume with resume_from_checkpoint: true"
        if checkpoint is not None:
            text = f"saved {checkpoint}{resume}"
        elif latest is not None:  # not seen from this process (another node's disk), or the save failed
            text = f"no checkpoint of this step here, the newest complete one is {latest}{resume}"
        else:
            text = "no checkpoint saved"
        super().__init__(f"interrupted at step {step}: {text}")


class _RankVote:
    """Makes every rank of a distributed run stop at the same step, so none waits forever in a
    collective (or a checkpoint barrier) that the others left. Under torchrun each rank gets the
    signal itself (the launcher passes it on), but not at the same moment. Each step end, every
    rank puts the signal it has seen (0: none) into one all-reduce (MAX); the result of step ``s`` is
    read at the end of step ``s + 1``, when the device finished step ``s`` long ago, so the vote
    never waits for the step in flight (on CUDA the result comes back to a pinned host buffer
    behind an event). The run stops one step after the signal, on every rank alike."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.event: Any = None
        self.pending = False

    @classmethod
    def for_run(cls, args: Any) -> _RankVote | None:
        """A vote for a run on several processes with a process group; None on one process."""
        import torch.distributed as dist

        if getattr(args, "world_size", 1) <= 1 or not (dist.is_available() and dist.is_initialized()):
            return None
        return cls(args.device)

    def __call__(self, signum: int) -> int:
        """This step's signal number in (0: none); the previous step's vote out: the highest
        signal number any rank had seen by then (0: train on)."""
        import torch.distributed as dist

        if self.pending:
            if self.event is not None:
                self.event.synchronize()
            decided = int(self.host.item())
            if decided:
                self.pending = False
                return decided
        self.flag.fill_(int(signum))
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        if self.device.type == "cuda":
            self.host.copy_(self.flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host.copy_(self.flag)  # gloo on the CPU: the reduce has returned with its result
        self.pending = True
        return 0


class InterruptCallback(TrainerCallback):
    """Installs SIGINT and SIGTERM handlers for the length of training (from ``on_train_begin`` to
    ``on_train_end``, the previous handlers then back); the first signal sets a flag, and the end
    of the step in progress asks the Trainer for a checkpoint (``control.should_save``) and the
    end of training (``control.should_training_stop``). ``stopped_at`` is then that step.

    Every training process of the run installs them (each rank of a distributed run: see
    :class:`_RankVote`); the processes it forks while training (dataloader workers) block both
    signals (:func:`_in_child`), and ignore them should they inherit the handler unblocked.
    Workers started another way (``spawn``) keep their own behaviour. Handlers can only be
    installed from the main thread: training run from another thread keeps the signals' previous
    behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid: int | None = None
        self._vote: _RankVote | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.received = self.stopped_at = None
        if threading.current_thread() is not threading.main_thread():
            logger.info("training runs outside the main thread: Ctrl-C / SIGTERM save no checkpoint")
            return
        self._pid = os.getpid()
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_in_child)
            import multiprocessing.util  # registers its exit function first: ours then runs before it

            atexit.register(_end_blocked_workers)
            _FORK_HOOK.append(True)
        _TRAINING_PIDS.add(self._pid)
        self._vote = _RankVote.for_run(args)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked worker: the training process ends the run, and its workers with it
        if self.received is None:
            self.received = signum
        self.restore()  # a second signal acts as before training: Ctrl-C raises, SIGTERM ends the process

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is not None:
            return
        seen = int(self.received or 0)
        signum = self._vote(seen) if self._vote is not None else seen
        if not signum:
            return
        self.stopped_at = state.global_step
        self.received = signum  # on a rank that got no signal itself: the one another rank got
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # the user asked to stop; an eval here could also veto the save (save_strategy: best)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is not None:  # the checkpoint of this step is written; no epoch-end eval or save
            control.should_save = False
            control.should_evaluate = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()
        self._vote = None

    def restore(self) -> None:
        """Put the handlers found at ``on_train_begin`` back (where ours are still installed)."""
        if threading.current_thread() is not threading.main_thread():
            return
        _TRAINING_PIDS.discard(os.getpid())
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def interruption(self, output_dir: str) -> TrainingInterrupted | None:
        """The exception ``run_sft`` raises after a run this callback stopped; None otherwise."""
        if self.stopped_at is None or self.received is None:
            return None
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from .checkpoints import checkpoint_problem, latest_complete_checkpoint

        checkpoint = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_at}")
        if checkpoint_problem(checkpoint) is None:
            return TrainingInterrupted(self.received, self.stopped_at, checkpoint)
        return TrainingInterrupted(self.received, self.stopped_at, None, latest_complete_checkpoint(output_dir))
