"""What users of the original LLaVA code (haotian-liu/LLaVA) paste, on checkpoints written the way
it writes them: its ``load_pretrained_model`` call with a positional ``model_name``, the
inference steps of its ``run_llava.py`` (``tokenizer_image_token`` + ``process_images`` +
``model.generate(images=...)``), and mmtune's own ``chat`` and ``train`` pointed at such a
folder (no processor files). Expected ids follow the original's algorithms as restated in
``conftest.py``; expected tokens come from the plain parts (CLIP, the projector, Llama)."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlamaForCausalLM

from mmtune.llava import (
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    get_model_name_from_path,
    load_pretrained_model,
    preprocess_images,
    process_images,
    tokenizer_image_token,
)
from mmtune.testing import make_image, make_image_file

from .conftest import (
    VICUNA_V1_SYSTEM,
    original_image_token_ids,
    reference_greedy,
    reference_logits,
    write_original_checkpoint,
)

QUESTION = "What is in the picture?"
IDS_WITH_IMAGE = [1, 20, IMAGE_TOKEN_INDEX, 30, 31]


def _padded_pixels(clip: str, image: Image.Image) -> torch.Tensor:
    """The original's ``pad``: the image centred on a square of CLIP's mean colour, truncated
    (122, 116, 104), then CLIP's preprocessing."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return CLIPImageProcessor.from_pretrained(clip).preprocess(canvas, return_tensors="pt")["pixel_values"]


def test_run_llava_steps_on_an_original_checkpoint(tmp_path):
    """``llava/eval/run_llava.py``'s ``eval_model``, line for line, with mmtune's imports."""
    checkpoint = write_original_checkpoint(tmp_path)
    model_name = get_model_name_from_path(checkpoint.path)
    tokenizer, model, image_processor, context_len = load_pretrained_model(checkpoint.path, None, model_name)
    qs = DEFAULT_IMAGE_TOKEN + "\n" + QUESTION
    prompt = f"{VICUNA_V1_SYSTEM} USER: {qs} ASSISTANT:"
    image = make_image(80, 50)
    image_sizes = [image.size]
    images_tensor = process_images([image], image_processor, model.config).to(model.device, dtype=model.dtype)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    with torch.inference_mode():
        output_ids = model.generate(input_ids, images=images_tensor, image_sizes=image_sizes, do_sample=False,
                                    num_beams=1, max_new_tokens=4, use_cache=True)
    outputs = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()

    assert model_name == "full" and context_len == 2048
    want_ids = original_image_token_ids(prompt, tokenizer)
    assert want_ids[0] == tokenizer.bos_token_id and want_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert input_ids[0].tolist() == want_ids
    want_pixels = _padded_pixels(checkpoint.clip, image)  # the checkpoint's image_aspect_ratio is pad
    assert torch.equal(images_tensor, want_pixels)
    want_tokens = reference_greedy(checkpoint, want_ids, want_pixels, 4, eos=tokenizer.eos_token_id)
    assert output_ids[0].tolist() == want_tokens
    assert outputs == tokenizer.decode(want_tokens, skip_special_tokens=True).strip()


def test_the_returned_processor_serves_as_the_image_processor(tmp_path):
    """What the original's scripts read from the image processor its loader returns."""
    checkpoint = write_original_checkpoint(tmp_path)
    _, _, image_processor, _ = load_pretrained_model(checkpoint.path, None, "llava-v1.5-7b")
    clip = CLIPImageProcessor.from_pretrained(checkpoint.clip)
    image = make_image(70, 40)
    assert torch.equal(image_processor.preprocess(image, return_tensors="pt")["pixel_values"],
                       clip.preprocess(image, return_tensors="pt")["pixel_values"])
    assert image_processor.image_mean == clip.image_mean and image_processor.image_std == clip.image_std
    assert image_processor.crop_size["height"] == 56 and image_processor.size["shortest_edge"] == 56
    fill = tuple(int(x * 255) for x in image_processor.image_mean)  # the original's expand2square colour
    assert fill == (122, 116, 104)


