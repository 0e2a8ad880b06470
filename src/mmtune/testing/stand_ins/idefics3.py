"""Offline stand-ins for the idefics3 family (:mod:`mmtune.families.idefics3`): its tiny tokenizer,
processor and model config, built without the Hub for tests, benchmarks and the demo."""

from __future__ import annotations

from typing import Any

from mmtune.testing.fixtures import FamilyFixture, build_bpe_tokenizer, register_fixture


IDEFICS_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>", "<pad>") + tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))


def _tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(IDEFICS_SPECIALS, vocab_size=500),
                                   eos_token="<end_of_utterance>", pad_token="<pad>", bos_token="<|im_start|>",
                                   additional_special_tokens=list(IDEFICS_SPECIALS[2:]))


def _build(path: str, kind: str) -> None:
    import transformers

    prefix = "Idefics3" if kind == "idefics3" else "SmolVLM"
    ip = getattr(transformers, f"{prefix}ImageProcessor")(size={"longest_edge": 728}, max_image_size={"longest_edge": 364})
    kwargs: dict[str, Any] = {"image_seq_len": 169}
    if kind == "smolvlm":
        kwargs["video_processor"] = transformers.SmolVLMVideoProcessor()
    getattr(transformers, f"{prefix}Processor")(image_processor=ip, tokenizer=_tokenizer(), **kwargs).save_pretrained(path)


def _tiny(kind: str) -> Any:
    import transformers

    tok = _tokenizer()
    cfg_cls = transformers.Idefics3Config if kind == "idefics3" else transformers.SmolVLMConfig
    return cfg_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=364, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,  # 26x26 patches of 14 px -> 13x13 = 169 tokens per sub-image (image_seq_len)
        pad_token_id=tok.pad_token_id,
    )


register_fixture(FamilyFixture("idefics3", build=lambda p: _build(p, "idefics3"), tiny_config=lambda: _tiny("idefics3"),
                               plugin="idefics3"))


register_fixture(FamilyFixture("smolvlm", build=lambda p: _build(p, "smolvlm"), tiny_config=lambda: _tiny("smolvlm"),
                               plugin="smolvlm"))
