"""``MMTrainer``: the HF Trainer with a separate projector learning rate, checkpoints written
atomically, and less host time a step, all through the Trainer's overridable methods:

- ``training_step``: the Trainer's step with a cheap train-mode switch (:class:`TrainModeSwitch`)
  instead of ``model.train()``, which walks the whole module tree every step; on the plain
  one-device / DDP path only (context parallel, FSDP, DeepSpeed and SageMaker take the Trainer's);
- ``_clip_grad_norm``: gradients that all live on one device as plain tensors are clipped by
  :func:`clip_grad_norm_one_device`, without torch's per-parameter ``norm.to(device)``;
- ``floating_point_ops``: the parameter count taken once.

``model.zero_grad()`` has no Trainer seam (the training loop calls it inline): the Trainer's own
runs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any

import torch
from transformers import Trainer

from mmtune.model.composite import get_composite_model, has_prefix
from mmtune.speed.forward import TrainingForward
from mmtune.speed.sync_free import without_precomputed

from .checkpoints import TRAINER_STATE, publish_checkpoint, staging_folder

logger = logging.getLogger(__name__)


class TrainModeSwitch:
    """``model.train(mode)`` over a flat list of its modules taken once: nothing to do when
    every module is already in ``mode`` (what ``Module.train`` would leave), ``Module.train``
    otherwise. Modules added to the model later are not in the list, so this is not for FSDP
    or DeepSpeed, which swap parameters when the Trainer prepares the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modules = list(model.modules())

    def set(self, mode: bool = True) -> torch.nn.Module:
        if all(m.training == mode for m in self.modules):
            return self.model
        return self.model.train(mode)


def clip_grad_norm_one_device(parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that all live on one device as plain
    tensors (one GPU, DDP): the same ``_foreach_norm`` per dtype, stacked and clipped, without
    torch's ``norm.to(device)`` per parameter. Anything else (several devices, DTensor, sparse) goes to
    torch's own function. Returns the total norm, as torch's does."""
    if isinstance(parameters, torch.Tensor):  # torch's function takes a single tensor too
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    if any(type(g) is not torch.Tensor or g.is_sparse or g.device != device for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [n for group in by_dtype.values() for n in torch._foreach_norm(group, norm_type)]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def one_device_clipping(accelerator: Any) -> bool:
    """Whether the Trainer's gradients are plain tensors on one device under ``accelerator``
    (no distribution, or DDP), so :func:`clip_grad_norm_one_device` clips them; FSDP,
    DeepSpeed and XLA keep accelerate's own path."""
    from accelerate.utils import DistributedType

    if accelerator is None:
        return False
    return accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)


def _sagemaker_mp() -> bool:
    try:
        from transformers.utils import is_sagemaker_mp_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_sagemaker_mp_enabled())


