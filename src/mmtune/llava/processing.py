"""``LlavaLlamaProcessor``: tokenizer + the tower's image processor + LLaVA's image rules.

Saved and loaded with ``save_pretrained`` / ``AutoProcessor.from_pretrained`` like any
transformers processor; ``__call__`` gives ``input_ids`` with one ``IMAGE_TOKEN_INDEX`` per
``<image>`` and the images as the model takes them, with ``image_sizes`` as ``[width, height]``
rows (LLaVA's ``image.size``; ``image_grid_pinpoints`` are ``[width, height]`` pairs too).

It also stands in for the tower's image processor that the original LLaVA's
``load_pretrained_model`` returns in its place: ``preprocess``, ``image_mean``, ``image_std``,
``crop_size`` and ``size`` are the image processor's, and ``mmtune.llava.process_images`` takes
it, so the original's inference scripts run with it unchanged.
"""

from __future__ import annotations

from typing import Any

from transformers import BatchFeature, ProcessorMixin

from .constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from .mm_utils import preprocess_images, tokenizer_image_token


class LlavaLlamaProcessor(ProcessorMixin):
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_aspect_ratio: str = "square",
                 image_grid_pinpoints: Any = None, mm_use_im_start_end: bool = False, chat_template: Any = None,
                 **kwargs: Any) -> None:
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = image_grid_pinpoints
        self.mm_use_im_start_end = mm_use_im_start_end
        self.image_token = DEFAULT_IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def expand_placeholder(self, text: str) -> str:
        """``<image>`` wrapped in ``<im_start>``/``<im_end>`` when the model was trained so."""
        if not self.mm_use_im_start_end:
            return text
        return text.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)

    def process_images(self, images: list[Any]) -> dict[str, Any]:
        return preprocess_images(images, self.image_processor, self.image_aspect_ratio, self.image_grid_pinpoints)

    # ---------------------------------------------------------------- the image processor's face
    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """The tower's image processor's ``preprocess`` (``pixel_values``, no aspect-ratio rule),
        which code written for the original LLaVA calls on what its loader returns."""
        return self.image_processor.preprocess(images, return_tensors=return_tensors, **kwargs)

    @property
    def image_mean(self) -> Any:
        return self.image_processor.image_mean

    @property
    def image_std(self) -> Any:
        return self.image_processor.image_std

    @property
    def crop_size(self) -> Any:
        return getattr(self.image_processor, "crop_size", None)

    @property
    def size(self) -> Any:
        return self.image_processor.size

    def __call__(self, text: str | list[str] | None = None, images: Any = None, return_tensors: str | None = "pt",
                 **kwargs: Any) -> BatchFeature:
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            ids = [tokenizer_image_token(self.expand_placeholder(t), self.tokenizer) for t in texts]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            length = max(len(x) for x in ids)
            side = self.tokenizer.padding_side
            data["input_ids"] = [([pad] * (length - len(x)) + x) if side == "left" else x + [pad] * (length - len(x))
                                 for x in ids]
            data["attention_mask"] = [([0] * (length - len(x)) + [1] * len(x)) if side == "left"
                                      else [1] * len(x) + [0] * (length - len(x)) for x in ids]
        if images is not None:
            images = [images] if not isinstance(images, (list, tuple)) else list(images)
            data.update(self.process_images(images))
        return BatchFeature(data, tensor_type=return_tensors)
