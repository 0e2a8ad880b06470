"""Qwen2.5-Omni thinker: images, videos, audio, and audio inside video."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.media import MediaConfig, load_audio
from mmtune.plugins import get_mm_plugin
from mmtune.testing import get_fixture, load_processor, make_audio_file, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, check_batch_parity, plugin_ids, render

WRAP = {"<image>": "<|vision_bos|><|IMAGE|><|vision_eos|>", "<video>": "<|vision_bos|><|VIDEO|><|vision_eos|>",
        "<audio>": "<|audio_bos|><|AUDIO|><|audio_eos|>"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni")
    return {"big": make_image_file(str(d / "big.jpg"), 301, 173, seed=1), "small": make_image_file(str(d / "s.png"), 40, 30),
            "video": make_video_file(str(d / "v.mp4"), frames=24, width=64, height=48, fps=4, with_audio=True),
            "audio": make_audio_file(str(d / "a.wav"), seconds=1.7)}


def _to_proc(text):
    for k, v in WRAP.items():
        text = text.replace(k, v)
    return text


def _samples(media):
    conv = [{"role": "user", "content": "<image>Hear <audio>, see <image> and <video>"}, {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    return [MMSample(conv, images=[media["big"], media["small"]], videos=[media["video"]], audios=[media["audio"]]),
            MMSample([{"role": "user", "content": "Hi"}])]


def _proc_media(plugin):
    def fn(s):
        clips = plugin._regularize_videos(s.videos)
        return {"images": [Image.open(p).convert("RGB") for p in s.images], "videos": [c.frames for c in clips],
                "audio": [load_audio(a, 16000) for a in s.audios]}
    return fn


def test_ids_and_tensors_match_processor(media):
    processor = load_processor("qwen2_omni")
    plugin = get_mm_plugin("qwen2_omni")
    clip = plugin._regularize_videos([media["video"]])[0]
    result = check_batch_parity(plugin, processor, _samples(media), _to_proc, _proc_media(plugin),
                                processor_kwargs={"do_sample_frames": False, "fps": clip.sample_fps},
                                tensor_keys=["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                             "input_features", "feature_attention_mask"])
    ours, ref = result["ours"], result["ref"]
    assert torch.allclose(ours["video_second_per_grid"].float(), torch.as_tensor(ref["video_second_per_grid"]).float())


def test_audio_in_video_interleaving_matches_processor_rule(media):
    processor = load_processor("qwen2_omni")
    plugin = get_mm_plugin("qwen2_omni", media=MediaConfig(use_audio_in_video=True))
    clip = plugin._regularize_videos([media["video"]])[0]
    (grid,) = plugin.video_grids([clip], processor)
    ours = plugin.video_text(processor, clip, grid)
    wave = load_audio(media["video"], 16000)
    n_audio = plugin.audio_count(wave, processor)
    merge = processor.video_processor.merge_size
    stand_in = {"video_grid_thw": torch.tensor([[grid[0], grid[1] // merge * merge, merge]]),
                "video_second_per_grid": [2 / clip.sample_fps]}
    stand_in["video_grid_thw"] = torch.tensor([[grid[0], grid[1] // merge, merge]])
    theirs = processor.replace_video_with_audio_token(stand_in, 0, {"num_audio_tokens": [n_audio]}, 0,
                                                      position_id_per_seconds=25, seconds_per_chunk=2.0)
    assert ours == f"<|vision_bos|>{theirs}<|vision_eos|>"
    assert ours.count("<|AUDIO|>") == n_audio and ours.count("<|VIDEO|>") == grid[0] * grid[1] // merge**2
    # the 6 s clip spans several 2 s chunks, so frames and audio really interleave
    assert "<|AUDIO|><|VIDEO|>" in ours


def test_tiny_thinker_accepts_plugin_output(media):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    processor = load_processor("qwen2_omni")
    for use_audio_in_video in (False, True):
        plugin = get_mm_plugin("qwen2_omni", media=MediaConfig(use_audio_in_video=use_audio_in_video))
        s = _samples(media)[0]
        ids = torch.tensor([plugin_ids(plugin, processor, s)])
        mm = plugin.get_mm_inputs(s.images, s.videos, s.audios, [2], [1], [1], [ids[0].tolist()], processor)
        if use_audio_in_video:
            assert mm["input_features"].shape[0] == 2  # the standalone clip and the video's own track
        torch.manual_seed(0)
        model = Qwen2_5OmniThinkerForConditionalGeneration(get_fixture("qwen2_omni").tiny_config()).eval()
        with torch.no_grad():
            out = model(input_ids=ids, use_audio_in_video=use_audio_in_video, **mm)
        assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()


def test_no_expansion(media):
    processor = load_processor("qwen2_omni")
    s = _samples(media)[0]
    plugin = get_mm_plugin("qwen2_omni")
    short = get_mm_plugin("qwen2_omni", expand_mm_tokens=False).process_messages(s.messages, s.images, s.videos, s.audios, processor)
    clip = plugin._regularize_videos(s.videos)[0]
    ref = processor(text=[render(short)], **_proc_media(plugin)(s), do_sample_frames=False, fps=clip.sample_fps, return_tensors="pt")
    assert ref["input_ids"][0].tolist() == plugin_ids(plugin, processor, s)
