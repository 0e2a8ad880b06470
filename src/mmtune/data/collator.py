"""Pad a list of tokenised samples and attach the family's multimodal tensors.

Media are decoded here, at batch time (tokenising read their headers only): a sample whose
media fail to decode (a truncated JPEG body) is named by its ``sample_index`` and ``source``
(:class:`~mmtune.data.problems.BadSamplesError`, with the bad samples attached, which
``skip_bad_samples`` replaces: :mod:`mmtune.data.skip`). Those two columns never reach the model.

M-RoPE position ids (Qwen family, GLM-4V, Omni) are built here, on the CPU in the dataloader
worker, through the model's own ``get_rope_index``: building them inside forward costs host
syncs on the GPU every step. So are the vision tower's own inputs and the rest of what
:mod:`mmtune.speed.sync_free` lists, when the sync-free lever gave a ``ForwardPrecompute``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from mmtune.constants import IGNORE_INDEX

from .loader import sample_media
from .problems import BadSamplesError, cause, sample_lines, where

#: what a batch-time media error adds: the way to keep a run going over such samples
SKIP_HINT = "fix or remove it, or set `skip_bad_samples: true` to skip such samples"


def describe_sample(feature: dict[str, Any], position: int) -> str:
    """``sample N of FILE (line L)`` of a tokenised sample (its ``sample_index`` and ``source``
    columns), else its position in the batch."""
    index, source = feature.get("sample_index"), feature.get("source")
    if index is None or not source:
        return f"sample {position} of this batch"
    return where(index, source, sample_lines(source, [index]).get(index))


def _find_rope_index(model: Any) -> Any:
    """The model's ``get_rope_index`` (looked up through peft and composite wrappers)."""
    seen = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        fn = getattr(type(m), "get_rope_index", None)
        if fn is not None:
            return getattr(m, "get_rope_index")
        for attr in ("base_model", "model"):
            child = m.__dict__.get("_modules", {}).get(attr) if hasattr(m, "__dict__") else None
            stack.append(child)
    return None


