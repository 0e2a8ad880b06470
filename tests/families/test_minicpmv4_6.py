"""MiniCPM-V 4.6 / 4.7 (minicpmv4_6, minicpmv4_7): ids and tensors equal the installed processor's
(sliced and unsliced images of several sizes, two a sample, videos of different frame counts, a
text-only sample; image ids per sample; 4.7's mm_token_type_ids); composite keys and a forward
on live tiny models; the templates (Qwen3.5's reasoning turns) with loss on the answers only;
packing refused (the Qwen3.5 language model's linear-attention state)."""

import types

import pytest
import torch
from PIL import Image

from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, plugin_ids, render

from ..helpers import CONV

HAS_47 = True
try:
    from transformers import MiniCPMV4_7Processor  # noqa: F401  (newer than transformers 5.17)
except ImportError:
    HAS_47 = False
#: transformers 5.17's window merger: one image size per batch (mmtune.families.minicpmv4_6.UNIFORM_SIZES_ONLY)
OLD_MERGER = not HAS_47
TYPES = ["minicpmv4_6"] + (["minicpmv4_7"] if HAS_47 else [])
TENSORS = ["pixel_values", "target_sizes", "pixel_values_videos", "target_sizes_videos"]
#: the checkpoint's rendering (a Qwen3.5 backbone's chat template, enable_thinking off / on)
PROMPT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
          "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("minicpmv46_media")
    return {
        "huge": make_image_file(str(d / "huge.jpg"), 400, 170, seed=1),  # sliced (scale_resolution 112)
        "big": make_image_file(str(d / "big.jpg"), 150, 190, seed=2),
        "small": make_image_file(str(d / "small.png"), 30, 44, seed=3),  # not sliced
        "vid_a": make_video_file(str(d / "a.mp4"), frames=4, width=64, height=48, fps=2),
        "vid_b": make_video_file(str(d / "b.mp4"), frames=4, width=200, height=120, fps=2, seed=3),
        "vid_c": make_video_file(str(d / "c.mp4"), frames=6, width=90, height=60, fps=2, seed=4),
    }


def _proc_media(name):
    def media(sample):
        clips = get_mm_plugin(name)._regularize_videos(sample.videos)
        return {"images": [Image.open(p).convert("RGB") for p in sample.images], "videos": [c.frames for c in clips]}
    return media


def _proc_text(text):
    return text.replace("<image>", "<|image_pad|>").replace("<video>", "<|video_pad|>")


def _samples(media):
    return [
        MMSample([{"role": "user", "content": "<image>Compare <image> and <video>."}, {"role": "assistant", "content": "Same."}],
                 images=[media["huge"], media["small"]], videos=[media["vid_b"]]),
        MMSample([{"role": "user", "content": "<image>and <video>"}, {"role": "assistant", "content": "ok"}],
                 images=[media["big"]], videos=[media["vid_a"]]),
        MMSample([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]),
    ]


@pytest.mark.parametrize("name", TYPES)
def test_ids_and_tensors_match_processor(name, media, monkeypatch):
    from mmtune.families import minicpmv4_6

    # the processor's output, mixed sizes included, on every release (5.17's model refuses those: below)
    monkeypatch.setattr(minicpmv4_6, "UNIFORM_SIZES_ONLY", "<0")
    processor = load_processor(name)
    samples = _samples(media)
    keys = TENSORS + (["mm_token_type_ids"] if name == "minicpmv4_7" else [])
    plugin = get_mm_plugin(name)
    result = check_batch_parity(plugin, processor, samples, _proc_text, _proc_media(name),
                                processor_kwargs={"do_sample_frames": False}, tensor_keys=TENSORS)
    if name == "minicpmv4_7":  # the collator's token types equal the processor's
        ids = result["ref"]["input_ids"]
        assert torch.equal(plugin.mm_token_type_ids(ids, processor) * result["ref"]["attention_mask"],
                           result["ref"]["mm_token_type_ids"])
    assert set(keys) <= set(result["ref"])
    text = render(plugin.process_messages(samples[0].messages, samples[0].images, samples[0].videos, [], processor))
    assert "<slice>" in text and "<image_id>1</image_id>" in text  # a sliced image; ids per sample
    assert ("<image_id>0</image_id><image><|video_pad|>" in text) == (name == "minicpmv4_6")  # 4.7 numbers no video


