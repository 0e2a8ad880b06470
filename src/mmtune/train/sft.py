"""Supervised fine-tuning on HF Trainer: one recipe for every family."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import torch
from transformers import Trainer

from mmtune.data import MultiModalCollator, build_dataset
from mmtune.data.packing import dataset_lengths, maybe_pack
from mmtune.model.composite import get_composite_model, has_prefix
from mmtune.model.folders import check_model_args
from mmtune.model.loader import (check_lora_target_before_loading, load_config, load_model,
                                  load_tokenizer_and_processor, model_class_for)
from mmtune.model.saved import resolve_template
from mmtune.plugins import get_mm_plugin
from mmtune.speed.forward import TrainingForward, collator_precompute
from mmtune.speed.sync_free import without_precomputed
from mmtune.templates import get_template

from .callbacks import JsonlLogCallback, MmtuneConfigCallback, plot_loss
from .checkpoints import TRAINER_STATE, publish_checkpoint, resolve_resume, staging_folder
from .interrupt import InterruptCallback
from .outputs import prepare_output_dir

logger = logging.getLogger(__name__)


def trim_module_walks(model: torch.nn.Module) -> None:
    """The Trainer calls ``model.train()`` and ``model.zero_grad()`` every step; each walks the
    whole module tree (2,665 modules on Qwen2-VL-2B with LoRA: ~10 ms of host time a step
    together). Give ``model`` versions that walk a flat list taken once: ``train(mode)`` does
    nothing when every module is already in ``mode`` (what the original would leave) and runs
    the original otherwise; ``zero_grad`` clears the listed parameters' gradients as the
    original does. The lists are taken here: modules added later are not seen, so this is not
    for FSDP or DeepSpeed, which swap parameters when the Trainer prepares the model."""
    if "train" in vars(model) or "zero_grad" in vars(model):
        return
    modules = list(model.modules())
    params = list(model.parameters())
    original_train = model.train

    def train(mode: bool = True) -> torch.nn.Module:
        if all(m.training == mode for m in modules):
            return model
        return original_train(mode)

    def zero_grad(set_to_none: bool = True) -> None:
        for p in params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    model.train = train
    model.zero_grad = zero_grad


def clip_grad_norm_one_device(parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that all live on one device as plain
    tensors (one GPU, DDP): the same ``_foreach_norm`` per dtype, stacked and clipped, without
    torch's ``norm.to(device)`` per parameter (338 calls, ~3.5 ms of host time a step on a
    full fine-tune of Qwen2-VL-2B). Anything else (several devices, DTensor, sparse) goes to
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


def use_one_device_clipping(accelerator: Any) -> bool:
    """Route ``accelerator.clip_grad_norm_`` through :func:`clip_grad_norm_one_device` where
    the gradients are plain tensors on one device (no distribution, or DDP); FSDP, DeepSpeed
    and XLA keep accelerate's own path. Returns whether it was routed."""
    from accelerate.utils import DistributedType

    if accelerator is None or "clip_grad_norm_" in vars(accelerator):
        return False
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
        return False

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        accelerator.unscale_gradients()
        return clip_grad_norm_one_device(parameters, max_norm, norm_type)

    accelerator.clip_grad_norm_ = clip_grad_norm_
    return True


def set_host_threads(requested: int | None, device_type: str, dataloader_workers: int) -> int | None:
    """Set torch's intra-op thread count for the training process; returns the count set, or
    None when torch's own is kept. By default one thread when training on CUDA with dataloader
    workers: batches are then built in the workers, and the host only launches GPU work, so
    OpenMP threads woken by the odd small CPU op and left spinning only take cores from the
    launching thread of a host-bound step (H200, full fine-tune of Qwen2-VL-2B sizes: 42.5
    samples/s with ``OMP_NUM_THREADS=1`` against 40.6 with torch's sixteen in one call; in
    another, the plain loop fed by 4 pinned workers took 97.6 ms a step with one thread against
    99.8 ms without; both gaps within the spread between calls)."""
    if requested is None:
        if device_type != "cuda" or dataloader_workers <= 0:
            return None
        requested = 1
    if requested < 1:
        raise ValueError(f"host_threads must be >= 1, not {requested}")
    if torch.get_num_threads() != requested:
        logger.info("host threads: %d (was %d)", requested, torch.get_num_threads())
        torch.set_num_threads(requested)
    return requested


