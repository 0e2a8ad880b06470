"""Pixtral and Mistral 3: row layout parity with PixtralProcessor."""

import pytest
import torch
from PIL import Image

from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file
from mmtune.model.composite import get_composite_model
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, no_pixel_decoding, plugin_ids, render

NAMES = ["pixtral", "mistral3"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("pix")
    return {"big": make_image_file(str(d / "big.jpg"), 700, 310, seed=1), "small": make_image_file(str(d / "s.png"), 20, 37)}


def _samples(media):
    conv = [{"role": "user", "content": "<image>What? <image>"}, {"role": "assistant", "content": "Shapes."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    return [MMSample(conv, images=[media["big"], media["small"]]), MMSample([{"role": "user", "content": "Hi"}])]


def _imgs(s):
    return {"images": [Image.open(p).convert("RGB") for p in s.images]}


@pytest.mark.parametrize("name", NAMES)
def test_ids_and_tensors_match_processor(name, media):
    processor = load_processor(name)
    result = check_batch_parity(get_mm_plugin(name), processor, _samples(media), lambda t: t.replace("<image>", "[IMG]"),
                                _imgs, nested=("images",))
    assert {"pixel_values", "image_sizes"} <= set(result["ours"])
    assert "[IMG_BREAK]" in processor.tokenizer.decode(result["batch_ids"][0])
    s = _samples(media)[0]
    with no_pixel_decoding():  # rows and columns follow from the header size alone
        get_mm_plugin(name).process_messages(s.messages, s.images, [], [], processor)


@pytest.mark.parametrize("name", NAMES)
def test_no_expansion(name, media):
    processor = load_processor(name)
    s = _samples(media)[0]
    short = get_mm_plugin(name, expand_mm_tokens=False).process_messages(s.messages, s.images, [], [], processor)
    ref = processor(text=[render(short)], **_imgs(s), return_tensors="pt")
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
    check_composite_keys(model, get_composite_model("llava" if name == "pixtral" else name))
