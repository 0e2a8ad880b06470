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


class PixelsDecoded(AssertionError):
    """Raised by :func:`no_pixel_decoding` when an image's pixels are decoded."""


def no_pixel_decoding() -> Any:
    """A context manager under which decoding any image's pixels (``Image.load``, which
    every pixel access and ``convert`` go through) raises: wrap a plugin's token counting in
    it to prove the count comes from headers alone."""
    import contextlib
    from unittest import mock

    from PIL import Image, ImageFile

    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise PixelsDecoded(f"pixels of {getattr(self, 'filename', '') or self!r} were decoded")

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(Image.Image, "load", refuse))
    stack.enter_context(mock.patch.object(ImageFile.ImageFile, "load", refuse))
    return stack


def check_composite_keys(model: Any, entry: Any) -> None:
    """``entry`` (a CompositeModel) names real modules of ``model``, and its vision, projector
    and language keys split the model's parameters with nothing left over and nothing twice.
    A key may also name a bare parameter (LLaVA-NeXT's ``model.image_newline``)."""
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    keys = [entry.projector_key, *entry.vision_model_keys, *entry.language_model_keys]
    missing = [k for k in keys if k not in names]
    assert not missing, f"{entry.model_type}: no module named {missing} in {type(model).__name__}"
    conflicts = [k for k in entry.lora_conflict_keys if not any(n.split(".")[-1] == k or n.endswith("." + k) for n in names)]
    assert not conflicts, f"{entry.model_type}: lora_conflict_keys {conflicts} match no module"
    for pname, _ in model.named_parameters():
        owners = [k for k in keys if pname == k or pname.startswith(k + ".")]
        assert len(owners) == 1, f"{entry.model_type}: parameter {pname} is covered by {owners or 'no key'}"
