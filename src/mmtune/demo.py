"""The embedded demo: a tiny VLM learns colours and shapes from synthetic images on the CPU.

Nothing is downloaded: the images are drawn here, the Qwen2-VL processor and tokenizer come
from ``mmtune.testing``, and the model is a randomly initialised tiny Qwen2-VL. Held-out
accuracy is ``mmtune predict``'s (:func:`mmtune.infer.predict_folder`): the trained folder
answers each held-out question by greedy generation, and an answer counts when it is the
truth through the short-answer normaliser. It is printed next to the best any text-only model
can do on the same questions (always answering the most frequent word).

:func:`export_data` (``mmtune demo --export-data DIR``) writes the same kind of shapes, plus a
video and audio, as the small data set every ``examples/*.yaml`` trains on (``examples/data``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20),
           "purple": (140, 40, 170), "orange": (245, 130, 10)}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?"}


def draw_shape(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = rng.randint(int(size * 0.7), size - 6)  # large shapes: the demo is about colour and shape, not search
    x0, y0 = rng.randint(2, size - s - 2), rng.randint(2, size - s - 2)
    paint_shape(d, shape, x0, y0, s, COLOURS[colour])
    return img


def paint_shape(d: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, s: int, fill: tuple[int, int, int]) -> None:
    """Draw ``shape`` filling the ``s``-pixel square box at (``x0``, ``y0``)."""
    box = [x0, y0, x0 + s, y0 + s]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)
    else:
        w = max(3, s // 4)
        d.rectangle([x0 + s // 2 - w // 2, y0, x0 + s // 2 + w // 2, y0 + s], fill=fill)
        d.rectangle([x0, y0 + s // 2 - w // 2, x0 + s, y0 + s // 2 + w // 2], fill=fill)


def make_dataset(root: str, n_train: int, n_test: int, size: int = 56, seed: int = 0,
                 filename: str = "train.json") -> tuple[str, list[dict]]:
    """Images on disk plus a ShareGPT json (``filename``); returns its path and the held-out items."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    train, test = [], []
    for i in range(n_train + n_test):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"images/{i:05d}.png"
        draw_shape(colour, shape, size, rng).save(os.path.join(root, name))
        for kind, answer in (("colour", colour), ("shape", shape)):
            item = {"messages": [{"role": "user", "content": f"<image>{QUESTIONS[kind]}"},
                                 {"role": "assistant", "content": answer}], "images": [name], "kind": kind}
            (train if i < n_train else test).append(item)
    path = os.path.join(root, filename)
    with open(path, "w") as fh:
        json.dump([{k: v for k, v in it.items() if k != "kind"} for it in train], fh)
    return path, test


