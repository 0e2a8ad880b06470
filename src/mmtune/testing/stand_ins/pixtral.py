"""Offline stand-ins for the pixtral family (:mod:`mmtune.families.pixtral`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture


MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>")


def build_mistral_tokenizer() -> Any:
    from transformers import LlamaTokenizerFast

    return LlamaTokenizerFast(tokenizer_object=build_bpe_tokenizer(MISTRAL_SPECIAL_TOKENS, vocab_size=400),
                              unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              add_bos_token=False, add_eos_token=False,
                              additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[3:8]))


def _build(path: str, patch: int, merge: int, longest: int) -> None:
    from transformers import PixtralImageProcessor, PixtralProcessor

    ip = PixtralImageProcessor(size={"longest_edge": longest}, patch_size=patch * merge)
    PixtralProcessor(image_processor=ip, tokenizer=build_mistral_tokenizer(), patch_size=patch,
                     spatial_merge_size=merge).save_pretrained(path)


def _tiny(kind: str) -> Any:
    from transformers import LlavaConfig, Mistral3Config

    tok = build_mistral_tokenizer()
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, image_size=512, patch_size=16 if kind == "pixtral" else 14)
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tok.pad_token_id)
    img = tok.convert_tokens_to_ids("[IMG]")
    if kind == "pixtral":
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=img,
                           vision_feature_select_strategy="full", vision_feature_layer=-1,
                           projector_hidden_act="gelu", multimodal_projector_bias=True)
    return Mistral3Config(vision_config=vision, text_config=text, image_token_id=img, spatial_merge_size=2,
                          vision_feature_layer=-1)


register_fixture(FamilyFixture("pixtral", build=lambda p: _build(p, 16, 1, 512), tiny_config=lambda: _tiny("pixtral"),
                               plugin="pixtral"))


register_fixture(FamilyFixture("mistral3", build=lambda p: _build(p, 14, 2, 512), tiny_config=lambda: _tiny("mistral3"),
                               plugin="mistral3"))
