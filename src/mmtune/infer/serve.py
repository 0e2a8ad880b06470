"""``mmtune serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a :class:`ChatEngine`.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (``stream`` true or false).
Messages take OpenAI's content parts: ``text``; ``image_url`` (``{"url": ...}`` or the URL
itself) as a ``data:`` URL, a local path or a ``file://`` URL; ``video_url`` / ``video`` and
``audio_url`` / ``audio`` the same way; ``input_audio`` (``{"data": base64, "format": ...}``).
Remote ``http(s)`` URLs are not fetched (the server reads only what it is sent and the local
disk). Decoding options: ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (absent:
greedy, as ``mmtune chat``), ``top_p``, and the extensions ``top_k`` and
``repetition_penalty``; ``n`` must be 1 and ``stop`` is not supported (both refused, not ignored).

A request that cannot be served is answered 4xx with OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), the message naming the part at fault:
a body that is not JSON, a malformed message, bad base64, a medium that is missing or does not
decode, a prompt plus ``max_tokens`` over the context length (``context_length_exceeded``), an
unknown model (404).

Batching: one worker thread owns the model. Requests wait in a queue; the worker takes the
first, waits ``batch_wait_s`` for more, and generates up to ``max_batch_size`` requests with the
same decoding options in one ``generate`` call (left padding), streaming each row's tokens to
its own request as they come. A stream whose client goes away stops its row.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .chat import ChatEngine, GenerationOptions

logger = logging.getLogger(__name__)

__all__ = ["BatchingGenerator", "RequestError", "create_app", "parse_chat_request", "run_server"]


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx), the message, the request field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict[str, Any]:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- parsing

@dataclass
class ChatRequest:
    """A request read and checked: the conversation as mmtune's sample, the decoding options."""

    messages: list[dict[str, str]]
    images: list[Any]
    videos: list[Any]
    audios: list[Any]
    system: str | None
    options: GenerationOptions
    stream: bool
    model: str | None


_PART_KINDS = {"image_url": "image", "image": "image", "video_url": "video", "video": "video",
               "audio_url": "audio", "audio": "audio", "input_audio": "audio"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _decode_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where}: the base64 data does not decode ({exc})", param="messages") from None


def _medium(value: Any, kind: str, where: str) -> Any:
    """A content part's medium as the media loaders take it: a local path, or its bytes."""
    if isinstance(value, dict):
        if "data" in value:  # input_audio: {"data": base64, "format": "wav"}
            return {"bytes": _decode_base64(str(value["data"]), where), "path": None}
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: expected a URL string (a data: URL or a local path) for the {kind}",
                           param="messages")
    if value.startswith("data:"):
        head, sep, payload = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(f"{where}: a data URL must be data:<type>;base64,<data>", param="messages")
        return {"bytes": _decode_base64(payload, where), "path": None}
    if value.startswith(("http://", "https://")):
        raise RequestError(f"{where}: remote URLs are not fetched; send the {kind} as a data: URL or a path on the "
                           "server", param="messages")
    path = value[len("file://"):] if value.startswith("file://") else value
    if not os.path.isfile(path):
        raise RequestError(f"{where}: {kind} file not found on the server: {path}", param="messages")
    return path


def _check_decodes(item: Any, kind: str, where: str) -> None:
    """Decode an image now, so that a bad one is this request's 400, not its batch's failure."""
    if kind != "image":
        return
    from PIL import Image

    try:
        source = io.BytesIO(item["bytes"]) if isinstance(item, dict) else item
        with Image.open(source) as image:
            image.load()
    except Exception as exc:  # PIL's own errors, of several classes
        raise RequestError(f"{where}: the image does not decode ({type(exc).__name__}: {exc})",
                           param="messages") from None


