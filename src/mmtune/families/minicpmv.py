"""MiniCPM-V 2.5 / 2.6 (remote code: ``trust_remote_code=True`` with the authors' processor).

The authors' slicing rule, implemented here from their documented processor:

* ``ratio = W*H / scale_resolution^2``; ``multiple = min(ceil(ratio), max_slice_nums)``;
  ``multiple <= 1`` means no slices;
* candidate slice counts ``multiple-1, multiple, multiple+1`` (dropping 1 and > max);
  every factorisation ``cols x rows`` of a count is scored by
  ``|log(W/H) - log(cols/rows)|``; the first best wins (fewest columns on ties);
* text: ``<image_id>i</image_id>`` (when ``use_image_id``) + ``<image>`` + ``<unk>`` x query_num
  + ``</image>``, then ``rows`` lines joined by ``\\n``, each ``cols`` x
  (``<slice>`` + ``<unk>`` x query_num + ``</slice>``).

The slice count depends only on the size, so tokenising reads headers only; the pixel
tensors come from the checkpoint's own image processor, with ``image_bound`` built here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mmtune.model.composite import CompositeModel, register_composite_model
from mmtune.plugins import IMAGE_PLACEHOLDER, BasePlugin, Message, register_mm_plugin


def sliced_grid(width: int, height: int, max_slice_nums: int = 9, scale_resolution: int = 448) -> tuple[int, int] | None:
    """(cols, rows) of slices for an image of ``width`` x ``height``, or None (no slicing)."""
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_error = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            error = abs(log_ratio - math.log(cols / (count // cols)))
            if error < best_error:
                best, best_error = (cols, count // cols), error
    return best


class MiniCPMVPlugin(BasePlugin):
    default_image_token = "<image>"
    supports_no_expand = False
    #: MiniCPM-V 2.6 defaults; a loaded processor's own values win
    query_num = 64
    max_slice_nums = 9
    scale_resolution = 448
    use_image_id = True
    slice_mode = True

    def _setting(self, processor: Any, name: str) -> Any:
        for owner in (getattr(processor, "image_processor", None), processor):
            value = getattr(owner, name, None) if owner is not None else None
            if value is not None:
                return value
        return getattr(self, name)

    def image_text(self, processor: Any, index: int, width: int, height: int) -> str:
        query = self._setting(processor, "image_feature_size") if processor is not None and hasattr(
            getattr(processor, "image_processor", None), "image_feature_size") else self._setting(processor, "query_num")
        unk = "<unk>" * int(query)
        text = f"<image>{unk}</image>"
        if self._setting(processor, "use_image_id"):
            text = f"<image_id>{index}</image_id>{text}"
        grid = sliced_grid(width, height, int(self._setting(processor, "max_slice_nums")),
                           int(self._setting(processor, "scale_resolution")))
        if self._setting(processor, "slice_mode") and grid is not None:
            cols, rows = grid
            text += "\n".join("".join(f"<slice>{unk}</slice>" for _ in range(cols)) for _ in range(rows))
        return text

    def process_messages(
        self, messages: Sequence[Message], images: Sequence[Any], videos: Sequence[Any], audios: Sequence[Any], processor: Any
    ) -> list[Message]:
        self._validate_messages(messages, images, videos, audios)
        sizes = self.image_sizes(images)
        return self.replace_placeholders(messages, IMAGE_PLACEHOLDER, lambda i: self.image_text(processor, i, *sizes[i]))

    @staticmethod
    def image_bounds(ids: Sequence[int], tokenizer: Any) -> torch.Tensor:
        """(start, end) spans of ``<unk>`` query tokens inside each image/slice, for the model."""
        starts = {tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<slice>")}
        ends = {tokenizer.convert_tokens_to_ids("</image>"), tokenizer.convert_tokens_to_ids("</slice>")}
        opens = [i + 1 for i, t in enumerate(ids) if t in starts]
        closes = [i for i, t in enumerate(ids) if t in ends]
        if len(opens) != len(closes):
            raise ValueError(f"unbalanced image markers: {len(opens)} openings, {len(closes)} closings")
        return torch.tensor(list(zip(opens, closes)), dtype=torch.long).reshape(-1, 2)

    def get_mm_inputs(
        self,
        images: Sequence[Any],
        videos: Sequence[Any],
        audios: Sequence[Any],
        imglens: Sequence[int],
        vidlens: Sequence[int],
        audlens: Sequence[int],
        batch_ids: Sequence[list[int]],
        processor: Any,
    ) -> dict[str, Any]:
        """Pixel slices and target sizes from the checkpoint's image processor, per sample."""
        self._validate_input(processor, images, videos, audios)
        out: dict[str, Any] = {"image_bound": [self.image_bounds(ids, processor.tokenizer) for ids in batch_ids]}
        decoded = self._regularize_images(images)
        pixel_values, tgt_sizes, start = [], [], 0
        for n in imglens:
            if n:
                result = processor.image_processor(decoded[start:start + n], return_tensors="pt")
                pixel_values.append(result["pixel_values"][0])
                tgt_sizes.append(result["tgt_sizes"][0])
            else:
                pixel_values.append([])
                tgt_sizes.append(torch.zeros(0, 2, dtype=torch.long))
            start += n
        out.update(pixel_values=pixel_values, tgt_sizes=tgt_sizes)
        return out


register_mm_plugin("minicpmv", MiniCPMVPlugin)
register_composite_model(
    CompositeModel(
        model_type="minicpmv",  # the authors' remote-code layout
        projector_key="resampler",
        vision_model_keys=["vpm"],
        language_model_keys=["llm"],
        lora_conflict_keys=[],
    )
)