def make_shape_video(path: str, colour: str, shape: str, frames: int = 8, size: int = 112, fps: int = 4) -> str:
    """An MP4 (mpeg4 codec, via PyAV) of one shape crossing the frame from left to right."""
    import av

    s = size // 3
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.thread_count = 1  # one encoder thread: the same bytes on every machine with this PyAV
        for i in range(frames):
            img = Image.new("RGB", (size, size), (235, 235, 235))
            x0 = 2 + (size - s - 4) * i // max(1, frames - 1)
            paint_shape(ImageDraw.Draw(img), shape, x0, (size - s) // 2, s, COLOURS[colour])
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


#: answers of the text-only rows of ``conversations.json`` (LLaVA's instruction mix has text-only rows too)
TEXT_ONLY = (("Which colour do you get by mixing blue and yellow?", "green"),
             ("How many corners does a triangle have?", "three"),
             ("How many sides does a square have?", "four"),
             ("What colour is a ripe banana?", "yellow"))


def _write_json(root: str, name: str, rows: list[dict[str, Any]]) -> str:
    path = os.path.join(root, name)
    with open(path, "w") as fh:
        json.dump(rows, fh, indent=1)
        fh.write("\n")
    return path


def export_data(root: str, n_images: int = 16, image_size: int = 112, seed: int = 0) -> list[str]:
    """Write the example data set that ``examples/*.yaml`` train on into ``root``; returns the
    files written. Deterministic (fixed seeds), so that ``mmtune demo --export-data
    examples/data`` reproduces the committed copy. Media paths in the json files are relative to
    the json file's folder (mmtune's default ``media_dir``).

    - ``images/*.png``: the demo's coloured shapes; ``shapes.json``: a colour and a shape
      question per image (ShareGPT ``messages`` with ``role``/``content``, ``images``).
    - ``videos/moving_shape.mp4`` (one shape crossing the frame, 8 frames at 4 fps);
      ``shapes_video.json``: the image rows, video rows and a row with an image and the video.
    - ``audios/tone_low.wav``, ``tone_high.wav`` (1 s, 16 kHz); ``audio.json``: questions on them.
    - ``pairs.json``: preference pairs (stage dpo) on the same images: the true colour or shape
      chosen, the next one in the list rejected.
    - ``captions.json``: LLaVA stage-1 style (``conversations`` with ``from``/``value``, one
      ``image`` per row, ``<image>`` then a caption).
    - ``conversations.json``: LLaVA instruction style, multi-turn rows about an image mixed with
      text-only rows.
    """
    from mmtune.testing import make_audio_file

    os.makedirs(root, exist_ok=True)
    shapes_path, _ = make_dataset(root, n_images, 0, size=image_size, seed=seed, filename="shapes.json")
    with open(shapes_path) as fh:
        shape_rows = json.load(fh)
    written = [os.path.join(root, f"images/{i:05d}.png") for i in range(n_images)]
    written.append(_write_json(root, "shapes.json", shape_rows))  # again, indented for readers
    # (image, colour, shape) of each image: make_dataset writes its colour row, then its shape row
    facts = [(shape_rows[2 * i]["images"][0], shape_rows[2 * i]["messages"][1]["content"],
              shape_rows[2 * i + 1]["messages"][1]["content"]) for i in range(n_images)]
    written.append(_write_json(root, "pairs.json", preference_pairs(facts)))

    rng = random.Random(seed + 1)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    video = "videos/moving_shape.mp4"
    written.append(make_shape_video(os.path.join(root, video), colour, shape, size=image_size))
    other = next(i for i, (_, c, sh) in enumerate(facts) if (c, sh) != (colour, shape))
    video_rows = [
        {"messages": [{"role": "user", "content": "<video>What colour is the moving shape?"},
                      {"role": "assistant", "content": colour}], "videos": [video]},
        {"messages": [{"role": "user", "content": "<video>What shape moves in the video?"},
                      {"role": "assistant", "content": shape}], "videos": [video]},
        {"messages": [{"role": "user", "content": "<video>Which way does the shape move?"},
                      {"role": "assistant", "content": "from left to right"}], "videos": [video]},
        {"messages": [{"role": "user", "content": "<image><video>Does the picture show the shape of the video?"},
                      {"role": "assistant", "content": f"no: the picture shows a {facts[other][1]} {facts[other][2]}, "
                                                       f"the video a {colour} {shape}"}],
         "images": [facts[other][0]], "videos": [video]},
    ]
    written.append(_write_json(root, "shapes_video.json", shape_rows + video_rows))

    os.makedirs(os.path.join(root, "audios"), exist_ok=True)
    audio_rows = []
    for pitch, freq in (("low", 220.0), ("high", 880.0)):
        name = f"audios/tone_{pitch}.wav"
        written.append(make_audio_file(os.path.join(root, name), seconds=1.0, sampling_rate=16000, freq=freq))
        audio_rows += [
            {"messages": [{"role": "user", "content": "<audio>Is this tone high or low?"},
                          {"role": "assistant", "content": pitch}], "audios": [name]},
            {"messages": [{"role": "user", "content": "<audio>What do you hear?"},
                          {"role": "assistant", "content": f"a steady {pitch} tone"}], "audios": [name]},
        ]
    written.append(_write_json(root, "audio.json", audio_rows))

    captions = [{"id": os.path.splitext(os.path.basename(image))[0], "image": image,
                 "conversations": [{"from": "human", "value": "<image>"},
                                   {"from": "gpt", "value": f"a {c} {sh} on a pale background"}]}
                for image, c, sh in facts]
    written.append(_write_json(root, "captions.json", captions))

    chats: list[dict[str, Any]] = []
    for i, (image, c, sh) in enumerate(facts):
        chats.append({"id": f"chat-{i:05d}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": f"It is {c}."},
            {"from": "human", "value": "And what shape is it?"}, {"from": "gpt", "value": f"A {sh}."}]})
        if i % 4 == 3 and i // 4 < len(TEXT_ONLY):
            question, answer = TEXT_ONLY[i // 4]
            chats.append({"id": f"text-{i // 4:05d}", "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    written.append(_write_json(root, "conversations.json", chats))
    logger.info("example data: %d files in %s", len(written), root)
    return written


def build_model_dir(root: str, hidden: int = 128, vision_dim: int = 64, vision_depth: int = 2, seed: int = 0) -> str:
    """A randomly initialised tiny Qwen2-VL with the offline processor, saved like a checkpoint."""
    from transformers import AutoModelForImageTextToText

    from mmtune.testing import get_fixture, processor_dir
    from transformers import AutoProcessor

    path = os.path.join(root, "tiny-qwen2-vl")
    config = get_fixture("qwen2_vl").tiny_config()
    config.text_config.hidden_size = hidden
    config.text_config.intermediate_size = hidden * 2
    config.vision_config.hidden_size = hidden
    config.vision_config.embed_dim = vision_dim
    config.vision_config.num_heads = 4
    config.vision_config.depth = vision_depth
    half = hidden // config.text_config.num_attention_heads // 2  # M-RoPE sections cover half a head
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(config.text_config, attr, None)
        if isinstance(rope, dict) and "mrope_section" in rope:
            rope["mrope_section"] = section
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    AutoProcessor.from_pretrained(processor_dir("qwen2_vl")).save_pretrained(path)
    return path


@dataclass
class DemoResult:
    accuracy: float
    text_only_baseline: float
    train_seconds: float
    output_dir: str
    chat: list[tuple[str, str, str, str]]


def text_only_baseline(train_path: str, items: list[dict]) -> float:
    """The best a model that ignores the image can do: answer each question with its most
    frequent training answer."""
    from collections import Counter

    rows = json.load(open(train_path))
    best = {}
    for kind, question in QUESTIONS.items():
        answers = Counter(r["messages"][1]["content"] for r in rows if question in r["messages"][0]["content"])
        best[kind] = answers.most_common(1)[0][0]
    return sum(best[it["kind"]] == it["messages"][1]["content"] for it in items) / len(items)


def run_demo(output_dir: str = "demo_output", n_train: int = 2000, n_test: int = 200, max_steps: int = 1500,
             batch_size: int = 16, learning_rate: float = 2e-3, seed: int = 0, chat_examples: int = 4,
             image_size: int = 56) -> DemoResult:
    from mmtune.config import parse_config
    from mmtune.infer.predict import PREDICTIONS_FILE, predict_folder
    from mmtune.train import run_sft

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data_dir = os.path.join(output_dir, "data")
    train_path, test_items = make_dataset(data_dir, n_train, n_test, size=image_size, seed=seed)
    model_dir = build_model_dir(output_dir, seed=seed)
    run_dir = os.path.join(output_dir, "run")
    config = dict(model_name_or_path=model_dir, dataset=train_path, template="qwen2_vl", finetuning_type="full",
                  freeze_vision_tower=False, freeze_multi_modal_projector=False, torch_dtype="fp32",
                  output_dir=run_dir, per_device_train_batch_size=batch_size, max_steps=max_steps,
                  learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=30, logging_steps=20,
                  save_strategy="no", seed=seed, cutoff_len=256, dataloader_num_workers=0, use_cpu=True,
                  disable_tqdm=False, overwrite_output_dir=True)  # the demo's own folder: a rerun replaces it
    args = parse_config(None, extra=config)
    start = time.perf_counter()
    run_sft(*args)
    seconds = time.perf_counter() - start
    test_path = os.path.join(data_dir, "test.json")
    with open(test_path, "w") as fh:
        json.dump([{k: v for k, v in it.items() if k != "kind"} for it in test_items], fh)
    predict_dir = os.path.join(output_dir, "predict")
    results = predict_folder(run_dir, test_path, predict_dir, torch_dtype="fp32", max_new_tokens=4,
                             predict_batch_size=batch_size, overwrite_output_dir=True)  # the demo's own folder
    accuracy = results["accuracy"]
    baseline = text_only_baseline(train_path, test_items)
    logger.info("held-out accuracy %.1f%% (text-only best %.1f%%) after %.0f s of training", 100 * accuracy,
                100 * baseline, seconds)
    with open(os.path.join(predict_dir, PREDICTIONS_FILE)) as fh:
        rows = [json.loads(line) for line in fh]
    answers = []
    for item, row in zip(test_items[:chat_examples], rows):
        answers.append((item["images"][0], item["messages"][0]["content"].replace("<image>", ""), row["prediction"],
                        row["label"]))
        logger.info("chat: [%s] %s -> %r (truth: %s)", *answers[-1])
    return DemoResult(accuracy, baseline, seconds, run_dir, answers)


def preference_pairs(facts: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Pairwise ShareGPT rows for (image, colour, shape) facts: per image a colour and a shape
    question, the truth chosen and the next colour / shape of the lists rejected."""
    colours, rows = list(COLOURS), []
    for image, colour, shape in facts:
        for kind, truth, options in (("colour", colour, colours), ("shape", shape, list(SHAPES))):
            rows.append({"messages": [{"role": "user", "content": f"<image>{QUESTIONS[kind]}"}],
                         "chosen": {"role": "assistant", "content": truth},
                         "rejected": {"role": "assistant", "content": options[(options.index(truth) + 1) % len(options)]},
                         "images": [image]})
    return rows


def make_preference_dataset(root: str, n_train: int, n_test: int, size: int = 56, seed: int = 0,
                            filename: str = "pairs.json") -> tuple[str, list[dict]]:
    """Images on disk plus a pairwise ShareGPT json (``messages`` ending with the question,
    ``chosen``: the true colour or shape, ``rejected``: a wrong one); returns its path and the
    held-out pairs (same form)."""
    rng = random.Random(seed + 1)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    train, test = [], []
    for i in range(n_train + n_test):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"images/pair{i:05d}.png"
        draw_shape(colour, shape, size, rng).save(os.path.join(root, name))
        kind = rng.choice(("colour", "shape"))
        truth = colour if kind == "colour" else shape
        wrong = rng.choice([c for c in (COLOURS if kind == "colour" else SHAPES) if c != truth])
        item = {"messages": [{"role": "user", "content": f"<image>{QUESTIONS[kind]}"}],
                "chosen": {"role": "assistant", "content": truth},
                "rejected": {"role": "assistant", "content": wrong}, "images": [name]}
        (train if i < n_train else test).append(item)
    path = os.path.join(root, filename)
    with open(path, "w") as fh:
        json.dump(train, fh)
    return path, test


@torch.no_grad()
def pair_accuracy(model: Any, processor: Any, template: Any, plugin: Any, root: str, items: list[dict],
                  batch_size: int = 16) -> tuple[float, float]:
    """(share of pairs whose chosen answer the model finds likelier than the rejected one, the
    mean log-likelihood margin chosen - rejected), through the training collator of pairs."""
    from mmtune.data.collator import MultiModalCollator
    from mmtune.data.loader import encode_preference
    from mmtune.train.preference import PreferenceCollator, logps_from_logits

    tok = processor.tokenizer
    collator = PreferenceCollator(MultiModalCollator(plugin, processor, tok, model=model))
    model.eval()
    wins, margins = 0, 0.0
    for start in range(0, len(items), batch_size):
        feats = []
        for item in items[start:start + batch_size]:
            sample, enc, extra = encode_preference(item, "pairs", root, _DemoData(), template, plugin, tok, processor)
            feats.append({"input_ids": enc.input_ids, "labels": enc.labels, "images": sample.images, **extra})
        batch = collator(feats)
        labels = batch.pop("labels")
        batch.pop("shared_media", None)
        logps = logps_from_logits(model(**batch).logits, labels).logps
        n = len(feats)
        diff = logps[:n] - logps[n:]
        wins += int((diff > 0).sum())
        margins += float(diff.sum())
    return wins / len(items), margins / len(items)


@dataclass
class _DemoData:
    """The data settings :func:`pair_accuracy` encodes held-out pairs with (the run's)."""

    cutoff_len: int = 256
    drop_overlong: bool = True


@dataclass
class PreferenceDemoResult:
    accuracy_before: float
    accuracy_after: float
    margin_before: float
    margin_after: float
    train_seconds: float
    output_dir: str


def run_preference_demo(output_dir: str = "demo_output", n_train: int = 600, n_test: int = 100,
                        max_steps: int = 400, batch_size: int = 8, learning_rate: float = 2e-3, seed: int = 0,
                        image_size: int = 56) -> PreferenceDemoResult:
    """DPO on synthetic pairs (the true colour or shape chosen, a wrong one rejected), full
    fine-tuning with the reference cached before training: the share of held-out pairs the
    model ranks right, before and after."""
    from mmtune.config import parse_config
    from mmtune.train import build_saved, run_sft

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data_dir = os.path.join(output_dir, "pref_data")
    train_path, test_items = make_preference_dataset(data_dir, n_train, n_test, size=image_size, seed=seed)
    model_dir = build_model_dir(output_dir, seed=seed)
    before = build_saved(model_dir, template="qwen2_vl", dtype="fp32")
    acc0, margin0 = pair_accuracy(before.model, before.processor, before.template, before.plugin, data_dir, test_items)
    del before
    run_dir = os.path.join(output_dir, "dpo_run")
    config = dict(model_name_or_path=model_dir, dataset=train_path, template="qwen2_vl", finetuning_type="full",
                  stage="dpo", pref_loss="sigmoid", pref_beta=0.5, freeze_vision_tower=False,
                  freeze_multi_modal_projector=False, torch_dtype="fp32", output_dir=run_dir,
                  per_device_train_batch_size=batch_size, per_device_eval_batch_size=16, max_steps=max_steps,
                  learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=10,
                  save_strategy="no", seed=seed, cutoff_len=256, dataloader_num_workers=0, use_cpu=True,
                  disable_tqdm=False, overwrite_output_dir=True)
    start = time.perf_counter()
    run_sft(*parse_config(None, extra=config))
    seconds = time.perf_counter() - start
    after = build_saved(run_dir, dtype="fp32")
    acc1, margin1 = pair_accuracy(after.model, after.processor, after.template, after.plugin, data_dir, test_items)
    logger.info("held-out pairs ranked right: %.1f%% before, %.1f%% after DPO (mean log-likelihood margin %.2f -> "
                "%.2f), %.0f s of training", 100 * acc0, 100 * acc1, margin0, margin1, seconds)
    return PreferenceDemoResult(acc0, acc1, margin0, margin1, seconds, run_dir)
