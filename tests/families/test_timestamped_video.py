"""Qwen3-VL and GLM-4V: per-frame timestamps, several videos of different lengths in one sample."""

import pytest
import torch
from PIL import Image

from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids, render

WRAP = {
    "qwen3_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"),
    "glm4v": ("<|begin_of_image|><|image|><|end_of_image|>", "<|begin_of_video|><|video|><|end_of_video|>"),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("ts_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 333, 190, seed=1),
        "small": make_image_file(str(d / "small.png"), 30, 44, seed=2),
        "vid_a": make_video_file(str(d / "a.mp4"), frames=8, width=64, height=48, fps=4),
        "vid_b": make_video_file(str(d / "b.mp4"), frames=20, width=72, height=40, fps=5, seed=3),
    }


def _samples(media):
    conv = [
        {"role": "user", "content": "<image>Compare <image> with the clips <video> and <video>."},
        {"role": "assistant", "content": "Similar."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    return [
        MMSample(conv, images=[media["big"], media["small"]], videos=[media["vid_a"], media["vid_b"]]),
        MMSample([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]),
    ]


def _proc_text(name):
    image, video = WRAP[name]
    return lambda t: t.replace("<image>", image).replace("<video>", video)


def _proc_media(plugin):
    def fn(sample):
        clips = plugin._regularize_videos(sample.videos)
        return {"images": [Image.open(p).convert("RGB") for p in sample.images], "videos": [c.frames for c in clips],
                "video_metadata": [c.metadata() for c in clips]}

    return fn


@pytest.mark.parametrize("name", sorted(WRAP))
def test_ids_and_tensors_match_processor(name, media):
    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    samples = _samples(media)
    result = check_batch_parity(plugin, processor, samples, _proc_text(name), _proc_media(plugin),
                                processor_kwargs={"do_sample_frames": False},
                                tensor_keys=["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"])
    grids = result["ours"]["video_grid_thw"]
    assert grids[0, 0] != grids[1, 0]  # the two videos really have different temporal lengths
    text = render(plugin.process_messages(samples[0].messages, samples[0].images, samples[0].videos, [], processor))
    assert ("seconds>" in text) if name == "qwen3_vl" else ("<|end_of_image|>0" in text)


@pytest.mark.parametrize("name", sorted(WRAP))
def test_no_expansion(name, media):
    processor = load_processor(name)
    sample = _samples(media)[0]
    short = get_mm_plugin(name, expand_mm_tokens=False).process_messages(sample.messages, sample.images, sample.videos, [], processor)
    ref = processor(text=[render(short)], **_proc_media(get_mm_plugin(name))(sample), do_sample_frames=False, return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin(name), processor, sample)


# GLM-4V's model (transformers 5.23) rejects images and videos in ONE sample even when fed its own
# processor's output (it counts video-frame <|image|> tokens as image tokens), so it gets them apart.
MODEL_SAMPLES = {"qwen3_vl": [("images", "videos")], "glm4v": [("images",), ("videos",)]}


@pytest.mark.parametrize("name", sorted(WRAP))
def test_tiny_model_accepts_plugin_output(name, media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(name).tiny_config()).eval()
    for kinds in MODEL_SAMPLES[name]:
        images = [media["big"], media["small"]] if "images" in kinds else []
        videos = [media["vid_a"], media["vid_b"]] if "videos" in kinds else []
        text = "<image>" * len(images) + "<video>" * len(videos) + " what?"
        sample = MMSample([{"role": "user", "content": text}], images=images, videos=videos)
        ids = torch.tensor([plugin_ids(plugin, processor, sample)])
        mm = plugin.get_mm_inputs(images, videos, [], [len(images)], [len(videos)], [0], [ids[0].tolist()], processor)
        with torch.no_grad():
            out = model(input_ids=ids, mm_token_type_ids=plugin.mm_token_type_ids(ids, processor), **mm)
        assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
