"""Qwen3-Omni thinker (qwen3_omni_moe): images, videos, audio and audio inside video against the
installed Qwen3OmniMoeProcessor (ids token for token, every tensor), a tiny thinker's forward
and its composite keys, and the chat template with loss on the answers only."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.media import MediaConfig, load_audio
from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import get_fixture, load_processor, make_audio_file, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, assert_tensors_equal, check_composite_keys, plugin_ids, render

from ..helpers import CONV

NAME = "qwen3_omni_moe"
FIXTURE = "qwen3_omni_moe_thinker"
WRAP = {"<image>": "<|vision_start|><|image_pad|><|vision_end|>", "<video>": "<|vision_start|><|video_pad|><|vision_end|>",
        "<audio>": "<|audio_start|><|audio_pad|><|audio_end|>"}
KEYS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
        "input_features", "feature_attention_mask"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni3")
    t = np.arange(int(8000 * 1.225)) / 8000
    return {
        "big": make_image_file(str(d / "big.jpg"), 301, 173, seed=1),
        "small": make_image_file(str(d / "small.png"), 40, 30),
        "video": make_video_file(str(d / "v.mp4"), frames=24, width=64, height=48, fps=4, with_audio=True),
        "a1": make_audio_file(str(d / "a1.wav"), seconds=1.0),
        "a35": make_audio_file(str(d / "a35.wav"), seconds=3.5, sampling_rate=22050, freq=300),
        "a8k": {"array": (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), "sampling_rate": 8000},
    }


@pytest.fixture(scope="module")
def processor():
    return load_processor(FIXTURE)


def _samples(media):
    conv = [
        {"role": "user", "content": "<image>Hear <audio>, then <video>, see <image>."},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "And <audio> and <audio>?"},
        {"role": "assistant", "content": "Tones."},
    ]
    return [
        MMSample(conv, images=[media["big"], media["small"]], videos=[media["video"]],
                 audios=[media["a1"], media["a35"], media["a8k"]]),
        MMSample([{"role": "user", "content": "<image>and <audio>"}, {"role": "assistant", "content": "ok"}],
                 images=[media["small"]], audios=[media["a1"]]),
        MMSample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
    ]


def _to_proc(text):
    for k, v in WRAP.items():
        text = text.replace(k, v)
    return text


def _processor_call(processor, plugin, samples, audio_in_video):
    """The installed processor on the same decoded media, the sampled fps given as its ``fps``;
    with audio in video the tracks go in text order (5.25: ``audio_from_video_indices``; 5.17:
    ``use_audio_in_video`` reads them from ``audio``)."""
    from transformers import processing_utils

    images, videos, audio, slots = [], [], [], []
    for s in samples:
        images += [Image.open(p).convert("RGB") for p in s.images]
        waves, paths, clips = iter(s.audios), iter(s.videos), iter(plugin._regularize_videos(s.videos))
        for kind in re.findall(r"<audio>|<video>", render(s.messages)):
            if kind == "<audio>":
                audio.append(load_audio(next(waves), 16000))
                slots.append(None)
                continue
            videos.append(next(clips).frames)
            path = next(paths)
            if audio_in_video:
                audio.append(load_audio(path, 16000))
                slots.append(len(videos) - 1)
    fps = plugin._regularize_videos([samples[0].videos[0]])[0].sample_fps
    kwargs = dict(do_sample_frames=False, fps=fps, padding=True, return_tensors="pt")
    if audio_in_video:
        omni_mixin = getattr(processing_utils, "OmniModalProcessorMixin", None)
        if omni_mixin is not None and isinstance(processor, omni_mixin):
            kwargs.update(audio_from_video_indices=slots, load_audio_from_video=True)
        else:
            kwargs.update(use_audio_in_video=True)
    texts = [_to_proc(render(s.messages)) for s in samples]
    return processor(text=texts, images=images or None, videos=videos or None, audio=audio or None, **kwargs)


@pytest.mark.parametrize("audio_in_video", [False, True])
def test_ids_and_tensors_match_processor(media, processor, audio_in_video):
    plugin = get_mm_plugin(NAME, media=MediaConfig(use_audio_in_video=audio_in_video))
    samples = _samples(media)
    ref = _processor_call(processor, plugin, samples, audio_in_video)
    batch_ids = [plugin_ids(plugin, processor, s) for s in samples]
    for i, ids in enumerate(batch_ids):
        assert ids == ref["input_ids"][i][ref["attention_mask"][i].bool()].tolist(), f"sample {i}"
    text = processor.tokenizer.decode(batch_ids[0])
    assert ("<|video_pad|><|audio_pad|>" in text) == audio_in_video  # really interleaved
    assert ("<|audio_pad|><|video_pad|>" in text) == audio_in_video
    mm = plugin.get_mm_inputs(*(sum((getattr(s, k) for s in samples), []) for k in ("images", "videos", "audios")),
                              *([len(getattr(s, k)) for s in samples] for k in ("images", "videos", "audios")),
                              batch_ids, processor)
    assert_tensors_equal(mm, ref, KEYS)
    assert mm["input_features"].shape[0] == 4 + audio_in_video
    assert mm.get("use_audio_in_video", False) == audio_in_video


def test_tiny_thinker_forward_and_composite_keys(media, processor):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    config = get_fixture(FIXTURE).tiny_config()
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config).eval()
    check_composite_keys(model, get_composite_model(config.model_type))
    s = _samples(media)[0]
    for audio_in_video in (False, True):
        plugin = get_mm_plugin(NAME, media=MediaConfig(use_audio_in_video=audio_in_video))
        ids = plugin_ids(plugin, processor, s)
        mm = plugin.get_mm_inputs(s.images, s.videos, s.audios, [2], [1], [3], [ids], processor)
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **mm)
        assert out.logits.shape[:2] == input_ids.shape and torch.isfinite(out.logits).all()


def test_template_is_chatml_without_a_default_system_and_trains_answers_only(processor):
    t = get_template("qwen3_omni")
    assert get_composite_model("qwen3_omni_moe_thinker").template == "qwen3_omni"
    assert t.render(CONV[1:4]) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                                   "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(CONV).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    tok = processor.tokenizer
    ids, labels = t.encode(tok, CONV)
    assert ids == tok(t.render(CONV), add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Hello<|im_end|>\nRed<|im_end|>\n"
