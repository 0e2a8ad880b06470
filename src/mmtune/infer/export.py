"""Merge a LoRA adapter into its base and save a model + processor transformers can load."""

from __future__ import annotations

import json
import logging
import os


logger = logging.getLogger(__name__)


def export_model(model_path: str, output_dir: str, adapter_path: str | None = None, dtype: str = "auto") -> str:
    """``model_path``: a full model folder, or the base when ``adapter_path`` is given (an adapter
    folder alone is accepted too: its ``adapter_config.json`` names the base)."""
    from mmtune.hparams import FinetuningArguments, ModelArguments
    from mmtune.model.loader import load_model, load_tokenizer_and_processor

    if adapter_path is None and os.path.exists(os.path.join(model_path, "adapter_config.json")):
        adapter_path = model_path
        model_path = json.load(open(os.path.join(model_path, "adapter_config.json")))["base_model_name_or_path"]
    args = ModelArguments(model_name_or_path=model_path, adapter_name_or_path=adapter_path, torch_dtype=dtype)
    model = load_model(args, FinetuningArguments(), is_trainable=False)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        logger.info("merged adapter %s into %s", adapter_path, model_path)
    model.config.use_cache = True
    model.save_pretrained(output_dir)
    tokenizer, processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=adapter_path or model_path))
    (processor or tokenizer).save_pretrained(output_dir)
    return output_dir
