"""Supervised fine-tuning on HF Trainer: one recipe for every family."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from mmtune.model.composite import get_composite_model, has_prefix
from mmtune.speed import fused_loss
from mmtune.speed.fused_loss import FusedHead
from mmtune.speed.result import Applied

from . import recipe
from .callbacks import JsonlLogCallback, MmtuneConfigCallback, plot_loss
from .checkpoints import resolve_resume
from .interrupt import InterruptCallback
from .outputs import prepare_output_dir
from .preference import PairedMedia, PreferenceForward, PreferenceTrainer, precompute_reference
from .trainer import MMTrainer

logger = logging.getLogger(__name__)


def set_host_threads(requested: int | None, device_type: str, dataloader_workers: int) -> int | None:
    """Set torch's intra-op thread count for the training process; returns the count set, or
    None when torch's own is kept. By default one thread when training on CUDA with dataloader
    workers: batches are then built in the workers, and the host only launches GPU work, so
    OpenMP threads woken by the odd small CPU op and left spinning only take cores from the
    launching thread of a host-bound step (benchmarks/README.md has the measurements)."""
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
    """Train, save (adapter or model + processor), log and plot; returns the metrics.

    The output folder and the checkpoint to resume from are checked first (nothing loads for a
    run that cannot start); the pipeline comes from :func:`mmtune.train.recipe.build`."""
    prepare_output_dir(model_args, mm_args, training_args)  # before anything loads: never over a run or a model
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)  # a complete checkpoint
    parts = recipe.build(model_args, data_args, finetuning_args, training_args, mm_args=mm_args)
    model, template, model_type, data_args = parts.model, parts.template, parts.model_type, parts.data_args
    tokenizer, processor, datasets = parts.tokenizer, parts.processor, parts.datasets
    train_dataset, collator = parts.train_dataset, parts.collator
    training_args = dataclasses.replace(training_args, gradient_checkpointing=False)  # build enabled it, once
    if data_args.skip_bad_samples:  # a sample whose media fail at batch time: replaced, counted, listed
        from mmtune.data.skip import BadSampleGuard, SkippedSamplesCallback

        collator = BadSampleGuard(collator, [datasets["train"], datasets.get("eval")], training_args.output_dir)
        callbacks = [*(callbacks or []), SkippedSamplesCallback(collator.report_path)]
    threads_before = torch.get_num_threads()
    set_host_threads(mm_args.host_threads, training_args.device.type, training_args.dataloader_num_workers)
    record = run_record(model_args, data_args, finetuning_args, mm_args, model_type, template)
    # a LoRA of a LLaVA assembled around a plain LM: its config goes beside every adapter
    assembled_config = (model.config if model_args.vision_tower
                        and finetuning_args.finetuning_type == "lora" else None)
    interrupt = InterruptCallback()  # Ctrl-C / SIGTERM: a checkpoint of the step reached, then TrainingInterrupted
    trainer_class, extra = MMTrainer, {"training_forward": parts.training_forward}
    eval_dataset = datasets.get("eval")
    if finetuning_args.preference:
        preference = preference_forward(parts, finetuning_args)
        if finetuning_args.reference == "cached":  # once, with the initial weights: no second model in memory
            batch = training_args.per_device_eval_batch_size
            with training_args.main_process_first(desc="reference log-probabilities"):
                train_dataset = precompute_reference(model, train_dataset, parts.collator, preference, batch,
                                                     training_args.device)
                if eval_dataset is not None:
                    eval_dataset = precompute_reference(model, eval_dataset, parts.collator, preference, batch,
                                                        training_args.device)
        trainer_class, extra = PreferenceTrainer, {"preference": preference}
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        # the Trainer saves it into every checkpoint-N and the final folder, before any push
        processing_class=processor or tokenizer,
        callbacks=[JsonlLogCallback(), MmtuneConfigCallback(record, assembled_config), interrupt, *(callbacks or [])],
        projector_lr=mm_args.projector_lr,
        **extra,
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
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_metrics("all", metrics)
    if mm_args.plot_loss and trainer.is_world_process_zero():
        plot_loss(training_args.output_dir)
    return metrics


def preference_forward(parts: Any, finetuning_args: Any) -> PreferenceForward:
    """The preference loss's forward for a built pipeline: the fused head of the levers, when
    they applied it, and the towers' paired-media hooks."""
    result = parts.levers.get(fused_loss.SWITCH)
    fused = result.state if isinstance(result, Applied) and isinstance(result.state, FusedHead) else None
    media = PairedMedia.install(parts.model) if finetuning_args.stage == "dpo" else None
    return PreferenceForward(finetuning_args, fused=fused, media=media)


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
