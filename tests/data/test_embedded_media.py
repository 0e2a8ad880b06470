"""Embedded media (``datasets.Image`` / ``Audio`` / ``Video`` columns, ``{bytes, path}`` dicts) and
``dataset:`` entries that go through ``datasets.load_dataset`` (Hub ids, Hub-layout folders,
``:split``): each gives the same token ids and tensors as the same data given as file paths."""

import json
import os

import datasets
import pytest
import torch
from datasets import Features, Image, List, Value

from mmtune.data import MultiModalCollator
from mmtune.data.check import check_dataset
from mmtune.config import DataArguments
from mmtune.data.loader import build_dataset
from mmtune.media import MediaError, load_audio, load_image, load_video, media_reference, sample_context
from mmtune.plugins import get_mm_plugin
from mmtune.templates import get_template
from mmtune.testing import get_fixture, load_processor, make_audio_file, make_image_file, make_video_file
from mmtune.testing.parity import no_pixel_decoding

IMAGES = {"a.png": (80, 60), "b.jpg": (56, 90), "c.png": (120, 40), "d.png": (64, 64)}
ROWS = [  # (question, answer, images)
    ("<image>what colour is it?", "red", ["a.png"]),
    ("<image><image>compare the two", "the same shapes", ["b.jpg", "c.png"]),
    ("text only question", "a text answer", []),
    ("<image>describe it", "a circle", ["d.png"]),
    ("<image>and again", "a circle again and again", ["a.png"]),
    ("<image>what is this?", "fine", ["c.png"]),
]
TENSORS = ("input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw")


