"""mmtune's native LLaVA (``llava_llama``, see :mod:`mmtune.llava`).

No expansion: each ``<image>`` stays one token and becomes ``IMAGE_TOKEN_INDEX`` (-200); the
model splices the image's features there, so the sequence the LM sees is longer than
``input_ids`` by (features - 1) per image. Two templates: ``llava_llama_plain`` (stage 1:
the image alone, then the caption, as LLaVA's ``preprocess_plain``) and ``llava_llama`` (stage
2: Vicuna v1 conversation), both opening with BOS as LLaVA's ``tokenizer_image_token`` does
with Vicuna's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.speed.capabilities import SpeedCapabilities
from mmtune.plugins import BasePlugin, Message, register_mm_plugin
from mmtune.templates import TEMPLATES, Template, register_template

IMAGE_TOKEN_INDEX = -200  # mmtune.llava.IMAGE_TOKEN_INDEX (not imported: plugins stay light)
IM_START, IM_END = "<im_start>", "<im_end>"


class LlavaLlamaPlugin(BasePlugin):
    """``<image>`` -> one ``IMAGE_TOKEN_INDEX``; ``images`` / ``image_sizes`` as the
    processor's aspect-ratio rule (square, pad, anyres) makes them."""

    default_image_token = "<image>"
    #: ids that stand for media after :meth:`process_token_ids` (truncation never cuts them)
    placeholder_ids = (IMAGE_TOKEN_INDEX,)

    def process_messages(self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any],
                         audios: Sequence[Any], processor: Any) -> list[Message]:
        messages = super().process_messages(messages, images, videos, audios, processor)
        if getattr(processor, "mm_use_im_start_end", False):
            for message in messages:
                message["content"] = message["content"].replace(self.image_token, IM_START + self.image_token + IM_END)
        return messages

    def tokenize(self, text: str, tokenizer: Any) -> list[int]:
        """As LLaVA's ``tokenizer_image_token``: the text between placeholders is tokenised
        piece by piece and each ``<image>`` is one ``IMAGE_TOKEN_INDEX``. A leading BOS (the
        templates' prefix) becomes its id and the text after it is tokenised on its own, as
        the original tokenises it (its tokenizer adds BOS): a Llama tokenizer that marks only
        a text's first word as word-initial (``legacy=False``) would otherwise take the word
        after ``<s>`` as a continuation, another token."""
        pieces = text.split(self.image_token)
        ids: list[int] = []
        bos = getattr(tokenizer, "bos_token", None)
        if bos and pieces[0].startswith(bos) and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            pieces[0] = pieces[0][len(bos):]
        for i, piece in enumerate(pieces):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            if piece:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def image_token_id(self, tokenizer: Any) -> int:
        token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token} token: build the model's processor with "
                             "mmtune (LlavaMetaForCausalLM.initialize_vision_tokenizer adds it)")
        return token_id

    def process_token_ids(self, input_ids: list[int], labels: list[int] | None, images: Sequence[Any],
                          videos: Sequence[Any], audios: Sequence[Any], tokenizer: Any,
                          processor: Any) -> tuple[list[int], list[int] | None]:
        input_ids, labels = super().process_token_ids(input_ids, labels, images, videos, audios, tokenizer, processor)
        token_id = self.image_token_id(tokenizer)  # ids tokenised without :meth:`tokenize`
        input_ids = [IMAGE_TOKEN_INDEX if t == token_id else t for t in input_ids]
        if labels is not None:
            labels = [-100 if t == IMAGE_TOKEN_INDEX else y for t, y in zip(input_ids, labels)]
        return input_ids, labels

    def _get_mm_inputs(self, images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any],
                       processor: Any) -> dict[str, Any]:
        if not images:
            return {}
        return processor.process_images(self._regularize_images(images))


register_mm_plugin("llava_llama", LlavaLlamaPlugin)


@dataclass(frozen=True)
class ImageOnlyPromptTemplate(Template):
    """LLaVA's stage-1 format (``conv_llava_plain`` with ``preprocess_plain``): each user turn
    that holds images is replaced by its image placeholders alone, then the caption and the
    separator follow. The original does this (``source[0]['value'] = DEFAULT_IMAGE_TOKEN``), so
    the prompts of LCS-558k rows ("Give a brief description of the image.\n<image>") never reach
    the model; keeping them would train on other tokens than the original. A ``<im_start>`` /
    ``<im_end>`` wrapping goes too, as there. A user turn without an image keeps its text (the
    original rejects such rows)."""

    image_token: str = "<image>"

    def render_turns(self, messages: Sequence[dict[str, str]], system: str | None = None) -> list[tuple[str, str]]:
        kept = [{**m, "content": self.image_token * m["content"].count(self.image_token)}
                if m["role"] == "user" and self.image_token in m["content"] else m for m in messages]
        return super().render_turns(kept, system)


def _image_only_prompts(template: Template, name: str, **changes: Any) -> ImageOnlyPromptTemplate:
    values = {f.name: getattr(template, f.name) for f in fields(template)}
    return ImageOnlyPromptTemplate(**{**values, "name": name, **changes})


register_template(_image_only_prompts(TEMPLATES["plain"], "llava_llama_plain", plugin="llava_llama", prefix="<s>"))
register_template(TEMPLATES["vicuna_v1"].bind("llava_llama", plugin="llava_llama", prefix="<s>"))

register_composite_model(CompositeModel(
    model_type="llava_llama",
    template="llava_llama",
    projector_key="model.mm_projector",
    vision_model_keys=["model.vision_tower"],
    language_model_keys=["model.embed_tokens", "model.layers", "model.norm", "lm_head"],
    speed=SpeedCapabilities(fusable_head=True),
))
