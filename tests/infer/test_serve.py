"""`mmtune serve` on a local port, answered through the official `openai` client: models, chat
completions with an image (streaming and not), concurrent requests batched, and 4xx answers
with a message for bad requests (a tiny untrained Qwen2-VL)."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn

from mmtune.demo import build_model_dir
from mmtune.infer import ChatEngine
from mmtune.infer.serve import create_app
from mmtune.testing import make_audio_file, make_image, make_image_file, make_video_file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    engine = ChatEngine(build_model_dir(str(root), hidden=64), dtype="fp32", max_new_tokens=4)
    app = create_app(engine, "tiny", batch_wait_s=0.5, max_model_len=200)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    buffer = io.BytesIO()
    make_image(56, 56, seed=1).save(buffer, format="PNG")
    yield {"client": client, "app": app, "engine": engine, "root": root, "url": f"http://127.0.0.1:{port}/v1",
           "png": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}
    uv.should_exit = True
    thread.join(timeout=30)


def _ask(image_url, text="What colour is the shape?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": text}]}]


def test_models_and_a_completion_with_an_image_streamed_and_not(server):
    client, engine = server["client"], server["engine"]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=_ask(server["png"]), max_tokens=4)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 4 and reply.usage.prompt_tokens > 4  # the image's tokens count
    # the same answer as the engine's own greedy generation of the same prompt
    image = server["root"] / "same.png"
    make_image(56, 56, seed=1).save(image)
    direct = engine.generate_batch([engine.prompt_feature([{"role": "user", "content": "<image>What colour is the "
                                                                                       "shape?"}], [str(image)])])
    assert choice.message.content == direct[0].text
    chunks = list(client.chat.completions.create(model="tiny", messages=_ask(server["png"]), max_tokens=4,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_local_paths_video_and_audio_parts_are_read(server):
    root, client = server["root"], server["client"]
    path = make_image_file(str(root / "local.png"), 56, 56)
    reply = client.chat.completions.create(model="tiny", messages=_ask("file://" + path), max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    video = make_video_file(str(root / "clip.mp4"), frames=4, width=56, height=56)
    reply = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "What moves?"}]}])
    assert reply.usage.prompt_tokens > 10
    audio = make_audio_file(str(root / "tone.wav"), seconds=0.5, sampling_rate=16000)
    with open(audio, "rb") as fh:
        data = base64.b64encode(fh.read()).decode()
    with pytest.raises(openai.BadRequestError) as refused:  # read, then refused by a model without audio
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, {"type": "text", "text": "?"}]}])
    assert "audio" in refused.value.message


def test_concurrent_requests_are_generated_in_one_batch(server):
    client, generator = server["client"], server["app"].state.generator
    before = len(generator.batch_sizes)
    answers = [None] * 3

    def ask(k):
        answers[k] = client.chat.completions.create(model="tiny", messages=_ask(server["png"], f"Question {k}?"),
                                                    max_tokens=3).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(a, str) for a in answers)
    assert generator.batch_sizes[before:] == [3]  # one generate call for the three


def test_bad_requests_get_4xx_with_a_message(server):
    client = server["client"]
    cases = [
        (_ask("data:image/png;base64,@@not base64@@"), {}, "base64"),
        (_ask("/no/such/picture.png"), {}, "not found"),
        (_ask("data:image/png;base64," + base64.b64encode(b"not a png at all").decode()), {}, "does not decode"),
        (_ask("https://example.com/cat.png"), {}, "remote URLs are not fetched"),
        (_ask(server["png"], "long " * 300), {}, "context length"),
        (_ask(server["png"]), {"max_tokens": 0}, "max_tokens"),
        (_ask(server["png"]), {"n": 2}, "n must be 1"),
        ([{"role": "assistant", "content": "hi"}], {}, "user"),
        ([{"role": "user", "content": [{"type": "hologram"}]}], {}, "unknown content part type"),
    ]
    for messages, extra, words in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=messages, **extra)
        assert refused.value.status_code == 400 and words in refused.value.message, (words, refused.value.message)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.chat.completions.create(model="other", messages=_ask(server["png"]))
    request = urllib.request.Request(server["url"] + "/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    assert raw.value.code == 400 and "not JSON" in json.loads(raw.value.read())["error"]["message"]
