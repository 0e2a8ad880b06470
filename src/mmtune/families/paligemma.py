"""PaliGemma: image tokens are an id-level PREFIX (then BOS, then the prompt), added in
``process_token_ids`` rather than by rewriting text; ``token_type_ids`` are 1 on the
answer (the processor's "suffix"), 0 on images and prompt (prefix-LM attention)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmtune.constants import IGNORE_INDEX
from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin
from mmtune.templates import Template, register_template


class PaliGemmaPlugin(BasePlugin):
    default_image_token = "<image>"
    token_type_key = "token_type_ids"

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        return self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: "")

    def process_token_ids(
        self,
        input_ids: list[int],
        labels: list[int] | None,
        images: Sequence[Any],
        videos: Sequence[Any],
        audios: Sequence[Any],
        tokenizer: Any,
        processor: Any,
    ) -> tuple[list[int], list[int] | None]:
        self._validate_input(processor, images, videos, audios)
        prefix = [tokenizer.convert_tokens_to_ids(self.image_token)] * (processor.image_seq_length * len(images))
        if images and (not input_ids or input_ids[0] != tokenizer.bos_token_id):
            prefix.append(tokenizer.bos_token_id)
        input_ids = prefix + list(input_ids)
        if labels is not None:
            labels = [IGNORE_INDEX] * len(prefix) + list(labels)
        return input_ids, labels

    @staticmethod
    def token_type_ids_from_labels(labels: Any) -> Any:
        """1 where the model is trained to answer (labels set), else 0."""
        return (labels != IGNORE_INDEX).long()


register_mm_plugin("paligemma", PaliGemmaPlugin)
register_composite_model(
    CompositeModel(
        model_type="paligemma",
        template="paligemma",
        projector_key="model.multi_modal_projector",
        vision_model_keys=["model.vision_tower"],
        language_model_keys=["model.language_model", "lm_head"],
        lora_conflict_keys=[],
        speed=SpeedCapabilities(fusable_head=True),
    )
)


# No chat format: PaliGemmaProcessor builds images + BOS + prefix + "\n" (token type 0), then the suffix + EOS
# (token type 1, the trained part). The images (and BOS when missing) come from process_token_ids.
register_template(Template(name="paligemma", plugin="paligemma", prefix="<bos>", user="{content}\n",
                           assistant="{content}<eos>", system_in_user=True))
