"""Parity harness: a plugin's ids and tensors must equal the family processor's own.

Used by every family test, so "exact" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MMSample:
    messages: list[dict[str, str]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)


def render(messages: Sequence[dict[str, str]]) -> str:
    """A neutral role-tagged rendering (chat templates are tested elsewhere)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def plugin_ids(plugin: Any, processor: Any, sample: MMSample) -> list[int]:
    expanded = plugin.process_messages(sample.messages, sample.images, sample.videos, sample.audios, processor)
    ids = processor.tokenizer(render(expanded), add_special_tokens=False)["input_ids"]
    ids, _ = plugin.process_token_ids(ids, None, sample.images, sample.videos, sample.audios, processor.tokenizer, processor)
    return ids


def assert_tensors_equal(ours: dict[str, Any], ref: dict[str, Any], keys: Sequence[str] | None = None, atol: float = 1e-6) -> None:
    keys = list(keys) if keys is not None else [k for k in ours if k in ref]
    assert keys, f"no tensor keys in common: ours={sorted(ours)}, processor={sorted(ref)}"
    for key in keys:
        a, b = ours[key], ref[key]
        a = torch.as_tensor(a) if not isinstance(a, torch.Tensor) else a
        b = torch.as_tensor(b) if not isinstance(b, torch.Tensor) else b
        assert a.shape == b.shape, f"{key}: shape {tuple(a.shape)} != processor {tuple(b.shape)}"
        if a.is_floating_point():
            assert torch.allclose(a.float(), b.float(), atol=atol, rtol=0), f"{key}: values differ (max {(a.float()-b.float()).abs().max()})"
        else:
            assert torch.equal(a, b), f"{key}: values differ"


def check_batch_parity(
    plugin: Any,
    processor: Any,
    samples: Sequence[MMSample],
    to_processor_text: Callable[[str], str],
    processor_media: Callable[[MMSample], dict[str, Any]],
    processor_kwargs: dict[str, Any] | None = None,
    tensor_keys: Sequence[str] | None = None,
    nested: Sequence[str] = (),
) -> dict[str, Any]:
    """Per-sample ids and batch tensors of ``plugin`` against ``processor`` (one call, whole batch).

    ``to_processor_text`` maps the rendered text with ``<image>`` placeholders to the text the
    processor expects (its own single placeholder tokens); ``processor_media`` gives the
    processor's media kwargs for a sample (decoded images, frames, waves); keys in ``nested``
    are passed per sample (list of lists) for processors that need that. Returns our mm inputs.
    """
    texts: list[str] = []
    media: dict[str, list[Any]] = {}
    for s in samples:
        texts.append(to_processor_text(render(s.messages)))
        for key, value in processor_media(s).items():
            if key in nested:
                media.setdefault(key, []).append(list(value))
            else:
                media.setdefault(key, []).extend(value)
    ref = processor(text=texts, **{k: v for k, v in media.items() if any(len(x) if hasattr(x, "__len__") else 1 for x in v)}, padding=True, return_tensors="pt", **(processor_kwargs or {}))
    for i, s in enumerate(samples):
        ours = plugin_ids(plugin, processor, s)
        theirs = ref["input_ids"][i][ref["attention_mask"][i].bool()].tolist()
        assert ours == theirs, f"sample {i}: {len(ours)} ids vs processor's {len(theirs)}"
    batch_ids = [plugin_ids(plugin, processor, s) for s in samples]
    mm = plugin.get_mm_inputs(
        [x for s in samples for x in s.images],
        [x for s in samples for x in s.videos],
        [x for s in samples for x in s.audios],
        [len(s.images) for s in samples],
        [len(s.videos) for s in samples],
        [len(s.audios) for s in samples],
        batch_ids,
        processor,
    )
    assert_tensors_equal(mm, ref, tensor_keys)
    return {"ours": mm, "ref": ref, "batch_ids": batch_ids}
