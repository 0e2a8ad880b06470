"""LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA: parity with the processors."""

import pytest
import torch
from PIL import Image

from mmtune.media import MediaConfig
from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids, render

FAMILIES = {  # name -> takes videos
    "llava": False,
    "llava_next": False,
    "llava_next_video": True,
    "llava_onevision": True,
    "video_llava": True,
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 500, 230, seed=1),
        "small": make_image_file(str(d / "small.png"), 60, 90, seed=2),  # below the 336 crop
        "video": make_video_file(str(d / "v.mp4"), frames=10, width=64, height=48, fps=4),
    }


def _samples(media, with_video):
    conv = [
        {"role": "user", "content": "<image>What is here? And <image>?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "Look again: the clip <video>" if with_video else "Look again."},
        {"role": "assistant", "content": "Still a circle."},
    ]
    return [
        MMSample(conv, images=[media["big"], media["small"]], videos=[media["video"]] if with_video else []),
        MMSample([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]),
    ]


def _processor_media(plugin):
    def fn(sample):
        out = {"images": [Image.open(p).convert("RGB") for p in sample.images]}
        if sample.videos:
            out["videos"] = [c.frames for c in plugin._regularize_videos(sample.videos)]
        return out

    return fn


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ids_and_tensors_match_processor(name, media):
    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    kwargs = {"do_sample_frames": False} if FAMILIES[name] else {}
    result = check_batch_parity(plugin, processor, _samples(media, FAMILIES[name]), lambda t: t,
                                _processor_media(plugin), processor_kwargs=kwargs)
    assert {"pixel_values", "pixel_values_images"} & set(result["ours"])  # Video-LLaVA keeps the legacy key
    if FAMILIES[name]:
        assert "pixel_values_videos" in result["ours"]
    if name == "video_llava":
        assert result["ours"]["pixel_values_videos"].shape[1] == 8  # Video-LLaVA's fixed 8 frames


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_expansion_lets_processor_expand(name, media):
    processor = load_processor(name)
    short_plugin = get_mm_plugin(name, expand_mm_tokens=False)
    sample = _samples(media, FAMILIES[name])[0]
    short = short_plugin.process_messages(sample.messages, sample.images, sample.videos, [], processor)
    assert render(short).count("<image>") == 2
    media_kwargs = _processor_media(short_plugin)(sample)
    ref = processor(text=[render(short)], **media_kwargs, return_tensors="pt",
                    **({"do_sample_frames": False} if FAMILIES[name] else {}))
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin(name), processor, sample)


def test_user_pixel_cap_applied_once(media):
    processor = load_processor("llava_next")
    plugin = get_mm_plugin("llava_next", media=MediaConfig(image_max_pixels=200 * 100))
    sample = MMSample([{"role": "user", "content": "<image>"}], images=[media["big"]])
    resized = plugin._regularize_images(sample.images)[0]
    assert resized.width * resized.height <= 200 * 100 and abs(resized.width / resized.height - 500 / 230) < 0.05
    ref = processor(text=["user: <image>\n"], images=[resized], return_tensors="pt")
    assert plugin_ids(plugin, processor, sample) == ref["input_ids"][0].tolist()
    mm = plugin.get_mm_inputs(sample.images, [], [], [1], [0], [0], [[0]], processor)
    assert torch.equal(mm["image_sizes"], ref["image_sizes"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tiny_model_accepts_plugin_output(name, media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    sample = _samples(media, FAMILIES[name])[0]
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [len(sample.videos)], [0], [ids], processor)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(name).tiny_config()).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **mm)
    assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()
