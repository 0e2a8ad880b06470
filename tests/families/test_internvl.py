"""InternVL: tiling counts from headers, frames as Frame{i} blocks, tiles ordered as they appear."""

import pytest
import torch
from PIL import Image

from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file, make_video_file
from mmtune.model.composite import get_composite_model
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, no_pixel_decoding, plugin_ids, render


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("ivl")
    return {"big": make_image_file(str(d / "big.jpg"), 1200, 500, seed=1),
            "small": make_image_file(str(d / "s.png"), 100, 60, seed=2),
            "video": make_video_file(str(d / "v.mp4"), frames=6, width=64, height=48, fps=2)}


def _samples(media):
    conv = [{"role": "user", "content": "<image>Compare with the clip <video> and <image>"},
            {"role": "assistant", "content": "Alike."}, {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."}]
    return [MMSample(conv, images=[media["big"], media["small"]], videos=[media["video"]]),
            MMSample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])]


def _proc_media(plugin):
    def fn(s):
        return {"images": [Image.open(p).convert("RGB") for p in s.images],
                "videos": [c.frames for c in plugin._regularize_videos(s.videos)]}
    return fn


def test_ids_and_tensors_match_processor(media):
    processor = load_processor("internvl")
    plugin = get_mm_plugin("internvl")
    result = check_batch_parity(plugin, processor, _samples(media), lambda t: t.replace("<image>", "<IMG_CONTEXT>"),
                                _proc_media(plugin), tensor_keys=["pixel_values"])
    tiles = result["ours"]["pixel_values"].shape[0]
    assert tiles > 1 + 1 + 6  # the wide image really was tiled
    with no_pixel_decoding():  # image tiles follow from the header size alone
        plugin.process_messages([{"role": "user", "content": "<image><image>"}], [media["big"], media["small"]], [], [],
                                processor)


def test_no_expansion(media):
    processor = load_processor("internvl")
    s = _samples(media)[0]
    short = get_mm_plugin("internvl", expand_mm_tokens=False).process_messages(s.messages, s.images, s.videos, [], processor)
    ref = processor(text=[render(short)], **_proc_media(get_mm_plugin("internvl"))(s), return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin("internvl"), processor, s)
    short_ids = processor.tokenizer(render(short), add_special_tokens=False)["input_ids"]
    mm = get_mm_plugin("internvl", expand_mm_tokens=False).get_mm_inputs(s.images, s.videos, [], [2], [1], [0],
                                                                          [short_ids], processor)
    assert torch.equal(mm["pixel_values"], ref["pixel_values"])


def test_tiny_model_accepts_plugin_output(media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor("internvl")
    plugin = get_mm_plugin("internvl")
    s = _samples(media)[0]
    ids = torch.tensor([plugin_ids(plugin, processor, s)])
    mm = plugin.get_mm_inputs(s.images, s.videos, [], [2], [1], [0], [ids[0].tolist()], processor)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture("internvl").tiny_config()).eval()
    with torch.no_grad():
        out = model(input_ids=ids, **mm)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
    check_composite_keys(model, get_composite_model("internvl"))
