"""GLM-4.6V (glm46v): ids and tensors equal the installed processor's (images of several sizes,
two videos of different frame counts with ``"{t:.1f} seconds"`` timestamps, a text-only sample);
composite keys and a forward on a live tiny model; the two chat templates render as the
checkpoint's own (thinking off and on, generation prompt, system prompt, reasoning kept only in
the last answer) with loss on the answers only."""

import re

import pytest
import torch
from PIL import Image

from mmtune.errors import DataError
from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, plugin_ids, render

from ..helpers import CONV

NAME = "glm46v"
TENSORS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"]
#: the checkpoint's chat_template.jinja on CONV (+ the EOS mmtune trains), and on CONV[:4] with
#: add_generation_prompt, with enable_thinking=False and with its default
NO_THINK = ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi/nothink<|assistant|>\n<think></think>\nHello"
            "<|user|>\nColour?/nothink<|assistant|>\n<think></think>")
THINK = "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello<|user|>\nColour?<|assistant|>"
REASONED = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nLet me see.\n</think>\n\nHello"},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "<think>\nIt is red.\n</think>\n\nRed"}]
REASONED_FULL = ("[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello<|user|>\nColour?<|assistant|>"
                 "\n<think>It is red.</think>\nRed<|endoftext|>")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm46v_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 333, 190, seed=1),
        "small": make_image_file(str(d / "small.png"), 30, 44, seed=2),
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
    conv = [{"role": "user", "content": "<image>Compare <image> with the clips <video> and <video>."},
            {"role": "assistant", "content": "Similar."}]
    return [
        MMSample(conv, images=[media["big"], media["small"]], videos=[media["vid_a"], media["vid_b"]]),
        MMSample([{"role": "user", "content": "<image>and"}, {"role": "assistant", "content": "ok"}],
                 images=[media["small"]]),
        MMSample([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]),
    ]


def test_ids_and_tensors_match_processor(media, processor):
    assert type(processor).__name__ == "Glm46VProcessor"
    plugin = get_mm_plugin(NAME)
    samples = _samples(media)
    result = check_batch_parity(plugin, processor, samples, _proc_text, _proc_media,
                                processor_kwargs={"do_sample_frames": False})
    assert set(result["ours"]) == set(TENSORS) <= set(result["ref"])
    grids = result["ours"]["video_grid_thw"]
    assert grids[0, 0] != grids[1, 0] and len(result["ours"]["image_grid_thw"]) == 3
    text = render(plugin.process_messages(samples[0].messages, samples[0].images, samples[0].videos, [], processor))
    # each temporal group: an image block followed by its timestamp, one decimal and "seconds"
    assert text.count("<|end_of_image|>") == 2 + int(grids[:, 0].sum())
    clip = plugin._regularize_videos([media["vid_b"]])[0].metadata()  # every second sampled frame's time
    stamps = [f"{i / clip['fps']:.1f} seconds" for i in clip["frames_indices"][::2]]
    assert stamps[-2:] == ["2.2 seconds", "3.2 seconds"]
    assert text.endswith("".join(f"<|end_of_image|>{s}" for s in stamps[-1:]) + "<|end_of_video|>.\nassistant: Similar.\n")
    assert re.findall(r"<\|end_of_image\|>([0-9.]+ seconds)", text)[-len(stamps):] == stamps


def test_tiny_model_runs_on_plugin_output_and_composite_keys_match(media, processor):
    from transformers import AutoModelForImageTextToText

    config = get_fixture(NAME).tiny_config()
    assert config.model_type == NAME
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    check_composite_keys(model, get_composite_model(NAME))
    plugin = get_mm_plugin(NAME)
    # as GLM-4.1V's, the model takes images and videos in separate samples
    for images, videos in (([media["big"], media["small"]], []), ([], [media["vid_a"], media["vid_b"]])):
        text = "<image>" * len(images) + "<video>" * len(videos) + " what?"
        sample = MMSample([{"role": "user", "content": text}], images, videos)
        ids = plugin_ids(plugin, processor, sample)
        mm = plugin.get_mm_inputs(images, videos, [], [len(images)], [len(videos)], [0], [ids], processor)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), **mm)  # the model checks features == tokens
        assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()


def test_templates_render_as_the_checkpoints_own():
    plain, thinking = get_template("glm46v"), get_template("glm46v_thinking")
    assert get_composite_model(NAME).template == "glm46v"
    assert plain.render(CONV) == NO_THINK + "\nRed<|endoftext|>"
    assert plain.render(CONV[:4]) == NO_THINK
    assert thinking.render(CONV) == THINK + "\n<think></think>\nRed<|endoftext|>"
    assert thinking.render(CONV[:4]) == THINK
    assert thinking.render(REASONED) == REASONED_FULL
    assert plain.render(REASONED[:3]).startswith("[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>\nHello<|user|>")
    with pytest.raises(DataError, match="glm46v_thinking"):
        plain.render(REASONED)  # its reasoning would be lost
    for t in (plain, thinking):
        assert t.plugin == NAME and t.stop_words == ("<|endoftext|>", "<|user|>", "<|observation|>")


@pytest.mark.parametrize("name,messages,trained", [
    ("glm46v", CONV, "\nHello\nRed<|endoftext|>"),
    ("glm46v_thinking", CONV, "\n<think></think>\nHello\n<think></think>\nRed<|endoftext|>"),
    ("glm46v_thinking", REASONED, "\n<think></think>\nHello\n<think>It is red.</think>\nRed<|endoftext|>"),
])
def test_loss_on_the_answers_only_and_ids_as_the_whole_text(name, messages, trained, processor):
    tok, t = processor.tokenizer, get_template(name)
    ids, labels = t.encode(tok, messages)
    assert ids == tok(t.render(messages), add_special_tokens=False)["input_ids"]  # no merge across a boundary
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == trained
    t.check_tokenizer(tok)
