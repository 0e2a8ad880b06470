"""Llama 4: tile layout from header sizes equals the processor's."""

import pytest
import torch
from PIL import Image

from mmtune.compat import apply_mends
from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids, render


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("l4")
    return {"big": make_image_file(str(d / "big.jpg"), 300, 140, seed=1), "small": make_image_file(str(d / "s.png"), 30, 50)}


def _samples(media):
    conv = [{"role": "user", "content": "<image>What? <image>"}, {"role": "assistant", "content": "Shapes."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    return [MMSample(conv, images=[media["big"], media["small"]]), MMSample([{"role": "user", "content": "Hi"}])]


def _imgs(s):
    return {"images": [Image.open(p).convert("RGB") for p in s.images]}


def test_ids_and_tensors_match_processor(media):
    processor = load_processor("llama4")
    result = check_batch_parity(get_mm_plugin("llama4"), processor, _samples(media),
                                lambda t: t.replace("<image>", "<|image|>"), _imgs, tensor_keys=["pixel_values"])
    assert "<|tile_x_separator|>" in processor.tokenizer.decode(result["batch_ids"][0])


def test_no_expansion(media):
    processor = load_processor("llama4")
    s = _samples(media)[0]
    short = get_mm_plugin("llama4", expand_mm_tokens=False).process_messages(s.messages, s.images, [], [], processor)
    ref = processor(text=[render(short)], **_imgs(s), return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin("llama4"), processor, s)


def test_tiny_model_accepts_plugin_output(media):
    from transformers import Llama4ForConditionalGeneration

    processor = load_processor("llama4")
    plugin = get_mm_plugin("llama4")
    s = _samples(media)[0]
    ids = torch.tensor([plugin_ids(plugin, processor, s)])
    mm = plugin.get_mm_inputs(s.images, [], [], [2], [0], [0], [ids[0].tolist()], processor)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(get_fixture("llama4").tiny_config()).eval()
    apply_mends("llama4", model)  # built here without the loader: its mends (mmtune.compat) by hand
    assert mm["pixel_values"].dtype == torch.bfloat16  # Llama4's processor emits bf16; the trainer casts
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=mm["pixel_values"].float())
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
