"""LLaVA's two mixins: the model half (tower + projector) and the causal-LM half (splicing
image features into the token embeddings at the ``IMAGE_TOKEN_INDEX`` placeholders)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn
from tokenizers import AddedToken

from .constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from .encoders import build_vision_tower
from .mm_utils import anyres_grid, image_size
from .projectors import build_vision_projector

logger = logging.getLogger(__name__)

#: model-argument names read by ``initialize_vision_modules`` -> config field
_MODULE_ARGS = {
    "vision_tower": "mm_vision_tower",
    "mm_vision_select_layer": "mm_vision_select_layer",
    "mm_vision_select_feature": "mm_vision_select_feature",
    "mm_projector_type": "mm_projector_type",
    "mm_patch_merge_type": "mm_patch_merge_type",
    "mm_use_im_start_end": "mm_use_im_start_end",
    "mm_use_im_patch_token": "mm_use_im_patch_token",
    "image_aspect_ratio": "image_aspect_ratio",
    "image_grid_pinpoints": "image_grid_pinpoints",
}


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file (``weights_only``), or a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"projector file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle errors have no common base class
        raise ValueError(f"cannot read projector file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"projector file {path} does not hold a state dict of tensors")
    return state


_TOWER_KEY = "vision_tower.vision_tower."


def complete_vision_tower(model: Any, missing_keys: Any) -> set[str]:
    """Finish loading the vision tower after ``from_pretrained``: the checkpoint filled the
    weights it holds (LLaVA's full checkpoints hold the tower, possibly trained), and those it
    lacks come from ``mm_vision_tower``, the tower checkpoint LLaVA's own builder loads with
    ``vision_tower.load_model()`` (stage-1 and LoRA outputs, a base LM under a LLaVA config,
    checkpoints saved without the tower). Returns ``missing_keys`` less the tower's."""
    missing = set(missing_keys)
    tower = model.get_vision_tower()
    if tower is None:
        return missing
    if "vision_tower" not in tower._modules:
        tower.load_model(dtype=model.get_input_embeddings().weight.dtype)
        tower.to(model.get_input_embeddings().weight.device)
        return {k for k in missing if _TOWER_KEY not in k}
    lost = sorted(k for k in missing if _TOWER_KEY in k)
    if lost:
        tower.load_weights([k.split(_TOWER_KEY, 1)[1] for k in lost])
    tower.is_loaded = True
    return missing - set(lost)


class LlavaMetaModel:
    """Mixed into the base model: owns ``vision_tower``, ``mm_projector`` and, for
    ``spatial_unpad`` merging, the ``image_newline`` embedding."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        if getattr(config, "mm_vision_tower", None) or getattr(config, "vision_config", None):
            # The tower's modules exist from the start, so from_pretrained fills them from the
            # checkpoint when it holds them; otherwise from_pretrained loads them from
            # mm_vision_tower (see complete_vision_tower). Checkpoints of the original LLaVA
            # name only mm_vision_tower: its config is read here and recorded, so a re-saved
            # checkpoint is whole.
            tower = build_vision_tower(config, delay_load=True)
            if not tower.is_loaded:
                tower.allocate()
                config.vision_config = tower.cfg_only.to_dict()
            self.vision_tower = tower
            self.mm_projector = build_vision_projector(config)
            if "unpad" in (getattr(config, "mm_patch_merge_type", "flat") or ""):
                self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))

    def get_vision_tower(self) -> Any:
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, model_args: Any) -> None:
        """Attach (or replace) tower and projector as ``model_args`` says; load a stage-1
        projector from ``model_args.pretrain_mm_mlp_adapter`` when given."""
        config = self.config  # type: ignore[attr-defined]
        for arg, key in _MODULE_ARGS.items():
            value = getattr(model_args, arg, None)
            if value is not None:
                setattr(config, key, value)
        if not getattr(config, "mm_vision_tower", None):
            raise ValueError("initialize_vision_modules: model_args.vision_tower names no tower")
        embed = self.get_input_embeddings()  # type: ignore[attr-defined]
        dtype, device = embed.weight.dtype, embed.weight.device
        tower = self.get_vision_tower()
        if tower is None or tower.name_or_path != config.mm_vision_tower or not tower.is_loaded:
            config.vision_config = None
            tower = build_vision_tower(config, delay_load=True)
            tower.load_model(dtype=dtype)
            self.vision_tower = tower.to(device)
        config.vision_config = tower.config.to_dict()
        config.mm_hidden_size = tower.hidden_size
        projector = getattr(self, "mm_projector", None)
        fresh = build_vision_projector(config)
        if projector is None or [p.shape for p in projector.parameters()] != [p.shape for p in fresh.parameters()]:
            self.mm_projector = fresh.to(device=device, dtype=dtype)
        if "unpad" in (config.mm_patch_merge_type or "") and getattr(self, "image_newline", None) is None:
            std = 1 / config.hidden_size**0.5
            self.image_newline = nn.Parameter(torch.randn(config.hidden_size, dtype=dtype, device=device) * std)
        path = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if path:
            self.load_projector(path)

    def load_projector(self, path: str) -> None:
        """Load a stage-1 file: ``mm_projector.*`` weights (any key prefix), and the tower's
        position embeddings and ``image_newline`` when the file carries them."""
        state = load_state_file(path)
        projector = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
        if not projector:
            raise ValueError(f"{path} holds no mm_projector weights (keys: {', '.join(list(state)[:5])} ...)")
        own = self.mm_projector.state_dict()
        missing = sorted(set(own) - set(projector))
        unexpected = sorted(set(projector) - set(own))
        wrong = [f"{k}: file {tuple(projector[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in projector and projector[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"projector file {path} does not match mm_projector_type={self.config.mm_projector_type!r}"  # type: ignore[attr-defined]
                f" (mm_hidden_size={self.config.mm_hidden_size}, hidden_size={self.config.hidden_size}):"  # type: ignore[attr-defined]
                f" missing {missing}, unexpected {unexpected}, shape mismatches {wrong}"
            )
        self.mm_projector.load_state_dict(projector)
        loaded = [f"mm_projector ({len(projector)} tensors)"]
        position = [v for k, v in state.items() if "vision_tower" in k and k.endswith("position_embedding.weight")]
        if position:
            target = next(m.weight for n, m in self.get_vision_tower().named_modules() if n.endswith("position_embedding"))
            if position[0].shape != target.shape:
                raise ValueError(f"{path}: vision position embeddings {tuple(position[0].shape)} do not fit the "
                                 f"tower's {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(position[0])
            loaded.append("vision position embeddings")
        newline = [v for k, v in state.items() if k.endswith("image_newline")]
        if newline and getattr(self, "image_newline", None) is not None:
            with torch.no_grad():
                self.image_newline.copy_(newline[0])
            loaded.append("image_newline")
        logger.info("loaded %s from %s", ", ".join(loaded), path)


class LlavaMetaForCausalLM:
    """Mixed into the causal LM: image encoding and feature splicing."""

    def get_model(self) -> Any:
        return self.model  # type: ignore[attr-defined]

    def get_vision_tower(self) -> Any:
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> projected features [N, tokens, hidden]."""
        return self.get_model().mm_projector(self.get_vision_tower()(images))

    # ---------------------------------------------------------------- image features
    def image_features(self, images: Any, image_sizes: Any = None) -> list[torch.Tensor]:
        """One [tokens, hidden] tensor per image. ``images`` is [N, 3, H, W] (one crop per
        image), or per-image tile stacks (a list of [tiles, 3, H, W] / [3, H, W], or a padded
        [N, tiles, 3, H, W] with ``image_sizes`` as ``[width, height]`` rows for anyres)."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return list(self.encode_images(images).unbind(0))
        config = self.config  # type: ignore[attr-defined]
        tower = self.get_vision_tower()
        if isinstance(images, torch.Tensor) and images.ndim == 5:
            stacks = list(images.unbind(0))
            if image_sizes is not None and config.image_aspect_ratio == "anyres":
                grids = [anyres_grid(size, config.image_grid_pinpoints, tower.image_size) for size in image_sizes]
                stacks = [s[: 1 + cols * rows] for s, (cols, rows) in zip(stacks, grids)]
        else:
            stacks = [x if x.ndim == 4 else x.unsqueeze(0) for x in images]
        counts = [s.shape[0] for s in stacks]
        encoded = self.encode_images(torch.cat(stacks)).split(counts)
        merge = config.mm_patch_merge_type or "flat"
        if merge == "flat":
            return [f.flatten(0, 1) for f in encoded]
        if not merge.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type {merge!r} (flat, spatial, spatial_unpad)")
        if image_sizes is None:
            raise ValueError(f"mm_patch_merge_type={merge} needs image_sizes")
        return [self._spatial_merge(f, image_size(sz), "unpad" in merge) for f, sz in zip(encoded, image_sizes)]

    def _spatial_merge(self, tiles: torch.Tensor, size: tuple[int, int], unpad: bool) -> torch.Tensor:
        """Base view, then the tiles re-assembled into the image's grid (cropped back to the
        image's aspect ratio and closed by ``image_newline`` per row when ``unpad``), as
        LLaVA merges them; ``size`` is the image's (width, height)."""
        tower = self.get_vision_tower()
        newline = getattr(self.get_model(), "image_newline", None)
        base = tiles[0]
        if tiles.shape[0] == 1:
            return torch.cat([base, newline[None].to(base.dtype)]) if unpad else base
        config = self.config  # type: ignore[attr-defined]
        if config.image_aspect_ratio != "anyres":
            raise ValueError(f"mm_patch_merge_type={config.mm_patch_merge_type} with several tiles per image needs "
                             f"image_aspect_ratio=anyres, not {config.image_aspect_ratio!r}")
        side = tower.num_patches_per_side
        if base.shape[0] != side * side:
            raise ValueError("spatial patch merging needs mm_vision_select_feature=patch")
        cols, rows = anyres_grid(size, config.image_grid_pinpoints, tower.image_size)
        feats = tiles[1:].view(rows, cols, side, side, -1)
        if not unpad:
            return torch.cat([base, feats.permute(0, 2, 1, 3, 4).flatten(0, 3)])
        hidden = feats.shape[-1]
        plane = feats.permute(4, 0, 2, 1, 3).reshape(hidden, rows * side, cols * side)
        plane = unpad_features(plane, size)
        plane = torch.cat([plane, newline[:, None, None].to(plane.dtype).expand(hidden, plane.shape[1], 1)], dim=2)
        return torch.cat([base, plane.flatten(1, 2).transpose(0, 1)])

    # ---------------------------------------------------------------- splicing
    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: Any,
        image_sizes: Any = None,
        padding_side: str | None = None,
    ) -> tuple[Any, Any, Any, Any, Any, Any]:
        """Replace each ``IMAGE_TOKEN_INDEX`` by its image's features.

        Returns ``(input_ids, position_ids, attention_mask, past_key_values, inputs_embeds,
        labels)``: unchanged ids and no embeddings when there is nothing to splice (no images,
        or a generation step whose images are already in the KV cache); otherwise ``None`` ids
        and new embeddings, labels (``IGNORE_INDEX`` on image features), attention mask and
        position ids, each sample truncated to ``tokenizer_model_max_length`` and padded on
        ``padding_side`` (default: the config's ``tokenizer_padding_side``)."""
        tower = self.get_vision_tower()
        if input_ids is None:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        is_image = (input_ids == IMAGE_TOKEN_INDEX) & mask
        placeholders = int(is_image.sum())
        n_images = _count_images(images)
        if placeholders == 0:
            cached = past_key_values is not None and _cache_length(past_key_values) > 0
            if n_images and not cached:
                raise ValueError(f"{n_images} images given but input_ids hold no <image> placeholder "
                                 f"(IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX})")
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if tower is None:
            raise ValueError("input_ids hold <image> placeholders but the model has no vision tower")
        if placeholders != n_images:
            per_sample = is_image.sum(1).tolist()
            raise ValueError(f"the batch has {placeholders} <image> placeholders (per sample: {per_sample}) "
                             f"but {n_images} images")
        features = self.image_features(images, image_sizes)
        embeds = self.get_model().embed_tokens(input_ids.masked_fill(input_ids < 0, 0))
        limit = getattr(self.config, "tokenizer_model_max_length", None)  # type: ignore[attr-defined]
        rows: list[torch.Tensor] = []
        row_labels: list[torch.Tensor] = []
        k = 0
        for b in range(input_ids.shape[0]):
            keep = mask[b]
            ids_b, emb_b = input_ids[b][keep], embeds[b][keep]
            lab_b = labels[b][keep] if labels is not None else torch.full_like(ids_b, IGNORE_INDEX)
            parts: list[torch.Tensor] = []
            part_labels: list[torch.Tensor] = []
            start = 0
            for p in (ids_b == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                feat = features[k].to(emb_b.dtype)
                k += 1
                parts += [emb_b[start:p], feat]
                part_labels += [lab_b[start:p], lab_b.new_full((feat.shape[0],), IGNORE_INDEX)]
                start = p + 1
            parts.append(emb_b[start:])
            part_labels.append(lab_b[start:])
            row, row_label = torch.cat(parts), torch.cat(part_labels)
            if limit is not None:
                row, row_label = row[:limit], row_label[:limit]
            rows.append(row)
            row_labels.append(row_label)
        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right") or "right"  # type: ignore[attr-defined]
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be left or right, not {side!r}")
        length = max(r.shape[0] for r in rows)
        out_embeds, out_labels, out_mask, out_pos = [], [], [], []
        for row, row_label in zip(rows, row_labels):
            n, pad = row.shape[0], length - row.shape[0]
            filler = row.new_zeros(pad, row.shape[1])
            out_embeds.append(torch.cat([filler, row] if side == "left" else [row, filler]))
            label_fill = row_label.new_full((pad,), IGNORE_INDEX)
            out_labels.append(torch.cat([label_fill, row_label] if side == "left" else [row_label, label_fill]))
            ones, zeros = mask.new_ones(n), mask.new_zeros(pad)
            out_mask.append(torch.cat([zeros, ones] if side == "left" else [ones, zeros]))
            positions = torch.arange(n, device=row.device)
            zpos = positions.new_zeros(pad)
            out_pos.append(torch.cat([zpos, positions] if side == "left" else [positions, zpos]))
        new_mask = torch.stack(out_mask)
        if attention_mask is not None:
            new_mask = new_mask.to(attention_mask.dtype)
        return (None, torch.stack(out_pos), new_mask, past_key_values, torch.stack(out_embeds),
                torch.stack(out_labels) if labels is not None else None)

    # ---------------------------------------------------------------- tokenizer
    @staticmethod
    def add_image_tokens(model_args: Any, tokenizer: Any) -> list[str]:
        """Add ``<image>`` (one token; it becomes ``IMAGE_TOKEN_INDEX`` and is never embedded)
        and the ``<im_patch>`` / ``<im_start>`` ``<im_end>`` tokens ``model_args`` asks for;
        returns the tokens that need embedding rows."""
        embedded: list[str] = []
        if getattr(model_args, "mm_use_im_patch_token", False):
            embedded.append(DEFAULT_IMAGE_PATCH_TOKEN)
        if getattr(model_args, "mm_use_im_start_end", False):
            embedded += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
        # the embedded tokens first, in LLaVA's order, so they get the ids the original gave
        # them over the same base tokenizer; add_tokens (not add_special_tokens, whose keyword
        # arguments changed across transformers releases) keeps the tokenizer's other specials
        for token in [*embedded, DEFAULT_IMAGE_TOKEN]:
            if token not in tokenizer.get_vocab():
                tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        return embedded

    def initialize_vision_tokenizer(self, model_args: Any, tokenizer: Any) -> int:
        """:meth:`add_image_tokens`, then grow the embeddings so those tokens have rows (new
        rows start at the mean of the old ones). Returns the number of rows added."""
        embedded = self.add_image_tokens(model_args, tokenizer)
        for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            setattr(self.config, key, bool(getattr(model_args, key, False)))  # type: ignore[attr-defined]
        old = self.get_input_embeddings().weight.shape[0]  # type: ignore[attr-defined]
        needed = max([tokenizer.convert_tokens_to_ids(t) + 1 for t in embedded], default=0)
        if needed <= old:
            return 0
        self.resize_token_embeddings(needed)  # type: ignore[attr-defined]
        for matrix in (self.get_input_embeddings(), self.get_output_embeddings()):  # type: ignore[attr-defined]
            if matrix is not None:
                with torch.no_grad():
                    matrix.weight[old:] = matrix.weight[:old].mean(0, keepdim=True)
        return needed - old


def unpad_features(plane: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``plane`` [C, H, W], the feature grid of an image of ``size`` (width, height) that was
    resized into the grid and centred on padding, cropped back to the image's own rows or
    columns. The kept extent is truncated to an integer as LLaVA does (transformers' LLaVA-NeXT
    rounds it, which differs where the product is a hair below a whole number)."""
    width, height = size
    current_height, current_width = plane.shape[1:]
    if width / height > current_width / current_height:
        scale = current_width / width
        pad = (current_height - int(height * scale)) // 2
        return plane[:, pad:current_height - pad, :]
    scale = current_height / height
    pad = (current_width - int(width * scale)) // 2
    return plane[:, :, pad:current_width - pad]


def _count_images(images: Any) -> int:
    if images is None:
        return 0
    if isinstance(images, torch.Tensor):
        return images.shape[0]
    return len(images)


def _cache_length(cache: Any) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return cache[0][0].shape[-2] if cache else 0
