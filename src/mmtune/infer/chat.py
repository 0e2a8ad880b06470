"""A chat engine (template + plugin + model, streamed output) and a conversation over it.

Any folder mmtune writes opens here: a final output folder, a ``checkpoint-N`` (LoRA: the
adapter's ``adapter_config.json`` names the base), an export, or a model from the Hub. The
template comes from ``--template``, else the folder's ``mmtune_config.json``, else the default
the model's family declares for its ``model_type``; with none of these it is an error, never a
guess (a wrong template answers plausibly and wrongly).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria

logger = logging.getLogger(__name__)

MEDIA_KINDS: dict[str, str] = {"image": "images", "video": "videos", "audio": "audios"}


@dataclass
class GenerationOptions:
    """How answers are decoded. These settings alone decide it (the checkpoint's
    ``generation_config`` gives only its end-of-sequence ids): ``temperature`` 0, the default,
    decodes greedily, so the same question gets the same answer (what one wants when checking
    a fine-tune); above 0 it samples, with ``top_p`` / ``top_k`` applied when set."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    #: at least this many new tokens (end-of-turn ids are held back until then): benchmarks
    #: that must time a fixed answer length; None: stop at the first end-of-turn id
    min_new_tokens: int | None = None
    #: transformers' ``cache_implementation`` for ``generate`` (``static``: a preallocated KV
    #: cache); None: transformers' default (a dynamic cache)
    cache_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), not {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), not {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: none), not {self.repetition_penalty}")
        if self.min_new_tokens is not None and not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], not "
                             f"{self.min_new_tokens}")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            logger.warning("top_p / top_k apply only when sampling (temperature > 0): decoding greedily")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate``. The neutral values (temperature 1, top_p 1, top_k
        50 when greedy; top_k 0 = off when sampling) override whatever the checkpoint's
        generation_config holds, so that it cannot change the decoding chosen here."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                  "repetition_penalty": self.repetition_penalty or 1.0}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
        if self.temperature == 0:
            return {**kwargs, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
        return {**kwargs, "do_sample": True, "temperature": self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "top_k": self.top_k or 0}


class _StopOnEvent(StoppingCriteria):
    """A stopping criterion that ends generation once ``event`` is set (an answer abandoned by
    its reader: Ctrl-C in the REPL, or a closed stream)."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Generated:
    """One row of :meth:`ChatEngine.generate_batch`: the new token ids (up to, not including,
    the first end-of-turn id), their text, and why generation ended: ``stop`` (an end-of-turn
    id) or ``length`` (``max_new_tokens`` reached)."""

    token_ids: list[int]
    text: str
    finish_reason: str


class ChatEngine:
    """Load once, then ``stream(messages, images=..., videos=..., audios=...)`` yields text pieces;
    :meth:`generate_batch` answers many prompts in one ``generate`` call (``mmtune predict``,
    ``mmtune serve``).

    ``model_path``: a full model folder or Hub id, or an adapter folder alone (its
    ``adapter_config.json`` names the base); ``adapter_path`` adds an adapter to a base.
    ``template``: a template name; default: the folder's mmtune_config.json, else the family's
    declared default for the model type (a one-line ``ConfigError`` when there is neither).
    :meth:`from_parts` wraps what :func:`~mmtune.train.recipe.build_saved` already built."""

    def __init__(self, model_path: str, adapter_path: str | None = None, template: str | None = None,
                 dtype: str = "auto", max_new_tokens: int | None = None,
                 generation: GenerationOptions | None = None) -> None:
        from mmtune.train import recipe

        parts = recipe.build_saved(model_path, adapter_path, template=template, dtype=dtype)
        self._setup(parts, generation, max_new_tokens)

    @classmethod
    def from_parts(cls, parts: Any, generation: GenerationOptions | None = None) -> ChatEngine:
        """An engine over ``parts`` of :func:`~mmtune.train.recipe.build_saved` (with a model)."""
        engine = cls.__new__(cls)
        engine._setup(parts, generation, None)
        return engine

    def _setup(self, parts: Any, generation: GenerationOptions | None, max_new_tokens: int | None) -> None:
        self.generation = generation or GenerationOptions()
        if max_new_tokens is not None:
            self.generation = dataclasses.replace(self.generation, max_new_tokens=max_new_tokens)
        self.parts = parts
        self.template, self.plugin, self.collator = parts.template, parts.plugin, parts.collator
        logger.info("chat: template %s (%s), plugin %s", self.template.name, parts.template_source, parts.plugin_name)
        self.tokenizer, self.processor, self.model = parts.tokenizer, parts.processor, parts.model
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int] | None:
        """The template's end-of-turn tokens, the tokenizer's EOS and the checkpoint's."""
        vocab = self.tokenizer.get_vocab()
        ids = [vocab[w] for w in self.template.stop_words if w in vocab]
        ids.append(self.tokenizer.eos_token_id)
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += config_eos if isinstance(config_eos, list) else [config_eos]
        ids = list(dict.fromkeys(i for i in ids if i is not None))
        return ids or None

    def render_prompt(self, messages: Sequence[dict[str, str]], system: str | None = None) -> str:
        """The chat template's text of ``messages`` up to the generation prompt, media left as
        placeholders (what ``mmtune predict`` records as the prompt)."""
        return "".join(p + a for p, a in self.template.render_turns(list(messages), system))

    def prompt_feature(self, messages: Sequence[dict[str, str]], images: Sequence[Any] = (),
                       videos: Sequence[Any] = (), audios: Sequence[Any] = (),
                       system: str | None = None) -> dict[str, Any]:
        """The prompt of ``messages`` (ending with a user turn) as the collator takes it: the
        ids of the rendered template with media expanded by the plugin (media headers read,
        pixels not decoded), and the media."""
        images, videos, audios = list(images), list(videos), list(audios)
        expanded = self.plugin.process_messages(list(messages), images, videos, audios, self.processor)
        prompt = "".join(p + a for p, a in self.template.render_turns(expanded, system))
        ids = self.plugin.tokenize(prompt, self.tokenizer)
        ids, _ = self.plugin.process_token_ids(ids, None, images, videos, audios, self.tokenizer, self.processor)
        return {"input_ids": ids, "images": images, "videos": videos, "audios": audios}

    def batch_inputs(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Left-padded model inputs of prompt features, media decoded once, on the model's device."""
        batch = self.collator(list(features))
        batch.pop("labels")
        device = next(self.model.parameters()).device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _inputs(self, messages: list[dict[str, str]], images: list[Any], videos: list[Any], audios: list[Any],
                system: str | None = None) -> dict:
        return self.batch_inputs([self.prompt_feature(messages, images, videos, audios, system)])

    @torch.no_grad()
    def generate_batch(self, features: Sequence[dict[str, Any]], generation: GenerationOptions | None = None,
                       streamer: Any = None, stopping_criteria: Sequence[StoppingCriteria] = ()) -> list[Generated]:
        """Answers to prompt features (:meth:`prompt_feature`) in one ``generate`` call: left
        padding, the KV cache of ``generation.cache_implementation``, each row cut at its first
        end-of-turn id. ``streamer`` (a transformers ``BaseStreamer``) receives the prompt
        ids, then each step's new token of every row; ``stopping_criteria`` may end rows early."""
        from transformers import StoppingCriteriaList

        generation = generation or self.generation
        inputs = self.batch_inputs(features)
        width = inputs["input_ids"].shape[1]
        self.model.eval()
        out = self.model.generate(**inputs, **generation.generate_kwargs(), pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.stop_ids, streamer=streamer,
                                  stopping_criteria=StoppingCriteriaList(list(stopping_criteria)))
        stops = set(self.stop_ids or ())
        rows = []
        for row in out[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in stops), None)
            ids = row if end is None else row[:end]
            reason = "stop" if end is not None else "length"
            rows.append(Generated(ids, self.tokenizer.decode(ids, skip_special_tokens=True), reason))
        return rows

    def stream(self, messages: Sequence[dict[str, str]], images: Sequence[Any] = (), videos: Sequence[Any] = (),
               audios: Sequence[Any] = (), system: str | None = None) -> Iterator[str]:
        """The answer to ``messages`` (media in the order of their placeholders), piece by
        piece. ``system`` replaces the template's default system prompt. Closing the
        iterator early (or Ctrl-C while reading it) stops generation before it returns; an
        error inside generation is raised here."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        inputs = self._inputs(list(messages), list(images), list(videos), list(audios), system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        kwargs = dict(**inputs, **self.generation.generate_kwargs(), streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
                      stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]))
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as exc:  # handed to the reader, who would otherwise wait forever
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, name="mmtune-generate", daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]

    def chat(self, messages: Sequence[dict[str, str]], **media: Any) -> str:
        return "".join(self.stream(messages, **media)).strip()


class ChatSession:
    """One conversation over a :class:`ChatEngine`: its turns, and the media attached to each.

    :meth:`attach` queues a file for the next message; :meth:`ask` puts the missing
    placeholders at the start of that message, so a picture can join on any turn while the
    media of earlier turns stay with their turns. A turn whose answer fails or is abandoned
    is dropped, with what was attached to it. :meth:`clear` starts a new conversation."""

    def __init__(self, engine: ChatEngine, system: str | None = None) -> None:
        self.engine = engine
        self.system = system
        self.clear()

    def clear(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.media: dict[str, list[str]] = {key: [] for key in MEDIA_KINDS.values()}
        self.pending: dict[str, list[str]] = {key: [] for key in MEDIA_KINDS.values()}

    def attach(self, kind: str, path: str) -> str:
        """Queue ``path`` (an ``image``, ``video`` or ``audio`` file) for the next message."""
        if kind not in MEDIA_KINDS:
            raise ValueError(f"cannot attach a {kind!r}: one of {', '.join(MEDIA_KINDS)}")
        path = os.path.expanduser(path.strip().strip("'\""))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{kind} file not found: {path}")
        self.pending[MEDIA_KINDS[kind]].append(path)
        return path

    def ask(self, text: str) -> Iterator[str]:
        """Send ``text`` (with the queued media) and stream the answer; the turn joins the
        conversation once the answer is complete."""
        from mmtune.plugins import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

        marks = {"images": IMAGE_PLACEHOLDER, "videos": VIDEO_PLACEHOLDER, "audios": AUDIO_PLACEHOLDER}
        head = "".join(mark * max(0, len(self.pending[key]) - text.count(mark)) for key, mark in marks.items())
        messages = [*self.messages, {"role": "user", "content": head + text}]
        media = {key: self.media[key] + self.pending[key] for key in marks}
        self.pending = {key: [] for key in marks}
        pieces: list[str] = []
        for piece in self.engine.stream(messages, system=self.system, **media):
            pieces.append(piece)
            yield piece
        self.messages = [*messages, {"role": "assistant", "content": "".join(pieces).strip()}]
        self.media = media