def test_videos_of_different_frame_counts_in_one_batch(media, monkeypatch):
    """Each video's text and tensors are the processor's for it; a batch is their concatenation,
    which is the processor's own batched output where it can batch them (transformers 5.17's
    cannot: it fails on videos of different frame counts)."""
    import transformers

    from mmtune.families import minicpmv4_6

    monkeypatch.setattr(minicpmv4_6, "UNIFORM_SIZES_ONLY", "<0")
    processor, plugin = load_processor("minicpmv4_6"), get_mm_plugin("minicpmv4_6")
    vids = [media["vid_a"], media["vid_c"]]
    frames = [c.frames for c in plugin._regularize_videos(vids)]
    assert len(frames[0]) != len(frames[1])
    ours = plugin.get_mm_inputs([], vids, [], [0], [2], [0], [[]], processor)
    for i, vid in enumerate(vids):
        sample = MMSample([{"role": "user", "content": "<video>"}], videos=[vid])
        ref = processor(text=["user: <|video_pad|>\n"], videos=[frames[i]], do_sample_frames=False, return_tensors="pt")
        assert plugin_ids(plugin, processor, sample) == ref["input_ids"][0].tolist()
    if transformers.__version__ >= "5.25":
        ref = processor(text=["<|video_pad|><|video_pad|>"], videos=frames, do_sample_frames=False, return_tensors="pt")
        assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
        assert torch.equal(ours["target_sizes_videos"], ref["target_sizes_videos"])
    sizes = [processor.video_processor(videos=[f], do_sample_frames=False, return_tensors="pt") for f in frames]
    assert torch.equal(ours["target_sizes_videos"], torch.cat([s["target_sizes_videos"] for s in sizes]))


@pytest.mark.parametrize("name", TYPES)
def test_tiny_model_runs_on_plugin_output_and_composite_keys_match(name, media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    config = get_fixture(name).tiny_config()
    assert config.model_type == name and config.text_config.layer_types == ["linear_attention", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    check_composite_keys(model, get_composite_model(name))
    plugin = get_mm_plugin(name)
    sample = _samples(media)[0]
    if OLD_MERGER:  # one size of source image and slice per batch (see the next test)
        sample = MMSample([{"role": "user", "content": "<image><image>what?"}], images=[media["big"], media["big"]])
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs(sample.images, sample.videos, [], [2], [len(sample.videos)], [0], [ids], processor)
    input_ids = torch.tensor([ids])
    if plugin.token_type_key:
        mm[plugin.token_type_key] = plugin.mm_token_type_ids(input_ids, processor)
    with torch.no_grad():
        out = model(input_ids=input_ids, **mm)  # the model checks features == tokens
    assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()


def test_mixed_sizes_are_refused_only_where_the_window_merger_cannot_take_them(media):
    from mmtune.families.minicpmv4_6 import check_uniform_sizes
    from mmtune.media import MediaError

    check_uniform_sizes(torch.tensor([[8, 8], [8, 8]]), "target_sizes")  # one size: every release
    mixed = torch.tensor([[8, 12], [8, 8]])
    if OLD_MERGER:
        with pytest.raises(MediaError, match=r"cannot take.*upgrade transformers"):
            check_uniform_sizes(mixed, "target_sizes")
    else:
        check_uniform_sizes(mixed, "target_sizes")


@pytest.mark.parametrize("name", TYPES)
def test_templates_render_as_the_checkpoints_own(name):
    plain, thinking = get_template(name), get_template(f"{name}_thinking")
    assert get_composite_model(name).template == name and plain.plugin == thinking.plugin == name
    assert plain.render(CONV[:4]) == PROMPT + "<think>\n\n</think>\n\n"
    assert thinking.render(CONV[:4]) == PROMPT + "<think>\n"
    assert plain.render(CONV[1:3]).startswith("<|im_start|>user\nHi")  # no default system prompt
    reasoned = CONV[:4] + [{"role": "assistant", "content": "<think>\nIt is red.\n</think>\n\nRed"}]
    assert thinking.render(reasoned) == PROMPT + "<think>\nIt is red.\n</think>\n\nRed<|im_end|>\n"


@pytest.mark.parametrize("template,trained", [
    ("minicpmv4_6", "Hello<|im_end|>\nRed<|im_end|>\n"),
    ("minicpmv4_6_thinking", "Hello<|im_end|>\n\n\n</think>\n\nRed<|im_end|>\n"),
])
def test_loss_on_the_answers_only(template, trained):
    tok, t = load_processor("minicpmv4_6").tokenizer, get_template(template)
    ids, labels = t.encode(tok, CONV)
    assert ids == tok(t.render(CONV), add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == trained
    t.check_tokenizer(tok)


def test_packing_is_refused_with_its_reason():
    from mmtune.data.packing import packing_unsupported_reason

    for name in ("minicpmv4_6", "minicpmv4_7"):
        model = types.SimpleNamespace(config=types.SimpleNamespace(model_type=name))
        assert "Gated DeltaNet" in packing_unsupported_reason(model, None)


def test_a_type_this_transformers_lacks_is_refused_naming_the_version(tmp_path, monkeypatch):
    """minicpmv4_7 is newer than transformers 5.17: the family registers on import either way,
    and a checkpoint of it is refused before anything loads, saying transformers is too old
    (on 5.17 for real; here the type is hidden from transformers' mapping to show the same)."""
    import json

    import transformers
    from transformers.models.auto import configuration_auto

    from mmtune.model.folders import ModelFolderError, check_buildable, locate

    assert get_composite_model("minicpmv4_7") is not None and get_template("minicpmv4_7").plugin == "minicpmv4_7"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minicpmv4_7"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    if HAS_47:
        monkeypatch.delitem(configuration_auto.CONFIG_MAPPING_NAMES, "minicpmv4_7")
    with pytest.raises(ModelFolderError, match=f"needs a newer transformers than the installed {transformers.__version__}"):
        check_buildable(locate(str(tmp_path)), "model_name_or_path")