def test_positional_model_name_lora_and_device(tmp_path, caplog):
    """The original's ``model_worker`` call: ``(model_path, model_base, model_name, load_8bit,
    load_4bit, device=...)``. The files decide the kind; a name that says otherwise is logged."""
    checkpoint = write_original_checkpoint(tmp_path, kind="lora")
    with caplog.at_level(logging.INFO, logger="mmtune.llava.builder"):
        tokenizer, model, processor, _ = load_pretrained_model(checkpoint.path, checkpoint.base, "llava-v1.5-7b-lora",
                                                               False, False, device="cpu")
    assert not any("lora_" in n for n, _ in model.named_parameters()) and processor is not None
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([IDS_WITH_IMAGE]), images=pixels).logits
    torch.testing.assert_close(got, reference_logits(checkpoint, IDS_WITH_IMAGE, pixels), atol=1e-5, rtol=0)
    assert "as its files say" not in caplog.text  # name and files agree

    with caplog.at_level(logging.INFO, logger="mmtune.llava.builder"):
        load_pretrained_model(checkpoint.path, checkpoint.base, "my-run")
    assert "lacks 'llava'" in caplog.text and "lacks 'lora'" in caplog.text


def test_a_plain_language_model_loads_as_the_original_loads_one(tmp_path):
    """A name without ``llava`` over a plain Llama: the original returns the LM and no image
    processor; so does mmtune, as the folder's config says it is one."""
    checkpoint = write_original_checkpoint(tmp_path, kind="projector")
    tokenizer, model, image_processor, context_len = load_pretrained_model(checkpoint.base, None, "vicuna-7b-v1.5")
    assert type(model) is LlamaForCausalLM and image_processor is None and context_len == 2048
    ids = torch.tensor([tokenizer("a red square")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, checkpoint.lm(ids).logits, atol=1e-6, rtol=0)


def test_tokenizer_image_token_follows_the_tokenizer_as_the_original():
    from mmtune.testing.stand_ins.llava import build_llama_tokenizer

    without_bos = build_llama_tokenizer(())
    with_bos = build_llama_tokenizer(())
    with_bos.add_bos_token = True
    prompts = ["<image>\nWhat is it?", "USER: <image>\nWhat? ASSISTANT:", "<image><image>two", "no image", "a<image>"]
    for tok in (without_bos, with_bos):
        for prompt in prompts:
            assert tokenizer_image_token(prompt, tok) == original_image_token_ids(prompt, tok), prompt
    assert tokenizer_image_token("<image>x", with_bos, return_tensors="pt").dtype == torch.long
    assert tokenizer_image_token("<image>x", with_bos, add_special_tokens=False)[0] == IMAGE_TOKEN_INDEX
    assert get_model_name_from_path("/ckpts/llava-v1.5-7b-lora/checkpoint-500/") == "llava-v1.5-7b-lora_checkpoint-500"


def test_process_images_takes_the_model_config_as_the_original():
    """``anyres``: one tensor where every image has as many tiles, else a list of
    ``[tiles, 3, H, W]`` (the original's return); ``pad`` and others: one tensor."""
    ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    pinpoints = [[168, 56], [112, 112]]
    anyres = SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=pinpoints)
    wide, tall, square = make_image(100, 40), make_image(40, 100, seed=1), make_image(56, 56, seed=2)
    stacks = process_images([wide, tall], ip, anyres)  # 1 + 3 tiles, 1 + 4 tiles
    padded = preprocess_images([wide, tall], ip, "anyres", pinpoints)["images"]
    assert isinstance(stacks, list) and [s.shape[0] for s in stacks] == [4, 5]
    assert torch.equal(stacks[0], padded[0, :4]) and torch.equal(stacks[1], padded[1])
    same = process_images([wide, square], ip, anyres)
    assert torch.is_tensor(same) and same.shape == (2, 4, 3, 56, 56)
    pad = process_images([wide], ip, SimpleNamespace(image_aspect_ratio="pad"))
    assert torch.equal(pad, preprocess_images([wide], ip, "pad")["images"])
    plain = process_images([wide], ip, SimpleNamespace(image_aspect_ratio=None))
    assert torch.equal(plain, ip([wide], return_tensors="pt")["pixel_values"])
    with pytest.raises(TypeError, match="preprocess_images"):
        process_images([wide], ip, "pad")


