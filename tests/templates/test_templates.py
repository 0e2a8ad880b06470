"""Chat templates: exact rendered strings and label masks."""

import pytest

from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import load_processor

from ..helpers import CONV

EXPECTED = {
    "qwen2_vl": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\nRed<|im_end|>\n",
    "llava": "<s>Be brief. USER: Hi ASSISTANT:Hello</s>USER: Colour? ASSISTANT:Red</s>",
    "gemma3": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    "<start_of_turn>user\nColour?<end_of_turn>\n<start_of_turn>model\nRed<end_of_turn>\n",
    "mllama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nColour?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nRed<|eot_id|>",
    "plain": "HiHello\nColour?Red\n",  # no system prompt, no roles: image tokens + caption
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendered_string(name):
    assert get_template(name).render(CONV) == EXPECTED[name]


def test_default_system_prompt_of_qwen2_vl_matches_the_official_template():
    text = get_template("qwen2_vl").render(CONV[1:3])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_loss_only_on_answers_and_options():
    tok = load_processor("qwen2_vl").tokenizer
    t = get_template("qwen2_vl")
    ids, labels = t.encode(tok, CONV[1:])
    assert len(ids) == len(labels)
    trained = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert trained == "Hello<|im_end|>\nRed<|im_end|>\n"
    _, labels = t.encode(tok, CONV[1:], mask_history=True)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Red<|im_end|>\n"
    _, labels = t.encode(tok, CONV[1:], train_on_prompt=True)
    assert all(l != IGNORE_INDEX for l in labels)
    # encoding piecewise equals tokenising the whole rendered string
    assert ids == tok(t.render(CONV[1:]), add_special_tokens=False)["input_ids"]
