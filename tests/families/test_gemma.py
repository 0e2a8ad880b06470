"""Gemma 3 and PaliGemma: parity with the installed processors."""

import pytest
import torch
from PIL import Image

from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_image_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids, render


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma_media")
    return {
        "big": make_image_file(str(d / "big.jpg"), 640, 300, seed=1),
        "small": make_image_file(str(d / "small.png"), 50, 120, seed=2),  # below the 224 input size
    }


CONV = [
    {"role": "user", "content": "<image>Describe <image> please."},
    {"role": "assistant", "content": "Two circles."},
    {"role": "user", "content": "Which is larger?"},
    {"role": "assistant", "content": "The first."},
]


def _images(sample):
    return {"images": [Image.open(p).convert("RGB") for p in sample.images]}


def test_gemma3_ids_tensors_and_token_types(media):
    processor = load_processor("gemma3")
    plugin = get_mm_plugin("gemma3")
    samples = [MMSample(CONV, images=[media["big"], media["small"]]), MMSample([{"role": "user", "content": "Hi"}])]
    result = check_batch_parity(plugin, processor, samples, lambda t: t.replace("<image>", "<start_of_image>"), _images,
                                tensor_keys=["pixel_values"], nested=("images",))
    ref = result["ref"]
    mask = ref["attention_mask"].bool()
    assert plugin.token_type_key == "token_type_ids"
    assert torch.equal(plugin.mm_token_type_ids(ref["input_ids"], processor)[mask], torch.as_tensor(ref["token_type_ids"])[mask])


def test_gemma3_no_expansion(media):
    processor = load_processor("gemma3")
    sample = MMSample(CONV, images=[media["big"], media["small"]])
    short = get_mm_plugin("gemma3", expand_mm_tokens=False).process_messages(CONV, sample.images, [], [], processor)
    ref = processor(text=[render(short)], **_images(sample), return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin("gemma3"), processor, sample)


def test_gemma3_pan_and_scan(media):
    processor = load_processor("gemma3")
    plugin = get_mm_plugin("gemma3", pan_and_scan=True)
    sample = MMSample([{"role": "user", "content": "<image>What?"}], images=[media["big"]])
    ref = processor(text=[render(sample.messages).replace("<image>", "<start_of_image>")], **_images(sample),
                    do_pan_and_scan=True, return_tensors="pt")
    assert plugin_ids(plugin, processor, sample) == ref["input_ids"][0].tolist()
    mm = plugin.get_mm_inputs(sample.images, [], [], [1], [0], [0], [[0]], processor)
    assert mm["pixel_values"].shape[0] > 1  # the original plus its crops
    assert torch.allclose(mm["pixel_values"], ref["pixel_values"], atol=1e-6)


def test_paligemma_prefix_ids_labels_and_token_types(media):
    processor = load_processor("paligemma")
    plugin = get_mm_plugin("paligemma")
    tok = processor.tokenizer
    prompt, answer = "<image><image>caption en", "two circles"
    expanded = plugin.process_messages([{"role": "user", "content": prompt}], [media["big"], media["small"]], [], [], processor)
    prompt_ids = tok(expanded[0]["content"] + "\n", add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids, labels = plugin.process_token_ids(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids,
                                           [media["big"], media["small"]], [], [], tok, processor)
    ref = processor(text=["<image><image>caption en"], suffix=[answer],
                    images=[[Image.open(media["big"]).convert("RGB"), Image.open(media["small"]).convert("RGB")]],
                    return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    assert labels == ref["labels"][0].tolist()
    token_types = plugin.token_type_ids_from_labels(torch.tensor(labels))
    assert torch.equal(token_types, ref["token_type_ids"][0])
    mm = plugin.get_mm_inputs([media["big"], media["small"]], [], [], [2], [0], [0], [ids], processor)
    assert torch.allclose(mm["pixel_values"], ref["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("name", ["gemma3", "paligemma"])
def test_tiny_model_accepts_plugin_output(name, media):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    sample = MMSample([{"role": "user", "content": "<image>Look <image>"}], images=[media["big"], media["small"]])
    ids = torch.tensor([plugin_ids(plugin, processor, sample)])
    mm = plugin.get_mm_inputs(sample.images, [], [], [2], [0], [0], [ids[0].tolist()], processor)
    types = plugin.mm_token_type_ids(ids, processor) if name == "gemma3" else torch.zeros_like(ids)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture(name).tiny_config()).eval()
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types, **mm)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
