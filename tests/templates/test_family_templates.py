"""Every family's chat template: the exact string for a two-turn conversation with a system prompt
(each from the checkpoint's own chat template / training code, named in the family file), the two
template options those formats need, and labels on the answers only."""

import pytest
from PIL import Image

from mmtune.plugins import get_mm_plugin
from mmtune.templates import IGNORE_INDEX, get_template
from mmtune.testing import FIXTURES, get_fixture, load_processor, make_image_file

from ..helpers import CONV


VICUNA = "<s>Be brief. USER: Hi ASSISTANT:Hello</s>USER: Colour? ASSISTANT:Red</s>"
CHATML = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
          "<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\nRed<|im_end|>\n")
IDEFICS = ("System: Be brief.<end_of_utterance>\nUser: Hi<end_of_utterance>\nAssistant: Hello<end_of_utterance>\n"
           "User: Colour?<end_of_utterance>\nAssistant: Red<end_of_utterance>\n")
AYA_PREAMBLE = (
    "You are Aya Vision, a brilliant, sophisticated, AI-assistant chatbot trained to assist human users by providing "
    "thorough responses. You are a large vision language model built by the Cohere For AI. You are capable of "
    "interpreting images, including describing them, answering questions about their contents, extracting textual "
    "information, and analyzing visual context.")

EXPECTED = {
    "llava_next": VICUNA,
    "llava_next_mistral": "<s><<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] Hi [/INST] Hello</s> [INST] Colour? [/INST] Red</s> ",
    "llava_next_video": VICUNA,
    "video_llava": VICUNA,
    "llava_onevision": CHATML,
    "paligemma": "<bos>Be brief.\n\nHi\nHello<eos>Colour?\nRed<eos>",
    "glm4v": "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello<|user|>\nColour?<|assistant|>\n"
             "Red<|endoftext|>",
    "pixtral": "<s>[INST]Hi[/INST]Hello</s>[INST]Be brief.\n\nColour?[/INST]Red</s>",
    "mistral3": "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello</s>[INST]Colour?[/INST]Red</s>",
    "internvl": CHATML,
    "idefics3": "<|begin_of_text|>" + IDEFICS,
    "smolvlm": "<|im_start|>" + IDEFICS,
    "idefics2": "<s>" + IDEFICS,
    "llama4": "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
              "<|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\nHello<|eot|>"
              "<|header_start|>user<|header_end|>\n\nColour?<|eot|><|header_start|>assistant<|header_end|>\n\nRed<|eot|>",
    "gemma3n": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
               "<start_of_turn>user\nColour?<end_of_turn>\n<start_of_turn>model\nRed<end_of_turn>\n",
    "qwen2_omni": CHATML,
    "qwen2_omni_speech": CHATML,
    "minicpmv": CHATML,
    "minicpmv2_5": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                   "\n\nHello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nColour?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nRed<|eot_id|>",
    "aya_vision": f"<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{AYA_PREAMBLE}<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>Hello<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Colour?<|END_OF_TURN_TOKEN|>"
                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>Red<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
}

STARTS = {  # how a sample without a system prompt opens: the checkpoint's default system turn, or none
    "llava_next": "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions. USER: Hi",
    "llava_onevision": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi",
    "internvl": "<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                "多模态大语言模型。<|im_end|>\n<|im_start|>user\nHi",
    "qwen2_omni": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi",
    "qwen2_omni_speech": "<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, "
                         "capable of perceiving auditory and visual inputs, as well as generating text and speech."
                         "<|im_end|>\n<|im_start|>user\nHi",
    "minicpmv": "<|im_start|>user\nHi",
    "mistral3": "<s>[INST]Hi",  # the checkpoint's dated persona is not injected into training data
    "pixtral": "<s>[INST]Hi",
    "glm4v": "[gMASK]<sop><|user|>\nHi",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendered_string(name):
    assert get_template(name).render(CONV) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(STARTS))
def test_default_system_prompt(name):
    assert get_template(name).render(CONV[1:3]).startswith(STARTS[name])


def test_every_family_has_a_template_with_its_plugin():
    get_fixture("qwen2_vl")  # loads every family
    from mmtune.model.composite import COMPOSITE_MODELS
    from mmtune.templates import TEMPLATES

    for name, fixture in FIXTURES.items():
        # a fixture is named after its template, or after a model type whose family declares the template
        template = get_template(name if name in TEMPLATES else COMPOSITE_MODELS[name].template)
        assert template.plugin == (fixture.plugin or "base"), name
        get_mm_plugin(template.plugin)


def test_pixtral_puts_the_system_prompt_in_the_last_user_turn_also_for_generation():
    t = get_template("pixtral")
    assert t.render(CONV[:4]) == "<s>[INST]Hi[/INST]Hello</s>[INST]Be brief.\n\nColour?[/INST]"
    assert t.render(CONV[:2]) == "<s>[INST]Be brief.\n\nHi[/INST]"


def test_suffix_closes_only_a_conversation_that_ends_with_an_answer():
    t = get_template("glm4v")
    assert t.render(CONV[:4]).endswith("<|user|>\nColour?<|assistant|>\n")  # the generation prompt: no EOS
    assert t.render_turns(CONV)[-1] == ("<|user|>\nColour?<|assistant|>\n", "Red<|endoftext|>")
    assert get_template("qwen2_vl").suffix == ""


def test_glm4v_loss_only_on_answers_and_the_closing_eos():
    tok = load_processor("glm4v").tokenizer
    t = get_template("glm4v")
    ids, labels = t.encode(tok, CONV)
    assert len(ids) == len(labels)
    assert ids == tok(t.render(CONV), add_special_tokens=False)["input_ids"]  # pieces tokenise as the whole
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "HelloRed<|endoftext|>"
    _, labels = t.encode(tok, CONV, mask_history=True)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Red<|endoftext|>"
    _, labels = t.encode(tok, CONV, train_on_prompt=True)
    assert labels == ids


def test_paligemma_template_and_plugin_give_the_processors_prefix_and_suffix(tmp_path):
    processor = load_processor("paligemma")
    tok, plugin, t = processor.tokenizer, get_mm_plugin("paligemma"), get_template("paligemma")
    image = make_image_file(str(tmp_path / "a.png"), 60, 40)
    messages = [{"role": "user", "content": "<image>caption en"}, {"role": "assistant", "content": "a red circle"}]
    messages = plugin.process_messages(messages, [image], [], [], processor)
    ids, labels = t.encode(tok, messages, tokenize=plugin.tokenize)
    ids, labels = plugin.process_token_ids(ids, labels, [image], [], [], tok, processor)
    ref = processor(text=["<image>caption en"], suffix=["a red circle"], images=[[Image.open(image).convert("RGB")]],
                    return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    assert labels == ref["labels"][0].tolist()
