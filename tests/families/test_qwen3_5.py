"""Qwen3.5 / Qwen3.5-MoE: ids and tensors equal the installed processor's (images of several
sizes, two videos of different frame counts, a text-only sample); composite keys and a forward
on a live tiny model (dense and MoE, a Gated DeltaNet layer and a full-attention layer); the two
chat templates render as the checkpoint's own (generation prompt with and without thinking, a
system prompt, reasoning kept only in the last answer) with loss on the answers only; packing is
refused with its reason, which a tiny model shows: packed rows change the linear-attention
layers' output."""

import types

import pytest
import torch
from PIL import Image

from mmtune.errors import DataError
from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, plugin_ids

from ..helpers import CONV

NAME = "qwen3_5"
TENSORS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"]
START = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
#: the checkpoint's chat template (Qwen/Qwen3.5-*, chat_template.jinja) on CONV, on CONV[:4] with
#: add_generation_prompt and enable_thinking=False / default, and on REASONED
FULL = START + "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nRed<|im_end|>\n"
PROMPT_NO_THINKING = START + "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PROMPT_THINKING = START + "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n<think>\n"
REASONED = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nLet me see.\n</think>\n\nHello"},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "<think>\nIt is red.\n</think>\n\nRed"}]
REASONED_FULL = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nColour?"
                 "<|im_end|>\n<|im_start|>assistant\n<think>\nIt is red.\n</think>\n\nRed<|im_end|>\n")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_5_media")
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
    return text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>").replace(
        "<video>", "<|vision_start|><|video_pad|><|vision_end|>")


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
    assert type(processor).__name__ == "Qwen3VLProcessor"  # what the checkpoints ship
    result = check_batch_parity(get_mm_plugin(NAME), processor, _samples(media), _proc_text, _proc_media,
                                processor_kwargs={"do_sample_frames": False})
    assert set(result["ours"]) == set(TENSORS) <= set(result["ref"])
    grids = result["ours"]["video_grid_thw"]
    assert grids[0, 0] != grids[1, 0] and len(result["ours"]["image_grid_thw"]) == 3


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_tiny_model_runs_on_plugin_output_and_composite_keys_match(model_type, media, processor):
    from transformers import AutoModelForImageTextToText

    fixture = get_fixture(NAME)
    config = fixture.tiny_config() if model_type == "qwen3_5" else fixture.extra["moe_config"]()
    assert config.model_type == model_type
    assert config.text_config.layer_types == ["linear_attention", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    check_composite_keys(model, get_composite_model(model_type))
    plugin = get_mm_plugin(model_type)
    images, videos = [media["big"], media["small"]], [media["vid_a"], media["vid_b"]]
    sample = MMSample([{"role": "user", "content": "<image><image><video><video> what?"}], images, videos)
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs(images, videos, [], [2], [2], [0], [ids], processor)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **mm)  # the model checks features == tokens
    assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()


def test_templates_render_as_the_checkpoints_own():
    plain, thinking = get_template("qwen3_5"), get_template("qwen3_5_thinking")
    assert get_composite_model("qwen3_5").template == get_composite_model("qwen3_5_moe").template == "qwen3_5"
    for t in (plain, thinking):
        assert t.render(CONV) == FULL  # the full conversation does not depend on enable_thinking
        assert t.render(REASONED[:3]).startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>")
        assert t.render(CONV[1:3]).startswith("<|im_start|>user\nHi")  # no default system prompt
        assert t.plugin == "qwen3_5" and t.stop_words == ("<|im_end|>",)
    assert plain.render(CONV[:4]) == PROMPT_NO_THINKING
    assert thinking.render(CONV[:4]) == PROMPT_THINKING
    assert thinking.render(REASONED) == REASONED_FULL
    with pytest.raises(DataError, match="qwen3_5_thinking"):
        plain.render(REASONED)  # its reasoning would be lost


@pytest.mark.parametrize("name,messages,trained", [
    ("qwen3_5", CONV, "Hello<|im_end|>\nRed<|im_end|>\n"),
    ("qwen3_5_thinking", CONV, "Hello<|im_end|>\n\n\n</think>\n\nRed<|im_end|>\n"),
    ("qwen3_5_thinking", REASONED, "Hello<|im_end|>\n\nIt is red.\n</think>\n\nRed<|im_end|>\n"),
])
def test_loss_on_the_answers_only_and_ids_as_the_whole_text(name, messages, trained, processor):
    tok, t = processor.tokenizer, get_template(name)
    ids, labels = t.encode(tok, messages)
    assert ids == tok(t.render(messages), add_special_tokens=False)["input_ids"]  # no merge across a boundary
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == trained
    t.check_tokenizer(tok)  # <think> and </think> are single tokens


def test_packing_is_refused_with_its_reason():
    from mmtune.data.packing import maybe_pack, packing_unsupported_reason

    for model_type in ("qwen3_5", "qwen3_5_moe"):
        model = types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))
        assert "Gated DeltaNet" in packing_unsupported_reason(model, None)
        with pytest.raises(ValueError, match="recurrent state"):
            maybe_pack([], None, model, True, None, 2)


def test_packed_rows_would_leak_state_between_samples():
    """Why packing is off: two text samples laid in one row with restarting positions give the
    second sample another output than alone (attention alone would keep them apart)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(NAME).tiny_config()).eval()
    a, b = torch.randint(3, 200, (1, 9)), torch.randint(3, 200, (1, 7))
    with torch.no_grad():
        alone = model(input_ids=b).logits
        packed = model(input_ids=torch.cat([a, b], 1),
                       position_ids=torch.cat([torch.arange(9), torch.arange(7)])[None]).logits[:, 9:]
    assert not torch.allclose(alone, packed, atol=1e-4)
