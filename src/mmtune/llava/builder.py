"""Load LLaVA checkpoints the ways LLaVA's own builder does:

* a full ``llava_llama`` checkpoint;
* a LoRA checkpoint (``adapter_config.json``, optional ``non_lora_trainables``) over
  ``model_base``, merged;
* a projector-only checkpoint (``mm_projector.{safetensors,bin}`` + ``config.json``) over
  ``model_base``;
* any of them in 4 / 8 bits where bitsandbytes and a GPU are present.

The vision tower's weights come from the checkpoint when it has them, else from the tower's
own checkpoint (``mm_vision_tower``). Checkpoints of the original LLaVA code load as they are:
its ``config.json`` keys, a tokenizer without ``<image>`` (added here, after the tokens the
config embeds, so those keep their trained ids), ``non_lora_trainables.bin`` and
``mm_projector.bin`` (read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .configuration import LlavaConfig
from .encoders import tower_config, tower_image_processor
from .meta import complete_vision_tower, load_state_file
from .modeling_llava_llama import LlavaLlamaForCausalLM

logger = logging.getLogger(__name__)


def _first_file(folder: str, names: tuple[str, ...]) -> str | None:
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def quantization_kwargs(load_8bit: bool, load_4bit: bool, dtype: torch.dtype) -> dict[str, Any]:
    if not (load_8bit or load_4bit):
        return {}
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit and load_4bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("4/8-bit loading needs bitsandbytes (pip install 'mmtune[bnb]') and a CUDA GPU") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("4/8-bit loading needs a CUDA GPU")
    from transformers import BitsAndBytesConfig

    if load_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                                   bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["mm_projector", "vision_tower",
                                                                                     "lm_head"])
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["mm_projector", "vision_tower", "lm_head"])
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}


def ensure_tower_weights(model: Any, missing_keys: Any) -> None:
    """Load what the checkpoint lacked of the vision tower from ``mm_vision_tower``.
    ``LlavaLlamaForCausalLM.from_pretrained`` already does; this is for models loaded by other
    means (a no-op once the tower is loaded)."""
    tower = model.get_vision_tower()
    if tower is not None and tower.is_loaded and not any("vision_tower." in k for k in missing_keys):
        return
    complete_vision_tower(model, missing_keys)


def _strip(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def load_non_lora_trainables(model: Any, path: str) -> None:
    state = {_strip(k): v for k, v in load_state_file(path).items()}
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} weights match no parameter of the model (e.g. {unknown[:3]})")
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d non-LoRA trainable tensors from %s", len(state), path)


def llava_processor(config: Any, tokenizer: Any) -> Any:
    """A ``LlavaLlamaProcessor`` for a LLaVA checkpoint that carries no processor files (those the
    original LLaVA code writes, which save only the tokenizer): the image processor of the tower
    ``config`` names (from ``mm_vision_tower``'s folder, else built from the tower config),
    ``tokenizer`` with the image tokens the config asks for, and the config's
    ``image_aspect_ratio``, ``image_grid_pinpoints`` and ``mm_use_im_start_end``, so images and
    prompts are prepared as the checkpoint was trained."""
    from .meta import LlavaMetaForCausalLM
    from .processing import LlavaLlamaProcessor

    image_processor = tower_image_processor(getattr(config, "mm_vision_tower", None), tower_config(config))
    LlavaMetaForCausalLM.add_image_tokens(config, tokenizer)
    return LlavaLlamaProcessor(image_processor, tokenizer,
                               image_aspect_ratio=getattr(config, "image_aspect_ratio", None) or "square",
                               image_grid_pinpoints=getattr(config, "image_grid_pinpoints", None),
                               mm_use_im_start_end=bool(getattr(config, "mm_use_im_start_end", False)))


def load_processor(model_path: str, model_base: str | None, model: Any) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    if os.path.isfile(os.path.join(model_path, "processor_config.json")):
        return AutoProcessor.from_pretrained(model_path)
    source = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
    tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    model.initialize_vision_tokenizer(model.config, tokenizer)
    return llava_processor(model.config, tokenizer)


def _is_llava_checkpoint(model_path: str) -> bool:
    """Whether ``model_path``'s config.json is a LLaVA one (``model_type`` llava_llama, or the
    original's ``mm_vision_tower`` key); a folder without one (a plain LoRA adapter) is not."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model_path)
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "llava_llama" or bool(config.get("mm_vision_tower"))


def _check_model_name(model_name: str | None, llava: bool, adapter: bool, model_path: str) -> None:
    """The original decides the checkpoint's kind from ``model_name``; mmtune reads its files.
    Where the two disagree the files win, and the difference is logged."""
    if not model_name:
        return
    name = model_name.lower()
    if ("llava" in name) != llava:
        logger.info("model_name %r %s 'llava' but %s's config.json says it is %s: loading it as its files say",
                    model_name, "holds" if "llava" in name else "lacks", model_path,
                    "a LLaVA model" if llava else "a plain language model")
    if llava and ("lora" in name) != adapter:
        logger.info("model_name %r %s 'lora' but %s %s adapter_config.json: loading it as its files say", model_name,
                    "holds" if "lora" in name else "lacks", model_path, "has" if adapter else "has no")


def _load_plain_lm(model_path: str, model_base: str | None, adapter: bool, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """A language model without LLaVA (the original's branch for names without 'llava'):
    a full checkpoint, or a LoRA adapter over ``model_base`` merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(model_base, **kwargs)
        model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
        logger.info("merged LoRA weights from %s", model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    tokenizer_source = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
    return AutoTokenizer.from_pretrained(tokenizer_source, use_fast=True), model


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: Any = None,
    device: str | torch.device | None = None,
    use_flash_attn: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **kwargs: Any,
) -> tuple[Any, Any, Any, int]:
    """``(tokenizer, model, processor, context_len)`` for any of the checkpoint kinds above.

    Takes the original LLaVA's call as it is, ``load_pretrained_model(model_path, model_base,
    model_name, load_8bit, load_4bit, device_map, device, use_flash_attn, **kwargs)``, and
    mmtune's keywords (``dtype``, ``attn_implementation``). Differences from the original:

    * ``model_name`` is optional and decides nothing: the original loads LLaVA only when the
      name holds ``llava`` and LoRA when it holds ``lora``; here the checkpoint's files decide
      (a LLaVA ``config.json``, ``adapter_config.json``, ``mm_projector.*``), so a folder named
      anything loads. A plain language model (no LLaVA config) loads as the original loads one,
      with ``None`` in place of the processor.
    * The third item is a ``LlavaLlamaProcessor`` rather than the tower's image processor. It
      serves as one: ``preprocess``, ``image_mean``, ``crop_size`` and ``size`` are the image
      processor's, and ``mmtune.llava.process_images(images, processor, model.config)`` takes
      it, so the original's inference snippets run unchanged; called with ``text=`` and
      ``images=`` it prepares both as the checkpoint was trained.
    * Defaults: fp32 (``dtype``) and the CPU, where the original loads fp16 onto every GPU
      (``device_map="auto"``). As there, a ``device`` other than ``"cuda"`` places the model
      (``device_map={"": device}``) and ``device_map`` is otherwise passed to ``from_pretrained``;
      ``device="cuda"`` alone moves the model to the GPU. ``use_flash_attn`` selects
      ``flash_attention_2``. Other ``kwargs`` go to ``from_pretrained`` (``torch_dtype`` is
      read as ``dtype``).
    * ``context_len`` is the config's ``tokenizer_model_max_length`` (the training cutoff),
      else its ``max_position_embeddings``.
    """
    if "torch_dtype" in kwargs:  # the original's scripts and transformers 4 spell it so
        dtype = kwargs.pop("torch_dtype")
    if use_flash_attn:
        attn_implementation = "flash_attention_2"
    load_kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation,
                                   **quantization_kwargs(load_8bit, load_4bit, dtype), **kwargs}
    if "device_map" not in load_kwargs:  # quantised loading has placed the model already
        if device is not None and str(device) != "cuda":
            load_kwargs["device_map"] = {"": device}
        elif device_map is not None:
            load_kwargs["device_map"] = device_map
    adapter = os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    projector = _first_file(model_path, ("mm_projector.safetensors", "mm_projector.bin"))
    if (adapter or projector) and model_base is None:
        kind = "a LoRA" if adapter else "a projector-only"
        raise ValueError(f"{model_path} is {kind} checkpoint: pass model_base (the language model it was trained on)")
    llava = bool(projector) or _is_llava_checkpoint(model_path)
    _check_model_name(model_name, llava, adapter, model_path)
    if not llava:
        tokenizer, model = _load_plain_lm(model_path, model_base, adapter, load_kwargs)
    elif adapter or projector:
        config = LlavaConfig.from_pretrained(model_path)
        model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=config, **load_kwargs)
        if adapter:
            extra = _first_file(model_path, ("non_lora_trainables.safetensors", "non_lora_trainables.bin"))
            if extra:
                load_non_lora_trainables(model, extra)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
            logger.info("merged LoRA weights from %s", model_path)
        else:
            model.get_model().load_projector(projector)
    else:
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, **load_kwargs)
    if device is not None and "device_map" not in load_kwargs:
        model.to(device)
    model.eval()
    config = model.config
    context_len = getattr(config, "tokenizer_model_max_length", None) or getattr(config, "max_position_embeddings",
                                                                               None) or 2048
    if not llava:
        return tokenizer, model, None, context_len
    processor = load_processor(model_path, model_base, model)
    return processor.tokenizer, model, processor, context_len