class MMTrainer(Trainer):
    """HF Trainer with a separate projector learning rate, and less host time a step (module
    docstring)."""

    def __init__(self, *args: Any, projector_lr: float | None = None, training_forward: TrainingForward | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.training_forward = training_forward
        self._train_switch: TrainModeSwitch | None = None
        self._num_parameters: int | None = None

    # ------------------------------------------------------------------ host time a step
    def _plain_step(self) -> bool:
        """The one-device / DDP step :meth:`training_step` reproduces: no context parallel,
        FSDP, DeepSpeed or SageMaker, and a Trainer with the attributes the step reads."""
        from accelerate.utils import DistributedType

        accelerator = getattr(self, "accelerator", None)
        if accelerator is None or accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
            return False
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False) or _sagemaker_mp():
            return False
        if getattr(getattr(accelerator, "parallelism_config", None), "cp_enabled", False):
            return False
        needed = ("_prepare_context_parallel_inputs", "compute_loss_context_manager", "_prepare_inputs",
                  "current_gradient_accumulation_steps", "model_accepts_loss_kwargs", "compute_loss_func")
        return all(hasattr(self, name) for name in needed)

    def train_mode(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in training mode through its :class:`TrainModeSwitch` (taken on first use)."""
        if self._train_switch is None or self._train_switch.model is not model:
            self._train_switch = TrainModeSwitch(model)
        return self._train_switch.set(True)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The Trainer's ``training_step`` (the same steps, as in transformers 5.17 to 5.25) with
        :meth:`train_mode` for ``model.train()``; anything but the plain path
        (:meth:`_plain_step`) runs the Trainer's own."""
        if not self._plain_step():
            return super().training_step(model, inputs, num_items_in_batch)
        from transformers.training_args import OptimizerNames

        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            self.train_mode(model)
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            del inputs
            steps = self.args.torch_empty_cache_steps
            if steps is not None and self.state.global_step % steps == 0:
                from accelerate.utils.memory import clear_device_cache

                clear_device_cache()
                if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                    torch.mps.clear_graph_cache()
            kwargs = {}
            if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
                kwargs["learning_rate"] = self._get_learning_rate()
            if self.args.n_gpu > 1:
                loss = loss.mean()
            scaled = getattr(self, "loss_is_scaled_for_ga", None)  # 5.25; 5.17 decides as below
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            if not scaled:
                loss = loss / self.current_gradient_accumulation_steps
            self.accelerator.backward(loss, **kwargs)
            return loss.detach()

    # ------------------------------------------------------------------ the training forward
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Training steps go through the :class:`~mmtune.speed.forward.TrainingForward` (the fused
        loss and the sync-free inputs); evaluation, prediction, a label smoother or a
        ``compute_loss_func`` take the Trainer's own path (on the batch without the collator's
        precomputed entries). Around the loss, what the Trainer's ``compute_loss`` does: the model
        gets ``num_items_in_batch`` when it accepts loss kwargs, and the loss is scaled by the
        number of processes under ``average_tokens_across_devices``."""
        forward = self.training_forward
        if (forward is None or not model.training or self.label_smoother is not None
                or getattr(self, "compute_loss_func", None) is not None):
            return super().compute_loss(model, without_precomputed(inputs), return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        accepts = bool(getattr(self, "model_accepts_loss_kwargs", False))
        outputs = forward(model, inputs, num_items_in_batch=num_items_in_batch if accepts else None)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if self.args.average_tokens_across_devices and accepts and num_items_in_batch is not None:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """The Trainer's own, on the batch without the collator's precomputed entries."""
        return super().prediction_step(model, without_precomputed(inputs), prediction_loss_only,
                                       ignore_keys=ignore_keys)

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        """The Trainer's clipping; on one device or DDP through :func:`clip_grad_norm_one_device`
        (after unscaling, as accelerate's ``clip_grad_norm_`` does)."""
        mixed = getattr(self, "_has_mixed_mesh_grads", None)
        if not one_device_clipping(getattr(self, "accelerator", None)) or _sagemaker_mp() or (
                mixed is not None and mixed(model)):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm_one_device(model.parameters(), self.args.max_grad_norm)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's FLOP count, with the parameter count taken once: the Trainer recounts
        every parameter of the model on every step, host time that grows with the model."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._num_parameters is None:
            self._num_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._num_parameters

    def _get_output_dir(self, trial: Any) -> str:
        """The run's folder; while :meth:`_save_checkpoint` writes a checkpoint, its staging folder
        (the Trainer writes ``checkpoint-N`` into the folder this returns)."""
        staging = getattr(self, "_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, written atomically: into ``tmp-checkpoint-N/checkpoint-N``
        (every rank writes its files there), then, once complete (weights, optimizer, scheduler,
        RNG states, ``trainer_state.json``, and what callbacks add through ``write_checkpoint``),
        renamed to ``checkpoint-N`` by the saving process, the older checkpoints rotated out by
        ``save_total_limit`` afterwards. A run killed during a save leaves a ``tmp-checkpoint-N``
        that ``resume_from_checkpoint: true`` skips (it takes the previous checkpoint), never a
        ``checkpoint-N`` that looks complete and is not. A rename, not a copy: the cost is nil.

        transformers 4.36 staged checkpoints the same way and dropped it in 4.38: each rank renamed
        (racing on shared filesystems) and staging names differed between ranks. Here one process
        renames, between barriers, a name every rank derives from the step. A run that pushes to
        the Hub writes in place as the Trainer does: its uploads read the checkpoint folder after
        this returns, and a rename would move it under them."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self.args.push_to_hub:
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial)
        staging = staging_folder(run_dir, self.state.global_step)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()  # no rank writes into the staging folder before it is empty
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's files are in
        if self.args.should_save:
            self._publish_checkpoint(os.path.join(staging, name), os.path.join(run_dir, name), run_dir)
            with contextlib.suppress(OSError):
                os.rmdir(staging)
        self.accelerator.wait_for_everyone()  # on_save callbacks find checkpoint-N

    def _publish_checkpoint(self, staged: str, final: str, run_dir: str) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        if not os.path.isdir(staged):  # the Trainer no longer writes where _get_output_dir says
            raise RuntimeError(f"the Trainer wrote no checkpoint into {staged}: transformers' _save_checkpoint changed; "
                               "mmtune's MMTrainer._save_checkpoint must follow it")
        if self.state.best_model_checkpoint == staged:  # recorded while staging: the name it gets now
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE))
        for callback in self.callback_handler.callbacks:
            write = getattr(callback, "write_checkpoint", None)
            if write is not None:
                write(self.args, self.state, staged)
        publish_checkpoint(staged, final)
        # the Trainer rotated inside the staging folder; the run's folder is rotated here, as it would have been
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return  # their own checkpoint formats
        reload_renamed_weights(model if model is not None else self.model, resume_from_checkpoint)

    def create_optimizer(self) -> Any:
        if self.optimizer is not None or self.projector_lr is None:
            return super().create_optimizer()
        entry = get_composite_model(getattr(self.model.config, "model_type", ""))
        if entry is None:
            return super().create_optimizer()
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups.setdefault((has_prefix(name, [entry.projector_key]), name in decay), []).append(param)
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        param_groups = [
            {"params": params, "weight_decay": self.args.weight_decay if wd else 0.0,
             **({"lr": self.projector_lr} if is_proj else {})}
            for (is_proj, wd), params in groups.items()
        ]
        self.optimizer = cls(param_groups, **kwargs)
        return self.optimizer


