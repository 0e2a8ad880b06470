"""Qwen2-VL / Qwen2.5-VL plugin parity with the installed processors."""

import pytest
import torch
from PIL import Image

from mmtune.media import MediaConfig
from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids, render

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_media")
    big = make_image_file(str(d / "big.jpg"), 301, 173, seed=1)  # non-square, odd sizes
    small = make_image_file(str(d / "small.png"), 40, 30, seed=2)  # below min_pixels (56*56)
    vid_a = make_video_file(str(d / "a.mp4"), frames=8, width=64, height=48, fps=4)
    vid_b = make_video_file(str(d / "b.mp4"), frames=12, width=80, height=44, fps=4, seed=5)
    return {"big": big, "small": small, "vid_a": vid_a, "vid_b": vid_b}


def _to_processor_text(text: str) -> str:
    return text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>").replace(
        "<video>", "<|vision_start|><|video_pad|><|vision_end|>"
    )


def _samples(media):
    conv = [
        {"role": "user", "content": "<image>What is in this picture and <image> this one?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And the clip <video>?"},
        {"role": "assistant", "content": "It moves."},
    ]
    return [
        MMSample(conv, images=[media["big"], media["small"]], videos=[media["vid_a"]]),
        MMSample([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]),
    ]


def _processor_media(plugin):
    def fn(sample):
        clips = plugin._regularize_videos(sample.videos)
        return {
            "images": [Image.open(p).convert("RGB") for p in sample.images],
            "videos": [c.frames for c in clips],
            "video_metadata": [c.metadata() for c in clips],
        }

    return fn


@pytest.mark.parametrize("name", FAMILIES)
def test_ids_and_tensors_match_processor(name, media):
    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    result = check_batch_parity(
        plugin,
        processor,
        _samples(media),
        _to_processor_text,
        _processor_media(plugin),
        processor_kwargs={"do_sample_frames": False},
    )
    ours, ref = result["ours"], result["ref"]
    expected = {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    assert expected <= set(ours)
    if name == "qwen2_5_vl":
        assert torch.allclose(ours["second_per_grid_ts"].float(), torch.as_tensor(ref["second_per_grid_ts"]).float())
    # mm_token_type_ids as the processor builds them (transformers >= 5.17 needs them for M-RoPE)
    assert "mm_token_type_ids" in ref
    mask = ref["attention_mask"].bool()
    ours_types = plugin.mm_token_type_ids(ref["input_ids"], processor)
    assert torch.equal(ours_types[mask], torch.as_tensor(ref["mm_token_type_ids"])[mask])


@pytest.mark.parametrize("name", FAMILIES)
def test_no_expansion_lets_processor_expand(name, media):
    processor = load_processor(name)
    plugin = get_mm_plugin(name, expand_mm_tokens=False)
    expanded = get_mm_plugin(name)
    sample = _samples(media)[0]
    short = plugin.process_messages(sample.messages, sample.images, sample.videos, [], processor)
    assert render(short).count("<|image_pad|>") == 2 and render(short).count("<|video_pad|>") == 1
    clips = plugin._regularize_videos(sample.videos)
    ref = processor(
        text=[render(short)],
        images=[Image.open(p).convert("RGB") for p in sample.images],
        videos=[c.frames for c in clips],
        do_sample_frames=False,
        return_tensors="pt",
    )
    assert ref["input_ids"][0].tolist() == plugin_ids(expanded, processor, sample)


def test_user_caps_are_applied_once_by_the_processor(media):
    processor = load_processor("qwen2_vl")
    caps = MediaConfig(image_max_pixels=64 * 64, image_min_pixels=32 * 32)
    plugin = get_mm_plugin("qwen2_vl", media=caps)
    sample = MMSample([{"role": "user", "content": "<image><image>"}], images=[media["big"], media["small"]])
    ids = plugin_ids(plugin, processor, sample)
    ref = processor(
        text=[_to_processor_text(render(sample.messages))],
        images=[Image.open(p).convert("RGB") for p in sample.images],
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
        return_tensors="pt",
    )
    assert ids == ref["input_ids"][0].tolist()
    mm = plugin.get_mm_inputs(sample.images, [], [], [2], [0], [0], [ids], processor)
    assert torch.equal(mm["image_grid_thw"], ref["image_grid_thw"])
    # the cap really bounds the big image: at most 64*64 pixels -> (64*64)/(14*14) patches
    t, h, w = mm["image_grid_thw"][0].tolist()
    assert h * w * 14 * 14 <= 64 * 64


def test_counting_tokens_never_decodes_pixels(media, monkeypatch):
    processor = load_processor("qwen2_vl")
    plugin = get_mm_plugin("qwen2_vl")
    expected = plugin_ids(plugin, processor, MMSample([{"role": "user", "content": "<image><image>"}], [media["big"], media["small"]]))

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded while counting tokens")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    again = plugin_ids(plugin, processor, MMSample([{"role": "user", "content": "<image><image>"}], [media["big"], media["small"]]))
    assert again == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_model_accepts_processor_output(name, media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    sample = _samples(media)[0]
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [1], [0], [ids], processor)
    input_ids = torch.tensor([ids])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(name).tiny_config()).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, mm_token_type_ids=plugin.mm_token_type_ids(input_ids, processor), **mm)
    assert out.logits.shape[:2] == (1, len(ids))
    assert torch.isfinite(out.logits).all()
