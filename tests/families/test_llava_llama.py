"""The native LLaVA family: -200 placeholders, templates, media tensors, truncation."""

from __future__ import annotations

import pytest
import torch

from mmtune.data.formats import Sample
from mmtune.data.tokenize import encode_sample
from mmtune.llava import IMAGE_TOKEN_INDEX, tokenizer_image_token
from mmtune.plugins import get_mm_plugin
from mmtune.templates import get_template
from mmtune.testing import make_image
from mmtune.testing.fixtures import load_processor

TURNS = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A square."},
         {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}]


def test_templates_render_llava_formats():
    assert get_template("llava_llama").render(TURNS) == (
        "<s>Be brief. USER: <image>\nWhat is it? ASSISTANT:A square.</s>USER: Colour? ASSISTANT:Red.</s>")
    assert get_template("llava_llama_plain").render(
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a red square"}]
    ) == "<s><image>a red square\n"
    # stage 1 as LLaVA's preprocess_plain: a user turn with an image is the image alone
    assert get_template("llava_llama_plain").render(
        [{"role": "user", "content": "Give a brief description of the image.\n<image>"},
         {"role": "assistant", "content": "a red square"}]) == "<s><image>a red square\n"
    assert get_template("llava_llama").plugin == get_template("llava_llama_plain").plugin == "llava_llama"


def test_one_placeholder_per_image_becomes_minus_200():
    processor = load_processor("llava_llama")
    tok = processor.tokenizer
    plugin = get_mm_plugin("llava_llama")
    images = [make_image(80, 60), make_image(40, 90, seed=1)]
    sample = Sample(messages=[{"role": "user", "content": "<image> and <image>: same?"},
                              {"role": "assistant", "content": "no"}], images=images)
    enc = encode_sample(sample, get_template("llava_llama"), plugin, tok, processor)
    assert enc.input_ids.count(IMAGE_TOKEN_INDEX) == 2
    assert all(y == -100 for t, y in zip(enc.input_ids, enc.labels) if t == IMAGE_TOKEN_INDEX)
    prompt = get_template("llava_llama").render_turns(sample.messages)[0][0]
    # what the original gives with Vicuna's tokenizer (which adds BOS): BOS, then the text after
    # it tokenised on its own, its first word word-initial ("<s>A" as one string would not be)
    assert prompt.startswith("<s>A chat")
    want = [tok.bos_token_id] + tokenizer_image_token(prompt.removeprefix("<s>"), tok, add_special_tokens=False)
    assert enc.input_ids[:len(want)] == want
    assert tok.convert_ids_to_tokens(want[1]).startswith("\u2581")
    with pytest.raises(ValueError):
        plugin.process_messages([{"role": "user", "content": "<image>"}], images, [], [], processor)


@pytest.mark.parametrize("aspect", ["square", "pad", "anyres"])
def test_get_mm_inputs_follows_the_processor_aspect_ratio(aspect):
    processor = load_processor("llava_llama")
    processor.image_aspect_ratio = aspect
    processor.image_grid_pinpoints = [[56, 112], [112, 56], [112, 112]]
    plugin = get_mm_plugin("llava_llama")
    images = [make_image(100, 40), make_image(50, 90, seed=1)]
    out = plugin.get_mm_inputs(images, [], [], [1, 1], [0, 0], [0, 0], [[1], [1]], processor)
    want = processor.process_images([im.convert("RGB") for im in images])
    assert torch.equal(out["images"], want["images"]) and torch.equal(out["image_sizes"], want["image_sizes"])
    assert out["images"].ndim == (5 if aspect == "anyres" else 4)
    assert out["image_sizes"].tolist() == [[100, 40], [50, 90]]  # (width, height), as LLaVA's image.size


def test_im_start_end_wraps_the_placeholder():
    processor = load_processor("llava_llama")
    processor.mm_use_im_start_end = True
    out = get_mm_plugin("llava_llama").process_messages([{"role": "user", "content": "<image>hi"}], [make_image(60, 60)],
                                                         [], [], processor)
    assert out[0]["content"] == "<im_start><image><im_end>hi"


def test_truncation_never_cuts_the_image():
    processor = load_processor("llava_llama")
    plugin = get_mm_plugin("llava_llama")
    long_question = "word " * 40
    sample = Sample(messages=[{"role": "user", "content": long_question + "<image>"},
                              {"role": "assistant", "content": "yes"}], images=[make_image(60, 60)])
    enc = encode_sample(sample, get_template("llava_llama"), plugin, processor.tokenizer, processor, cutoff_len=20)
    assert enc.dropped and "media tokens" in enc.dropped
