"""The one place a run's pipeline is assembled: tokenizer, processor, template, plugin, datasets,
model and collator, in the order the checks need.

``mmtune train`` (:func:`~mmtune.train.sft.run_sft`), ``mmtune check-data``, the demo and the
training benchmarks call :func:`build`; ``mmtune chat``, ``mmtune export`` and the demo's evaluation reopen a
folder mmtune wrote through :func:`build_saved`, which differs only where a saved folder differs
(its template, plugin and media settings come from its ``mmtune_config.json``, its processor may
come from its base, and the model loads for inference). Whoever assembles the pipeline by hand
drifts from what training does; these two functions are the only assembly.

Order (:func:`build`): the model folder and ``lora_target`` are checked before anything large is
read (a misnamed module fails on a meta-device build, not after tokenising); the template's fit
to the tokenizer is checked once, before any sample; the data is tokenised before the model loads
(its longest batch sizes the automatic gradient checkpointing); the collator and packing are
decided once the model is there (packing asks the model whether it packs exactly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mmtune.config import ConfigError, DataArguments, FinetuningArguments, MMTrainingArguments, ModelArguments
from mmtune.data import MultiModalCollator, build_dataset
from mmtune.data.packing import dataset_lengths, maybe_pack
from mmtune.media import MediaConfig
from mmtune.model.composite import get_composite_model
from mmtune.model.folders import check_model_args
from mmtune.model.loader import (check_lora_target_before_loading, load_config, load_model,
                                 load_tokenizer_and_processor, model_class_for)
from mmtune.model.saved import SavedFolder, inspect_folder, resolve_template
from mmtune.plugins import get_mm_plugin
from mmtune.speed.forward import TrainingForward, collator_precompute
from mmtune.templates import get_template

from .preference import PreferenceCollator, add_kl_rows

logger = logging.getLogger(__name__)

__all__ = ["Parts", "build", "build_saved", "training_template"]


@dataclass
class Parts:
    """What :func:`build` or :func:`build_saved` assembled; a part not asked for is None (or empty).

    ``datasets`` are the tokenised datasets (``train``, and ``eval`` with ``val_size``);
    ``train_dataset`` and ``collator`` are what training iterates: packed rows and the packing
    collator where packing is on, else ``datasets["train"]`` and the padding collator.
    ``data_args`` is the run's data arguments with the template resolved (what was used);
    ``template_source`` says where the template came from, ``plugin_name`` the plugin's registered
    name; ``folder`` is the saved folder reopened."""

    tokenizer: Any
    processor: Any | None
    template: Any | None
    plugin: Any | None
    datasets: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    collator: Any = None
    train_dataset: Any = None
    data_args: DataArguments | None = None
    model_type: str | None = None
    template_source: str = ""
    plugin_name: str | None = None
    folder: SavedFolder | None = None
    #: what the speed levers returned, by switch (``Applied`` / ``Declined``); empty without a model
    levers: dict[str, Any] = field(default_factory=dict)

    @property
    def training_forward(self) -> TrainingForward | None:
        """The training forward the levers call for (the fused loss, the sync-free inputs), or None."""
        return TrainingForward.from_levers(self.levers)


def training_template(requested: str | None, model_type: str | None) -> str:
    """The run's chat template: ``template`` from the config, else the one the model's family
    declares for its ``model_type`` (logged, so a run never trains on a template it did not
    say); neither is a one-line error naming the ``template`` key."""
    name, source = resolve_template(requested, model_type, option="`template:` in the config, e.g. template:")
    if source != "given":
        logger.info("template: %s (%s; set `template` to choose another)", name, source)
    return name


def build(model_args: ModelArguments, data_args: DataArguments, finetuning_args: FinetuningArguments,
          training_args: Any = None, *, mm_args: MMTrainingArguments | None = None, datasets: bool = True,
          model: bool = True) -> Parts:
    """Assemble the pipeline a training run uses (see the module for the order and its reasons).

    ``training_args`` (transformers' ``TrainingArguments``) makes it a training build: the data is
    tokenised on the main process first, the seed is set before adapters initialise, the model
    learns where it trains (``device``), whether to checkpoint and the longest batch (for the
    speed levers), the collator fakes media for text-only batches on several ranks unless told,
    and the train set is packed as ``packing`` says. Without it the model loads for training on
    the default device, without packing. ``datasets=False`` reads no data (``check-data`` reads
    it itself); ``model=False`` loads no weights (and builds no collator)."""
    mm_args = mm_args if mm_args is not None else MMTrainingArguments()
    check_model_args(model_args)  # a missing, adapter or non-VLM model folder: one line, before anything loads
    config = load_config(model_args)
    if model and model_args.model_name_or_path:  # a misnamed lora_target: before the data is read (meta device)
        check_lora_target_before_loading(model_class_for(config), config, model_args, finetuning_args)
    tokenizer, processor = load_tokenizer_and_processor(model_args)
    model_type = getattr(config, "model_type", None)
    data_args = dataclasses.replace(data_args, template=training_template(data_args.template, model_type))
    template = get_template(data_args.template)
    plugin_name = mm_args.plugin or template.plugin
    plugin = get_mm_plugin(plugin_name, media=data_args.media_config())
    plugin.check_fit(template, tokenizer)  # a template that does not fit the model: once, before any sample
    parts = Parts(tokenizer=tokenizer, processor=processor, template=template, plugin=plugin, data_args=data_args,
                  model_type=model_type, template_source="given", plugin_name=plugin_name)
    if datasets:
        first = (training_args.main_process_first(desc="tokenising") if training_args is not None
                 else contextlib.nullcontext())
        with first:
            parts.datasets = build_dataset(data_args, template, plugin, tokenizer, processor,
                                           preference=finetuning_args.preference_data)
        parts.train_dataset = parts.datasets["train"]
    if not model:
        return parts
    device_type, checkpointing, batch_tokens, several_ranks = None, False, None, False
    if training_args is not None:
        from transformers import set_seed

        set_seed(training_args.seed)  # adapters are initialised below, before the Trainer seeds
        device_type = training_args.device.type
        checkpointing = training_args.gradient_checkpointing
        several_ranks = training_args.world_size > 1
        if datasets:  # the longest batch sizes the automatic gradient checkpointing
            longest = max(dataset_lengths(parts.datasets["train"]), default=data_args.cutoff_len)
            batch_tokens = training_args.per_device_train_batch_size * max(longest, data_args.packing_max_len or 0)
    parts.model = load_model(model_args, finetuning_args, is_trainable=True, gradient_checkpointing=checkpointing,
                             tokenizer=tokenizer, device_type=device_type, batch_tokens=batch_tokens,
                             levers_out=parts.levers)
    fake = mm_args.fake_media_for_text_only
    if fake is None:
        fake = several_ranks
    preference = finetuning_args.preference_data
    parts.collator = MultiModalCollator(plugin, processor, tokenizer,
                                        model=parts.model if mm_args.build_rope_in_collator else None,
                                        fake_media_for_text_only=bool(fake) and processor is not None,
                                        precompute=None if preference else collator_precompute(parts.levers))
    if preference:  # pairs / KTO rows around the padding collator; never packed (config refuses packing: true)
        parts.collator = PreferenceCollator(parts.collator, preference)
        if preference == "kto" and datasets:
            size = training_args.per_device_train_batch_size if training_args is not None else 1
            parts.datasets = {name: add_kl_rows(ds, size) for name, ds in parts.datasets.items()}
            parts.train_dataset = parts.datasets["train"]
    elif datasets and training_args is not None:
        parts.train_dataset, parts.collator = maybe_pack(parts.datasets["train"], parts.collator, parts.model,
                                                         data_args.packing, data_args.packing_max_len,
                                                         training_args.per_device_train_batch_size)
    return parts


def saved_media_config(saved: dict[str, Any] | None) -> MediaConfig:
    """The run's media settings (pixel caps, video fps ...) from mmtune_config.json, so a reopened
    folder preprocesses as training did; unknown keys (a newer mmtune's) are ignored."""
    names = {f.name for f in fields(MediaConfig)}
    return MediaConfig(**{k: v for k, v in (saved or {}).items() if k in names})


def load_saved_processor(folder: SavedFolder) -> tuple[Any, Any | None]:
    """The tokenizer and processor saved in ``folder.files``. A multimodal model's folder
    without a processor (one written before checkpoints carried it) takes its base's, with a
    warning; with no base to take it from it is an error naming the folder, rather than a
    model that cannot read an image."""
    tokenizer, processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=folder.files))
    if processor is not None or not folder.model_type or get_composite_model(folder.model_type) is None:
        return tokenizer, processor
    for other in folder.processor_fallbacks():
        _, processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=other))
        if processor is not None:
            logger.warning("%s has no processor (processor_config.json / preprocessor_config.json): using the one "
                           "of %s", folder.files, other)
            return tokenizer, processor
    raise ValueError(f"{folder.files} has no multimodal processor for its {folder.model_type} model "
                     f"(no processor_config.json / preprocessor_config.json); copy the base model's processor files "
                     f"into it")


