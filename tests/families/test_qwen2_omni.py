"""Qwen2.5-Omni thinker: images, videos, audio and audio inside video, against the installed
Qwen2_5OmniProcessor (ids token for token, every tensor) and a tiny thinker's forward."""

import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.media import MediaConfig, MediaError, load_audio
from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_audio_file, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, assert_tensors_equal, check_batch_parity, check_composite_keys, plugin_ids, render

WRAP = {"<image>": "<|vision_bos|><|IMAGE|><|vision_eos|>", "<video>": "<|vision_bos|><|VIDEO|><|vision_eos|>",
        "<audio>": "<|audio_bos|><|AUDIO|><|audio_eos|>"}
KEYS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
        "input_features", "feature_attention_mask"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni")
    t = np.arange(int(8000 * 1.225)) / 8000  # 122.5 hops at 16 kHz: the started hop adds a token
    return {
        "big": make_image_file(str(d / "big.jpg"), 301, 173, seed=1),
        "small": make_image_file(str(d / "small.png"), 40, 30),  # below the 56 x 56 minimum
        "video": make_video_file(str(d / "v.mp4"), frames=24, width=64, height=48, fps=4, with_audio=True),
        "silent": make_video_file(str(d / "silent.mp4"), frames=8, width=48, height=64, fps=4, seed=5),
        "a1": make_audio_file(str(d / "a1.wav"), seconds=1.0),
        "a35": make_audio_file(str(d / "a35.wav"), seconds=3.5, sampling_rate=22050, freq=300),
        "a8k": {"array": (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), "sampling_rate": 8000},
    }


@pytest.fixture(scope="module")
def processor():
    return load_processor("qwen2_omni")


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
        MMSample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
    ]


def _to_proc(text):
    for k, v in WRAP.items():
        text = text.replace(k, v)
    return text


def _processor_call(processor, plugin, samples, texts, audio_in_video):
    """The installed processor on the same decoded media; with audio in video, the videos' tracks
    are handed in text order (transformers >= 5.2x: one audio per slot with
    ``audio_from_video_indices``; 5.17: ``use_audio_in_video`` reads them from ``audio``)."""
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
    return processor(text=texts, images=images or None, videos=videos or None, audio=audio or None, **kwargs)


@pytest.mark.parametrize("audio_in_video", [False, True])
def test_ids_and_tensors_match_processor(media, processor, audio_in_video):
    plugin = get_mm_plugin("qwen2_omni", media=MediaConfig(use_audio_in_video=audio_in_video))
    samples = _samples(media)
    ref = _processor_call(processor, plugin, samples, [_to_proc(render(s.messages)) for s in samples], audio_in_video)
    batch_ids = [plugin_ids(plugin, processor, s) for s in samples]
    for i, ids in enumerate(batch_ids):
        assert ids == ref["input_ids"][i][ref["attention_mask"][i].bool()].tolist(), f"sample {i}"
    text = processor.tokenizer.decode(batch_ids[0])
    assert ("<|VIDEO|><|AUDIO|>" in text) == audio_in_video  # really interleaved (the 6 s clip spans 3 chunks)
    assert ("<|AUDIO|><|VIDEO|>" in text) == audio_in_video
    mm = plugin.get_mm_inputs(*(sum((getattr(s, k) for s in samples), []) for k in ("images", "videos", "audios")),
                              *([len(getattr(s, k)) for s in samples] for k in ("images", "videos", "audios")),
                              batch_ids, processor)
    assert_tensors_equal(mm, ref, KEYS)
    assert mm["input_features"].shape[0] == 3 + audio_in_video
    assert mm.get("use_audio_in_video", False) == audio_in_video


@pytest.mark.parametrize("audio_in_video", [False, True])
def test_no_expansion(media, processor, audio_in_video):
    cfg = MediaConfig(use_audio_in_video=audio_in_video)
    plugin = get_mm_plugin("qwen2_omni", media=cfg)
    short_plugin = get_mm_plugin("qwen2_omni", media=cfg, expand_mm_tokens=False)
    samples = _samples(media)
    texts = [render(short_plugin.process_messages(s.messages, s.images, s.videos, s.audios, processor)) for s in samples]
    assert "<|AUDIO|><|AUDIO|>" not in texts[0] and texts[0].count("<|VIDEO|>") == 1
    ref = _processor_call(processor, plugin, samples, texts, audio_in_video)
    assert ref["input_ids"][0][ref["attention_mask"][0].bool()].tolist() == plugin_ids(plugin, processor, samples[0])
    # the collator's tensors do not depend on whether the text was expanded
    ids = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    s = samples[0]
    mm = short_plugin.get_mm_inputs(s.images, s.videos, s.audios, [2], [1], [3], ids[:1], processor)
    assert_tensors_equal(mm, ref, KEYS)


def test_silent_video_with_audio_in_video_is_a_plain_video(media, processor):
    s = MMSample([{"role": "user", "content": "<video><audio>"}], videos=[media["silent"]], audios=[media["a1"]])
    on = get_mm_plugin("qwen2_omni", media=MediaConfig(use_audio_in_video=True))
    off = get_mm_plugin("qwen2_omni")
    ids = plugin_ids(on, processor, s)
    assert ids == plugin_ids(off, processor, s)
    mm = on.get_mm_inputs(s.images, s.videos, s.audios, [0], [1], [1], [ids], processor)
    assert mm["input_features"].shape[0] == 1 and "use_audio_in_video" not in mm


def test_frames_list_with_audio_in_video_names_the_problem(media, processor):
    frames = [Image.new("RGB", (56, 56), (i * 20, 0, 0)) for i in range(4)]
    plugin = get_mm_plugin("qwen2_omni", media=MediaConfig(use_audio_in_video=True))
    with pytest.raises(ValueError, match="video file"):
        plugin.process_messages([{"role": "user", "content": "<video>"}], [], [frames], [], processor)


def test_mismatch_names_counts(media, processor):
    plugin = get_mm_plugin("qwen2_omni")
    with pytest.raises(MediaError, match="2 <audio>.*1 audio"):
        plugin.process_messages([{"role": "user", "content": "<audio><audio>"}], [], [], [media["a1"]], processor)


def test_tiny_thinker_forward_and_composite_keys(media, processor):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(get_fixture("qwen2_omni").tiny_config()).eval()
    check_composite_keys(model, get_composite_model("qwen2_5_omni_thinker"))
    s = _samples(media)[0]
    for audio_in_video in (False, True):
        plugin = get_mm_plugin("qwen2_omni", media=MediaConfig(use_audio_in_video=audio_in_video))
        ids = plugin_ids(plugin, processor, s)
        mm = plugin.get_mm_inputs(s.images, s.videos, s.audios, [2], [1], [3], [ids], processor)
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **mm)
        assert out.logits.shape[:2] == input_ids.shape and torch.isfinite(out.logits).all()
