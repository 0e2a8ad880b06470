"""``LlavaConfig``: a Llama config plus the multimodal fields of LLaVA checkpoints."""

from __future__ import annotations

import copy
from typing import Any

from transformers import LlamaConfig

#: the multimodal fields and their defaults (names as in LLaVA's config.json files)
MM_DEFAULTS: dict[str, Any] = {
    "mm_vision_tower": None,  # path or hub id of a CLIP / SigLIP checkpoint
    "vision_config": None,  # the tower's own config (dict), recorded once the tower is built
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",  # patch | cls_patch
    "mm_projector_type": "linear",  # linear | mlp{N}x_gelu | identity
    "mm_hidden_size": None,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "square",  # square | pad | anyres
    "mm_patch_merge_type": "flat",  # flat | spatial_unpad
    "image_grid_pinpoints": None,
    "tokenizer_model_max_length": None,
    "tokenizer_padding_side": "right",
}


def _with_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    for key, value in MM_DEFAULTS.items():
        kwargs.setdefault(key, copy.deepcopy(value))
    return kwargs


class LlavaConfig(LlamaConfig):
    """Llama + vision tower + projector (``model_type = "llava_llama"``)."""

    model_type = "llava_llama"

    # transformers >= 5 builds configs as strict dataclasses (extra kwargs reach
    # ``__post_init__``); older 5.x releases take them in ``__init__``.
    if hasattr(LlamaConfig, "__post_init__"):

        def __post_init__(self, **kwargs: Any) -> None:
            super().__post_init__(**_with_defaults(kwargs))

    else:  # pragma: no cover - depends on the installed transformers

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**_with_defaults(kwargs))