def build_saved(model_path: str | SavedFolder, adapter_path: str | None = None, *, template: str | None = None,
                dtype: str = "auto", template_required: bool = True, model: bool = True,
                data_args: DataArguments | None = None, device: str | None = None) -> Parts:
    """Reopen a folder mmtune wrote (an output folder, a ``checkpoint-N``, an adapter folder
    alone, an export) or a model, for inference: the parts :func:`build` gives, from the folder.

    The template is ``template``, else the folder's recorded one, else the family's declared
    default (:func:`~mmtune.model.saved.resolve_template`); with none it is a ConfigError, or,
    with ``template_required=False``, no template and no plugin (an export still works). The
    plugin is the recorded one where the template is the recorded one, with the recorded media
    settings. The processor is the folder's, else its base's (:func:`load_saved_processor`); it
    loads before the weights, so a folder that cannot reopen fails fast. The collator pads on the
    left and builds no position ids (generation derives them). ``data_args`` (``mmtune predict``)
    tokenises its data with the folder's template and plugin, as :func:`build` would, before the
    weights load: ``datasets`` then holds ``train`` and, with ``val_size``, the held-out ``eval``
    that training set aside (the same split). The model is placed on ``device``, by default the
    accelerator when there is one (:func:`inference_device`): generation on the CPU of a GPU
    machine is many times slower; ``export`` passes ``"cpu"`` (merging needs no accelerator)."""
    folder = model_path if isinstance(model_path, SavedFolder) else inspect_folder(model_path, adapter_path)
    try:
        name, source = resolve_template(template, folder.model_type, folder.record, where=folder.files)
    except ConfigError:
        if template_required:
            raise
        name, source = None, "none known"
    chat_template = get_template(name) if name else None
    plugin, plugin_name = None, None
    if chat_template is not None:
        plugin_name = folder.record.get("template") == name and folder.record.get("plugin") or chat_template.plugin
        plugin = get_mm_plugin(plugin_name, media=saved_media_config(folder.record.get("media")))
    tokenizer, processor = load_saved_processor(folder)
    parts = Parts(tokenizer=tokenizer, processor=processor, template=chat_template, plugin=plugin,
                  model_type=folder.model_type, template_source=source, plugin_name=plugin_name, folder=folder)
    if plugin is not None:
        parts.collator = MultiModalCollator(plugin, processor, tokenizer, padding_side="left",
                                            build_position_ids=False)
    if data_args is not None:
        if chat_template is None:
            raise ConfigError(f"{folder.files}: no chat template to tokenise the data with; set `template`")
        parts.data_args = dataclasses.replace(data_args, template=name)
        parts.datasets = build_dataset(parts.data_args, chat_template, plugin, tokenizer, processor)
    if model:
        args = ModelArguments(model_name_or_path=folder.model_path, adapter_name_or_path=folder.adapter_path,
                              torch_dtype=dtype)
        parts.model = load_model(args, FinetuningArguments(), is_trainable=False)
        target = inference_device(device)
        if target != "cpu":
            logger.info("model placed on %s for inference", target)
            parts.model = parts.model.to(target)
    return parts


def inference_device(device: str | None = None) -> str:
    """Where an inference model goes: ``device`` when given, else ``cuda`` when torch sees a GPU,
    else ``mps`` on Apple silicon, else ``cpu``."""
    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
