"""Mllama: single image tokens, tiles per sample, cross-attention masks from ids."""

import pytest
import torch
from PIL import Image

from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("mll")
    return {"big": make_image_file(str(d / "big.jpg"), 300, 120, seed=1), "small": make_image_file(str(d / "s.png"), 40, 70)}


def _samples(media):
    conv = [{"role": "user", "content": "<|begin_of_text|><image>What? <image>"}, {"role": "assistant", "content": "Shapes."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    return [MMSample(conv, images=[media["big"], media["small"]]),
            MMSample([{"role": "user", "content": "<|begin_of_text|><image>One"}], images=[media["small"]])]


def _imgs(s):
    return {"images": [Image.open(p).convert("RGB") for p in s.images]}


def test_ids_tensors_and_cross_attention_mask(media):
    processor = load_processor("mllama")
    result = check_batch_parity(get_mm_plugin("mllama"), processor, _samples(media),
                                lambda t: t.replace("<image>", "<|image|>"), _imgs, nested=("images",),
                                tensor_keys=["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"])
    assert result["ours"]["cross_attention_mask"].sum() > 0


def test_tiny_model_accepts_plugin_output(media):
    from transformers import MllamaForConditionalGeneration

    processor = load_processor("mllama")
    plugin = get_mm_plugin("mllama")
    s = _samples(media)[0]
    ids = torch.tensor([plugin_ids(plugin, processor, s)])
    mm = plugin.get_mm_inputs(s.images, [], [], [2], [0], [0], [ids[0].tolist()], processor)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(get_fixture("mllama").tiny_config()).eval()
    with torch.no_grad():
        out = model(input_ids=ids, **mm)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
