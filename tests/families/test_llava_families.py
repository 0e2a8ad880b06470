"""LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA: parity with the processors.

Every batch holds a two-image sample (two turns, different non-square sizes, one below the
crop size; plus a video where the family takes one), a one-image sample (LLaVA-NeXT /
OneVision anyres tiling) and a text-only sample; the processor is called the way the model's
own examples call it, images nested per sample.
"""

import pytest
import torch
from PIL import Image

from mmtune.media import MediaConfig
from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.testing.parity import (
    MMSample,
    assert_tensors_equal,
    check_batch_parity,
    check_composite_keys,
    no_pixel_decoding,
    plugin_ids,
    render,
)

FAMILIES = {  # name -> takes videos
    "llava": False,
    "llava_next": False,
    "llava_next_video": True,
    "llava_onevision": True,
    "video_llava": True,
}
VIDEO_KW = {"do_sample_frames": False}  # frames are sampled once, by the plugin, for both sides


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 500, 230, seed=1),
        "small": make_image_file(str(d / "small.png"), 60, 90, seed=2),  # below every crop size here
        "tall": make_image_file(str(d / "tall.jpg"), 200, 410, seed=3),
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
        MMSample([{"role": "user", "content": "<image>Which shape?"}, {"role": "assistant", "content": "A star."}],
                 images=[media["tall"]]),
    ]


def _processor_media(plugin, processor):
    """The processor's media for one sample: the same decoded (and user-capped) images and
    the same sampled frames the plugin uses."""

    def fn(sample):
        out = {"images": plugin._regularize_images(sample.images)}
        if sample.videos:
            out["videos"] = [c.frames for c in plugin._regularize_videos(sample.videos, processor)]
        return out

    return fn


def _parity(name, plugin, media):
    processor = load_processor(name)
    return check_batch_parity(plugin, processor, _samples(media, FAMILIES[name]), lambda t: t,
                              _processor_media(plugin, processor), nested=("images",),
                              processor_kwargs=VIDEO_KW if FAMILIES[name] else {})


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ids_and_tensors_match_processor(name, media):
    result = _parity(name, get_mm_plugin(name), media)
    ours, ref = result["ours"], result["ref"]
    assert set(ours) == set(ref) - {"input_ids", "attention_mask"}, (sorted(ours), sorted(ref))
    if FAMILIES[name]:
        assert "pixel_values_videos" in ours
    if name == "video_llava":
        assert ours["pixel_values_videos"].shape[1] == 8  # Video-LLaVA's fixed 8 frames
    if name == "llava_onevision":
        assert ours["batch_num_images"].tolist() == [2, 1]  # multi-image sample skips anyres tiling


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_counts_read_headers_only(name, media):
    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    for sample in _samples(media, False):
        with no_pixel_decoding():
            expanded = plugin.process_messages(sample.messages, sample.images, [], [], processor)
        assert render(expanded).count("<image>") > len(sample.images) or not sample.images


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_expansion_lets_processor_expand(name, media):
    processor = load_processor(name)
    short_plugin = get_mm_plugin(name, expand_mm_tokens=False)
    samples = _samples(media, FAMILIES[name])
    get_media = _processor_media(short_plugin, processor)
    for sample in samples:
        short = short_plugin.process_messages(sample.messages, sample.images, sample.videos, [], processor)
        text = render(short)
        assert text.count("<image>") == len(sample.images) and text.count("<video>") == len(sample.videos)
        kwargs = {k: [v] if k == "images" else v for k, v in get_media(sample).items() if v}
        ref = processor(text=[text], **kwargs, return_tensors="pt", **(VIDEO_KW if FAMILIES[name] else {}))
        assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin(name), processor, sample)
        if sample.images or sample.videos:
            mm = short_plugin.get_mm_inputs(sample.images, sample.videos, [], [len(sample.images)],
                                            [len(sample.videos)], [0], [ref["input_ids"][0].tolist()], processor)
            assert_tensors_equal(mm, ref)


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision", "video_llava"])
def test_user_pixel_caps_applied_once(name, media):
    """A user cap resizes once, before the processor: the processor given the capped media
    agrees with the plugin token for token and tensor for tensor (a second hidden resize
    would change ``image_sizes`` or the pixels)."""
    caps = MediaConfig(image_max_pixels=200 * 100, video_max_pixels=32 * 24)
    plugin = get_mm_plugin(name, media=caps)
    resized = plugin._regularize_images([media["big"]])[0]
    assert resized.width * resized.height <= 200 * 100 and abs(resized.width / resized.height - 500 / 230) < 0.05
    result = _parity(name, plugin, media)
    if "image_sizes" in result["ours"]:
        assert result["ours"]["image_sizes"][0].tolist() == [resized.height, resized.width]
    if FAMILIES[name]:
        frame = plugin._regularize_videos([media["video"]], load_processor(name))[0].frames[0]
        assert frame.width * frame.height <= 32 * 24


def test_video_llava_takes_num_frames_from_its_processor(media):
    processor = load_processor("video_llava")
    processor.video_processor.num_frames = 4
    try:
        plugin = get_mm_plugin("video_llava")
        sample = MMSample([{"role": "user", "content": "<video>What happens?"}], videos=[media["video"]])
        result = check_batch_parity(plugin, processor, [sample], lambda t: t, _processor_media(plugin, processor),
                                    processor_kwargs=VIDEO_KW)
        assert result["ours"]["pixel_values_videos"].shape[1] == 4
    finally:
        processor.video_processor.num_frames = None


@pytest.mark.parametrize("name", sorted(FAMILIES) + ["vipllava"])
def test_tiny_model_accepts_plugin_output(name, media):
    """A forward pass of the tiny model on a two-image batch cross-checks the counts with
    the model's own feature count; the composite keys split its parameters exactly."""
    from transformers import AutoModelForImageTextToText

    family = "llava" if name == "vipllava" else name
    processor = load_processor(family)
    plugin = get_mm_plugin(family)
    samples = _samples(media, FAMILIES[family])
    samples = [samples[0], samples[2]]
    ids = [plugin_ids(plugin, processor, s) for s in samples]
    width = max(map(len, ids))
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    mm = plugin.get_mm_inputs([x for s in samples for x in s.images], [x for s in samples for x in s.videos], [],
                              [len(s.images) for s in samples], [len(s.videos) for s in samples], [0, 0], ids,
                              processor)
    fixture = get_fixture(family)
    config = fixture.extra["vipllava_config"]() if name == "vipllava" else fixture.tiny_config()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, **mm)
    assert out.logits.shape[:2] == (2, width) and torch.isfinite(out.logits).all()
    check_composite_keys(model, get_composite_model(config.model_type))
