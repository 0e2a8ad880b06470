"""Sample packing: several tokenised samples share one row; attention never crosses samples.

Why: with variable-length data a padded batch spends most of its compute on pad tokens (the
batch is as long as its longest sample). Packing fills rows with whole samples instead, so
the same memory carries more samples a step. It must change no result, so:

* Rows are filled greedily, first-fit-decreasing on sample lengths (deterministic: ties
  keep dataset order); a sample is never cut. The default row length is the dataset's
  longest sample, so a packed row costs what padding's worst batch row already costs (equal
  peak memory).
* Position ids restart at 0 for every sample and no ``attention_mask`` is passed: then
  transformers (>= 5.17) finds the sample boundaries in the position ids itself
  (``masking_utils.find_packed_sequence_indices`` -> block-diagonal causal mask for sdpa,
  eager and flex). Flash-attention finds them too (``_is_packed_sequence`` -> varlen
  kernels), but only for a batch of one row, so for it the rows are laid end to end in one.
* M-RoPE models (Qwen2/2.5/3-VL, GLM-4V) take ``position_ids`` of shape ``(4, rows, len)``:
  row 0 the text positions (what the mask and flash-attention read; per-sample ``arange``),
  rows 1-3 the 3D rope index, which the model's own ``get_rope_index`` computes for every
  sample on its own (as if unpacked) before the pieces are laid side by side.
* Media tensors are built exactly as unpacked collation of the same samples builds them
  (the plugin sees one entry per sample, media in order), so placeholders still match.
* The first label of every sample is ignored: unpacked it is never predicted (nothing comes
  before it); packed, the previous sample's last token would otherwise learn to predict it.
  With that, the Trainer's loss (a sum over label tokens divided by their count,
  ``num_items_in_batch``) equals the unpacked batch's.

Exactness depends on the model (no bidirectional image blocks, no cross-attention, media
tensors per image not per sample), so packing is on by default only for the model types
whose family declares a packing layout (``CompositeModel.packing``: ``"mrope"`` or
``"causal"``), each checked by a test; see :func:`packing_unsupported_reason`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from mmtune.model.composite import no_packing_reason, packable_model_types, packing_layout

from .collator import IGNORE_INDEX, MultiModalCollator, _find_rope_index

logger = logging.getLogger(__name__)

#: attention implementations whose mask creation detects packed position ids
PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")
#: packing is switched on by default when it should carry at least this many times the samples a step
AUTO_MIN_GAIN = 1.2


# ---------------------------------------------------------------------------- bin packing
def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` tokens.

    Longest first, each into the first (lowest-numbered) bin with room; a segment tree over
    the bins' free room makes that O(n log n). A sample longer than ``capacity`` gets a bin
    of its own. Deterministic: equal lengths keep their dataset order."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [0] * (2 * size)  # max free room in each subtree; unopened bins count as `capacity`
    for leaf in range(size):
        free[size + leaf] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []

    def take(leaf: int, room: int) -> None:
        node = size + leaf
        free[node] = room
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2

    for i in order:
        need = int(lengths[i])
        if need > capacity:  # alone, in a row of its own length
            bins.append([i])
            take(len(bins) - 1, 0)
            continue
        node = 1
        while node < size:  # the leftmost bin with room (unopened bins all have room)
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        take(b, free[node] - need)
    return bins


def dataset_lengths(dataset: Any) -> list[int]:
    """Token count of every sample (from the Arrow column when the dataset has one)."""
    try:
        import pyarrow.compute as pc

        table = dataset.data  # datasets.Dataset: lengths without reading the ids into Python
        lengths = pc.list_value_length(table.column("input_ids").combine_chunks())
        indices = getattr(dataset, "_indices", None)
        if indices is not None:
            lengths = lengths.take(indices.column(0).combine_chunks())
        return [int(x) for x in lengths.to_pylist()]
    except (AttributeError, ImportError, KeyError, TypeError):
        return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def padding_efficiency(lengths: Sequence[int], batch_size: int, seed: int = 0) -> float:
    """Real tokens / tokens computed when shuffled samples are padded batch by batch."""
    if not lengths:
        return 1.0
    order = list(lengths)
    random.Random(seed).shuffle(order)
    real = computed = 0
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start:start + max(1, batch_size)]
        real += sum(chunk)
        computed += len(chunk) * max(chunk)
    return real / computed


# ---------------------------------------------------------------------------- dataset
class PackedDataset(torch.utils.data.Dataset):
    """One item = one row: ``{"packed": [sample, sample, ...]}`` (the samples as tokenised)."""

    def __init__(self, base: Any, packs: list[list[int]]) -> None:
        self.base = base
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"packed": [self.base[int(i)] for i in self.packs[index]]}

    @property
    def samples_per_row(self) -> float:
        return sum(len(p) for p in self.packs) / max(1, len(self.packs))


# ---------------------------------------------------------------------------- collator
@dataclass
class PackingCollator(MultiModalCollator):
    """:class:`MultiModalCollator` that also collates packed rows (``{"packed": [...]}``);
    plain samples (e.g. the eval set) are collated as before."""

    #: lay all rows end to end in one (flash-attention detects packing only with batch size 1)
    flatten: bool = False

    @classmethod
    def from_collator(cls, collator: MultiModalCollator, **kwargs: Any) -> PackingCollator:
        base = {f.name: getattr(collator, f.name) for f in fields(MultiModalCollator) if f.init}
        return cls(**{**base, **kwargs})

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if features and "packed" in features[0]:
            return self.collate_packed([list(f["packed"]) for f in features])
        return super().__call__(features)

    def collate_packed(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """``rows[r]`` = the samples of row ``r``; returns the batch without an attention mask."""
        if getattr(self.plugin, "token_type_key", None) == "token_type_ids":
            raise ValueError("packing does not support token_type_ids families (bidirectional image attention)")
        rows = [list(r) for r in rows]
        has_media = any(s.get("images") or s.get("videos") or s.get("audios") for r in rows for s in r)
        if self.fake_media_for_text_only and not has_media and getattr(self.plugin, "image_token", None):
            # the dummy image is a sample of its own: nothing attends to it, it has no label
            fake, _ = self._fake_image([{"input_ids": [], "labels": []}])
            rows[0].append(fake[0])
        if self.flatten:
            rows = [[s for r in rows for s in r]]
        subs = [s for r in rows for s in r]
        sub_ids = [list(s["input_ids"]) for s in subs]
        sub_labels = [list(s.get("labels", s["input_ids"])) for s in subs]
        for y in sub_labels:
            if y:
                y[0] = IGNORE_INDEX
        row_lens = [sum(len(s["input_ids"]) for s in r) for r in rows]
        length = max(row_lens)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        text_pos = torch.zeros((len(rows), length), dtype=torch.long)
        spans: list[tuple[int, int, int]] = []  # (row, start, length) of every sample, in order
        k = 0
        for r, row in enumerate(rows):
            at = 0
            for _ in row:
                n = len(sub_ids[k])
                input_ids[r, at:at + n] = torch.tensor(sub_ids[k], dtype=torch.long)
                labels[r, at:at + n] = torch.tensor(sub_labels[k], dtype=torch.long)
                text_pos[r, at:at + n] = torch.arange(n)
                spans.append((r, at, n))
                at += n
                k += 1
            text_pos[r, at:] = torch.arange(length - at)  # the pad tail is a "sample" of its own
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        key = getattr(self.plugin, "token_type_key", None)
        mm = self.media_inputs(subs, sub_ids)
        mm.pop(key, None)  # per sample; rebuilt for the packed rows below
        batch.update(mm)
        if key:
            types = self.plugin.mm_token_type_ids(input_ids, self.processor)
            if types is not None:
                batch[key] = types
        rope = _find_rope_index(self.model) if self.model is not None and self.build_position_ids else None
        if rope is None:
            batch["position_ids"] = text_pos
        else:
            batch["position_ids"] = torch.cat([text_pos[None], self._packed_rope(batch, sub_ids, spans, text_pos)])
        return self._precompute(batch)

    def _packed_rope(self, batch: dict[str, Any], sub_ids: list[list[int]], spans: list[tuple[int, int, int]],
                     text_pos: torch.Tensor) -> torch.Tensor:
        """(3, rows, len) M-RoPE positions: the model's rope index of every sample computed
        on an unpacked, right-padded view of the samples, then laid into the rows."""
        out = text_pos[None].expand(3, -1, -1).clone()
        if not any(k in batch for k in ("image_grid_thw", "video_grid_thw")):
            return out  # text only: the rope index is the text position on all three axes
        longest = max(len(x) for x in sub_ids)
        ids = torch.full((len(sub_ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sub_ids), longest), dtype=torch.long)
        for i, x in enumerate(sub_ids):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        view = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "position_ids")}
        view.update(input_ids=ids, attention_mask=mask)
        key = getattr(self.plugin, "token_type_key", None)
        if key:
            types = self.plugin.mm_token_type_ids(ids, self.processor)
            if types is not None:
                view[key] = types * mask
        self._add_rope_positions(view)
        pos = view["position_ids"]
        for i, (r, start, n) in enumerate(spans):
            out[:, r, start:start + n] = pos[:, i, :n]
        return out


# ---------------------------------------------------------------------------- policy
def _unwrap_config(model: Any) -> Any:
    return getattr(model, "config", None)


def packing_unsupported_reason(model: Any, collator: MultiModalCollator) -> str | None:
    """Why packing would not be exact for this model and collator (``None``: it would be)."""
    config = _unwrap_config(model)
    model_type = getattr(config, "model_type", None)
    layout = packing_layout(model_type or "")
    if layout is None:
        if no_packing_reason(model_type or ""):
            return f"model type {model_type!r}: {no_packing_reason(model_type or '')}"
        return (f"model type {model_type!r} is not among the types checked to pack exactly "
                f"({', '.join(sorted(packable_model_types()))})")
    if layout == "mrope" and (collator.model is None or not collator.build_position_ids
                              or _find_rope_index(collator.model) is None):
        return "M-RoPE positions must be built in the collator (build_rope_in_collator: true)"
    if getattr(collator.plugin, "token_type_key", None) == "token_type_ids":
        return "the family's token_type_ids make image attention bidirectional"
    impl = str(getattr(config, "_attn_implementation", None) or "sdpa")
    if impl not in PACKABLE_ATTENTION and "flash_attention" not in impl:
        return f"attention implementation {impl!r} does not detect packed sequences"
    return None


def _no_kv_cache(model: Any) -> None:
    """A KV cache in forward turns off transformers' packed-sequence detection (it only looks
    when ``past_key_values`` is None), so packed training must run without one."""
    config = _unwrap_config(model)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "use_cache", False):
            cfg.use_cache = False


def uses_flash_attention(model: Any) -> bool:
    return "flash_attention" in str(getattr(_unwrap_config(model), "_attn_implementation", "") or "")


@dataclass
class PackingPlan:
    packs: list[list[int]]
    max_len: int
    fill: float  # real tokens / row capacity
    padding_efficiency: float  # of unpacked random batches
    samples_per_row: float

    @property
    def gain(self) -> float:
        """Samples a step packed / padded at equal peak memory (rows of ``max_len`` tokens)."""
        return self.fill / self.padding_efficiency if self.padding_efficiency else 1.0


def plan_packing(lengths: Sequence[int], batch_size: int, max_len: int | None = None) -> PackingPlan:
    """Pack ``lengths`` into rows of ``max_len`` (default: the longest sample) and estimate
    what that brings over padded batches of ``batch_size`` samples."""
    capacity = int(max_len or max(lengths, default=1))
    packs = first_fit_decreasing(lengths, capacity)
    rows = max(1, len(packs))
    row_len = max(capacity, max(lengths, default=0))
    return PackingPlan(
        packs=packs, max_len=capacity, fill=sum(lengths) / (rows * row_len),
        padding_efficiency=padding_efficiency(lengths, batch_size),
        samples_per_row=len(lengths) / rows,
    )


def maybe_pack(dataset: Any, collator: MultiModalCollator, model: Any, packing: bool | None,
               packing_max_len: int | None, batch_size: int) -> tuple[Any, MultiModalCollator]:
    """The train dataset and collator to use: packed when ``packing`` is True (error if not
    exact for this model), padded when False; when None (default), packed if the model
    supports it and the data's lengths vary enough that rows carry >= ``AUTO_MIN_GAIN``
    times the samples a step."""
    if packing is False:
        return dataset, collator
    reason = packing_unsupported_reason(model, collator)
    if reason is not None:
        if packing:
            raise ValueError(f"packing: true is not exact here: {reason}")
        logger.info("packing off: %s", reason)
        return dataset, collator
    lengths = dataset_lengths(dataset)
    plan = plan_packing(lengths, batch_size, packing_max_len)
    summary = (f"{len(lengths)} samples -> {len(plan.packs)} rows of <= {plan.max_len} tokens "
               f"({plan.samples_per_row:.2f} samples a row, {plan.fill:.0%} full; padded batches of "
               f"{batch_size} are {plan.padding_efficiency:.0%} real tokens; ~{plan.gain:.2f}x samples a step)")
    if packing is None and plan.gain < AUTO_MIN_GAIN:
        logger.info("packing off (lengths vary too little to gain >= %.1fx): %s", AUTO_MIN_GAIN, summary)
        return dataset, collator
    logger.info("packing on: %s", summary)
    _no_kv_cache(model)
    packed = PackingCollator.from_collator(collator, flatten=uses_flash_attention(model))
    return PackedDataset(dataset, plan.packs), packed
