"""Gemma 4: ids and tensors equal the installed processor's (images of several sizes, two videos
of different frame counts, two audio clips of different lengths, a text-only sample), counted
without decoding an image's pixels; composite keys and a forward on a live tiny model (text,
vision and audio towers); the chat template renders as the E2B/E4B checkpoints' own with loss
on the answers only."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.media import MediaError
from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import get_fixture, load_processor, make_audio_file, make_image_file, make_video_file
from mmtune.testing.parity import (MMSample, assert_tensors_equal, check_batch_parity, check_composite_keys,
                                   no_pixel_decoding, plugin_ids)

from ..helpers import CONV

NAME = "gemma4"
TENSORS = ["pixel_values", "image_position_ids", "input_features",
           "input_features_mask"]
#: the E2B/E4B checkpoints' chat template (google/gemma-4-E2B-it, chat_template.jinja, thinking off) on CONV
EXPECTED = ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"
            "<|turn>user\nColour?<turn|>\n<|turn>model\nRed<turn|>\n")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma4_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 333, 190, seed=1),
        "small": make_image_file(str(d / "small.png"), 30, 44, seed=2),
        "vid_a": make_video_file(str(d / "a.mp4"), frames=8, width=64, height=48, fps=4),
        "vid_b": make_video_file(str(d / "b.mp4"), frames=20, width=72, height=40, fps=5, seed=3),
        "vid_c": make_video_file(str(d / "c.mp4"), frames=8, width=72, height=40, fps=4, seed=4),
        "aud_a": make_audio_file(str(d / "a.wav"), seconds=0.6),
        "aud_b": make_audio_file(str(d / "b.wav"), seconds=1.3),
    }


@pytest.fixture(scope="module")
def processor():
    return load_processor(NAME)


def _proc_media(sample):
    plugin = get_mm_plugin(NAME)
    clips = plugin._regularize_videos(sample.videos)
    return {"images": [Image.open(p).convert("RGB") for p in sample.images], "videos": [c.frames for c in clips],
            "video_metadata": [c.metadata() for c in clips], "audio": plugin._regularize_audios(sample.audios)}


def _samples(media):
    return [
        MMSample([{"role": "user", "content": "<image>Compare <image> with <video>, <video>, <audio> and <audio>."},
                  {"role": "assistant", "content": "Similar."}],
                 images=[media["big"], media["small"]], videos=[media["vid_a"], media["vid_c"]],
                 audios=[media["aud_a"], media["aud_b"]]),
        MMSample([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]),
    ]


def test_ids_and_tensors_match_processor(media, processor):
    plugin = get_mm_plugin(NAME)
    samples = _samples(media)
    result = check_batch_parity(plugin, processor, samples, lambda t: t.replace("<image>", "<|image|>").replace(
        "<video>", "<|video|>").replace("<audio>", "<|audio|>"), _proc_media, processor_kwargs={"do_sample_frames": False},
        tensor_keys=TENSORS + processor.video_processor.model_input_names, nested=("images",))
    ref = result["ref"]
    types = plugin.mm_token_type_ids(ref["input_ids"], processor)
    assert torch.equal(types * ref["attention_mask"], ref["mm_token_type_ids"])
    assert set(types.unique().tolist()) == {0, 1, 2, 3}  # text, image, video, audio tokens
    image_runs = [int((ids == processor.image_token_id).sum()) for ids in ref["input_ids"]]
    assert image_runs[0] == sum(plugin.processor_image_token_counts(processor, samples[0].images))
    assert len(set(plugin.audio_token_counts(plugin._regularize_audios(samples[0].audios), processor))) == 2


def test_videos_of_different_frame_counts_in_one_batch(media, processor):
    """Releases whose video processor returns ``num_frames_per_video`` take any frame counts (and
    the ids and tensors match the processor's); older ones stack a batch's videos, and mmtune
    says so in one error instead of the processor's shape error."""
    plugin = get_mm_plugin(NAME)
    sample = MMSample([{"role": "user", "content": "<video> and <video>"}, {"role": "assistant", "content": "two"}],
                      videos=[media["vid_a"], media["vid_b"]])
    frames = [len(c.frames) for c in plugin._regularize_videos(sample.videos)]
    assert frames[0] != frames[1]
    if "num_frames_per_video" in processor.video_processor.model_input_names:
        result = check_batch_parity(plugin, processor, [sample], lambda t: t.replace("<video>", "<|video|>"),
                                    _proc_media, processor_kwargs={"do_sample_frames": False},
                                    tensor_keys=["pixel_values_videos", "video_position_ids", "num_frames_per_video"])
        assert result["ours"]["num_frames_per_video"].tolist() == frames
    else:
        with pytest.raises(MediaError, match="frame counts must match"):
            plugin.get_mm_inputs([], sample.videos, [], [0], [2], [0], [], processor)


def test_image_tokens_are_counted_without_decoding_pixels(media, processor):
    plugin = get_mm_plugin(NAME)
    sample = MMSample([{"role": "user", "content": "<image><image>"}], [media["big"], media["small"]])
    expected = plugin_ids(plugin, processor, sample)
    with no_pixel_decoding():
        assert plugin_ids(plugin, processor, sample) == expected


def test_tiny_model_runs_on_plugin_output_and_composite_keys_match(media, processor):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(NAME).tiny_config()).eval()
    check_composite_keys(model, get_composite_model(NAME))
    plugin = get_mm_plugin(NAME)
    sample = _samples(media)[0]
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs(sample.images, sample.videos, sample.audios, [2], [2], [2], [ids], processor)
    batch = torch.tensor([ids])
    with torch.no_grad():  # the model checks features == tokens for each modality
        out = model(input_ids=batch, mm_token_type_ids=plugin.mm_token_type_ids(batch, processor), **mm)
    assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()


def test_template_renders_as_the_checkpoints_own_with_loss_on_answers(processor):
    t = get_template(NAME)
    assert get_composite_model(NAME).template == NAME and t.plugin == NAME
    assert t.render(CONV) == EXPECTED
    assert t.render(CONV[:4]).endswith("<|turn>user\nColour?<turn|>\n<|turn>model\n")  # the generation prompt
    assert t.render(CONV[1:3]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"  # no default system
    tok = processor.tokenizer
    ids, labels = t.encode(tok, CONV)
    assert ids == tok(EXPECTED, add_special_tokens=False)["input_ids"]
    answers = [tok(a, add_special_tokens=False)["input_ids"] for a in ("Hello<turn|>\n", "Red<turn|>\n")]
    assert [i for i, l in zip(ids, labels) if l != IGNORE_INDEX] == answers[0] + answers[1]
    t.check_tokenizer(tok)


def test_the_audio_tower_keeps_eager_attention_whatever_the_model_is_asked_to_use():
    from mmtune.model.composite import attention_implementation

    config = get_fixture(NAME).tiny_config()
    assert attention_implementation(config, "sdpa") == {"": "sdpa", "text_config": "sdpa", "vision_config": "sdpa",
                                                        "audio_config": "eager"}
    config.audio_config = None  # the 26B / 31B checkpoints: no audio tower, nothing to fix
    assert attention_implementation(config, "sdpa") == "sdpa"
    assert attention_implementation(get_fixture("qwen3_5").tiny_config(), "sdpa") == "sdpa"