# ---------------------------------------------------------------- mmtune's CLI on an original checkpoint
def test_mmtune_chat_on_an_original_checkpoint(tmp_path, capsys):
    """No processor files: chat builds LLaVA's processor from ``mm_vision_tower``, takes the
    family's template (Vicuna v1, LLaVA-1.5's ``--version v1``) and gives the answer the
    original's prompt gives."""
    from mmtune.cli import main
    from mmtune.infer import ChatEngine

    checkpoint = write_original_checkpoint(tmp_path)
    assert not {"processor_config.json", "preprocessor_config.json"} & set(os.listdir(checkpoint.path))
    image_path = make_image_file(str(tmp_path / "picture.png"), 80, 50)
    assert main(["chat", checkpoint.path, "--image", image_path, "--prompt", f"<image>\n{QUESTION}",
                 "--max-new-tokens", "4"]) == 0
    answer = capsys.readouterr().out.split("assistant> ", 1)[1].strip()

    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    want_ids = original_image_token_ids(f"{VICUNA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:", tokenizer)
    want_pixels = _padded_pixels(checkpoint.clip, Image.open(image_path).convert("RGB"))
    want_tokens = reference_greedy(checkpoint, want_ids, want_pixels, 4, eos=tokenizer.eos_token_id)
    assert answer == tokenizer.decode(want_tokens, skip_special_tokens=True).strip()

    engine = ChatEngine(checkpoint.path)  # the same inputs, seen directly
    assert engine.template.name == "llava_llama" and type(engine.processor).__name__ == "LlavaLlamaProcessor"
    batch = engine._inputs([{"role": "user", "content": f"<image>\n{QUESTION}"}], [image_path], [], [])
    assert batch["input_ids"][0].tolist() == want_ids
    assert torch.equal(batch["images"], want_pixels)


def test_mmtune_train_from_an_original_checkpoint(tmp_path, capsys):
    """A 2-step LoRA run with no template given: the family's, and the output folder carries
    LLaVA's processor, so it reopens."""
    from mmtune.cli import main
    from mmtune.demo import make_dataset

    checkpoint = write_original_checkpoint(tmp_path)
    data, items = make_dataset(str(tmp_path / "data"), n_train=4, n_test=1, size=56)
    out = tmp_path / "out"
    config = tmp_path / "original.yaml"  # no template: the family's
    config.write_text(f"model_name_or_path: {checkpoint.path}\ndataset: {data}\nfinetuning_type: lora\nlora_rank: 4\n"
                      f"torch_dtype: fp32\noutput_dir: {out}\nper_device_train_batch_size: 2\nmax_steps: 2\n"
                      "learning_rate: 1.0e-3\nlogging_steps: 1\nsave_strategy: 'no'\nuse_cpu: true\n"
                      "disable_tqdm: true\nplot_loss: false\n")
    assert main(["train", str(config)]) == 0
    logged = [json.loads(line) for line in open(out / "trainer_log.jsonl")]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)
    record = json.load(open(out / "mmtune_config.json"))
    assert record["template"] == "llava_llama" and record["model_type"] == "llava_llama"
    image = os.path.join(os.path.dirname(data), items[0]["images"][0])
    capsys.readouterr()
    assert main(["chat", str(out), "--image", image, "--prompt", "What colour?", "--max-new-tokens", "2"]) == 0
    assert "assistant> " in capsys.readouterr().out
