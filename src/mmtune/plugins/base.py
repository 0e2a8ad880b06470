"""BasePlugin: validation, media regularisation and the three public hooks.

A family subclasses :class:`BasePlugin` and overrides what differs:

* ``process_messages`` expands each ``<image>`` / ``<video>`` / ``<audio>`` placeholder into
  exactly the tokens the family's processor would produce (counts from image headers and the
  processor's settings wherever possible, so tokenising never decodes pixels);
* ``process_token_ids`` edits ids after templating (PaliGemma prefixes, LLaVA's -200, ...);
* ``get_mm_inputs`` builds the batch tensors (pixel values, grids, masks, ...).

The base implementation expands nothing and feeds each sub-processor (image, video,
audio) its regularised media.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmtune.media import MediaConfig, MediaError, VideoClip, image_size, load_audio, load_image, load_video
from mmtune.media.audio import audio_seconds
from mmtune.media.image import resize_image, scaled_size

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"

Message = dict[str, Any]  # {"role": str, "content": str}
MediaList = Sequence[Any]


class BasePlugin:
    """Generic plugin: validation and media handling, no token expansion."""

    #: family defaults, used when ``get_mm_plugin`` is given no token
    default_image_token: str | None = None
    default_video_token: str | None = None
    default_audio_token: str | None = None
    #: frames per video are rounded to a multiple of this (Qwen: temporal patch 2)
    video_frame_factor: int = 1
    #: model-input name of per-token modality ids (Qwen: ``mm_token_type_ids``, Gemma 3:
    #: ``token_type_ids``); None when the model needs none
    token_type_key: str | None = None
    #: ids that stand for media after ``process_token_ids`` (e.g. LLaVA's -200): never truncated
    placeholder_ids: tuple[int, ...] = ()

    def __init__(
        self,
        image_token: str | None = None,
        video_token: str | None = None,
        audio_token: str | None = None,
        expand_mm_tokens: bool = True,
        media: MediaConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_token = image_token if image_token is not None else self.default_image_token
        self.video_token = video_token if video_token is not None else self.default_video_token
        self.audio_token = audio_token if audio_token is not None else self.default_audio_token
        self.expand_mm_tokens = expand_mm_tokens
        self.media = media or MediaConfig()
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown options: {sorted(kwargs)}")

    # ------------------------------------------------------------------ validation
    def _validate_input(self, processor: Any, images: MediaList, videos: MediaList, audios: MediaList) -> None:
        """Media given but the family or the processor cannot take them."""
        image_processor = getattr(processor, "image_processor", None)
        video_processor = getattr(processor, "video_processor", None) or image_processor
        feature_extractor = getattr(processor, "feature_extractor", None)
        family = type(self).__name__
        if images:
            if self.image_token is None:
                raise MediaError(f"{family} does not take images, but {len(images)} were given")
            if processor is None or image_processor is None:
                raise MediaError(f"images were given but the processor has no image processor ({family})")
        if videos:
            if self.video_token is None:
                raise MediaError(f"{family} does not take videos, but {len(videos)} were given")
            if processor is None or video_processor is None:
                raise MediaError(f"videos were given but the processor has no video processor ({family})")
        if audios:
            if self.audio_token is None:
                raise MediaError(f"{family} does not take audio, but {len(audios)} clips were given")
            if processor is None or feature_extractor is None:
                raise MediaError(f"audio was given but the processor has no feature extractor ({family})")

    @staticmethod
    def count_placeholders(messages: Sequence[Message], placeholder: str) -> int:
        return sum(str(m.get("content", "")).count(placeholder) for m in messages)

    def _validate_messages(
        self, messages: Sequence[Message], images: MediaList, videos: MediaList, audios: MediaList
    ) -> None:
        """Each placeholder kind must match its media count; the error gives both numbers."""
        for kind, placeholder, media in (
            ("image", IMAGE_PLACEHOLDER, images),
            ("video", VIDEO_PLACEHOLDER, videos),
            ("audio", AUDIO_PLACEHOLDER, audios),
        ):
            found = self.count_placeholders(messages, placeholder)
            if found != len(media):
                raise MediaError(
                    f"the messages hold {found} {placeholder} placeholder(s) but {len(media)} {kind}(s) were given"
                )

    # ------------------------------------------------------------------ fit and notes
    def check_fit(self, template: Any, tokenizer: Any) -> tuple[str, ...]:
        """Once per template and tokenizer (cached, a refusal too): the template's turn markers
        must be tokens of ``tokenizer`` (its ``check_tokenizer`` raises otherwise). Call it at
        setup to refuse a template that does not fit before any sample is read. Returns this plugin's
        media tokens that ``tokenizer`` does not keep as one known token: such a token in a
        sample's expanded text would reach the model as pieces of text, so the sample's media
        would find no place; a family may still never put it in a text (SmolVLM's videos
        become image tokens), so the caller looks for these in each expanded text."""
        cached = getattr(self, "_fit_cache", None)
        if cached is not None and cached[0] is template and cached[1] is tokenizer:
            if isinstance(cached[2], Exception):
                raise type(cached[2])(*cached[2].args)
            return cached[2]
        try:
            template.check_tokenizer(tokenizer)
        except ValueError as exc:  # the same answer for every later sample, without tokenising again
            self._fit_cache = (template, tokenizer, exc)
            raise
        tokens = [t for t in dict.fromkeys((self.image_token, self.video_token, self.audio_token)) if t]
        unk = getattr(tokenizer, "unk_token_id", None)
        batch = tokenizer(tokens, add_special_tokens=False)["input_ids"] if tokens else []
        unknown = tuple(t for t, ids in zip(tokens, batch) if len(ids) != 1 or ids[0] == unk)
        self._fit_cache = (template, tokenizer, unknown)
        return unknown

    def audio_limit(self, processor: Any) -> float | None:
        """Seconds of audio the processor's feature extractor keeps (it cuts the rest), or None
        when it keeps any length: Whisper-style extractors cut to ``n_samples`` (30 s chunks),
        others where their call truncates by default (or the processor's audio defaults say so)
        to ``max_length`` samples."""
        fe = getattr(processor, "feature_extractor", None)
        rate = getattr(fe, "sampling_rate", None)
        if fe is None or not rate:
            return None
        params = inspect.signature(type(fe).__call__).parameters
        kwargs = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
        kwargs.update(self.processor_defaults(processor, "audio"))
        if not kwargs.get("truncation"):
            return None
        samples = kwargs.get("max_length") or getattr(fe, "n_samples", None)
        return samples / rate if samples else None

    def media_notes(self, images: MediaList, videos: MediaList, audios: MediaList,
                    processor: Any) -> list[tuple[str, str]]:
        """What the processor will do to a sample's media that the user should hear of, as
        ``(kind, detail)`` notes (tokens and tensors stay the processor's own): ``audio_cut``
        for a clip longer than :meth:`audio_limit`, its length read from its header."""
        limit = self.audio_limit(processor) if audios else None
        if limit is None:
            return []
        notes = []
        for k, audio in enumerate(audios, 1):
            seconds = audio_seconds(audio, self.media.audio_sampling_rate)
            if seconds > limit:
                notes.append(("audio_cut", f"audio {k}: {seconds:.1f} s, the model takes {limit:.1f} s"))
        return notes

    # ------------------------------------------------------------------ regularisation
    def image_sizes(self, images: MediaList) -> list[tuple[int, int]]:
        """(width, height) each image will have when the processor sees it, from headers only."""
        sizes = []
        for img in images:
            w, h = image_size(img)
            sizes.append(scaled_size(w, h, *self._user_image_caps()))
        return sizes

    def processor_image_token_counts(self, processor: Any, images: MediaList, **kwargs: Any) -> list[int]:
        """Tokens per image from header sizes through the processor's own size-only counter
        (``_get_num_multimodal_tokens``, the rule vLLM relies on): exact and decode-free."""
        sizes = [[h, w] for (w, h) in self.image_sizes(images)]
        data = processor._get_num_multimodal_tokens(image_sizes=sizes, **kwargs)
        return [int(n) for n in data["num_image_tokens"]]

    @staticmethod
    def processor_defaults(processor: Any, modality: str = "images") -> dict[str, Any]:
        """The processor's call-time defaults for one modality (``images``/``videos``/``audio``),
        which its sub-processors do not know when called directly. transformers >= 5.2x keeps
        them on the processor class, older 5.x on its ``*ProcessorKwargs._defaults``."""
        defaults = dict(getattr(type(processor), f"{modality}_kwargs", None) or {})
        kwargs_cls = getattr(processor, "valid_processor_kwargs", None)
        older = getattr(kwargs_cls, "_defaults", {}).get(f"{modality}_kwargs", {}) if kwargs_cls else {}
        return {**older, **defaults}

    @staticmethod
    def processed_frame_size(sub_processor: Any) -> tuple[int, int]:
        """(height, width) a fixed-size image/video processor outputs (crop, else resize)."""
        crop = getattr(sub_processor, "crop_size", None)
        if getattr(sub_processor, "do_center_crop", False) and crop:
            return int(crop["height"]), int(crop["width"])
        size = sub_processor.size
        if size.get("height") is not None:
            return int(size["height"]), int(size["width"])
        raise ValueError(f"{type(sub_processor).__name__} has no fixed output size ({dict(size)})")

    def _user_image_caps(self) -> tuple[int | None, int | None]:
        """The user caps this plugin applies by resizing (families that hand caps to their
        processor override this to return ``(None, None)``)."""
        return self.media.image_max_pixels, self.media.image_min_pixels

    def _user_video_caps(self) -> tuple[int | None, int | None]:
        return self.media.video_max_pixels, self.media.video_min_pixels

    def _regularize_images(self, images: MediaList) -> list[Image.Image]:
        max_px, min_px = self._user_image_caps()
        return [resize_image(load_image(img), max_px, min_px) for img in images]

    def _regularize_videos(self, videos: MediaList) -> list[VideoClip]:
        max_px, min_px = self._user_video_caps()
        return [
            load_video(
                v,
                fps=self.media.video_fps,
                maxlen=self.media.video_maxlen,
                frame_factor=self.video_frame_factor,
                max_pixels=max_px,
                min_pixels=min_px,
            )
            for v in videos
        ]

    def _regularize_audios(self, audios: MediaList) -> list[np.ndarray]:
        return [load_audio(a, self.media.audio_sampling_rate) for a in audios]

    # ------------------------------------------------------------------ tensors
    def _get_mm_inputs(
        self, images: MediaList, videos: MediaList, audios: MediaList, processor: Any
    ) -> dict[str, torch.Tensor]:
        """Run each sub-processor on its regularised media."""
        out: dict[str, torch.Tensor] = {}
        if images:
            out.update(processor.image_processor(self._regularize_images(images), return_tensors="pt"))
        if videos:
            video_processor = getattr(processor, "video_processor", None) or processor.image_processor
            clips = self._regularize_videos(videos)
            out.update(video_processor(videos=[c.frames for c in clips], return_tensors="pt"))
        if audios:
            out.update(
                processor.feature_extractor(
                    self._regularize_audios(audios),
                    sampling_rate=self.media.audio_sampling_rate,
                    return_attention_mask=True,
                    return_tensors="pt",
                )
            )
        return dict(out)

    def mm_token_type_ids(self, input_ids: torch.Tensor, processor: Any) -> torch.Tensor | None:
        """Per-token modality ids (0 text, 1 image, 2 video, 3 audio) exactly as the processor
        builds them, for a padded batch of ids; built in the collator, never inside forward."""
        create = getattr(processor, "create_mm_token_type_ids", None)
        if create is None:
            return None
        return torch.tensor(create(input_ids.tolist()), dtype=torch.long)

    @staticmethod
    def split_per_sample(items: Sequence[Any], lengths: Sequence[int]) -> list[list[Any]]:
        """The batch's flat media list cut back into one list per sample (``imglens`` etc.)."""
        if sum(lengths) != len(items):
            raise MediaError(f"per-sample counts {list(lengths)} add up to {sum(lengths)}, not {len(items)} media")
        out, start = [], 0
        for n in lengths:
            out.append(list(items[start:start + n]))
            start += n
        return out

    # ------------------------------------------------------------------ expansion helper
    @staticmethod
    def replace_placeholders(
        messages: Sequence[Message], placeholder: str, make: Callable[[int], str]
    ) -> list[Message]:
        """Replace the i-th ``placeholder`` across all messages (in order) by ``make(i)``."""
        counter = 0
        pattern = re.compile(re.escape(placeholder))
        result = []
        for message in messages:
            content = message.get("content", "")

            def _sub(_: re.Match[str]) -> str:
                nonlocal counter
                text = make(counter)
                counter += 1
                return text

            new = dict(message)
            new["content"] = pattern.sub(_sub, content) if isinstance(content, str) else content
            result.append(new)
        return result

    # ------------------------------------------------------------------ public API
    def process_messages(
        self,
        messages: Sequence[Message],
        images: MediaList,
        videos: MediaList,
        audios: MediaList,
        processor: Any,
    ) -> list[Message]:
        """Expand placeholders into the family's tokens (base: validate only)."""
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        return copy.deepcopy(list(messages))

    def tokenize(self, text: str, tokenizer: Any) -> list[int]:
        """Token ids of one template piece (base: the tokenizer, no special tokens added; see
        :meth:`tokenize_many`)."""
        return self.tokenize_many([text], tokenizer)[0]

    def tokenize_many(self, texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
        """Token ids of several template pieces, in one tokenizer call (a call costs about as
        much as a hundred tokens). A family that overrides :meth:`tokenize` gets it per piece.

        A run of one media token (the hundreds of ``<|image_pad|>`` an image becomes) is handed
        to the tokenizer as a single token and widened back in the ids: a tokenizer cuts its
        added tokens out of the text before anything else, so the ids are the same, while the
        run no longer costs as much as the rest of the sample. Where the tokenizer does not
        give one id per run (a token it would split), that piece is tokenised whole."""
        if type(self).tokenize is not BasePlugin.tokenize:
            return [self.tokenize(text, tokenizer) for text in texts]
        if not texts:
            return []
        runs = self._media_runs(tokenizer)
        found: list[list[tuple[int, int]]] = [[] for _ in texts]  # per text: (token id, run length)
        collapsed = list(texts)
        if runs is not None:
            pattern, ids_of = runs
            tokens = list(ids_of)  # the pattern's groups, in order
            for i, text in enumerate(texts):
                if any(token in text for token in tokens):
                    def collapse(match: re.Match[str], _runs: list[tuple[int, int]] = found[i]) -> str:
                        token = tokens[(match.lastindex or 1) - 1]
                        _runs.append((ids_of[token], len(match.group(0)) // len(token)))
                        return token

                    collapsed[i] = pattern.sub(collapse, text)
        batch = tokenizer(collapsed, add_special_tokens=False)["input_ids"]
        return [self._widen_runs(ids, runs_i, text, tokenizer) if runs_i else ids
                for ids, runs_i, text in zip(batch, found, texts)]

    @staticmethod
    def _widen_runs(ids: list[int], runs: list[tuple[int, int]], text: str, tokenizer: Any) -> list[int]:
        """``ids`` of a collapsed text with each run's single id repeated back to the run's length;
        the whole text's own ids if the tokenizer did not give exactly one id per run."""
        for tid in {t for t, _ in runs}:
            if ids.count(tid) != sum(1 for t, _ in runs if t == tid):
                return tokenizer(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        pos = 0
        for tid, length in runs:
            at = ids.index(tid, pos)
            out += ids[pos:at]
            out += [tid] * length
            pos = at + 1
        out += ids[pos:]
        return out

    def _media_runs(self, tokenizer: Any) -> tuple[re.Pattern[str], dict[str, int]] | None:
        """(a pattern matching a run of any media token, token -> id) for the media tokens that
        ``tokenizer`` keeps whole (added tokens, not split as text); None when there is none.
        Computed once per tokenizer."""
        cached = getattr(self, "_runs_cache", None)
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        ids_of: dict[str, int] = {}
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        added = {str(tok): (tid, tok) for tid, tok in decoder.items()}
        if not getattr(tokenizer, "split_special_tokens", False):
            for token in (self.image_token, self.video_token, self.audio_token):
                if not token or token not in added:
                    continue
                tid, info = added[token]
                if getattr(info, "single_word", False) or (getattr(info, "normalized", False)
                                                          and not getattr(info, "special", False)):
                    continue
                ids_of[token] = tid
        runs = None
        if ids_of:
            ids_of = dict(sorted(ids_of.items(), key=lambda item: -len(item[0])))  # longest token first
            runs = (re.compile("|".join(f"((?:{re.escape(t)})+)" for t in ids_of)), ids_of)
        self._runs_cache = (tokenizer, runs)
        return runs

    def process_token_ids(
        self,
        input_ids: list[int],
        labels: list[int] | None,
        images: MediaList,
        videos: MediaList,
        audios: MediaList,
        tokenizer: Any,
        processor: Any,
    ) -> tuple[list[int], list[int] | None]:
        """Family-specific id edits after templating (base: none)."""
        self._validate_input(processor, images, videos, audios)
        return input_ids, labels

    def get_mm_inputs(
        self,
        images: MediaList,
        videos: MediaList,
        audios: MediaList,
        imglens: Sequence[int],
        vidlens: Sequence[int],
        audlens: Sequence[int],
        batch_ids: Sequence[list[int]],
        processor: Any,
    ) -> dict[str, torch.Tensor | list[Any]]:
        """Tensors for a batch: ``images`` etc. are the batch's media flattened in sample
        order, ``imglens[i]`` of them belonging to sample ``i``; ``batch_ids`` are the
        samples' token ids (some families derive masks from them)."""
        self._validate_input(processor, images, videos, audios)
        return self._get_mm_inputs(images, videos, audios, processor)