def _checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        return sorted({os.path.join(folder, f) for f in json.load(open(index))["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def reload_renamed_weights(model: Any, folder: str) -> int:
    """Load a full checkpoint whose keys ``save_pretrained`` renamed to the hub layout
    (transformers 5.2x: ``visual.*``, ``model.layers.*``), which the Trainer's resume would
    otherwise skip with a 'missing keys' warning, training on from the base weights.
    Returns the number of tensors loaded here (0 when the keys already matched)."""
    from safetensors import safe_open

    files = _checkpoint_files(folder)
    if not files or hasattr(model, "peft_config"):
        return 0
    own = model.state_dict()
    with safe_open(files[0], "pt") as fh:
        if set(fh.keys()) <= set(own):
            return 0  # the Trainer loaded them as they are
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return 0
    by_id = {id(t): name for name, t in own.items()}
    saved_to_own = {saved: by_id[id(t)] for saved, t in revert_weight_conversion(model, dict(own)).items()
                    if id(t) in by_id}
    state = {}
    for path in files:
        with safe_open(path, "pt") as fh:
            for key in fh.keys():
                if key in saved_to_own:
                    state[saved_to_own[key]] = fh.get_tensor(key)
    missing = [k for k in own if k not in state]
    if missing and len(missing) == len(own):
        raise ValueError(f"checkpoint {folder}: none of its weights match the model (e.g. {missing[0]})")
    model.load_state_dict(state, strict=False)
    logger.info("resume: loaded %d renamed tensors from %s", len(state), folder)
    return len(state)
