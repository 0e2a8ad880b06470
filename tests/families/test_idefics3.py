"""Idefics3 and SmolVLM: image-splitting layout parity with the processors."""

import pytest
import torch
from PIL import Image

from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file
from mmtune.model.composite import get_composite_model
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, no_pixel_decoding, plugin_ids, render

NAMES = ["idefics3", "smolvlm"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("idf")
    return {"big": make_image_file(str(d / "big.jpg"), 900, 400, seed=1), "small": make_image_file(str(d / "s.png"), 50, 80)}


def _samples(media):
    conv = [{"role": "user", "content": "<image>What? <image>"}, {"role": "assistant", "content": "Shapes."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    return [MMSample(conv, images=[media["big"], media["small"]]), MMSample([{"role": "user", "content": "Hi"}])]


def _imgs(s):
    return {"images": [Image.open(p).convert("RGB") for p in s.images]}


@pytest.mark.parametrize("name", NAMES)
def test_ids_and_tensors_match_processor(name, media):
    processor = load_processor(name)
    result = check_batch_parity(get_mm_plugin(name), processor, _samples(media), lambda t: t, _imgs, nested=("images",))
    assert "<row_1_col_2>" in processor.tokenizer.decode(result["batch_ids"][0])  # the big image was split
    s = _samples(media)[0]
    with no_pixel_decoding():  # the split follows from the header size alone
        get_mm_plugin(name).process_messages(s.messages, s.images, [], [], processor)


@pytest.mark.parametrize("name", NAMES)
def test_no_expansion(name, media):
    processor = load_processor(name)
    s = _samples(media)[0]
    short = get_mm_plugin(name, expand_mm_tokens=False).process_messages(s.messages, s.images, [], [], processor)
    ref = processor(text=[render(short)], images=[_imgs(s)["images"]], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin(name), processor, s)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_accepts_plugin_output(name, media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    s = _samples(media)[0]
    ids = torch.tensor([plugin_ids(plugin, processor, s)])
    mm = plugin.get_mm_inputs(s.images, [], [], [2], [0], [0], [ids[0].tolist()], processor)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(name).tiny_config()).eval()
    with torch.no_grad():
        out = model(input_ids=ids, **mm)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
    check_composite_keys(model, get_composite_model(name))


def test_smolvlm_video_matches_processor(tmp_path):
    from mmtune.testing import make_video_file

    processor = load_processor("smolvlm")
    plugin = get_mm_plugin("smolvlm")
    video = make_video_file(str(tmp_path / "v.mp4"), frames=12, width=80, height=60, fps=4)
    conv = [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "Motion."}]
    s = MMSample(conv, videos=[video])
    clips = plugin._regularize_videos([video])
    result = check_batch_parity(plugin, processor, [s, MMSample([{"role": "user", "content": "Hi"}])], lambda t: t,
                                lambda x: {"videos": [c.frames for c in plugin._regularize_videos(x.videos)],
                                           "video_metadata": [c.metadata() for c in plugin._regularize_videos(x.videos)]},
                                processor_kwargs={"do_sample_frames": False}, nested=("videos", "video_metadata"))
    text = processor.tokenizer.decode(result["batch_ids"][0])
    assert text.count("<global-img>") == len(clips[0].frames) > 1  # one global-image block per frame
    short = get_mm_plugin("smolvlm", expand_mm_tokens=False).process_messages(conv, [], [video], [], processor)
    ref = processor(text=[render(short)], videos=[[clips[0].frames]], video_metadata=[[clips[0].metadata()]],
                    do_sample_frames=False, return_tensors="pt")
    assert ref["input_ids"][0].tolist() == result["batch_ids"][0]  # the processor expands the bare <video> alike
    with pytest.raises(ValueError, match="images or videos"):
        plugin.get_mm_inputs([tmp_path / "x.png"], [video], [], [1], [1], [0], [[0]], processor)
