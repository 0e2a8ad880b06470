"""One sample -> token ids and labels, through the family plugin and the chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmtune.constants import IGNORE_INDEX
from mmtune.media import MediaError

from .formats import Sample



@dataclass
class EncodeResult:
    input_ids: list[int]
    labels: list[int]
    dropped: str | None = None  # why the sample was dropped, if it was
    #: what happened to a kept sample that the user should hear of, as (kind, detail): kinds
    #: are counted per dataset in the training log and listed by ``check-data``
    notes: list[tuple[str, str]] = field(default_factory=list)


def media_token_ids(plugin: Any, tokenizer: Any) -> set[int]:
    ids = set()
    for token in (plugin.image_token, plugin.video_token, plugin.audio_token):
        if token:
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    ids.update(getattr(plugin, "placeholder_ids", ()))
    return ids


def encode_sample(
    sample: Sample,
    template: Any,
    plugin: Any,
    tokenizer: Any,
    processor: Any,
    cutoff_len: int = 2048,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    drop_overlong: bool = True,
    keep_empty_answers: bool = False,
) -> EncodeResult:
    """Expand media, apply the template, edit ids per family, then truncate safely: text may
    be cut after the last media token; a cut through media drops the sample (or raises)."""
    messages = plugin.process_messages(sample.messages, sample.images, sample.videos, sample.audios, processor)
    input_ids, labels = template.encode(tokenizer, messages, sample.system, train_on_prompt, mask_history,
                                        tokenize_many=plugin.tokenize_many)
    input_ids, labels = plugin.process_token_ids(
        input_ids, labels, sample.images, sample.videos, sample.audios, tokenizer, processor
    )
    if len(input_ids) > cutoff_len:
        media_ids = media_token_ids(plugin, tokenizer)
        if not media_ids.isdisjoint(input_ids[cutoff_len:]):  # a media token would be cut
            last = max(i for i, t in enumerate(input_ids) if t in media_ids)
            reason = f"{len(input_ids)} tokens with media tokens up to position {last} exceed cutoff_len={cutoff_len}"
            if not drop_overlong:
                raise MediaError(reason)
            return EncodeResult([], [], dropped=reason)
        full = len(input_ids)
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        if labels.count(IGNORE_INDEX) == len(labels):
            return EncodeResult([], [], dropped=f"{full} tokens: cutoff_len={cutoff_len} cuts away every answer token")
    if labels.count(IGNORE_INDEX) == len(labels):  # count runs in C: no per-token Python loop
        return EncodeResult([], [], dropped="no trainable token (empty answer)")
    return EncodeResult(input_ids, labels)