def _messages(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _image_struct(root, name):
    return {"bytes": (root / name).read_bytes(), "path": name}


def _write_hub_folder(folder, table, splits=("train", "test")):
    """A folder laid out as a Hub dataset repository: parquet shards under data/ and a README
    whose YAML names the splits."""
    (folder / "data").mkdir(parents=True)
    for split in splits:
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    configs = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n# tiny\n")
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    for i, (name, (w, h)) in enumerate(IMAGES.items()):
        make_image_file(str(root / name), w, h, seed=i)
    messages = [_messages(q, a) for q, a, _ in ROWS]
    (root / "paths.json").write_text(json.dumps([{"messages": m, "images": imgs} for m, (_, _, imgs) in zip(messages, ROWS)]))
    structs = [[_image_struct(root, n) for n in imgs] for _, _, imgs in ROWS]
    turn = {"role": Value("string"), "content": Value("string")}
    decoded = datasets.Dataset.from_dict({"messages": messages, "images": structs},
                                         features=Features({"messages": List(turn), "images": List(Image())}))
    entries = {"paths": str(root / "paths.json")}
    decoded.to_parquet(str(root / "image.parquet"))
    entries["parquet, List(Image())"] = str(root / "image.parquet")
    decoded.cast_column("images", List(Image(decode=False))).to_parquet(str(root / "undecoded.parquet"))
    entries["parquet, List(Image(decode=False))"] = str(root / "undecoded.parquet")
    decoded.save_to_disk(str(root / "saved"))
    entries["save_to_disk, List(Image())"] = str(root / "saved")
    datasets.Dataset.from_dict({"messages": messages, "images": structs}).to_parquet(str(root / "structs.parquet"))
    entries["parquet, {bytes, path} structs"] = str(root / "structs.parquet")
    (root / "dicts.json").write_text(json.dumps([{"messages": m, "images": [{"path": n, "bytes": None} for n in imgs]}
                                                 for m, (_, _, imgs) in zip(messages, ROWS)]))
    entries["json, {path, bytes: null} dicts"] = str(root / "dicts.json")
    single = [None if not imgs else _image_struct(root, imgs[0]) for _, _, imgs in ROWS]
    single_rows = [m if len(imgs) < 2 else _messages("<image>compare the two", "the same shapes")
                   for m, (_, _, imgs) in zip(messages, ROWS)]
    datasets.Dataset.from_dict({"messages": single_rows, "image": single},
                               features=Features({"messages": List(turn), "image": Image()})).to_parquet(str(root / "single.parquet"))
    (root / "single_paths.json").write_text(json.dumps([{"messages": m, "images": imgs[:1]}
                                                        for m, (_, _, imgs) in zip(single_rows, ROWS)]))
    parts = datasets.Dataset.from_dict({"messages": [  # OpenAI content parts: the images inside the messages
        [{"role": "user", "content": [{"type": "image", "image": s} for s in imgs]
          + [{"type": "text", "text": q.replace("<image>", "")}]},
         {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        for (q, a, _), imgs in zip(ROWS, structs)]})
    parts.to_parquet(str(root / "parts.parquet"))
    entries["parquet, images inside content parts"] = str(root / "parts.parquet")
    hub = _write_hub_folder(root / "hub", decoded)
    entries["Hub-layout folder, :test split"] = hub + ":test"
    processor = load_processor("qwen2_vl")
    return {"root": root, "entries": entries, "processor": processor, "hub": hub}


def _build(data, entry, **kw):
    processor = data["processor"]
    args = DataArguments(dataset=entry, overwrite_cache=True, **kw)
    return build_dataset(args, get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"), processor.tokenizer, processor)


def _collate(data, rows, model=None):
    processor = data["processor"]
    return MultiModalCollator(get_mm_plugin("qwen2_vl"), processor, processor.tokenizer, model=model)(list(rows))


def _assert_same_batch(got, want, keys=TENSORS):
    for key in keys:
        assert key in got and key in want, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("kind", ["parquet, List(Image())", "parquet, List(Image(decode=False))",
                                  "save_to_disk, List(Image())", "parquet, {bytes, path} structs",
                                  "json, {path, bytes: null} dicts", "parquet, images inside content parts",
                                  "Hub-layout folder, :test split"])
def test_embedded_images_give_the_same_ids_and_tensors_as_paths(data, kind):
    reference = _build(data, data["entries"]["paths"])["train"]
    with no_pixel_decoding():  # token counts from the bytes' headers, as from files
        ds = _build(data, data["entries"][kind])["train"]
    assert len(ds) == len(ROWS)
    for got, want in zip(ds, reference):
        assert list(got["input_ids"]) == list(want["input_ids"]) and list(got["labels"]) == list(want["labels"])
    _assert_same_batch(_collate(data, ds), _collate(data, reference))


def test_embedded_bytes_are_read_from_the_source_not_copied(data):
    """The tokenised dataset references the source's Arrow file for the image bytes: the file
    tokenising writes is far smaller than the images, and the rows carry the bytes."""
    ds = _build(data, data["entries"]["parquet, List(Image())"])["train"]
    assert "embedded_images" in ds.column_names and ds.features["images"].feature.dtype == "string"
    image_bytes = sum((data["root"] / name).stat().st_size for _, _, imgs in ROWS for name in imgs)
    written = [f["filename"] for f in ds.cache_files if os.path.basename(f["filename"]).startswith("cache-")]
    assert written and sum(os.path.getsize(f) for f in written) < image_bytes / 4
    assert ds[1]["images"] == ["", ""] and ds[1]["embedded_images"][1]["path"] == "c.png"
    paths = _build(data, data["entries"]["paths"])["train"]
    assert "embedded_images" not in paths.column_names  # path datasets are stored as before


def test_single_image_column(data):
    """``image: Image()`` (one per row, None for text-only rows) equals the path version."""
    reference = _build(data, str(data["root"] / "single_paths.json"))["train"]
    ds = _build(data, str(data["root"] / "single.parquet"))["train"]
    assert [list(r["input_ids"]) for r in ds] == [list(r["input_ids"]) for r in reference]
    _assert_same_batch(_collate(data, ds), _collate(data, reference))


def test_packing_and_eval_split_with_embedded_media(data):
    """The eval split and packed rows (PackedDataset + PackingCollator) read the embedded bytes
    and equal the path dataset's, M-RoPE positions included."""
    from transformers import AutoModelForImageTextToText

    from mmtune.data.packing import maybe_pack

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(get_fixture("qwen2_vl").tiny_config()).eval()
    reference = _build(data, data["entries"]["paths"], val_size=0.34)
    ds = _build(data, data["entries"]["Hub-layout folder, :test split"], val_size=0.34)
    assert len(ds["eval"]) == len(reference["eval"]) == 3
    _assert_same_batch(_collate(data, ds["eval"], model), _collate(data, reference["eval"], model),
                       TENSORS + ("position_ids",))
    processor = data["processor"]
    collator = MultiModalCollator(get_mm_plugin("qwen2_vl"), processor, processor.tokenizer, model=model)
    packed_ref, packer_ref = maybe_pack(reference["train"], collator, model, True, None, 2)
    packed, packer = maybe_pack(ds["train"], collator, model, True, None, 2)
    assert packed.packs == packed_ref.packs
    got = packer([packed[i] for i in range(len(packed))])
    want = packer_ref([packed_ref[i] for i in range(len(packed_ref))])
    _assert_same_batch(got, want, ("input_ids", "labels", "pixel_values", "image_grid_thw", "position_ids"))


def test_mixing_path_and_embedded_datasets(data):
    """A path dataset beside an embedded one (it gets an all-null embedded column), and a
    one-image-per-row column beside a list column (rewritten as lists), concatenated and
    interleaved: every row collates as its own dataset does."""
    paths, embedded = data["entries"]["paths"], data["entries"]["parquet, List(Image())"]
    single = str(data["root"] / "single.parquet")
    mixed = _build(data, f"{paths},{embedded},{single}")["train"]
    parts = [_build(data, e)["train"] for e in (paths, embedded, single)]
    rows = [r for part in parts for r in part]
    assert len(mixed) == len(rows)
    for start in range(0, len(rows), 6):
        _assert_same_batch(_collate(data, mixed.select(range(start, start + 6))), _collate(data, rows[start:start + 6]))
    interleaved = _build(data, f"{paths},{embedded}", dataset_ratios="1,1")["train"]
    assert len(_collate(data, interleaved)["image_grid_thw"]) == sum(len(r["images"]) for r in interleaved)


def test_training_on_embedded_images_equals_training_on_paths(data, tmp_path):
    """``mmtune train`` on a Hub-layout folder (a split picked, an eval split, default packing)
    logs the same losses as on the same data given as paths."""
    from mmtune.testing import tiny_model_dir
    from mmtune.config import parse_config
    from mmtune.train import run_sft

    model = tiny_model_dir("qwen2_vl", str(tmp_path))
    metrics = {}
    for name, entry in (("paths", data["entries"]["paths"]), ("hub", data["entries"]["Hub-layout folder, :test split"])):
        cfg = dict(model_name_or_path=model, dataset=entry, template="qwen2_vl", finetuning_type="lora", lora_rank=4,
                   torch_dtype="fp32", output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=2,
                   learning_rate=1e-3, save_strategy="no", seed=0, use_cpu=True, dataloader_num_workers=0,
                   disable_tqdm=True, val_size=0.34, overwrite_cache=True, report_to="none")
        metrics[name] = run_sft(*parse_config(None, extra=cfg))
    assert metrics["hub"]["train_loss"] == pytest.approx(metrics["paths"]["train_loss"], rel=1e-5)
    assert metrics["hub"]["eval_loss"] == pytest.approx(metrics["paths"]["eval_loss"], rel=1e-5)


def test_embedded_audio_and_video(tmp_path):
    """``datasets.Audio`` / ``datasets.Video`` columns read undecoded ({bytes, path}) give the
    same ids and tensors as the files (Qwen2-Audio, Qwen2-VL video)."""
    wav = make_audio_file(str(tmp_path / "a.wav"), seconds=0.6, sampling_rate=8000)
    mp4 = make_video_file(str(tmp_path / "v.mp4"), frames=8, width=56, height=56, fps=4)
    cases = [("qwen2_audio", "audios", "<audio>", "a.wav", datasets.Audio(decode=False)),
             ("qwen2_vl", "videos", "<video>", "v.mp4", datasets.Video(decode=False))]
    for family, column, placeholder, name, feature in cases:
        processor = load_processor(family)
        plugin, template = get_mm_plugin(family), get_template(family)
        messages = [_messages(f"{placeholder}what is it?", "a tone" if column == "audios" else "moving shapes")]
        (tmp_path / f"{column}.json").write_text(json.dumps([{"messages": messages[0], column: [name]}]))
        table = datasets.Dataset.from_dict({"messages": messages, column: [[{"bytes": (tmp_path / name).read_bytes(),
                                                                           "path": name}]]})
        table.cast(Features({**table.features, column: List(feature)})).to_parquet(str(tmp_path / f"{column}.parquet"))
        built = []
        for entry in (f"{column}.json", f"{column}.parquet"):
            args = DataArguments(dataset=str(tmp_path / entry), overwrite_cache=True, template=family)
            built.append(build_dataset(args, template, plugin, processor.tokenizer, processor)["train"])
        assert list(built[0][0]["input_ids"]) == list(built[1][0]["input_ids"])
        assert f"embedded_{column}" in built[1].column_names
        got, want = (MultiModalCollator(plugin, processor, processor.tokenizer)([d[0]]) for d in built)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (family, key)
    assert wav and mp4


def test_media_loaders_take_embedded_bytes_and_references(tmp_path):
    """Bytes, {bytes, path} dicts (bytes win over a path that does not exist) and the data URI
    media_reference stores read back to what the file gives."""
    import numpy as np
    import soundfile

    png = make_image_file(str(tmp_path / "i.png"), 30, 20)
    wav = make_audio_file(str(tmp_path / "a.wav"), seconds=0.5, sampling_rate=16000)
    mp4 = make_video_file(str(tmp_path / "v.mp4"), frames=6, width=32, height=32, fps=3)
    image = np.asarray(load_image(png))
    for form in ({"bytes": open(png, "rb").read(), "path": "elsewhere/i.png"}, media_reference(load_image(png)),
                 media_reference({"bytes": open(png, "rb").read(), "path": None})):
        assert np.array_equal(np.asarray(load_image(form)), image)
    wave = load_audio(wav)
    samples, rate = soundfile.read(wav, dtype="float32")
    for form in ({"bytes": open(wav, "rb").read(), "path": "gone.wav"}, media_reference({"array": samples, "sampling_rate": rate}),
                 open(wav, "rb").read()):
        assert np.array_equal(load_audio(form), wave)
    clip = load_video(mp4, fps=3.0)
    for form in ({"bytes": open(mp4, "rb").read(), "path": "v.mp4"}, media_reference({"bytes": open(mp4, "rb").read()})):
        other = load_video(form, fps=3.0)
        assert other.indices == clip.indices
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(other.frames, clip.frames))
    assert media_reference(png) == png and media_reference({"path": png, "bytes": None}) == png


def _corrupt_parquet(data, name, mutate):
    root = data["root"]
    rows = [[_image_struct(root, n) for n in imgs] for _, _, imgs in ROWS]
    rows[1][1] = {"bytes": mutate(rows[1][1]["bytes"]), "path": "c.png"}
    table = datasets.Dataset.from_dict({"messages": [_messages(q, a) for q, a, _ in ROWS], "images": rows},
                                       features=Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                                                          "images": List(Image())}))
    table.to_parquet(str(root / name))
    return str(root / name)


def _assert_short_and_clean(message):
    assert len(message) < 300, message
    assert "\\x" not in message and "b'" not in message and "PIL." not in message and "BytesIO" not in message, message


def test_check_data_reads_embedded_media_and_names_a_corrupt_one(data):
    processor = data["processor"]
    template, plugin = get_template("qwen2_vl"), get_mm_plugin("qwen2_vl")
    for kind in ("parquet, List(Image())", "save_to_disk, List(Image())", "Hub-layout folder, :test split",
                 "parquet, {bytes, path} structs"):
        report = check_dataset(DataArguments(dataset=data["entries"][kind]), template, plugin, processor.tokenizer, processor)
        assert report.ok and report.samples == len(ROWS), (kind, report.render())
    cut = _corrupt_parquet(data, "cut.parquet", lambda b: b[: len(b) // 2])  # the header is whole: only decoding fails
    report = check_dataset(DataArguments(dataset=cut), template, plugin, processor.tokenizer, processor)
    assert len(report.problems) == 1 and report.samples == len(ROWS)
    problem = report.problems[0]
    assert problem.startswith(f"sample 1 of {cut}: embedded image 'c.png' (PNG, ") and "could not be decoded" in problem
    _assert_short_and_clean(problem)


def test_a_corrupt_embedded_image_is_a_short_error_naming_the_sample(data):
    garbage = _corrupt_parquet(data, "garbage.parquet", lambda b: b"\x89PNG but not really" + bytes(range(256)) * 40)
    with pytest.raises(MediaError) as info:
        _build(data, garbage)
    message = str(info.value)
    assert message.startswith(f"sample 1 of {garbage}: embedded image 'c.png' (unrecognised format, 10259 bytes) "
                              "could not be decoded"), message
    _assert_short_and_clean(message)
    cut = _corrupt_parquet(data, "cut_batch.parquet", lambda b: b[: len(b) // 2])
    ds = _build(data, cut)["train"]  # headers are whole: tokenising passes, the batch cannot decode
    with sample_context(1, cut), pytest.raises(MediaError) as info:
        _collate(data, [ds[1]])
    assert "embedded image 'c.png' (PNG, " in str(info.value)
    _assert_short_and_clean(str(info.value))


def test_hub_ids_go_through_load_dataset_with_their_split(data, monkeypatch):
    """``org/name`` and ``org/name:split`` are handed to ``datasets.load_dataset`` as they are
    (here answered from the local Hub-layout folder: no network)."""
    calls = []
    real = datasets.load_dataset

    def offline_hub(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        return real(data["hub"] if path == "org/tiny" else path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    reference = _build(data, data["entries"]["paths"])["train"]
    for entry, split in (("org/tiny", "train"), ("org/tiny:test", "test"), ("org/tiny:train[:2]", "train[:2]")):
        calls.clear()
        ds = _build(data, entry)["train"]
        assert calls == [("org/tiny", split)]
        assert [list(r["input_ids"]) for r in ds] == [list(r["input_ids"]) for r in reference][:len(ds)]
    assert len(ds) == 2


@pytest.mark.parametrize("entry, words", [
    ("org/not-there", ["'org/not-there'", "Hugging Face Hub"]),
    ("{root}/missing.json", ["missing.json", "no such file or folder"]),
    ("{hub}:validation", ["validation", "train", "test"]),
    ("{root}/saved:test", ["save_to_disk has no splits"]),
])
def test_a_missing_dataset_is_one_line_naming_the_entry(data, entry, words):
    entry = entry.format(root=data["root"], hub=data["hub"])
    with pytest.raises(ValueError) as info:
        _build(data, entry)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"dataset {entry!r}: ") and len(message) < 400, message
    for word in words:
        assert word in message, message
    processor = data["processor"]
    report = check_dataset(DataArguments(dataset=entry), get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"),
                           processor.tokenizer, processor)
    assert report.problems == [message]
