"""Qwen2-Audio: parity with the installed processor (files, arrays needing resampling)."""

import numpy as np
import pytest
import torch

from mmtune.media import load_audio
from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_audio_file
from mmtune.model.composite import get_composite_model
from mmtune.testing.parity import MMSample, check_batch_parity, check_composite_keys, plugin_ids, render


@pytest.fixture(scope="module")
def audios(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    t = np.arange(8000 * 2) / 8000
    return [
        make_audio_file(str(d / "one.wav"), seconds=1.225),  # 122.5 hops: a started hop adds a token here
        make_audio_file(str(d / "long.wav"), seconds=3.5, sampling_rate=22050, freq=300),  # resampled to 16 kHz
        {"array": (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), "sampling_rate": 8000},
        np.zeros(16000 * 31, dtype=np.float32) + 0.01,  # longer than Whisper's 30 s window: truncated
    ]


def _to_proc(text):
    return text.replace("<audio>", "<|audio_bos|><|AUDIO|><|audio_eos|>")


def test_ids_and_tensors_match_processor(audios):
    processor = load_processor("qwen2_audio")
    plugin = get_mm_plugin("qwen2_audio")
    conv = [
        {"role": "user", "content": "<audio>What is this? And <audio>?"},
        {"role": "assistant", "content": "Tones."},
        {"role": "user", "content": "And <audio>? <audio>"},
        {"role": "assistant", "content": "A lower one."},
    ]
    samples = [MMSample(conv, audios=audios), MMSample([{"role": "user", "content": "Hi"}])]
    result = check_batch_parity(plugin, processor, samples, _to_proc,
                                lambda s: {"audio": [load_audio(a, 16000) for a in s.audios]})
    assert set(result["ours"]) == {"input_features", "feature_attention_mask"}
    # the 22.05 kHz file really was resampled: 3.5 s at 16 kHz
    assert abs(len(load_audio(audios[1], 16000)) - 56000) <= 2


def test_no_expansion(audios):
    processor = load_processor("qwen2_audio")
    sample = MMSample([{"role": "user", "content": "<audio>Hi"}], audios=audios[:1])
    short = get_mm_plugin("qwen2_audio", expand_mm_tokens=False).process_messages(sample.messages, [], [], sample.audios, processor)
    ref = processor(text=[render(short)], audio=[load_audio(audios[0], 16000)], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(get_mm_plugin("qwen2_audio"), processor, sample)


def test_tiny_model_accepts_plugin_output(audios):
    from transformers import Qwen2AudioForConditionalGeneration

    processor = load_processor("qwen2_audio")
    plugin = get_mm_plugin("qwen2_audio")
    sample = MMSample([{"role": "user", "content": "<audio>Hi <audio>"}], audios=audios[:2])
    ids = plugin_ids(plugin, processor, sample)
    mm = plugin.get_mm_inputs([], [], sample.audios, [0], [0], [2], [ids], processor)
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(get_fixture("qwen2_audio").tiny_config()).eval()
    check_composite_keys(model, get_composite_model("qwen2_audio"))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **mm)
    assert out.logits.shape[1] == len(ids) and torch.isfinite(out.logits).all()