class MMTrainer(Trainer):
    """HF Trainer with a separate projector learning rate, and less host time a step."""

    def __init__(self, *args: Any, projector_lr: float | None = None, training_forward: TrainingForward | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.training_forward = training_forward
        if isinstance(self.model, torch.nn.Module) and not (getattr(self, "is_fsdp_enabled", False)
                                                             or getattr(self, "is_deepspeed_enabled", False)):
            trim_module_walks(self.model)  # FSDP and ZeRO replace or partition parameters after this
        use_one_device_clipping(getattr(self, "accelerator", None))

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

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's FLOP count, with the parameter count taken once: the Trainer recounts
        every parameter of the model on every step (tens of ms of host time on a 2B model)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if getattr(self, "_mmtune_num_parameters", None) is None:
            self._mmtune_num_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._mmtune_num_parameters

    def _get_output_dir(self, trial: Any) -> str:
        """The run's folder; while :meth:`_save_checkpoint` writes a checkpoint, its staging folder
        (the Trainer writes ``checkpoint-N`` into the folder this returns)."""
        staging = getattr(self, "_mmtune_staging", None)
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
        self._mmtune_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._mmtune_staging = None
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


def gather_fsdp_state_dict(trainer: Any) -> None:
    """Under FSDP with sharded checkpoints, switch to a full (gathered) state dict for the final
    save: transformers writes the output folder's weights only for FULL_STATE_DICT, so a sharded
    run would otherwise end with no model or adapter there (checkpoints keep their DCP shards)."""
    plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(plugin, "fsdp_plugin", None)
    if not getattr(trainer, "is_fsdp_enabled", False) or plugin is None:
        return
    if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")
        logger.info("FSDP: final save gathers a full state dict (checkpoints stayed sharded)")


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


def save_projector(model: Any, output_dir: str) -> str | None:
    """Stage 1's product on its own: ``mm_projector.safetensors`` (projector and, when the
    model has one, ``image_newline``), keys as in the full model, for stage 2's
    ``pretrain_mm_mlp_adapter``."""
    from safetensors.torch import save_file

    entry = get_composite_model(getattr(model.config, "model_type", ""))
    if entry is None:
        return None
    state = {name: param.detach().cpu().contiguous() for name, param in model.named_parameters()
             if has_prefix(name, [entry.projector_key]) or name.endswith("image_newline")}
    path = os.path.join(output_dir, "mm_projector.safetensors")
    save_file(state, path)
    logger.info("projector saved to %s (%d tensors)", path, len(state))
    return path


def run_sft(model_args: Any, data_args: Any, finetuning_args: Any, mm_args: Any, training_args: Any,
            callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train, save (adapter or model + processor), log and plot; returns the metrics."""
    prepare_output_dir(model_args, mm_args, training_args)  # before anything loads: never over a run or a model
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)  # a complete checkpoint
    check_model_args(model_args)  # a missing, adapter or non-VLM model folder: one line, before anything loads
    config = load_config(model_args)
    if model_args.model_name_or_path:  # a misnamed lora_target: before the data is read (a meta-device build)
        check_lora_target_before_loading(model_class_for(config), config, model_args, finetuning_args)
    tokenizer, processor = load_tokenizer_and_processor(model_args)
    model_type = getattr(config, "model_type", None)
    data_args = dataclasses.replace(data_args, template=training_template(data_args.template, model_type))
    template = get_template(data_args.template)
    plugin = get_mm_plugin(mm_args.plugin or template.plugin, media=data_args.media_config())
    plugin.check_fit(template, tokenizer)  # a template that does not fit the model: once, before any sample
    with training_args.main_process_first(desc="tokenising"):
        datasets = build_dataset(data_args, template, plugin, tokenizer, processor)
    gc = training_args.gradient_checkpointing
    from transformers import set_seed

    set_seed(training_args.seed)  # adapters are initialised below, before the Trainer seeds
    longest = max(dataset_lengths(datasets["train"]), default=data_args.cutoff_len)  # sizes auto checkpointing
    batch_tokens = training_args.per_device_train_batch_size * max(longest, data_args.packing_max_len or 0)
    levers: dict[str, Any] = {}
    model = load_model(model_args, finetuning_args, is_trainable=True, gradient_checkpointing=gc, tokenizer=tokenizer,
                       device_type=training_args.device.type, batch_tokens=batch_tokens, levers_out=levers)
    training_args = dataclasses.replace(training_args, gradient_checkpointing=False)  # enabled above, once
    fake = mm_args.fake_media_for_text_only
    if fake is None:
        fake = training_args.world_size > 1
    collator = MultiModalCollator(plugin, processor, tokenizer, model=model if mm_args.build_rope_in_collator else None,
                                  fake_media_for_text_only=bool(fake) and processor is not None,
                                  precompute=collator_precompute(levers))
    train_dataset, collator = maybe_pack(datasets["train"], collator, model, data_args.packing, data_args.packing_max_len,
                                         training_args.per_device_train_batch_size)
    if data_args.skip_bad_samples:  # a sample whose media fail at batch time: replaced, counted, listed
        from mmtune.data.skip import BadSampleGuard, SkippedSamplesCallback

        collator = BadSampleGuard(collator, [datasets["train"], datasets.get("eval")], training_args.output_dir)
        callbacks = [*(callbacks or []), SkippedSamplesCallback(collator.report_path)]
    threads_before = torch.get_num_threads()
    set_host_threads(mm_args.host_threads, training_args.device.type, training_args.dataloader_num_workers)
    record = run_record(model_args, data_args, finetuning_args, mm_args, model_type, template)
    # a LoRA of a LLaVA assembled around a plain LM: its config goes beside every adapter
    assembled_config = (model.config if getattr(model_args, "vision_tower", None)
                        and finetuning_args.finetuning_type == "lora" else None)
    interrupt = InterruptCallback()  # Ctrl-C / SIGTERM: a checkpoint of the step reached, then TrainingInterrupted
    trainer = MMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=datasets.get("eval"),
        data_collator=collator,
        # the Trainer saves it into every checkpoint-N and the final folder, before any push
        processing_class=processor or tokenizer,
        callbacks=[JsonlLogCallback(), MmtuneConfigCallback(record, assembled_config), interrupt, *(callbacks or [])],
        projector_lr=mm_args.projector_lr,
        training_forward=TrainingForward.from_levers(levers),
    )
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        interrupt.restore()  # also where training raised before on_train_end
        torch.set_num_threads(threads_before)  # the caller's count again
    stopped = interrupt.interruption(training_args.output_dir)
    if stopped is not None:  # no final save: the folder holds checkpoints to resume from, not a finished run
        raise stopped
    gather_fsdp_state_dict(trainer)
    if training_args.should_save:  # everything beside the weights first: save_model pushes with push_to_hub
        MmtuneConfigCallback(record, assembled_config).write(training_args.output_dir)
        if finetuning_args.train_mm_proj_only:
            save_projector(trainer.model, training_args.output_dir)
    trainer.save_model(training_args.output_dir)  # weights and processor (processing_class)
    metrics = dict(result.metrics)
    if datasets.get("eval") is not None:
        metrics.update(trainer.evaluate())
    trainer.save_metrics("all", metrics)
    if mm_args.plot_loss and trainer.is_world_process_zero():
        plot_loss(training_args.output_dir)
    return metrics


def training_template(requested: str | None, model_type: str | None) -> str:
    """The run's chat template: ``template`` from the config, else the one the model's family
    declares for its ``model_type`` (logged, so a run never trains on a template it did not
    say); neither is a one-line error naming the ``template`` key."""
    name, source = resolve_template(requested, model_type, option="`template:` in the config, e.g. template:")
    if source != "given":
        logger.info("template: %s (%s; set `template` to choose another)", name, source)
    return name


def run_record(model_args: Any, data_args: Any, finetuning_args: Any, mm_args: Any, model_type: str | None,
               template: Any) -> dict[str, Any]:
    """What ``mmtune_config.json`` records of a run: what chat and export need to reopen its
    folders (template, plugin and its media settings, model type) and where it came from."""
    import mmtune

    return {
        "template": template.name,
        "plugin": mm_args.plugin or template.plugin,
        "media": dataclasses.asdict(data_args.media_config()),
        "finetuning_type": finetuning_args.finetuning_type,
        "model_type": model_type,
        "model_name_or_path": model_args.model_name_or_path,
        "mmtune_version": getattr(mmtune, "__version__", None),
    }
