"""Load tokenizer, processor and model with the right Auto class per family."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from mmtune.compat import apply_mends, yi_vl_projector

from .adapters import init_adapter, lora_plan, prepare_quantization
from .composite import attention_implementation, autocast_projector_dtype, configure_visual_model, get_composite_model
from .folders import check_model_args
from .layers import enable_gradient_checkpointing

logger = logging.getLogger(__name__)


def _hub_kwargs(model_args: Any) -> dict[str, Any]:
    return {"trust_remote_code": model_args.trust_remote_code, "cache_dir": model_args.cache_dir,
            "revision": model_args.revision}


def assembles_llava(model_args: Any) -> bool:
    """True when ``vision_tower`` asks to build a native LLaVA around a plain LM."""
    return bool(getattr(model_args, "vision_tower", None))


def _import_llava() -> Any:
    try:
        import mmtune.llava as llava  # registers llava_llama with the Auto classes
    except ImportError as exc:
        raise ImportError("model_type llava_llama needs mmtune.llava, the native LLaVA architecture") from exc
    return llava


def load_tokenizer_and_processor(model_args: Any) -> tuple[Any, Any | None]:
    """The tokenizer, and the multimodal processor when the checkpoint has one (else None).

    ``model_name_or_path`` and ``adapter_name_or_path`` are checked first
    (:func:`mmtune.model.folders.check_model_args`): a missing folder, a folder that holds no
    model, a model mmtune cannot build or an unknown Hub id is a one-line ModelFolderError
    before anything loads. A LoRA adapter folder is read for its tokenizer (chat and export read
    a LoRA output folder's own); one without a tokenizer is the error a run gives for an adapter
    folder as its model (:func:`load_config` gives it for one with a tokenizer, before the data
    or the model is read).

    A ``llava_llama`` checkpoint without processor files (what the original LLaVA code saves:
    config, weights and tokenizer) gets mmtune's ``LlavaLlamaProcessor``, built from the tower
    its config names and this tokenizer (see :func:`mmtune.llava.builder.llava_processor`)."""
    from transformers import AutoProcessor, AutoTokenizer

    check_model_args(model_args, for_tokenizer=True)  # a missing or wrong folder: one line, before any load
    llava = _import_llava()
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **_hub_kwargs(model_args))
    if assembles_llava(model_args):
        return tokenizer, _assembled_llava_processor(llava, model_args, tokenizer)
    try:
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, **_hub_kwargs(model_args))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        processor = _llava_checkpoint_processor(model_args, tokenizer)
        if processor is None:
            logger.info("no multimodal processor in %s (%s): text-only", model_args.model_name_or_path, exc)
    if processor is not None and not hasattr(processor, "tokenizer"):
        processor = None  # a bare tokenizer came back
    return tokenizer, processor


def _llava_checkpoint_processor(model_args: Any, tokenizer: Any) -> Any:
    """LLaVA's processor for a ``llava_llama`` checkpoint that has no processor files; None for
    any other model type."""
    from transformers import AutoConfig

    from mmtune.llava.builder import llava_processor

    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **_hub_kwargs(model_args))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if getattr(config, "model_type", None) != "llava_llama":
        return None
    processor = llava_processor(config, tokenizer)
    logger.info("%s has no processor files (a checkpoint of the original LLaVA code): built LLaVA's processor from "
                "its tower %s (image_aspect_ratio=%s)", model_args.model_name_or_path,
                getattr(config, "mm_vision_tower", None) or "(its recorded vision_config)",
                processor.image_aspect_ratio)
    return processor


def model_class_for(config: Any) -> Any:
    """The transformers class that builds ``config``: the one its family declares
    (``CompositeModel.model_class``), else AutoModelForImageTextToText where transformers maps
    the model type there, else AutoModelForCausalLM (mmtune's native LLaVA registers there)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    entry = get_composite_model(model_type)
    if entry is not None and entry.model_class is not None:
        return getattr(transformers, entry.model_class)
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    if model_type == "llava_llama":
        _import_llava()
    return AutoModelForCausalLM


def resolve_attn_implementation(requested: str) -> str:
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        logger.warning("flash_attention_2 requested but flash-attn is not installed: using sdpa")
        return "sdpa"
    return requested


def _assembled_llava_processor(llava: Any, model_args: Any, tokenizer: Any) -> Any:
    """Tokenizer (with LLaVA's image tokens) + the tower's image processor."""
    tower = llava.VisionTower(model_args.vision_tower, delay_load=True)
    llava.LlavaMetaForCausalLM.add_image_tokens(model_args, tokenizer)
    return llava.LlavaLlamaProcessor(tower.image_processor(), tokenizer,
                                     image_aspect_ratio=model_args.image_aspect_ratio or "square",
                                     image_grid_pinpoints=model_args.image_grid_pinpoints,
                                     mm_use_im_start_end=bool(model_args.mm_use_im_start_end))


def _llava_adapter_config(model_args: Any) -> Any:
    """The llava_llama config saved beside a LoRA adapter trained on an assembled LLaVA."""
    path = getattr(model_args, "adapter_name_or_path", None)
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return config if config.model_type == "llava_llama" else None


def load_config(model_args: Any) -> Any:
    """The config the model is built from. ``model_name_or_path`` and ``adapter_name_or_path`` are
    checked first (:func:`mmtune.model.folders.check_model_args`): a missing folder, an adapter
    folder given as the model or a model mmtune cannot build is a one-line ModelFolderError."""
    from transformers import AutoConfig

    check_model_args(model_args)
    _import_llava()
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **_hub_kwargs(model_args))
    adapter_config = _llava_adapter_config(model_args)
    if adapter_config is not None and config.model_type != "llava_llama":
        return adapter_config  # a LoRA run of a LLaVA assembled around this plain LM
    if assembles_llava(model_args) and config.model_type != "llava_llama":
        from mmtune.llava import LlavaConfig

        fields = config.to_dict()
        fields.pop("model_type", None)
        fields.pop("architectures", None)
        config = LlavaConfig(**fields)
    return configure_visual_model(config)


def load_model(
    model_args: Any,
    finetuning_args: Any,
    is_trainable: bool = True,
    gradient_checkpointing: bool = False,
    config: Any = None,
    device_type: str | None = None,
    batch_tokens: int | None = None,
    tokenizer: Any = None,
    speed_levers: bool = True,
    levers_out: dict[str, Any] | None = None,
) -> Any:
    """Build or load the model, then apply the fine-tuning method.

    ``speed_levers=False`` leaves a trainable model without them, for a caller that applies
    :func:`~mmtune.speed.levers.apply_levers` itself and wants its report (``mmtune env``).

    ``config`` given without weights on disk (``model_name_or_path`` empty) builds a randomly
    initialised model: that is how tests and benchmarks make real-sized models offline.
    ``device_type`` (where it will train; default cuda when present) and ``batch_tokens``
    (batch size x sequence length) inform the speed levers. ``tokenizer`` (native LLaVA) gets
    the image tokens the model's config asks for, and the embeddings grow to match.
    ``levers_out``, when given, receives what the speed levers returned (by key), for the
    training forward and the collator (:mod:`mmtune.speed.forward`); nothing is kept on the model.
    """
    config = configure_visual_model(config) if config is not None else load_config(model_args)
    # config.dtype: reading config.torch_dtype makes transformers warn that the name is deprecated
    dtype = model_args.compute_dtype(getattr(config, "dtype", None))
    cls = model_class_for(config)
    attn = attention_implementation(config, resolve_attn_implementation(model_args.attn_implementation))
    if is_trainable and model_args.model_name_or_path:
        check_lora_target_before_loading(cls, config, model_args, finetuning_args)
    with yi_vl_projector(config):
        if model_args.model_name_or_path:
            model, info = cls.from_pretrained(model_args.model_name_or_path, config=config, dtype=dtype,
                                              attn_implementation=attn, output_loading_info=True,
                                              **prepare_quantization(model_args), **_hub_kwargs(model_args))
            if getattr(config, "model_type", "") == "llava_llama":
                from mmtune.llava.builder import ensure_tower_weights

                ensure_tower_weights(model, info["missing_keys"])  # LLaVA checkpoints may omit the tower
        else:
            config._attn_implementation = attn
            model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls(config).to(dtype)
    apply_mends(getattr(config, "model_type", ""), model)  # what this transformers release needs (mmtune.compat)
    if assembles_llava(model_args):
        model.get_model().initialize_vision_modules(model_args)
    if tokenizer is not None and getattr(model.config, "model_type", "") == "llava_llama":
        model.initialize_vision_tokenizer(model_args if assembles_llava(model_args) else model.config, tokenizer)
    if is_trainable and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache while training
    if getattr(model.config, "text_config", None) is not None and hasattr(model.config.text_config, "use_cache"):
        model.config.text_config.use_cache = not is_trainable
    autocast_projector_dtype(model, model_args)
    if is_trainable and gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = init_adapter(model, model_args, finetuning_args, is_trainable)
    if is_trainable and speed_levers:  # batch_tokens sizes the auto checkpointing
        from mmtune.speed.levers import apply_levers

        report = apply_levers(model, speed_config(model_args, device_type=device_type,
                                                  gradient_checkpointing=gradient_checkpointing,
                                                  batch_tokens=batch_tokens))
        if levers_out is not None:
            levers_out.update(report)
    if not is_trainable:
        model.eval()
    return model


def speed_config(model_args: Any, *, device_type: str | None, gradient_checkpointing: bool,
                 batch_tokens: int | None) -> Any:
    """The run's resolved :class:`~mmtune.speed.config.SpeedConfig` (logged once), for
    ``device_type`` (default: cuda when present)."""
    import torch

    from mmtune.speed.config import resolve_speed_config

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_speed_config(model_args, device_type=device_type, gradient_checkpointing=gradient_checkpointing,
                                batch_tokens=batch_tokens)


def check_lora_target_before_loading(cls: Any, config: Any, model_args: Any, finetuning_args: Any) -> bool:
    """Check ``lora_target`` (:func:`mmtune.model.adapters.lora_plan`) on the model built from
    ``config`` with its parameters on the meta device, so that a misnamed module fails before
    the weights are read; returns whether it checked. The same check runs again on the loaded
    model (it is what decides the targets), so the cases skipped here still fail before any
    training step: ``lora_target: all`` (no name to miss), a LoRA adapter to continue
    (``lora_target`` is not read), a native LLaVA assembled around a plain LM (its tower and
    projector exist only once assembled), DeepSpeed ZeRO-3 (it partitions whatever is built),
    and a model that cannot be built on the meta device."""
    if finetuning_args.finetuning_type != "lora" or model_args.adapter_name_or_path or assembles_llava(model_args):
        return False
    if finetuning_args.train_mm_proj_only or all(t == "all" for t in finetuning_args.lora_targets):
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return False
    import copy

    from accelerate import init_empty_weights

    skeleton_config = copy.deepcopy(config)  # building sets dtype and attention on the config it is given
    try:
        with init_empty_weights(), yi_vl_projector(skeleton_config):
            skeleton = (cls.from_config(skeleton_config) if hasattr(cls, "from_config")
                        else cls(skeleton_config))
    except Exception as exc:  # noqa: BLE001 (the check on the loaded model still runs)
        logger.debug("lora_target: not checked before loading (the meta-device build failed: %s)", exc)
        return False
    lora_plan(skeleton, finetuning_args)
    return True
