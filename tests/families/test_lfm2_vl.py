"""LFM2-VL (lfm2_vl): ids and tensors equal the installed processor's (a tiled large image, small
images, several a sample, a text-only sample); composite keys and a forward on a live tiny model
(a short-convolution layer and an attention layer); the template (ChatML after
``<|startoftext|>``) with loss on the answers only; packing refused with its reason, which the
tiny model shows."""

import types

import pytest
import torch
from PIL import Image

from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import get_fixture, load_processor, make_image_file
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, plugin_ids, render

from ..helpers import CONV

NAME = "lfm2_vl"
TENSORS = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("lfm2_media")
    return {
        "huge": make_image_file(str(d / "huge.jpg"), 1100, 620, seed=1),  # tiled: 512-px tiles + thumbnail
        "big": make_image_file(str(d / "big.jpg"), 333, 190, seed=2),
        "small": make_image_file(str(d / "small.png"), 30, 44, seed=3),
    }


@pytest.fixture(scope="module")
def processor():
    return load_processor(NAME)


def _samples(media):
    return [
        MMSample([{"role": "user", "content": "<image>Compare <image>."}, {"role": "assistant", "content": "Same."}],
                 images=[media["huge"], media["small"]]),
        MMSample([{"role": "user", "content": "<image>and"}, {"role": "assistant", "content": "ok"}],
                 images=[media["big"]]),
        MMSample([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]),
    ]


def test_ids_and_tensors_match_processor(media, processor):
    samples = _samples(media)
    result = check_batch_parity(get_mm_plugin(NAME), processor, samples, lambda t: t,
                                lambda s: {"images": [Image.open(p).convert("RGB") for p in s.images]},
                                tensor_keys=TENSORS, nested=("images",))
    assert set(TENSORS) <= set(result["ours"])
    text = render(get_mm_plugin(NAME).process_messages(samples[0].messages, samples[0].images, [], [], processor))
    assert "<|img_row_1_col_1|>" in text and "<|img_thumbnail|>" in text and text.count("<|image_start|>") == 2


def test_tiny_model_runs_on_plugin_output_and_composite_keys_match(media, processor):
    from transformers import AutoModelForImageTextToText

    config = get_fixture(NAME).tiny_config()
    assert config.text_config.layer_types == ["conv", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    check_composite_keys(model, get_composite_model(NAME))
    plugin = get_mm_plugin(NAME)
    sample = _samples(media)[0]
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs(sample.images, [], [], [2], [0], [0], [ids], processor)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **mm)  # the model checks features == tokens
    assert out.logits.shape[:2] == (1, len(ids)) and torch.isfinite(out.logits).all()


def test_template_and_loss_on_the_answers_only(processor):
    t = get_template(NAME)
    assert get_composite_model(NAME).template == NAME
    assert t.render(CONV[1:4]) == ("<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                                   "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")
    tok = processor.tokenizer
    ids, labels = t.encode(tok, CONV)
    assert ids == tok(t.render(CONV), add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Hello<|im_end|>\nRed<|im_end|>\n"


def test_packing_is_refused_and_packed_rows_would_leak():
    from transformers import AutoModelForImageTextToText

    from mmtune.data.packing import packing_unsupported_reason

    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type=NAME))
    assert "short-convolution" in packing_unsupported_reason(model, None)
    torch.manual_seed(0)
    lm = AutoModelForImageTextToText.from_config(get_fixture(NAME).tiny_config()).eval()
    a, b = torch.randint(10, 300, (1, 9)), torch.randint(10, 300, (1, 7))
    with torch.no_grad():
        alone = lm(input_ids=b).logits
        packed = lm(input_ids=torch.cat([a, b], 1),
                    position_ids=torch.cat([torch.arange(9), torch.arange(7)])[None]).logits[:, 9:]
    assert not torch.allclose(alone, packed, atol=1e-4)
