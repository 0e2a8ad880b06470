"""Gemma 3n: image and audio soft-token runs, features and token types equal the processor's."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.media import load_audio
from mmtune.plugins import get_mm_plugin
from mmtune.testing import load_processor, make_audio_file, make_image_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids, render


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("g3n")
    return {"big": make_image_file(str(d / "big.jpg"), 400, 180, seed=1), "small": make_image_file(str(d / "s.png"), 30, 60),
            "a1": make_audio_file(str(d / "a1.wav"), seconds=1.0), "a2": make_audio_file(str(d / "a2.wav"), 2.5, 44100, 330)}


def _samples(media):
    conv = [{"role": "user", "content": "<image>Listen <audio> and look <image>, then <audio>"},
            {"role": "assistant", "content": "Done."}, {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Ok."}]
    return [MMSample(conv, images=[media["big"], media["small"]], audios=[media["a1"], media["a2"]]),
            MMSample([{"role": "user", "content": "Hi"}])]


def _to_proc(t):
    return t.replace("<image>", "<image_soft_token>").replace("<audio>", "<audio_soft_token>")


def _media(s):
    return {"images": [Image.open(p).convert("RGB") for p in s.images], "audio": [load_audio(a, 16000) for a in s.audios]}


def test_ids_tensors_and_token_types(media):
    processor = load_processor("gemma3n")
    plugin = get_mm_plugin("gemma3n")
    result = check_batch_parity(plugin, processor, _samples(media), _to_proc, _media, nested=("images",),
                                tensor_keys=["pixel_values", "input_features", "input_features_mask"])
    ref = result["ref"]
    mask = ref["attention_mask"].bool()
    assert torch.equal(plugin.mm_token_type_ids(ref["input_ids"], processor)[mask], torch.as_tensor(ref["token_type_ids"])[mask])


def test_no_expansion(media):
    processor = load_processor("gemma3n")
    s = _samples(media)[0]
    short = get_mm_plugin("gemma3n", expand_mm_tokens=False).process_messages(s.messages, s.images, [], s.audios, processor)
    m = _media(s)
    ref = processor(text=[render(short)], images=[m["images"]], audio=m["audio"], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin("gemma3n"), processor, s)
