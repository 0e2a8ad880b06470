"""``LlavaLlamaModel`` / ``LlavaLlamaForCausalLM``: Llama with LLaVA's image splicing."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from .configuration import LlavaConfig
from .meta import LlavaMetaForCausalLM, LlavaMetaModel, complete_vision_tower


def _load_with_tower(load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load`` (a ``from_pretrained``) with the vision tower's weights completed after it."""
    wants_info = kwargs.pop("output_loading_info", False)
    model, info = load(*args, output_loading_info=True, **kwargs)
    info["missing_keys"] = complete_vision_tower(model, info["missing_keys"])
    return (model, info) if wants_info else model


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, then the tower loaded (see
        :func:`~mmtune.llava.meta.complete_vision_tower`)."""
        return _load_with_tower(super().from_pretrained, *args, **kwargs)


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config: LlavaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, then the vision tower loaded as LLaVA's builder
        loads it, so ``AutoModelForCausalLM.from_pretrained`` gives a model that runs on
        images: the tower's weights come from the checkpoint where it holds them, the rest
        from ``mm_vision_tower`` (see :func:`~mmtune.llava.meta.complete_vision_tower`)."""
        return _load_with_tower(super().from_pretrained, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: Any = None,
        image_sizes: Any = None,
        pixel_values: Any = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """Llama's forward after splicing ``images`` (alias ``pixel_values``) into the
        placeholders; the loss skips image features and ``IGNORE_INDEX`` labels."""
        images = images if images is not None else pixel_values
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        # transformers from 5.25 names the KV cache ``cache``; earlier releases ``past_key_values``
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, _, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, cache, labels, images, image_sizes
                )
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images: Any = None, image_sizes: Any = None,
                 **kwargs: Any) -> Any:
        """Images are encoded once, into left-padded prompt embeddings; the KV cache carries
        them through decoding. Returns the new tokens only (as for any ``inputs_embeds``)."""
        images = images if images is not None else kwargs.pop("pixel_values", None)
        inputs = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if images is None:
            return super().generate(inputs, **kwargs)
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids with <image> placeholders and images, not inputs_embeds")
        kwargs.pop("position_ids", None)
        _, _, attention_mask, _, inputs_embeds, _ = self.prepare_inputs_labels_for_multimodal(
            inputs, None, kwargs.pop("attention_mask", None), None, None, images, image_sizes, padding_side="left"
        )
        if inputs_embeds is None:
            return super().generate(inputs, attention_mask=attention_mask, **kwargs)
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, inputs_embeds: Any = None, images: Any = None,
                                      image_sizes: Any = None, **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs (the cache under whichever name the installed release uses),
        plus ``images`` / ``image_sizes``. ``inputs_embeds`` is named: generate checks for it."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if images is not None:
            model_inputs["images"] = images
        if image_sizes is not None:
            model_inputs["image_sizes"] = image_sizes
        return model_inputs
