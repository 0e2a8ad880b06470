"""`mmtune chat` as a REPL, driven through main() with a scripted input(): clear, exit, Ctrl-D and
Ctrl-C, media attached on a later turn, the sampling flags and system prompt reaching generate,
an answer stopped mid-way, and the one-shot --prompt (a tiny untrained Qwen2-VL: no training)."""

import pytest

from mmtune.demo import build_model_dir
from mmtune.infer import ChatEngine
from mmtune.testing import make_image_file


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("repl")
    return {"model": build_model_dir(str(root), hidden=64), "image": make_image_file(str(root / "a.png"), 56, 56)}


def _script(monkeypatch, lines):
    """input() returns each line in turn; an exception class in the list is raised instead."""
    feed = iter(lines)

    def fake_input(prompt=""):
        item = next(feed)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)


def _spy_stream(monkeypatch, interrupt_first=False):
    """Record what each turn sends to the engine; optionally Ctrl-C after the first turn's first piece."""
    calls = []
    original = ChatEngine.stream

    def stream(self, messages, images=(), videos=(), audios=(), system=None):
        calls.append({"messages": [dict(m) for m in messages], "images": list(images), "videos": list(videos),
                      "system": system})
        for piece in original(self, messages, images, videos, audios, system):
            yield piece
            if interrupt_first and len(calls) == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(ChatEngine, "stream", stream)
    return calls


def _spy_generate(monkeypatch):
    from transformers.generation.utils import GenerationMixin

    calls = []
    original = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        calls.append(dict(kwargs))
        out = original(self, *args, **kwargs)
        calls[-1]["output"] = out
        return out

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    return calls


def test_repl_clear_attach_on_a_later_turn_and_ctrl_d(ws, monkeypatch, capsys):
    from mmtune.cli import CHAT_HELP, main

    calls = _spy_stream(monkeypatch)
    _script(monkeypatch, ["hello", "/image " + ws["image"], "what colour is it?", "/video /nope.mp4", "/image",
                          "/bogus", "clear", "hi again", "", EOFError])
    assert main(["chat", ws["model"], "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert CHAT_HELP in out and "(new conversation)" in out and "unknown command '/bogus'" in out
    assert "usage: /image PATH" in out and "video file not found: /nope.mp4" in err
    assert len(calls) == 3
    assert calls[0]["messages"] == [{"role": "user", "content": "hello"}] and calls[0]["images"] == []
    second = calls[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"] == "hello" and second[2]["content"] == "<image>what colour is it?"
    assert calls[1]["images"] == [ws["image"]] and calls[1]["videos"] == []
    assert calls[2]["messages"] == [{"role": "user", "content": "hi again"}] and calls[2]["images"] == []
    assert out.count("assistant>") == 3


def test_media_of_earlier_turns_stay_with_their_turns(ws, monkeypatch, capsys):
    from mmtune.cli import main

    calls = _spy_stream(monkeypatch)
    _script(monkeypatch, ["what is this?", "/image " + ws["image"], "and this <image>?", "exit"])
    assert main(["chat", ws["model"], "--image", ws["image"], "--max-new-tokens", "2"]) == 0
    assert calls[0]["messages"][0]["content"] == "<image>what is this?"
    last = calls[1]["messages"]
    assert last[0]["content"] == "<image>what is this?" and last[2]["content"] == "and this <image>?"  # not doubled
    assert calls[1]["images"] == [ws["image"], ws["image"]]


def test_sampling_flags_and_system_prompt_reach_generate_and_ctrl_c_exits(ws, monkeypatch, capsys):
    from mmtune.cli import main

    generated = _spy_generate(monkeypatch)
    _script(monkeypatch, ["hi", KeyboardInterrupt])
    assert main(["chat", ws["model"], "--temperature", "0.8", "--top-p", "0.9", "--top-k", "7",
                 "--repetition-penalty", "1.2", "--max-new-tokens", "3", "--system", "Answer in one word."]) == 0
    kwargs = generated[0]
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (True, 0.8, 0.9, 7)
    assert kwargs["repetition_penalty"] == 1.2 and kwargs["max_new_tokens"] == 3
    engine_tokenizer = kwargs["streamer"].tokenizer
    prompt = engine_tokenizer.decode(kwargs["input_ids"][0])
    assert "Answer in one word." in prompt and "You are a helpful assistant." not in prompt
    generated.clear()
    assert main(["chat", ws["model"], "--prompt", "hi", "--max-new-tokens", "2"]) == 0  # defaults: greedy
    assert generated[0]["do_sample"] is False and generated[0]["max_new_tokens"] == 2
    assert "You are a helpful assistant." in engine_tokenizer.decode(generated[0]["input_ids"][0])
    assert capsys.readouterr().out.count("assistant>") == 2


def test_ctrl_c_during_an_answer_drops_that_turn(ws, monkeypatch, capsys):
    from mmtune.cli import main

    calls = _spy_stream(monkeypatch, interrupt_first=True)
    _script(monkeypatch, ["/image " + ws["image"], "first", "second", EOFError])
    assert main(["chat", ws["model"], "--max-new-tokens", "8"]) == 0
    assert "(answer stopped" in capsys.readouterr().out
    assert calls[0]["images"] == [ws["image"]]
    assert calls[1]["messages"] == [{"role": "user", "content": "second"}] and calls[1]["images"] == []


def test_closing_a_stream_stops_generation(ws, monkeypatch):
    from mmtune.infer import GenerationOptions

    generated = _spy_generate(monkeypatch)
    options = GenerationOptions()
    engine = ChatEngine(ws["model"], max_new_tokens=3000, generation=options)
    assert engine.generation.max_new_tokens == 3000 and options.max_new_tokens == 256  # the caller's is kept
    engine.stop_ids = [engine.model.config.get_text_config().vocab_size + 1]  # no end-of-turn cuts it short
    stream = engine.stream([{"role": "user", "content": "hello"}])
    next(stream)
    stream.close()  # what Ctrl-C while reading does
    assert "output" in generated[0]  # generate has returned by the time close() does
    new_tokens = generated[0]["output"].shape[1] - generated[0]["input_ids"].shape[1]
    assert 0 < new_tokens < 3000


def test_one_shot_errors_are_one_line(ws, capsys):
    from mmtune.cli import main

    assert main(["chat", ws["model"], "--image", "/nope.png", "--prompt", "hi"]) == 2
    assert main(["chat", ws["model"], "--temperature", "-1", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmtune chat: error: --image /nope.png: no such file",
                   "mmtune chat: error: temperature must be >= 0 (0: greedy), not -1.0"]
