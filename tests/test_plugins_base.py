"""BasePlugin and the plugin registry: validation messages, media errors naming the file or
sample, processors lacking a sub-processor."""

import types

import pytest

from mmtune.media import MediaError, sample_context
from mmtune.plugins import BasePlugin, get_mm_plugin, register_mm_plugin
from mmtune.testing import load_processor, make_image_file, make_video_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin_media")
    bad = d / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {
        "img": make_image_file(str(d / "ok.jpg"), 60, 40),
        "bad": str(bad),
        "video": make_video_file(str(d / "ok.mp4"), frames=4),
        "missing_video": str(d / "nowhere.mp4"),
    }


@pytest.fixture(scope="module")
def qwen():
    return load_processor("qwen2_vl")


def test_placeholder_media_mismatch_gives_both_counts_and_the_sample(files, qwen):
    plugin = get_mm_plugin("qwen2_vl")
    messages = [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "ok"}]
    with sample_context(12, "data/train.json"), pytest.raises(ValueError) as info:
        plugin.process_messages(messages, [files["img"]], [], [], qwen)
    text = str(info.value)
    assert "sample 12 of data/train.json" in text and "2 <image>" in text and "1 image" in text
    with pytest.raises(ValueError, match=r"0 <video> placeholder\(s\) but 1 video"):
        plugin.process_messages([{"role": "user", "content": "hi"}], [], [files["video"]], [], qwen)


def test_unreadable_image_names_the_file_when_counting_and_when_loading(files, qwen):
    plugin = get_mm_plugin("qwen2_vl")
    messages = [{"role": "user", "content": "<image>"}]
    with pytest.raises(ValueError, match="corrupt.png"):
        plugin.process_messages(messages, [files["bad"]], [], [], qwen)
    with sample_context(3), pytest.raises(ValueError, match="sample 3: .*corrupt.png"):
        plugin.get_mm_inputs([files["bad"]], [], [], [1], [0], [0], [[1, 2]], qwen)
    with pytest.raises(ValueError, match="gone.jpg"):
        plugin.process_messages(messages, ["/no/such/dir/gone.jpg"], [], [], qwen)


def test_missing_video_file_names_the_file(files, qwen):
    plugin = get_mm_plugin("qwen2_vl")
    with pytest.raises(ValueError, match="nowhere.mp4"):
        plugin.process_messages([{"role": "user", "content": "<video>"}], [], [files["missing_video"]], [], qwen)
    with pytest.raises(ValueError, match="nowhere.mp4"):
        plugin.get_mm_inputs([], [files["missing_video"]], [], [0], [1], [0], [[1]], qwen)


def test_media_given_to_a_processor_without_the_sub_processor(files, qwen):
    plugin = get_mm_plugin("qwen2_vl")
    tokenizer_only = qwen.tokenizer  # a tokenizer has no image/video processor
    with pytest.raises(ValueError, match="no image processor"):
        plugin.process_messages([{"role": "user", "content": "<image>"}], [files["img"]], [], [], tokenizer_only)
    with pytest.raises(ValueError, match="no video processor"):
        plugin.get_mm_inputs([], [files["video"]], [], [0], [1], [0], [[1]], types.SimpleNamespace())
    with pytest.raises(ValueError, match="no feature extractor"):
        get_mm_plugin("base", audio_token="<audio>").process_messages(
            [{"role": "user", "content": "<audio>"}], [], [], ["a.wav"], qwen)
    with pytest.raises(ValueError, match="does not take audio"):  # Qwen2-VL has no audio token at all
        plugin.process_messages([{"role": "user", "content": "<audio>"}], [], [], ["a.wav"], qwen)
    with pytest.raises(ValueError, match="no image processor"):
        get_mm_plugin("base", image_token="<image>").process_messages(
            [{"role": "user", "content": "<image>"}], [files["img"]], [], [], None)


