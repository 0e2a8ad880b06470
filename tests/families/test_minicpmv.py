"""MiniCPM-V 2.6's slicing rule (its processor is remote code, absent here): hand-computed
cases, and the grid, the resize steps and the pixels cross-checked against transformers'
MiniCPM-V 4.6 image processor, which ships the same rule."""

import numpy as np
import pytest
import torch

from mmtune.families.minicpmv import MiniCPMVPlugin, SliceSettings, best_resize, refine_size, reshape_by_patch, sliced_grid
from mmtune.model.composite import get_composite_model
from mmtune.plugins import get_mm_plugin
from mmtune.testing import build_bpe_tokenizer, make_image, make_image_file, make_video_file
from mmtune.testing.parity import MMSample, no_pixel_decoding, render

# Hand-computed grids (scale_resolution 448, max_slice_nums 9; 448^2 = 200,704), (cols, rows):
#  448x448: ratio 1.0 -> multiple 1 -> no slices
#  1000x500: ratio 2.49 -> multiple 3; candidates 2: (1,2),(2,1); 3: (1,3),(3,1); 4: (1,4),(2,2),(4,1)
#            log(2)=0.693; errors: (2,1) |0.693-0.693|=0 -> (cols 2, rows 1)
#  500x1400: ratio 3.49 -> multiple 4; log(500/1400)=-1.030; (1,3): |-1.030+1.099|=0.069,
#            (1,4): |-1.030+1.386|=0.356, (1,5): 0.579, (1,2): 0.337 -> (1, 3)
#  2000x2000: ratio 19.9 -> multiple min(20, 9)=9; candidates 8 and 9 (10 > 9): (3,3) error 0 -> (3, 3)
#  600x400: ratio 1.196 -> multiple 2; counts 2 and 3; log 1.5 = 0.405; (2,1): |0.405-0.693| = 0.288,
#            (1,2): 1.098, (3,1): 0.693, (1,3): 1.504 -> (2, 1)
#  600x600: ratio 1.79 -> multiple 2; counts 2, 3; log 1 = 0: (1,2) and (2,1) tie at 0.693; the first
#            (fewest columns) wins -> (1, 2); (1,3),(3,1) score 1.099
HAND = [((448, 448), None), ((1000, 500), (2, 1)), ((500, 1400), (1, 3)), ((2000, 2000), (3, 3)),
        ((600, 400), (2, 1)), ((600, 600), (1, 2))]

# Hand-computed sizes (patch 14), (width, height):
#  1000x500, grid (2,1): source: area 500,000 > 200,704, r = 2: h = int(448/sqrt 2) = int(316.78) = 316,
#    w = int(632.0) = 632 -> multiples of 14: round(45.14)*14 = 630, round(22.57)*14 = 322 -> (630, 322);
#    refine: 1000/2 = 500 x 500/1 = 500 per slice -> upscaled: r = 1, h = w = 448 -> (896, 448), slices 448x448
#  300x200, no grid: upscaled (not sliced): r = 1.5, h = int(448/1.2247) = int(365.79) = 365,
#    w = int(547.5) = 547 -> round(39.07)*14 = 546, round(26.07)*14 = 364 -> (546, 364)
#  60x100, no grid: r = 0.6, h = int(448/0.7746) = int(578.37) = 578, w = int(346.8) = 346
#    -> round(24.71)*14 = 350, round(41.29)*14 = 574 -> (350, 574)
#  500x1400, grid (1,3): source: r = 0.357, h = int(448/0.5976) = int(749.65) = 749, w = int(267.5) = 267
#    -> round(19.07)*14 = 266, round(53.5)*14 = 54*14 = 756 -> (266, 756);
#    refine: ensure_divide(1400, 3) = 1401 -> slice 500 x 467 -> r = 1.0707, h = int(448/1.0347) = int(432.96)
#    = 432, w = int(462.5) = 462 -> 462 (33*14), round(30.86)*14 = 434 -> (462, 3*434 = 1302)
SIZES = [((1000, 500), (630, 322), (896, 448)), ((300, 200), (546, 364), None), ((60, 100), (350, 574), None),
         ((500, 1400), (266, 756), (462, 1302))]
MINICPM_SPECIALS = ("<unk>", "<s>", "</s>", "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>")


@pytest.mark.parametrize("size,grid", HAND)
def test_hand_computed_grids(size, grid):
    assert sliced_grid(*size) == grid


