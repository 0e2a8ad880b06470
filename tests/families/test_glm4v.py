"""GLM-4.1V / GLM-4.5V (glm4v / glm4v_moe): parity with the installed processor, per-frame
integer timestamps, two videos of different frame counts in one sample."""

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

NAME = "glm4v"
TENSORS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 333, 190, seed=1),
        "small": make_image_file(str(d / "small.png"), 30, 44, seed=2),  # < min_pixels (112*112)
        "vid_a": make_video_file(str(d / "a.mp4"), frames=8, width=64, height=48, fps=4),
        "vid_b": make_video_file(str(d / "b.mp4"), frames=20, width=72, height=40, fps=5, seed=3),
    }


@pytest.fixture(scope="module")
def processor():
    return load_processor(NAME)


def _proc_text(text):
    return text.replace("<image>", "<|begin_of_image|><|image|><|end_of_image|>").replace(
        "<video>", "<|begin_of_video|><|video|><|end_of_video|>")


def _proc_media(sample):
    clips = get_mm_plugin(NAME)._regularize_videos(sample.videos)
    return {"images": [Image.open(p).convert("RGB") for p in sample.images], "videos": [c.frames for c in clips],
            "video_metadata": [c.metadata() for c in clips]}


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


def test_ids_and_tensors_match_processor(media, processor):
    plugin = get_mm_plugin(NAME)
    samples = _samples(media)
    result = check_batch_parity(plugin, processor, samples, _proc_text, _proc_media,
                                processor_kwargs={"do_sample_frames": False})
    assert set(result["ours"]) == set(TENSORS) <= set(result["ref"])
    grids = result["ours"]["video_grid_thw"]
    assert grids[0, 0] != grids[1, 0]  # the two videos really have different temporal lengths
    text = render(plugin.process_messages(samples[0].messages, samples[0].images, samples[0].videos, [], processor))
    # each temporal group: an image block followed by its integer timestamp
    assert text.count("<|end_of_image|>") == 2 + int(grids[:, 0].sum())
    assert "<|end_of_image|>0" in text and "<|end_of_image|>3<|end_of_video|>" in text  # b.mp4: 4 s


def test_no_expansion(media, processor):
    plugin = get_mm_plugin(NAME, expand_mm_tokens=False)
    sample = _samples(media)[0]
    short = render(plugin.process_messages(sample.messages, sample.images, sample.videos, [], processor))
    assert short == _proc_text(render(sample.messages))
    ref = processor(text=[short], **_proc_media(sample), do_sample_frames=False, return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin(NAME), processor, sample)
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [2], [0], [plugin_ids(plugin, processor, sample)],
                              processor)
    assert_tensors_equal(mm, ref, TENSORS[:4])


def test_user_caps_are_applied_once_by_the_processor(media, processor):
    caps = MediaConfig(image_max_pixels=84 * 84, image_min_pixels=56 * 56, video_max_pixels=8 * 56 * 56,
                       video_min_pixels=4 * 28 * 28)
    plugin = get_mm_plugin(NAME, media=caps)
    sample = _samples(media)[0]
    ids = plugin_ids(plugin, processor, sample)
    ref = processor(text=[_proc_text(render(sample.messages))], **_proc_media(sample),
                    images_kwargs={"size": {"shortest_edge": 56 * 56, "longest_edge": 84 * 84}},
                    videos_kwargs={"size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 8 * 56 * 56},
                                   "do_sample_frames": False},
                    return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [2], [0], [ids], processor)
    assert_tensors_equal(mm, ref, TENSORS)
    assert [im.size for im in plugin._regularize_images(sample.images)] == [(333, 190), (30, 44)]
    default = plugin_ids(get_mm_plugin(NAME), processor, sample)
    assert len(ids) < len(default)  # the cap did bite


def test_counting_tokens_never_decodes_pixels(media, processor):
    plugin = get_mm_plugin(NAME)
    sample = MMSample([{"role": "user", "content": "<image><image>"}], [media["big"], media["small"]])
    expected = plugin_ids(plugin, processor, sample)
    with no_pixel_decoding():
        assert plugin_ids(plugin, processor, sample) == expected


# GLM-4V's model (transformers 5.23) rejects images and videos in ONE sample even when fed its own
# processor's output (it counts video-frame <|image|> tokens as image tokens), so it gets them apart.
@pytest.mark.parametrize("model_type", ["glm4v", "glm4v_moe"])
def test_tiny_model_runs_on_plugin_output_and_composite_keys_match(model_type, media, processor):
    from transformers import AutoModelForImageTextToText

    fixture = get_fixture(NAME)
    config = fixture.tiny_config() if model_type == "glm4v" else fixture.extra["moe_config"]()
    assert config.model_type == model_type
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    check_composite_keys(model, get_composite_model(model_type))
    plugin = get_mm_plugin(model_type)
    for images, videos in (([media["big"], media["small"]], []), ([], [media["vid_a"], media["vid_b"]])):
        text = "<image>" * len(images) + "<video>" * len(videos) + " what?"
        sample = MMSample([{"role": "user", "content": text}], images, videos)
        ids = plugin_ids(plugin, processor, sample)
        mm = plugin.get_mm_inputs(images, videos, [], [len(images)], [len(videos)], [0], [ids], processor)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), **mm)  # the model checks features == tokens
        assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()


def test_video_count_without_the_processor_counter(media, processor, monkeypatch):
    """transformers 5.17's GLM-4V video processor has no ``get_num_of_video_patches``: the
    fallback (its own module's smart_resize) must give the same ids, default and capped."""
    sample = _samples(media)[0]
    caps = MediaConfig(video_max_pixels=8 * 56 * 56, video_min_pixels=4 * 28 * 28)
    expected = [plugin_ids(get_mm_plugin(NAME, media=m), processor, sample) for m in (None, caps)]
    monkeypatch.delattr(type(processor.video_processor), "get_num_of_video_patches", raising=False)  # 5.17: absent
    assert not hasattr(processor.video_processor, "get_num_of_video_patches")
    assert [plugin_ids(get_mm_plugin(NAME, media=m), processor, sample) for m in (None, caps)] == expected
