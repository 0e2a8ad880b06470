"""Qwen2-VL / Qwen2.5-VL plugin parity with the installed processors and models."""

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

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
MM_KEYS = {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 301, 173, seed=1),  # non-square, odd sizes
        "small": make_image_file(str(d / "small.png"), 40, 30, seed=2),  # 1200 px < min_pixels 56*56
        "vid": make_video_file(str(d / "a.mp4"), frames=8, width=64, height=48, fps=4),
    }


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
        MMSample(conv, images=[media["big"], media["small"]], videos=[media["vid"]]),
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
    samples = _samples(media)
    result = check_batch_parity(
        plugin, processor, samples, _to_processor_text, _processor_media(plugin),
        processor_kwargs={"do_sample_frames": False},
    )
    ours, ref = result["ours"], result["ref"]
    expected = MM_KEYS | ({"second_per_grid_ts"} if name == "qwen2_5_vl" else set())
    assert expected <= set(ours) and expected <= set(ref)
    assert set(ours) == expected  # nothing more than the processor's tensors
    # the small image was brought up to min_pixels by the processor's rule, not ours
    assert ours["image_grid_thw"][1].prod() * 14 * 14 >= 56 * 56
    # the sample without media has no media tokens at all
    assert ours["mm_token_type_ids"][1].sum() == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_no_expansion_leaves_one_pad_and_processor_expands_it(name, media):
    processor = load_processor(name)
    plugin = get_mm_plugin(name, expand_mm_tokens=False)
    sample = _samples(media)[0]
    short = render(plugin.process_messages(sample.messages, sample.images, sample.videos, [], processor))
    assert short == _to_processor_text(render(sample.messages))  # exactly one pad per medium
    ref = processor(text=[short], **_processor_media(plugin)(sample), do_sample_frames=False, return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin(name), processor, sample)
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [1], [0], [plugin_ids(plugin, processor, sample)],
                              processor)
    assert_tensors_equal(mm, ref, ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"])


def test_user_caps_are_applied_once_by_the_processor(media):
    processor = load_processor("qwen2_vl")
    caps = MediaConfig(image_max_pixels=64 * 64, image_min_pixels=48 * 48, video_max_pixels=40 * 40,
                       video_min_pixels=28 * 28)
    plugin = get_mm_plugin("qwen2_vl", media=caps)
    sample = MMSample([{"role": "user", "content": "<image><image><video>"}], images=[media["big"], media["small"]],
                      videos=[media["vid"]])
    ids = plugin_ids(plugin, processor, sample)
    ref = processor(
        text=[_to_processor_text(render(sample.messages))],
        **_processor_media(plugin)(sample),
        images_kwargs={"size": {"shortest_edge": 48 * 48, "longest_edge": 64 * 64}},
        videos_kwargs={"size": {"shortest_edge": 28 * 28, "longest_edge": 40 * 40}, "do_sample_frames": False},
        return_tensors="pt",
    )
    assert ids == ref["input_ids"][0].tolist()
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [1], [0], [ids], processor)
    assert_tensors_equal(mm, ref, sorted(MM_KEYS))
    # applied once: the images reach the processor at their own size (no hidden pre-resize) ...
    assert [im.size for im in plugin._regularize_images(sample.images)] == [(301, 173), (40, 30)]
    # ... and the processor's cap really bounds them
    for t, h, w in mm["image_grid_thw"].tolist():
        assert 48 * 48 <= h * w * 14 * 14 <= 64 * 64


def test_counting_tokens_never_decodes_pixels(media):
    processor = load_processor("qwen2_vl")
    plugin = get_mm_plugin("qwen2_vl")
    sample = MMSample([{"role": "user", "content": "<image> and <image>"}], [media["big"], media["small"]])
    expected = plugin_ids(plugin, processor, sample)
    with no_pixel_decoding():
        again = plugin_ids(plugin, processor, sample)
        with pytest.raises(AssertionError, match="decoded"):  # the guard does bite on a decode
            Image.open(media["big"]).convert("RGB")
    assert again == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_model_runs_on_plugin_output_and_composite_keys_match(name, media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(name).tiny_config()).eval()
    check_composite_keys(model, get_composite_model(name))
    sample = MMSample([{"role": "user", "content": "<image> vs <image>: which <video>?"}],
                      images=[media["big"], media["small"]], videos=[media["vid"]])
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [1], [0], [ids], processor)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **mm)  # the model checks features == tokens
    assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()



def test_token_counts_with_user_caps_raise_no_deprecation_warning(media):
    """The counters get the caps under both names (each transformers release reads one); the
    release that deprecates ``min_pixels``/``max_pixels`` must not warn on every sample."""
    import warnings

    processor = load_processor("qwen2_vl")
    caps = MediaConfig(image_max_pixels=64 * 64, image_min_pixels=48 * 48, video_max_pixels=40 * 40,
                       video_min_pixels=28 * 28)
    plugin = get_mm_plugin("qwen2_vl", media=caps)
    sample = MMSample([{"role": "user", "content": "<image><video>"}], images=[media["big"]], videos=[media["vid"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ids = plugin_ids(plugin, processor, sample)
    ref = processor(text=[_to_processor_text(render(sample.messages))], **_processor_media(plugin)(sample),
                    images_kwargs={"size": {"shortest_edge": 48 * 48, "longest_edge": 64 * 64}},
                    videos_kwargs={"size": {"shortest_edge": 28 * 28, "longest_edge": 40 * 40},
                                   "do_sample_frames": False}, return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