@pytest.mark.parametrize("size,source,refined", SIZES)
def test_hand_computed_sizes(size, source, refined):
    grid = sliced_grid(*size)
    assert best_resize(*size, allow_upscale=grid is None) == source
    assert (refine_size(*size, grid) if grid else None) == refined
    pieces = SliceSettings().slice_image(make_image(*size))
    assert pieces[0].size == source and len(pieces) == 1 + (grid[0] * grid[1] if grid else 0)
    if grid:
        assert {p.size for p in pieces[1:]} == {(refined[0] // grid[0], refined[1] // grid[1])}


def test_grid_rule_matches_transformers_minicpmv4_6():
    from transformers import MiniCPMV4_6ImageProcessor

    ip = MiniCPMV4_6ImageProcessor()
    sizes = [(w, h) for w in range(120, 2600, 97) for h in range(120, 2600, 131)] + [(s, s) for s in range(400, 2000, 50)]
    for w, h in sizes:
        theirs = ip.get_sliced_grid((h, w), 9, 448)  # (rows, cols)
        assert (None if theirs is None else (theirs[1], theirs[0])) == sliced_grid(w, h, 9, 448), (w, h)


def test_pixels_match_transformers_minicpmv4_6():
    """4.6 rounds sizes to patch x 4 (two 2x2 merges); with its patch 7 that is 28, so our rule at
    patch 28 must cut the very same slices, pixel for pixel (2.6's own rounding to 14 is covered
    by the hand-computed cases above)."""
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    ip = MiniCPMV4_6ImageProcessorPil(patch_size=7)
    plugin = MiniCPMVPlugin()
    for w, h in [(1000, 500), (60, 100), (500, 1400), (700, 700)]:
        image = make_image(w, h, seed=w)
        ref = ip(image, return_tensors="np")
        pixels, sizes = plugin.slice_tensors(image, SliceSettings(patch_size=28), None)
        assert sizes == [[th // 4, tw // 4] for th, tw in ref["target_sizes"].tolist()]
        start = 0
        for ours, (th, tw) in zip(pixels, ref["target_sizes"].tolist()):
            chunk = ref["pixel_values"][0][:, :, start:start + th * tw * 7]
            start += th * tw * 7
            theirs = chunk.reshape(3, 7, th, tw, 7).transpose(0, 2, 1, 3, 4).reshape(3, th * 7, tw * 7)
            expected = reshape_by_patch(torch.from_numpy(np.ascontiguousarray(theirs)).float(), 28)
            assert torch.allclose(ours, expected, atol=1e-6, rtol=0), (w, h)


def test_reshape_by_patch_matches_transformers():
    from transformers import MiniCPMV4_6ImageProcessor

    image = torch.randn(3, 28, 42)
    assert torch.equal(reshape_by_patch(image, 14), MiniCPMV4_6ImageProcessor().reshape_by_patch(image, 14))


def test_placeholder_text_layout(tmp_path):
    plugin = get_mm_plugin("minicpmv")
    img = make_image_file(str(tmp_path / "a.jpg"), 1000, 500)
    small = make_image_file(str(tmp_path / "b.jpg"), 300, 200)
    with no_pixel_decoding():  # counts from headers alone
        out = plugin.process_messages([{"role": "user", "content": "<image>and<image>"}], [img, small], [], [], None)
    text = out[0]["content"]
    unk = "<unk>" * 64
    first = f"<image_id>0</image_id><image>{unk}</image><slice>{unk}</slice><slice>{unk}</slice>"
    second = f"<image_id>1</image_id><image>{unk}</image>"
    assert text == f"{first}and{second}"
    tall = make_image_file(str(tmp_path / "c.jpg"), 500, 1400)
    text = plugin.process_messages([{"role": "user", "content": "<image>"}], [tall], [], [], None)[0]["content"]
    assert text.count("\n") == 2 and text.count("<slice>") == 3  # 1 column x 3 rows


@pytest.fixture(scope="module")
def processor():
    """The tokenizer side of the authors' processor (its image side is what this plugin implements)."""
    from types import SimpleNamespace

    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(MINICPM_SPECIALS), unk_token="<unk>",
                                  additional_special_tokens=list(MINICPM_SPECIALS[3:]))
    return SimpleNamespace(tokenizer=tok, image_processor=None)


def test_batch_inputs_line_up_with_tokens(tmp_path, processor):
    """Two images (one below a slice), a two-turn conversation, a text-only sample, a video:
    one ``image_bound`` span of query_num tokens per slice tensor, in order."""
    plugin = get_mm_plugin("minicpmv")
    images = [make_image_file(str(tmp_path / "w.jpg"), 1000, 500), make_image_file(str(tmp_path / "s.png"), 60, 100)]
    video = make_video_file(str(tmp_path / "v.mp4"), frames=4, width=640, height=400, fps=2)
    conv = [{"role": "user", "content": "<image>Compare <image>"}, {"role": "assistant", "content": "Alike."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    samples = [MMSample(conv, images=images), MMSample([{"role": "user", "content": "Hi"}]),
               MMSample([{"role": "user", "content": "<video>What moves?"}], videos=[video])]
    batch_ids = []
    for s in samples:
        text = render(plugin.process_messages(s.messages, s.images, s.videos, [], processor))
        batch_ids.append(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    mm = plugin.get_mm_inputs(images, [video], [], [2, 0, 0], [0, 0, 1], [0, 0, 0], batch_ids, processor)
    frames = len(plugin._regularize_videos([video])[0].frames)
    # image 0: source + 2 slices; image 1: source only; each 640x400 frame: ratio 1.28 -> 2 slices (max 2)
    assert [len(p) for p in mm["pixel_values"]] == [4, 0, 3 * frames]
    for pixels, sizes, bounds in zip(mm["pixel_values"], mm["tgt_sizes"], mm["image_bound"]):
        assert len(pixels) == len(sizes) == len(bounds)
        assert all((bounds[:, 1] - bounds[:, 0] == 64).tolist())
        for p, (th, tw) in zip(pixels, sizes.tolist()):
            assert p.shape == (3, 14, th * tw * 14)
    unk = processor.tokenizer.convert_tokens_to_ids("<unk>")
    for ids, bounds in zip(batch_ids, mm["image_bound"]):
        assert all(ids[i] == unk for start, end in bounds.tolist() for i in range(start, end))
    with pytest.raises(ValueError, match="images or videos"):
        plugin.process_messages([{"role": "user", "content": "<image><video>"}], images[:1], [video], [], processor)


def test_composite_layout_is_the_authors():
    entry = get_composite_model("minicpmv")
    assert (entry.projector_key, entry.vision_model_keys, entry.language_model_keys) == ("resampler", ["vpm"], ["llm"])