@dataclass
class MultiModalCollator:
    plugin: Any
    processor: Any
    tokenizer: Any
    padding_side: str = "right"
    model: Any = None
    build_position_ids: bool = True
    #: give text-only batches one dummy image so every rank runs the vision tower (ZeRO-3 / FSDP
    #: otherwise deadlock when ranks disagree); its tokens are masked out and carry no label
    fake_media_for_text_only: bool = False
    #: the sync-free lever's :class:`~mmtune.speed.sync_free.ForwardPrecompute`
    #: (:func:`mmtune.speed.forward.collator_precompute`): adds what the forward would otherwise
    #: derive on the GPU with host syncs
    precompute: Any = None

    def _fake_image(self, features: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
        """Append one dummy image's tokens to the end of sample 0 (after every real token, so
        causal attention never sees them; masked and unlabelled, so the loss is unchanged)."""
        from PIL import Image

        size = 56
        dummy = Image.new("RGB", (size, size), (255, 255, 255))
        messages = self.plugin.process_messages([{"role": "user", "content": "<image>"}], [dummy], [], [], self.processor)
        fake = self.plugin.tokenize(messages[0]["content"], self.tokenizer)
        fake, _ = self.plugin.process_token_ids(fake, None, [dummy], [], [], self.tokenizer, self.processor)
        first = dict(features[0])
        real = len(first["input_ids"])
        first["input_ids"] = list(first["input_ids"]) + list(fake)
        first["labels"] = list(first.get("labels", features[0]["input_ids"])) + [IGNORE_INDEX] * len(fake)
        first["images"] = [dummy]
        return [first, *features[1:]], [real, len(first["input_ids"])]

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id (0 when it has none)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def media_inputs(self, features: list[dict[str, Any]], ids: list[list[int]]) -> dict[str, Any]:
        """The plugin's tensors for the samples' media (flattened in sample order); {} if none.
        Embedded media come from each row's ``embedded_<kind>`` column (:func:`sample_media`).
        When they fail, each sample's media are tried alone: the samples that fail so are
        named in a :class:`~mmtune.data.problems.BadSamplesError` (the original error is raised
        when none fails alone)."""
        try:
            media = {kind: [m for f in features for m in sample_media(f, kind)] for kind in ("images", "videos", "audios")}
            if not any(media.values()):
                return {}
            lengths = [[len(f.get(kind) or []) for f in features] for kind in ("images", "videos", "audios")]
            return self.plugin.get_mm_inputs(media["images"], media["videos"], media["audios"], *lengths, ids,
                                             self.processor)
        except Exception as exc:  # any type: the media loaders', the processor's
            bad = [(i, f, problem) for i, f in enumerate(features)
                   if (problem := self.media_problem(f, ids[i])) is not None]
            if not bad:
                raise
            position, feature, problem = bad[0]
            more = f" (and {len(bad) - 1} more samples of this batch)" if len(bad) > 1 else ""
            raise BadSamplesError(f"{describe_sample(feature, position)}: {problem}{more}; {SKIP_HINT}", bad) from exc

    def media_problem(self, feature: dict[str, Any], ids: list[int] | None = None) -> str | None:
        """Why one tokenised sample's media cannot be turned into the model's tensors (decoded
        in full, as a batch does), or None when they can (or it has none)."""
        try:
            media = {kind: sample_media(feature, kind) for kind in ("images", "videos", "audios")}
            if not any(media.values()):
                return None
            self.plugin.get_mm_inputs(media["images"], media["videos"], media["audios"], [len(media["images"])],
                                      [len(media["videos"])], [len(media["audios"])],
                                      [list(feature["input_ids"]) if ids is None else ids], self.processor)
        except Exception as exc:  # any type: the media loaders', the processor's
            return cause(exc, feature.get("sample_index"), feature.get("source"))
        return None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        fake_span = None
        has_media = any(f.get("images") or f.get("videos") or f.get("audios") for f in features)
        if self.fake_media_for_text_only and not has_media and getattr(self.plugin, "image_token", None):
            features, fake_span = self._fake_image(features)
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f.get("labels", f["input_ids"])) for f in features]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        label_t = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels)):
            sl = slice(length - len(x), length) if self.padding_side == "left" else slice(0, len(x))
            input_ids[i, sl] = torch.tensor(x)
            label_t[i, sl] = torch.tensor(y)
            mask[i, sl] = 1
        if fake_span is not None:
            offset = length - len(ids[0]) if self.padding_side == "left" else 0
            mask[0, offset + fake_span[0]:offset + fake_span[1]] = 0
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}
        batch.update(self.media_inputs(features, ids))
        key = getattr(self.plugin, "token_type_key", None)
        if key == "token_type_ids" and hasattr(self.plugin, "token_type_ids_from_labels"):
            batch[key] = self.plugin.token_type_ids_from_labels(label_t)
        elif key:
            types = self.plugin.mm_token_type_ids(input_ids, self.processor)
            if types is not None:
                batch[key] = types * mask
        if self.build_position_ids and self.model is not None and ("image_grid_thw" in batch or "video_grid_thw" in batch
                                                                   or key == "mm_token_type_ids"):
            self._add_rope_positions(batch)
        return self._precompute(batch)

    def _precompute(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.precompute(batch) if self.precompute is not None else batch

    def _add_rope_positions(self, batch: dict[str, Any]) -> None:
        rope = _find_rope_index(self.model)
        if rope is None:
            return
        params = inspect.signature(rope).parameters
        kwargs = {k: batch[k] for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                        "attention_mask", "second_per_grid_ts", "video_second_per_grid", "target_sizes",
                                        "target_sizes_videos") if k in params and k in batch}
        with torch.no_grad():
            position_ids, _ = rope(**kwargs)
        batch["position_ids"] = position_ids
