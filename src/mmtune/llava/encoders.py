"""Vision towers: transformers' CLIP and SigLIP vision models with LLaVA's feature rules.

A tower is built either from a recorded ``vision_config`` (random weights, filled by
``from_pretrained`` of the whole LLaVA checkpoint) or from a checkpoint path. Under
``delay_load`` only the path's config is read; :meth:`VisionTower.allocate` then creates the
modules for the outer model's ``from_pretrained`` to fill, and :meth:`VisionTower.load_model`
loads the weights from the path (what the checkpoint lacks, or all of them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

#: vision model_type -> (vision model class name, image processor class name, has a CLS token)
TOWERS: dict[str, tuple[str, str, bool]] = {
    "clip_vision_model": ("CLIPVisionModel", "CLIPImageProcessor", True),
    "siglip_vision_model": ("SiglipVisionModel", "SiglipImageProcessor", False),
}
#: full (text + vision) configs whose vision half is a tower
_FULL = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def vision_config_from(config: Any) -> Any:
    """The vision half of a CLIP / SigLIP config (a full config or a vision-only one)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type not in TOWERS:
            raise ValueError(f"unsupported vision tower type {model_type!r} (supported: {', '.join(TOWERS)})")
        return AutoConfig.for_model(model_type, **config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a config or dict, got {type(config).__name__}")
    if config.model_type in _FULL:
        return config.vision_config
    if config.model_type not in TOWERS:
        raise ValueError(f"unsupported vision tower type {config.model_type!r} (supported: {', '.join(TOWERS)})")
    return config


def _tower_class(vision_config: Any) -> Any:
    import transformers

    return getattr(transformers, TOWERS[vision_config.model_type][0])


class VisionTower(nn.Module):
    """Runs the tower and returns the features LLaVA feeds its projector: the hidden states
    of ``select_layer``, without the CLS token (``patch``) or with it (``cls_patch``)."""

    def __init__(
        self,
        name_or_path: str | None,
        select_layer: int = -2,
        select_feature: str = "patch",
        vision_config: Any = None,
        delay_load: bool = False,
    ) -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be patch or cls_patch, not {select_feature!r}")
        self.name_or_path = name_or_path
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.is_loaded = False
        if vision_config is not None:
            self.cfg_only = vision_config_from(vision_config)
            self.vision_tower = _tower_class(self.cfg_only)(self.cfg_only)
            self.vision_tower.requires_grad_(False)
            self.is_loaded = True
        elif name_or_path is None:
            raise ValueError("a vision tower needs a checkpoint path or a vision_config")
        else:
            from transformers import AutoConfig

            try:
                found = AutoConfig.from_pretrained(name_or_path)
            except (OSError, ValueError) as exc:
                raise OSError(f"mm_vision_tower={name_or_path!r}: cannot read the vision tower's config ({exc}); "
                              "point it to a local CLIP / SigLIP checkpoint folder or a reachable hub id") from exc
            self.cfg_only = vision_config_from(found)
            if not delay_load:
                self.load_model()
        if select_feature == "cls_patch" and not self.has_cls:
            raise ValueError(f"{self.cfg_only.model_type} has no CLS token: use mm_vision_select_feature=patch")

    def allocate(self) -> None:
        """Create the tower's modules from its config, their weights still to come: from the
        checkpoint of the model that holds the tower (its ``from_pretrained`` fills them) or
        from :meth:`load_model`. Until then the tower is not loaded and refuses to run."""
        if "vision_tower" not in self._modules:
            self.vision_tower = _tower_class(self.cfg_only)(self.cfg_only)
            self.vision_tower.requires_grad_(False)

    def load_model(self, dtype: torch.dtype | None = None) -> None:
        """Load the tower's weights from its checkpoint (frozen). Modules made by
        :meth:`allocate` keep their device and dtype: the weights are copied into them."""
        if self.is_loaded:
            return
        if "vision_tower" in self._modules:
            self.load_weights()
            return
        cls = _tower_class(self.cfg_only)
        self.vision_tower = cls.from_pretrained(self.name_or_path, dtype=dtype)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True
        logger.info("vision tower %s loaded from %s", cls.__name__, self.name_or_path)

    def load_weights(self, names: Sequence[str] | None = None) -> None:
        """Copy the weights of the tower's checkpoint (``name_or_path``) into its modules: all
        of them, or only ``names`` (state-dict keys of the tower model) when given."""
        cls = _tower_class(self.cfg_only)
        if not self.name_or_path:
            raise ValueError("the vision tower's weights are not in the checkpoint and mm_vision_tower names no "
                             "checkpoint to load them from")
        try:
            fresh = cls.from_pretrained(self.name_or_path).state_dict()
        except (OSError, ValueError) as exc:
            raise OSError(f"the vision tower's weights are not in the checkpoint and mm_vision_tower="
                          f"{self.name_or_path!r} cannot be loaded ({exc}): point mm_vision_tower in config.json "
                          f"to a local {cls.__name__} checkpoint or a reachable hub id") from exc
        if names is not None:
            absent = sorted(set(names) - set(fresh))
            if absent:
                raise ValueError(f"mm_vision_tower={self.name_or_path!r} lacks {len(absent)} weights the tower "
                                 f"needs (e.g. {absent[0]})")
            fresh = {name: fresh[name] for name in names}
        self.vision_tower.load_state_dict(fresh, strict=names is None)
        self.is_loaded = True
        logger.info("vision tower %s: %d weights loaded from %s", cls.__name__, len(fresh), self.name_or_path)

    @property
    def has_cls(self) -> bool:
        return TOWERS[self.cfg_only.model_type][2]

    @property
    def config(self) -> Any:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def num_tokens(self) -> int:
        """Features per image (one square crop)."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    def image_processor(self) -> Any:
        """The tower's image processor (see :func:`tower_image_processor`)."""
        return tower_image_processor(self.name_or_path, self.config)

    def _select(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        features = hidden_states[self.select_layer]
        if self.select_feature == "patch" and self.has_cls:
            features = features[:, 1:]
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [N, 3, H, W] -> features [N, tokens, hidden]."""
        if not self.is_loaded:
            raise RuntimeError(f"vision tower {self.name_or_path} is not loaded: call load_model() first")
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self._select(out.hidden_states)


def tower_image_processor(name_or_path: str | None, vision_config: Any) -> Any:
    """The image processor of the tower at ``name_or_path``: from its checkpoint when there is
    one, else built from ``vision_config``'s image size with the processor class's default
    statistics. Reads no weights."""
    import transformers

    vision_config = vision_config_from(vision_config)
    _, class_name, has_cls = TOWERS[vision_config.model_type]
    cls = getattr(transformers, class_name)
    if name_or_path:
        try:
            return cls.from_pretrained(name_or_path)
        except (OSError, ValueError):
            logger.info("no image processor in %s: building one from the tower config", name_or_path)
    side = vision_config.image_size
    if has_cls:
        return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return cls(size={"height": side, "width": side})


def tower_config(config: Any) -> Any:
    """The vision config of the tower a :class:`LlavaConfig` names: its recorded
    ``vision_config``, else the config of its ``mm_vision_tower`` checkpoint (read, no weights)."""
    recorded = getattr(config, "vision_config", None)
    if recorded is not None:
        return vision_config_from(recorded)
    name = getattr(config, "mm_vision_tower", None)
    if not name:
        raise ValueError("the LLaVA config names no vision tower (mm_vision_tower / vision_config)")
    from transformers import AutoConfig

    try:
        return vision_config_from(AutoConfig.from_pretrained(name))
    except (OSError, ValueError) as exc:
        raise OSError(f"mm_vision_tower={name!r}: cannot read the vision tower's config ({exc}); point it to a "
                      "local CLIP / SigLIP checkpoint folder or a reachable hub id") from exc


def build_vision_tower(config: Any, delay_load: bool = False) -> VisionTower:
    """The tower a :class:`LlavaConfig` names (its ``vision_config`` when recorded)."""
    return VisionTower(
        getattr(config, "mm_vision_tower", None),
        select_layer=getattr(config, "mm_vision_select_layer", -2),
        select_feature=getattr(config, "mm_vision_select_feature", "patch"),
        vision_config=getattr(config, "vision_config", None),
        delay_load=delay_load,
    )