def _options(body: dict[str, Any], default: GenerationOptions) -> GenerationOptions:
    def number(key: str, kind: type) -> Any:
        value = body.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
            raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, not {value!r}", param=key)
        return kind(value)

    if number("n", int) not in (None, 1):
        raise RequestError("n must be 1 (one answer a request)", param="n")
    if body.get("stop"):
        raise RequestError("stop sequences are not supported; the model stops at its end-of-turn token", param="stop")
    max_tokens = number("max_completion_tokens", int) or number("max_tokens", int)
    changes = {"max_new_tokens": max_tokens, "temperature": number("temperature", float),
               "top_p": number("top_p", float), "top_k": number("top_k", int),
               "repetition_penalty": number("repetition_penalty", float)}
    try:
        return dataclasses.replace(default, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as exc:
        raise RequestError(str(exc).replace("max_new_tokens", "max_tokens")) from None


def parse_chat_request(body: Any, default: GenerationOptions | None = None) -> ChatRequest:
    """A ``/v1/chat/completions`` body as a :class:`ChatRequest`; :class:`RequestError` naming
    the field, message and part at fault for anything that cannot be served."""
    from mmtune.data import normalize_row
    from mmtune.errors import DataError

    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", param="messages")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"messages[{i}]: role must be one of {', '.join(_ROLES)}, not {role!r}",
                               param="messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict):
                    raise RequestError(f"{where} must be an object with a type", param="messages")
                kind = part.get("type", "text")
                if kind == "text":
                    parts.append({"type": "text", "text": part.get("text")})
                elif kind in _PART_KINDS:
                    medium = _PART_KINDS[kind]
                    item = _medium(part.get(kind), medium, where)
                    _check_decodes(item, medium, where)
                    parts.append({"type": medium, medium: item})
                else:
                    raise RequestError(f"{where}: unknown content part type {kind!r} (text, image_url, video_url, "
                                       "audio_url, input_audio)", param="messages")
            content = parts
        elif content is None and role == "assistant":
            content = ""
        turns.append({"role": _ROLES[role], "content": content})
    try:
        sample = normalize_row({"messages": turns})
    except DataError as exc:
        raise RequestError(f"messages: {exc}", param="messages") from None
    if not sample.messages or sample.messages[-1]["role"] != "user":
        raise RequestError("the last message must be the user's (the one to answer)", param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, not {stream!r}", param="stream")
    return ChatRequest(sample.messages, sample.images, sample.videos, sample.audios, sample.system,
                       _options(body, default or GenerationOptions()), stream, body.get("model"))


# ------------------------------------------------------------------------------------- batching

@dataclass
class _Job:
    feature: dict[str, Any]
    options: GenerationOptions
    #: receives ("delta", text), then ("done", Generated) or ("error", message); from the worker thread
    emit: Callable[[tuple[str, Any]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class _RowStreamer(BaseStreamer):
    """Hands each row's new tokens, decoded incrementally, to its job; stops a row at its first
    end-of-turn id (generate pads finished rows after it)."""

    def __init__(self, jobs: Sequence[_Job], tokenizer: Any, stop_ids: Sequence[int]) -> None:
        self.jobs, self.tokenizer, self.stop_ids = jobs, tokenizer, set(stop_ids)
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands the prompt ids first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half a character: wait for the rest
                continue
            if len(text) > self.sent[row]:
                self.jobs[row].emit(("delta", text[self.sent[row]:]))
                self.sent[row] = len(text)

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    """Ends the rows whose client went away."""

    def __init__(self, jobs: Sequence[_Job]) -> None:
        super().__init__()
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([job.cancelled.is_set() for job in self.jobs], dtype=torch.bool, device=input_ids.device)


class BatchingGenerator:
    """One worker thread that generates queued requests in batches (see the module)."""

    def __init__(self, engine: ChatEngine, max_batch_size: int = 8, batch_wait_s: float = 0.01) -> None:
        self.engine, self.max_batch_size, self.batch_wait_s = engine, max_batch_size, batch_wait_s
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.waiting: list[_Job] = []
        #: the size of every batch generated (for logs and tests)
        self.batch_sizes: list[int] = []
        self.thread = threading.Thread(target=self._loop, name="mmtune-serve-generate", daemon=True)
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.thread.start()

    def stop(self) -> None:
        if self.started:
            self.queue.put(None)
            self.thread.join()

    def submit(self, job: _Job) -> None:
        self.queue.put(job)

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest waiting job and up to ``max_batch_size - 1`` others with
        its options, gathered for ``batch_wait_s``; None to stop."""
        if not self.waiting:
            job = self.queue.get()
            if job is None:
                return None
            self.waiting.append(job)
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            left = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            self.waiting.append(job)
        first = self.waiting[0].options
        batch = [job for job in self.waiting if job.options == first and not job.cancelled.is_set()][:self.max_batch_size]
        taken = {id(job) for job in batch}
        self.waiting = [job for job in self.waiting if id(job) not in taken and not job.cancelled.is_set()]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            streamer = _RowStreamer(batch, self.engine.tokenizer, self.engine.stop_ids or ())
            try:
                rows = self.engine.generate_batch([job.feature for job in batch], batch[0].options, streamer=streamer,
                                                  stopping_criteria=[_Cancelled(batch)])
            except Exception as exc:  # any failure of generate: each request of the batch hears of it
                logger.exception("serve: generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            for job, row, sent in zip(batch, rows, streamer.sent):
                if len(row.text) > sent:  # what the streamer held back (half a character at the end)
                    job.emit(("delta", row.text[sent:]))
                job.emit(("done", row))


# ------------------------------------------------------------------------------------- the app

def _context_length(engine: ChatEngine) -> int | None:
    config = getattr(engine.model, "config", None)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None)


def create_app(engine: ChatEngine, model_name: str, max_batch_size: int = 8, batch_wait_s: float = 0.01,
               max_model_len: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; its generator starts and stops with
    the app (``app.state.generator``)."""
    from contextlib import asynccontextmanager

    from mmtune.data.problems import one_line

    generator = BatchingGenerator(engine, max_batch_size, batch_wait_s)
    limit = max_model_len or _context_length(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        generator.start()
        yield
        generator.stop()

    app = FastAPI(title="mmtune", lifespan=lifespan)
    app.state.generator = generator

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mmtune"}]}

    def prompt(request: ChatRequest) -> dict[str, Any]:
        """The prompt's feature, checked: media the processor refuses, the context length."""
        from mmtune.media import MediaError

        try:
            feature = engine.prompt_feature(request.messages, request.images, request.videos, request.audios,
                                            request.system)
        except (MediaError, ValueError) as exc:
            raise RequestError(f"messages: {one_line(str(exc))}", param="messages") from None
        problem = engine.collator.media_problem(feature)
        if problem is not None:
            raise RequestError(f"messages: {problem}", param="messages")
        length = len(feature["input_ids"])
        if limit is not None and length + request.options.max_new_tokens > limit:
            raise RequestError(f"the prompt is {length} tokens; with max_tokens {request.options.max_new_tokens} "
                               f"that exceeds the model's context length of {limit} tokens; shorten the messages or "
                               "lower max_tokens", param="messages", code="context_length_exceeded")
        return feature

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Any:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not JSON: {exc}") from None
        request = parse_chat_request(body, engine.generation)
        if request.model not in (None, model_name):
            raise RequestError(f"the model {request.model!r} does not exist; this server serves {model_name!r}",
                               status=404, param="model", code="model_not_found")
        feature = await asyncio.get_running_loop().run_in_executor(None, prompt, request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job = _Job(feature, request.options, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        generator.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_tokens = len(feature["input_ids"])

        def usage(row: Any) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": len(row.token_ids),
                    "total_tokens": prompt_tokens + len(row.token_ids)}

        if not request.stream:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "error":
                        return JSONResponse({"error": {"message": value, "type": "server_error", "param": None,
                                                       "code": None}}, status_code=500)
                    if kind == "done":
                        break
            finally:
                job.cancelled.set()
            return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": value.text},
                                 "finish_reason": value.finish_reason}], "usage": usage(value)}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def stream() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "delta":
                        yield chunk({"content": value})
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        yield chunk({}, value.finish_reason, usage=usage(value))
                        break
                yield "data: [DONE]\n\n"
            finally:  # a client that went away stops its row
                job.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def run_server(model: str, adapter: str | None = None, template: str | None = None, dtype: str = "auto",
               host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
               max_batch_size: int = 8, max_model_len: int | None = None) -> None:
    """Load the model (as ``mmtune chat`` does) and serve it until interrupted."""
    import uvicorn

    engine = ChatEngine(model, adapter_path=adapter, template=template, dtype=dtype)
    name = served_model_name or os.path.basename(os.path.normpath(adapter or model))
    app = create_app(engine, name, max_batch_size=max_batch_size, max_model_len=max_model_len)
    logger.info("serving %s as %r on http://%s:%d/v1", model, name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
