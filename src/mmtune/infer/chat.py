"""A chat engine: template + plugin + model, with streamed output."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch


class ChatEngine:
    """Load once, then ``stream(messages, images=..., videos=..., audios=...)`` yields text pieces."""

    def __init__(self, model_path: str, adapter_path: str | None = None, template: str | None = None,
                 dtype: str = "auto", max_new_tokens: int = 256) -> None:
        from mmtune.hparams import FinetuningArguments, ModelArguments
        from mmtune.model.loader import load_model, load_tokenizer_and_processor
        from mmtune.plugins import get_mm_plugin
        from mmtune.templates import get_template

        meta_dir = adapter_path or model_path
        meta = os.path.join(meta_dir, "mmtune_config.json")
        saved = json.load(open(meta)) if os.path.exists(meta) else {}
        if adapter_path is None and os.path.exists(os.path.join(model_path, "adapter_config.json")):
            adapter_path = model_path
            model_path = json.load(open(os.path.join(model_path, "adapter_config.json")))["base_model_name_or_path"]
        self.tokenizer, self.processor = load_tokenizer_and_processor(ModelArguments(model_name_or_path=meta_dir))
        args = ModelArguments(model_name_or_path=model_path, adapter_name_or_path=adapter_path, torch_dtype=dtype)
        self.model = load_model(args, FinetuningArguments(), is_trainable=False)
        self.template = get_template(template or saved.get("template", "qwen2_vl"))
        self.plugin = get_mm_plugin(saved.get("plugin") or self.template.plugin)
        self.max_new_tokens = max_new_tokens

    def _inputs(self, messages: list[dict[str, str]], images: list[Any], videos: list[Any], audios: list[Any]) -> dict:
        from mmtune.data.collator import MultiModalCollator

        expanded = self.plugin.process_messages(messages, images, videos, audios, self.processor)
        prompt = "".join(p + a for p, a in self.template.render_turns(expanded))
        ids = self.plugin.tokenize(prompt, self.tokenizer)
        ids, _ = self.plugin.process_token_ids(ids, None, images, videos, audios, self.tokenizer, self.processor)
        collator = MultiModalCollator(self.plugin, self.processor, self.tokenizer, padding_side="left",
                                      build_position_ids=False)
        batch = collator([{"input_ids": ids, "images": images, "videos": videos, "audios": audios}])
        batch.pop("labels")
        device = next(self.model.parameters()).device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def stream(self, messages: list[dict[str, str]], images: list[Any] = (), videos: list[Any] = (),
               audios: list[Any] = ()) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        inputs = self._inputs(list(messages), list(images), list(videos), list(audios))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stops = [self.tokenizer.convert_tokens_to_ids(w) for w in self.template.stop_words] or None
        kwargs = dict(**inputs, streamer=streamer, max_new_tokens=self.max_new_tokens, do_sample=False,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=stops)
        thread = threading.Thread(target=self.model.generate, kwargs=kwargs)
        thread.start()
        yield from streamer
        thread.join()

    def chat(self, messages: list[dict[str, str]], **media: Any) -> str:
        return "".join(self.stream(messages, **media)).strip()