def test_base_plugin_keeps_placeholders_and_feeds_sub_processors(files, qwen):
    import torch

    plugin = get_mm_plugin("base", image_token="<image>")
    messages = [{"role": "user", "content": "<image> hi"}]
    out = plugin.process_messages(messages, [files["img"]], [], [], qwen)
    assert out == messages and out is not messages and out[0] is not messages[0]
    mm = plugin.get_mm_inputs([files["img"]], [], [], [1], [0], [0], [[1]], qwen)
    ref = qwen.image_processor(images=[qwen_image(files["img"])], return_tensors="pt")
    assert torch.equal(mm["image_grid_thw"], ref["image_grid_thw"])
    assert torch.allclose(mm["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    ids, labels = plugin.process_token_ids([1, 2], [3, 4], [files["img"]], [], [], qwen.tokenizer, qwen)
    assert (ids, labels) == ([1, 2], [3, 4])


def qwen_image(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_replace_placeholders_counts_across_messages_in_order():
    messages = [{"role": "user", "content": "<image>a<image>"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c<image>"}]
    out = BasePlugin.replace_placeholders(messages, "<image>", lambda i: f"[{i}]")
    assert [m["content"] for m in out] == ["[0]a[1]", "b", "c[2]"]
    assert messages[0]["content"] == "<image>a<image>"  # input untouched


def test_registry_defaults_overrides_and_errors():
    plugin = get_mm_plugin("qwen2_vl")
    assert (plugin.image_token, plugin.video_token, plugin.audio_token) == ("<|image_pad|>", "<|video_pad|>", None)
    assert get_mm_plugin("qwen2_vl", image_token="<x>").image_token == "<x>"
    assert type(get_mm_plugin("qwen2_5_vl")) is type(plugin)
    with pytest.raises(ValueError, match="unknown multimodal plugin 'nope'"):
        get_mm_plugin("nope")
    with pytest.raises(TypeError, match="unknown options"):
        get_mm_plugin("qwen2_vl", colour="red")
    register_mm_plugin("qwen2_vl", type(plugin))  # same class again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_mm_plugin("qwen2_vl", BasePlugin)


def test_media_error_is_a_value_error():
    assert issubclass(MediaError, ValueError)
    with sample_context(None, "x.jsonl"):
        assert str(MediaError("bad")) == "x.jsonl: bad"


def _family_names():
    from mmtune.testing import FIXTURES

    # families with a tokenize of their own (llava_llama's -200) are tested in their file
    return sorted(name for name, fixture in FIXTURES.items()
                  if fixture.plugin and type(get_mm_plugin(fixture.plugin)).tokenize is BasePlugin.tokenize)


@pytest.mark.parametrize("name", _family_names())
def test_tokenize_collapses_media_runs_to_the_same_ids(name):
    """A run of a media token is tokenised as one token and widened back: the ids must be
    exactly the tokenizer's on the whole text, for every family's tokenizer and tokens."""
    from mmtune.testing import get_fixture

    fixture = get_fixture(name)
    processor = load_processor(name)
    tok = getattr(processor, "tokenizer", processor)
    plugin = get_mm_plugin(fixture.plugin)
    tokens = [t for t in (plugin.image_token, plugin.video_token, plugin.audio_token) if t]
    assert tokens
    texts = []
    for t in tokens:
        texts += [t * 7, f"a{t * 5}b", f" {t * 3} x {t} y\n{t * 2}", f"Look: {t * 4}. Then{t}", f"{t}{t}\n\n{t * 9} end"]
    if len(tokens) > 1:
        texts.append(f"one {tokens[0] * 3}{tokens[1] * 2} two {tokens[-1] * 4}{tokens[0]}!")
    texts.append("no media at all")
    for text in texts:
        assert plugin.tokenize(text, tok) == tok(text, add_special_tokens=False)["input_ids"], (name, text[:80])


def test_tokenize_runs_are_not_retokenised(qwen):
    """The Qwen image pad is an added token: a 300-token run reaches the tokenizer as one."""
    plugin = get_mm_plugin("qwen2_vl")
    tok = qwen.tokenizer
    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, key):
            return getattr(self.inner, key)

        def __call__(self, text, **kwargs):
            seen.append(text)
            return self.inner(text, **kwargs)

    text = "<|vision_start|>" + "<|image_pad|>" * 300 + "<|vision_end|>What is it?"
    ids = plugin.tokenize(text, Recording(tok))
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 300
    assert seen == [["<|vision_start|><|image_pad|><|vision_end|>What is it?"]]
    # several pieces: one call, each piece's ids as if tokenised alone
    pieces = [text, "plain answer<|im_end|>\n", "<|image_pad|>" * 3 + "x" + "<|video_pad|>" * 2]
    seen.clear()
    assert plugin.tokenize_many(pieces, Recording(tok)) == [tok(p, add_special_tokens=False)["input_ids"] for p in pieces]
    assert len(seen) == 1 and len(seen[0]) == 3


def test_tokenize_falls_back_for_tokens_the_tokenizer_splits(qwen):
    """A media token that is no added token (split as text) is never collapsed."""
    plugin = BasePlugin(image_token="<img>")
    text = "see <img><img><img> here"
    assert plugin._media_runs(qwen.tokenizer) is None
    assert plugin.tokenize(text, qwen.tokenizer) == qwen.tokenizer(text, add_special_tokens=False)["input_ids"]
