"""mmtune.media: images, videos and audio from every accepted input form; caps; errors name the file."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mmtune.media import (
    MediaError,
    image_size,
    load_audio,
    load_image,
    load_video,
    resize_image,
    sample_context,
    scaled_size,
)
from mmtune.testing import make_audio_file, make_image, make_image_file, make_video_file
from mmtune.testing.parity import no_pixel_decoding


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    bad = d / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    return {
        "png": make_image_file(str(d / "a.png"), 120, 70, seed=3),
        "jpg": make_image_file(str(d / "b.jpg"), 90, 130, seed=4),
        "bad": str(bad),
        "video": make_video_file(str(d / "v.mp4"), frames=8, width=64, height=48, fps=4),
        "wav16": make_audio_file(str(d / "a16.wav"), seconds=1.0, sampling_rate=16000),
        "wav8": make_audio_file(str(d / "a8.wav"), seconds=0.5, sampling_rate=8000),
        "dir": str(d),
    }


# ------------------------------------------------------------------ images
def test_image_from_every_input_form_is_the_same_rgb_image(files):
    reference = np.asarray(Image.open(files["png"]).convert("RGB"))
    raw = open(files["png"], "rb").read()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    forms = [files["png"], raw, Image.open(files["png"]), {"path": files["png"]}, {"bytes": raw}, uri]
    for form in forms:
        img = load_image(form)
        assert img.mode == "RGB" and img.size == (120, 70)
        assert np.array_equal(np.asarray(img), reference), f"differs for {type(form).__name__}"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode):
    img = make_image(20, 10).convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_image_size_reads_the_header_only(files):
    raw = open(files["jpg"], "rb").read()
    with no_pixel_decoding():
        assert image_size(files["jpg"]) == (90, 130)
        assert image_size({"bytes": raw}) == (90, 130)
        assert image_size({"path": files["png"]}) == (120, 70)


@pytest.mark.parametrize("variant", ["baseline", "progressive", "exif", "cmyk", "grey", "optimized", "restart"])
def test_jpeg_header_reader_agrees_with_pil(tmp_path, variant):
    """image_size reads a JPEG's frame header itself (no PIL image object): same size as PIL,
    from a path, a {"path"} dict and bytes, for the JPEG flavours PIL writes."""
    from mmtune.media.image import _jpeg_size

    img = make_image(333, 211, seed=5)
    kwargs = {"baseline": {}, "progressive": {"progressive": True}, "optimized": {"optimize": True},
              "restart": {"restart_marker_blocks": 2}, "exif": {}, "cmyk": {}, "grey": {}}[variant]
    if variant == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: the stored size is what PIL reports, and what counts
        exif[0x010E] = "x" * 5000  # a long APP1 segment to skip
        kwargs["exif"] = exif.tobytes()
    if variant == "cmyk":
        img = img.convert("CMYK")
    if variant == "grey":
        img = img.convert("L")
    path = tmp_path / f"{variant}.jpg"
    img.save(path, format="JPEG", quality=80, **kwargs)
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        assert _jpeg_size(fh) == Image.open(path).size == (333, 211)
    with no_pixel_decoding():
        assert image_size(str(path)) == image_size({"path": str(path)}) == image_size({"bytes": raw}) == (333, 211)


def test_jpeg_header_reader_leaves_the_rest_to_pil(files, tmp_path):
    from mmtune.media.image import _jpeg_size

    with open(files["png"], "rb") as fh:
        assert _jpeg_size(fh) is None  # not a JPEG: PIL answers
    assert image_size(files["png"]) == (120, 70)
    cut = tmp_path / "cut.jpg"  # a JPEG cut inside its headers: PIL's error, naming the file
    cut.write_bytes(open(files["jpg"], "rb").read()[:40])
    with open(cut, "rb") as fh:
        assert _jpeg_size(fh) is None
    with pytest.raises(MediaError, match="cut.jpg"):
        image_size(str(cut))
    with pytest.raises(MediaError, match="not found"):
        image_size(str(tmp_path / "missing.jpg"))


@pytest.mark.parametrize("size", [(1000, 300), (301, 173), (64, 900)])
def test_caps_keep_aspect_ratio(size):
    img = make_image(*size)
    small = resize_image(img, max_pixels=128 * 128)
    assert small.width * small.height <= 128 * 128
    assert abs(small.width / small.height - size[0] / size[1]) < 0.05 * size[0] / size[1]
    big = resize_image(make_image(size[0] // 10, size[1] // 10), min_pixels=200 * 200)
    assert big.width * big.height >= 200 * 200
    assert abs(big.width / big.height - size[0] / size[1]) < 0.1 * size[0] / size[1]
    # the size is known without touching pixels, and equals the resize
    assert scaled_size(*size, max_pixels=128 * 128) == small.size
    assert resize_image(img, max_pixels=10**9, min_pixels=1) is img  # inside the caps: untouched


def test_image_errors_name_the_file(files):
    with pytest.raises(ValueError, match="nope.png"):
        load_image(files["dir"] + "/nope.png")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(files["bad"])
    with pytest.raises(ValueError, match="broken.jpg"):
        image_size({"path": files["bad"]})
    with pytest.raises(ValueError, match="base64"):
        load_image("data:image/png;base64,@@@notbase64")
    with pytest.raises(ValueError, match="'path' or 'bytes'"):
        load_image({"url": "x"})


def test_errors_name_the_sample_under_sample_context(files):
    with sample_context(7, "train.jsonl"), pytest.raises(MediaError) as info:
        load_image(files["bad"])
    assert "sample 7 of train.jsonl" in str(info.value) and "broken.jpg" in str(info.value)


# ------------------------------------------------------------------ videos
def test_video_from_file_fps_maxlen_and_frame_factor(files):
    clip = load_video(files["video"], fps=2.0, maxlen=128)  # 8 frames at 4 fps = 2 s -> 4 frames
    assert clip.total_frames == 8 and clip.source_fps == 4.0 and clip.duration == 2.0
    assert len(clip.frames) == 4 and clip.indices[0] == 0 and clip.indices[-1] == 7
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in clip.frames)
    assert clip.sample_fps == 2.0
    meta = clip.metadata()
    assert meta["total_num_frames"] == 8 and meta["fps"] == 4.0 and meta["frames_indices"] == clip.indices
    assert len(load_video(files["video"], fps=10.0, maxlen=3).frames) == 3
    assert len(load_video(files["video"], fps=10.0, maxlen=3, frame_factor=2).frames) == 2
    assert len(load_video(files["video"], fps=0.1, maxlen=128, frame_factor=2).frames) == 2  # never below the factor
    capped = load_video(files["video"], fps=2.0, max_pixels=32 * 24)
    assert capped.frames[0].width * capped.frames[0].height <= 32 * 24
    assert abs(capped.frames[0].width / capped.frames[0].height - 64 / 48) < 0.1


def test_video_frames_match_a_plain_pyav_decode(files):
    import av

    with av.open(files["video"]) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    clip = load_video(files["video"], fps=4.0)
    assert len(clip.frames) == len(decoded) == 8
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip.frames, decoded))


def test_video_from_a_list_of_frames(files):
    frames = [make_image(40, 30, seed=i) for i in range(6)]
    clip = load_video(frames, fps=2.0, source_fps=2.0)  # every frame kept
    assert len(clip.frames) == 6 and clip.indices == list(range(6))
    assert len(load_video(frames, fps=1.0, source_fps=2.0).frames) == 3
    assert len(load_video(frames, fps=2.0, maxlen=5, frame_factor=2).frames) == 4
    from_paths = load_video([files["png"], files["jpg"]], fps=2.0)
    assert [f.size for f in from_paths.frames] == [(120, 70), (90, 130)]


def test_video_errors_name_the_file(files):
    with pytest.raises(ValueError, match="missing.mp4"):
        load_video(files["dir"] + "/missing.mp4")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_video(files["bad"])
    with pytest.raises(ValueError, match="empty"):
        load_video([])


# ------------------------------------------------------------------ audio
def test_audio_from_file_and_resampling(files):
    wave = load_audio(files["wav16"])
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 16000
    import soundfile

    raw, _ = soundfile.read(files["wav16"], dtype="float32")
    assert np.array_equal(wave, raw)  # no resampling at the native rate
    up = load_audio(files["wav8"], sampling_rate=16000)  # 0.5 s at 8 kHz -> 16 kHz
    assert abs(len(up) - 8000) <= 32
    assert load_audio({"path": files["wav8"]}).shape == up.shape


def test_audio_from_arrays(files):
    tone = np.sin(np.linspace(0, 200 * np.pi, 8000)).astype(np.float32)
    up = load_audio({"array": tone, "sampling_rate": 8000})
    assert abs(len(up) - 16000) <= 32
    # the resampled tone keeps its frequency (100 Hz: 100 cycles in 1 s)
    peak_hz = lambda w, sr: np.argmax(np.abs(np.fft.rfft(w))) * sr / len(w)  # noqa: E731
    assert peak_hz(tone, 8000) == pytest.approx(100, abs=1) and peak_hz(up, 16000) == pytest.approx(100, abs=1)
    assert np.array_equal(load_audio(tone), tone)  # a bare array is taken at the target rate
    stereo = np.stack([tone, tone])
    assert load_audio({"array": stereo, "sampling_rate": 16000}).shape == (8000,)


def test_audio_errors_name_the_file(files):
    with pytest.raises(ValueError, match="gone.wav"):
        load_audio(files["dir"] + "/gone.wav")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_audio(files["bad"])


def test_audio_track_of_a_video_file_without_one_is_an_error(files):
    with pytest.raises(ValueError, match="v.mp4"):
        load_audio(files["video"])


def test_png_bytes_roundtrip_through_bytesio():
    buf = io.BytesIO()
    make_image(33, 21).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (33, 21)
