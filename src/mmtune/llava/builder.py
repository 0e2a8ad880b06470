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


def load_processor(model_path: str, model_base: str | None, model: Any) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    from .processing import LlavaLlamaProcessor

    if os.path.isfile(os.path.join(model_path, "processor_config.json")):
        return AutoProcessor.from_pretrained(model_path)
    source = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
    tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    model.initialize_vision_tokenizer(model.config, tokenizer)
    config = model.config
    return LlavaLlamaProcessor(model.get_vision_tower().image_processor(), tokenizer,
                               image_aspect_ratio=config.image_aspect_ratio,
                               image_grid_pinpoints=config.image_grid_pinpoints,
                               mm_use_im_start_end=config.mm_use_im_start_end)


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any, Any, int]:
    """``(tokenizer, model, processor, context_len)`` for any of the checkpoint kinds above."""
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation,
                              **quantization_kwargs(load_8bit, load_4bit, dtype)}
    adapter = os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    projector = _first_file(model_path, ("mm_projector.safetensors", "mm_projector.bin"))
    if (adapter or projector) and model_base is None:
        kind = "a LoRA" if adapter else "a projector-only"
        raise ValueError(f"{model_path} is {kind} checkpoint: pass model_base (the language model it was trained on)")
    if adapter or projector:
        config = LlavaConfig.from_pretrained(model_path)
        model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=config, **kwargs)
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
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, **kwargs)
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    model.eval()
    processor = load_processor(model_path, model_base, model)
    context_len = model.config.tokenizer_model_max_length or model.config.max_position_embeddings
    return processor.tokenizer, model, processor, context_len
