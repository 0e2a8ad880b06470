"""MiniCPM-V 2.6's slicing rule: hand-computed cases, and the grid rule cross-checked against
transformers' MiniCPM-V 4.6 image processor, which ships the same log-ratio rule."""

import math

import pytest
import torch

from mmtune.families.minicpmv import MiniCPMVPlugin, sliced_grid
from mmtune.plugins import get_mm_plugin
from mmtune.testing import make_image_file


# Hand-computed (scale_resolution 448, max_slice_nums 9; 448^2 = 200,704):
#  448x448: ratio 1.0 -> multiple 1 -> no slices
#  1000x500: ratio 2.49 -> multiple 3; candidates 2: (1,2),(2,1); 3: (1,3),(3,1); 4: (1,4),(2,2),(4,1)
#            log(2)=0.693; errors: (2,1) |0.693-0.693|=0 -> (cols 2, rows 1)
#  500x1400: ratio 3.49 -> multiple 4; log(500/1400)=-1.030; (1,3): |-1.030+1.099|=0.069,
#            (1,4): |-1.030+1.386|=0.356, (1,5): 0.579, (1,2): 0.337 -> (1, 3)
#  2000x2000: ratio 19.9 -> multiple min(20, 9)=9; candidates 8 and 9 (10 > 9): (3,3) error 0 -> (3, 3)
#  600x400: ratio 1.196 -> multiple 2; counts 2 and 3; log 1.5 = 0.405; (2,1): |0.405-0.693| = 0.288,
#            (1,2): 1.098, (3,1): 0.693, (1,3): 1.504 -> (2, 1)
HAND = [((448, 448), None), ((1000, 500), (2, 1)), ((500, 1400), (1, 3)), ((2000, 2000), (3, 3)), ((600, 400), (2, 1))]


@pytest.mark.parametrize("size,grid", HAND)
def test_hand_computed_grids(size, grid):
    assert sliced_grid(*size) == grid


def test_grid_rule_matches_transformers_minicpmv4_6():
    from transformers import MiniCPMV4_6ImageProcessor

    ip = MiniCPMV4_6ImageProcessor()
    for w in range(120, 2600, 97):
        for h in range(120, 2600, 131):
            theirs = ip.get_sliced_grid((h, w), 9, 448)  # (rows, cols)
            ours = sliced_grid(w, h, 9, 448)
            assert (None if theirs is None else (theirs[1], theirs[0])) == ours, (w, h)


def test_placeholder_text_layout(tmp_path):
    plugin = get_mm_plugin("minicpmv")
    img = make_image_file(str(tmp_path / "a.jpg"), 1000, 500)
    small = make_image_file(str(tmp_path / "b.jpg"), 300, 200)
    out = plugin.process_messages([{"role": "user", "content": "<image>and<image>"}], [img, small], [], [], None)
    text = out[0]["content"]
    unk = "<unk>" * 64
    first = f"<image_id>0</image_id><image>{unk}</image><slice>{unk}</slice><slice>{unk}</slice>"
    second = f"<image_id>1</image_id><image>{unk}</image>"
    assert text == f"{first}and{second}"
    tall = make_image_file(str(tmp_path / "c.jpg"), 500, 1400)
    text = plugin.process_messages([{"role": "user", "content": "<image>"}], [tall], [], [], None)[0]["content"]
    assert text.count("\n") == 2 and text.count("<slice>") == 3  # 1 column x 3 rows


def test_image_bounds_span_the_query_tokens():
    from mmtune.testing import build_bpe_tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=build_bpe_tokenizer(
        ["<unk>", "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>"]))
    ids = tok("hi <image><unk><unk></image><slice><unk><unk></slice> ok", add_special_tokens=False)["input_ids"]
    bounds = MiniCPMVPlugin.image_bounds(ids, tok)
    assert bounds.shape == (2, 2)
    for start, end in bounds.tolist():
        assert end - start == 2 and all(ids[i] == tok.convert_tokens_to_ids("<unk>") for i in range(start, end))
