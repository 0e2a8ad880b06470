"""One sample -> token ids and labels, through the family plugin and the chat template.

Nothing about a sample changes silently: a conversation that cannot be trained as it is
raises (:class:`~mmtune.data.formats.RowError`), a sample that is not trained on is dropped
with its reason (:attr:`EncodeResult.dropped`), and what happens to a kept sample is noted
(:attr:`EncodeResult.notes`), for the data layer to count and report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmtune.constants import IGNORE_INDEX
from mmtune.errors import UserError
from mmtune.media import MediaError, describe, image_size
from mmtune.plugins import IMAGE_PLACEHOLDER
from mmtune.templates import TemplateFitError, conversation_problem
from mmtune.templates.template import tokenizer_name

from .formats import RowError, Sample


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


#: the image that tells a plugin that cannot count any image from one that refuses one image
_REFERENCE_SIZE = (224, 224)


def _media_failure(exc: Exception, sample: Sample, template: Any, plugin: Any, processor: Any) -> Exception:
    """The error to raise for ``exc``, an exception of the processor's (not a MediaError) while
    ``plugin`` expanded ``sample``'s media. Where the plugin cannot count an ordinary image
    either, the template does not fit the model's processor; else each image is tried alone
    and the first the processor refuses is named, with its size and the processor's words."""
    family = type(plugin).__name__
    model = type(processor).__name__
    where = f"the {template.name!r} template's plugin ({family}) with the model's processor ({model})"

    def counts(images: list[Any]) -> Exception | None:
        try:
            plugin.process_messages([{"role": "user", "content": IMAGE_PLACEHOLDER * len(images)}], images, [], [],
                                    processor)
        except Exception as error:  # the processor's own, of any class
            return error
        return None

    if sample.images:
        from PIL import Image

        reference_error = counts([Image.new("RGB", _REFERENCE_SIZE)])
        if reference_error is not None:
            return TemplateFitError(f"{where} cannot count an image of {_REFERENCE_SIZE[0]}x{_REFERENCE_SIZE[1]} px "
                                    f"({_one_line(reference_error)}): the template does not fit the model; leave "
                                    "`template` unset to use the one the model's family declares")
        for k, image in enumerate(sample.images, 1):
            error = counts([image])
            if error is None:
                continue
            width, height = image_size(image)
            ratio = max(width, height) / max(1, min(width, height))
            return MediaError(f"image {k} ({describe(image)}, {width}x{height} px, aspect ratio {ratio:.0f}:1) is "
                              f"refused by the model's processor ({model}): {_one_line(error)}; crop, pad or "
                              "resize it to a size and aspect ratio the model takes")
    kinds = [k for k in ("images", "videos", "audios") if getattr(sample, k)]
    return MediaError(f"{where} failed on this sample's {', '.join(kinds) or 'text'}: {_one_line(exc)}")


def _expand(sample: Sample, template: Any, plugin: Any, tokenizer: Any, processor: Any) -> list[dict[str, str]]:
    """``plugin.process_messages`` on the sample, every failure named (see :func:`_media_failure`),
    and the expanded text holding no media token that the tokenizer lacks."""
    unknown = plugin.check_fit(template, tokenizer)
    try:
        messages = plugin.process_messages(sample.messages, sample.images, sample.videos, sample.audios, processor)
    except (MediaError, UserError):
        raise
    except Exception as exc:  # the processor's own errors: bare ValueError, IndexError, AttributeError, ...
        raise _media_failure(exc, sample, template, plugin, processor) from exc
    for token in unknown:
        if any(token in m["content"] for m in messages):
            raise TemplateFitError(
                f"template {template.name!r} (plugin {type(plugin).__name__}) does not fit the model's tokenizer "
                f"({tokenizer_name(tokenizer)}): the plugin marks media with {token}, which is not one of its tokens, "
                "so the model would find no media in the ids; leave `template` unset to use the one the model's "
                "family declares")
    return messages


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
    be cut after the last media token; a cut through media drops the sample (or raises).

    A conversation that is not alternating user/assistant turns raises
    :class:`~mmtune.data.formats.RowError`; one that ends with a user turn (nothing answers
    it) is dropped with that reason; a template or plugin whose tokens the tokenizer
    lacks raises :class:`~mmtune.templates.TemplateFitError` (checked once per template and
    tokenizer). An empty (or blank) answer drops the sample ("empty answer in turn K"), or with
    ``keep_empty_answers`` keeps it with an ``empty_answer`` note: it would train on the
    end-of-turn token alone. Kept samples note an answer cut by ``cutoff_len`` (``truncated``)
    and audio longer than the model takes (``audio_cut``)."""
    problem = conversation_problem([m["role"] for m in sample.messages], sample.positions or None)
    if problem:
        raise RowError(problem)
    last = len(sample.messages) - 1
    if sample.messages[last]["role"] == "user":
        return EncodeResult([], [], dropped=f"the conversation ends with a user turn (turn {sample.turn_number(last)}) "
                                            "that has no answer")
    notes: list[tuple[str, str]] = []
    empty = [sample.turn_number(i) for i, m in enumerate(sample.messages)
             if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        turns = f"turn {empty[0]}" if len(empty) == 1 else f"turns {', '.join(map(str, empty))}"
        if not keep_empty_answers:
            return EncodeResult([], [], dropped=f"empty answer in {turns}")
        notes.append(("empty_answer", turns))
    messages = _expand(sample, template, plugin, tokenizer, processor)
    notes += plugin.media_notes(sample.images, sample.videos, sample.audios, processor)
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
        cut = labels[cutoff_len:]
        cut_answer = len(cut) - cut.count(IGNORE_INDEX)
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        if labels.count(IGNORE_INDEX) == len(labels):
            return EncodeResult([], [], dropped=f"{full} tokens: cutoff_len={cutoff_len} cuts away every answer token")
        notes.append(("truncated", f"{cutoff_len} of {full} tokens kept; answer tokens cut: {cut_answer}"))
    if labels.count(IGNORE_INDEX) == len(labels):  # count runs in C: no per-token Python loop
        return EncodeResult([], [], dropped="no trainable token (empty answer)")
    return EncodeResult(input_ids, labels, notes=notes)
