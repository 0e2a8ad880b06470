"""Checkpoints written by the original LLaVA code (haotian-liu/LLaVA) load and run, and images are
preprocessed, tiled and merged as that code does.

The checkpoints are written as its ``train.py`` writes them (see ``write_original_checkpoint``):
its config.json keys (``model_type: llava_llama``, ``mm_vision_tower`` naming a CLIP folder, no
``vision_config``), weights under its names, a tokenizer without ``<image>``. Every expected value
below comes from the plain parts (CLIP, Llama, the projector's tensors) or is worked out by hand
from the original algorithm, never from the code under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, CLIPImageProcessor

from mmtune.testing.stand_ins.llava import build_llama_tokenizer
from mmtune.llava import IMAGE_TOKEN_INDEX, LlavaMetaForCausalLM, load_pretrained_model, preprocess_images
from mmtune.llava.meta import unpad_features
from mmtune.llava.mm_utils import background_colour
from mmtune.testing import make_image

from .conftest import make_model, reference_logits, write_original_checkpoint

IDS = [1, 20, IMAGE_TOKEN_INDEX, 30, 31]
BASE_VOCAB = len(build_llama_tokenizer(()))  # the original's tokenizer: no <image>


def _clip_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


def _logits(model, images):
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS]), images=images).logits


@pytest.fixture
def pixels():
    torch.manual_seed(5)
    return torch.randn(1, 3, 56, 56)


# ---------------------------------------------------------------- loading
FULL_VARIANTS = pytest.mark.parametrize("variant", [
    dict(),  # the tower inside the checkpoint (frozen: the same as mm_vision_tower's)
    dict(tower_in_checkpoint=False, weights_file="pytorch_model.bin"),  # saved without it (FSDP keeps it out)
    dict(tower_shift=0.01, unfreeze_mm_vision_tower=True),  # a trained tower: the checkpoint's weights win
], ids=["tower-in-checkpoint", "tower-from-mm_vision_tower", "trained-tower"])


@FULL_VARIANTS
def test_original_full_checkpoint_through_load_pretrained_model(tmp_path, pixels, variant):
    checkpoint = write_original_checkpoint(tmp_path, **variant)
    want = reference_logits(checkpoint, IDS, pixels)
    tokenizer, model, processor, context = load_pretrained_model(checkpoint.path)
    assert model.get_vision_tower().is_loaded and context == 2048
    torch.testing.assert_close(_logits(model, pixels), want, atol=1e-5, rtol=0)
    assert tokenizer.tokenize("<image>") == ["<image>"] and tokenizer.convert_tokens_to_ids("<image>") == BASE_VOCAB
    # the returned processor takes the prompt and the image the way the checkpoint was trained
    batch = processor(text="USER: <image>\nWhat is it? ASSISTANT:", images=[make_image(80, 50)])
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1 and batch["images"].shape == (1, 3, 56, 56)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], images=batch["images"])
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - 1 + 16


@FULL_VARIANTS
def test_original_full_checkpoint_through_auto_model_for_causal_lm(tmp_path, pixels, variant):
    checkpoint = write_original_checkpoint(tmp_path, **variant)
    want = reference_logits(checkpoint, IDS, pixels)
    auto = AutoModelForCausalLM.from_pretrained(checkpoint.path).eval()  # mmtune.llava is imported
    assert type(auto).__name__ == "LlavaLlamaForCausalLM" and auto.get_vision_tower().is_loaded
    torch.testing.assert_close(_logits(auto, pixels), want, atol=1e-5, rtol=0)
    _, info = AutoModelForCausalLM.from_pretrained(checkpoint.path, output_loading_info=True)
    assert not [k for k in info["missing_keys"] if "vision_tower" in k]
    bare = AutoModel.from_pretrained(checkpoint.path)  # the base model (no LM head) as well
    tower = bare.get_vision_tower()
    assert tower.is_loaded
    assert all(torch.equal(v, checkpoint.tower[k]) for k, v in tower.vision_tower.state_dict().items())


def test_original_lora_checkpoint_with_non_lora_trainables(tmp_path, pixels):
    checkpoint = write_original_checkpoint(tmp_path, kind="lora")
    tokenizer, model, _, _ = load_pretrained_model(checkpoint.path, model_base=checkpoint.base)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, pixels), reference_logits(checkpoint, IDS, pixels), atol=1e-5, rtol=0)
    assert tokenizer.convert_tokens_to_ids("<image>") == BASE_VOCAB  # the base tokenizer, <image> added


def test_original_projector_only_checkpoint_over_a_base_lm(tmp_path, pixels):
    checkpoint = write_original_checkpoint(tmp_path, kind="projector")
    assert json.load(open(f"{checkpoint.path}/config.json"))["tune_mm_mlp_adapter"] is True
    tokenizer, model, _, _ = load_pretrained_model(checkpoint.path, model_base=checkpoint.base)
    assert model.get_vision_tower().is_loaded
    torch.testing.assert_close(_logits(model, pixels), reference_logits(checkpoint, IDS, pixels), atol=1e-5, rtol=0)
    assert tokenizer.tokenize("a <image> b").count("<image>") == 1


def test_a_loaded_original_checkpoint_resaves_whole(tmp_path, pixels):
    """Re-saved, the checkpoint records the tower's config and weights: it loads without
    ``mm_vision_tower`` being reachable."""
    checkpoint = write_original_checkpoint(tmp_path, tower_in_checkpoint=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path).eval()
    model.save_pretrained(tmp_path / "resaved")
    config = json.load(open(tmp_path / "resaved" / "config.json"))
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    config["mm_vision_tower"] = str(tmp_path / "gone")
    json.dump(config, open(tmp_path / "resaved" / "config.json", "w"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    torch.testing.assert_close(_logits(again, pixels), reference_logits(checkpoint, IDS, pixels), atol=1e-5, rtol=0)


def test_an_unreachable_tower_is_a_clear_error(tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, tower_in_checkpoint=False)
    config = json.load(open(f"{checkpoint.path}/config.json"))
    config["mm_vision_tower"] = str(tmp_path / "no-such-clip")
    json.dump(config, open(f"{checkpoint.path}/config.json", "w"))
    with pytest.raises(OSError, match=r"mm_vision_tower='.*no-such-clip'.*local CLIP / SigLIP checkpoint"):
        AutoModelForCausalLM.from_pretrained(checkpoint.path)


class Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_image_token_comes_after_the_embedded_tokens_and_keeps_other_specials():
    """The original adds ``<im_patch>`` then ``<im_start>``/``<im_end>`` to its base tokenizer and
    never ``<image>``: those keep the ids they were trained with; ``<image>`` goes last, and the
    tokenizer's other special tokens stay special."""
    tok = build_llama_tokenizer(("<video>",))
    base = len(tok)
    embedded = LlavaMetaForCausalLM.add_image_tokens(Args(mm_use_im_patch_token=True, mm_use_im_start_end=True), tok)
    assert embedded == ["<im_patch>", "<im_start>", "<im_end>"]
    assert [tok.convert_tokens_to_ids(t) for t in [*embedded, "<image>"]] == [base, base + 1, base + 2, base + 3]
    assert "<video>" in tok.all_special_tokens  # not replaced
    assert tok.tokenize("a<image>b").count("<image>") == 1
    assert tok.decode(tok("a <image> b")["input_ids"], skip_special_tokens=True).split() == ["a", "b"]


# ---------------------------------------------------------------- preprocessing as the original
def test_pad_fills_with_the_truncated_mean_colour():
    ip = _clip_processor()
    # int(0.48145466 * 255) = int(122.77), int(0.4578275 * 255) = int(116.75), int(0.40821073 * 255) = int(104.09)
    assert background_colour(ip) == (122, 116, 104)
    red = Image.new("RGB", (112, 56), (255, 0, 0))
    canvas = Image.new("RGB", (112, 112), (122, 116, 104))
    canvas.paste(red, (0, 28))
    out = preprocess_images([red], ip, "pad")
    assert torch.equal(out["images"], ip([canvas], return_tensors="pt")["pixel_values"])


def _views(ip, base: Image.Image, tiles: list[Image.Image]) -> torch.Tensor:
    return ip([base, *tiles], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("side", [56, 28])
def test_anyres_square_images_tile_width_first(side):
    """A square image at or below the tower's size ties on every candidate of
    [[56, 112], [112, 56], [112, 112]]; the first wins, read as width 56, height 112: one column
    of two tiles (read as height, width it would be one row of two)."""
    ip = _clip_processor()
    image = make_image(side, side)
    # the image scaled by 56 / side (aspect kept, the long side capped) onto a black 56 x 112,
    # centred: at (0, 28); tiles are its top and bottom halves
    canvas = Image.new("RGB", (56, 112), (0, 0, 0))
    canvas.paste(image.resize((56, 56), Image.Resampling.BICUBIC), (0, 28))
    want = _views(ip, image.resize((56, 56), Image.Resampling.BICUBIC),
                  [canvas.crop((0, 0, 56, 56)), canvas.crop((0, 56, 56, 112))])
    out = preprocess_images([image], ip, "anyres", [[56, 112], [112, 56], [112, 112]])
    assert out["image_sizes"].tolist() == [[side, side]]
    assert torch.equal(out["images"][0], want)


def test_anyres_asymmetric_pinpoints_and_a_padded_batch():
    """[[168, 56], [112, 112]] and a 100 x 40 image: 168 x 56 scales it by min(1.68, 1.4) to
    140 x 56, keeping all 4000 px and wasting 9408 - 4000; 112 x 112 keeps 4000 and wastes
    12544 - 4000: the grid is 3 columns x 1 row (read as height, width it would be 2 x 2)."""
    ip = _clip_processor()
    wide, square = make_image(100, 40), make_image(56, 56, seed=1)
    # 100 x 40 -> scale_w 1.68 > scale_h 1.4: height 56, width ceil(100 * 1.4) = 140; pasted at (14, 0)
    canvas = Image.new("RGB", (168, 56), (0, 0, 0))
    canvas.paste(wide.resize((140, 56), Image.Resampling.BICUBIC), (14, 0))
    want_wide = _views(ip, wide.resize((56, 56), Image.Resampling.BICUBIC),
                       [canvas.crop((x, 0, x + 56, 56)) for x in (0, 56, 112)])
    # 56 x 56: 168 x 56 keeps 3136 and wastes 6272, 112 x 112 keeps 3136 and wastes 9408 -> 3 x 1 as well,
    # the image scaled by min(3, 1) onto 168 x 56 at (56, 0)
    canvas = Image.new("RGB", (168, 56), (0, 0, 0))
    canvas.paste(square, (56, 0))
    want_square = _views(ip, square, [canvas.crop((x, 0, x + 56, 56)) for x in (0, 56, 112)])
    out = preprocess_images([wide, square], ip, "anyres", [[168, 56], [112, 112]])
    assert out["images"].shape == (2, 4, 3, 56, 56) and out["image_sizes"].tolist() == [[100, 40], [56, 56]]
    assert torch.equal(out["images"][0], want_wide) and torch.equal(out["images"][1], want_square)

    tall = make_image(40, 100, seed=2)  # 112 x 112 now: 2 x 2 tiles; the stack is padded to the longest
    out = preprocess_images([tall, wide], ip, "anyres", "[(168, 56), (112, 112)]")
    assert out["images"].shape == (2, 5, 3, 56, 56) and out["images"][1, 4].abs().max() == 0


# ---------------------------------------------------------------- stage-1 data as the original
#: a row of LLaVA's LCS-558k (blip_laion_cc_sbu_558k.json) as it ships
LCS_558K_ROW = {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
    {"from": "human", "value": "Give a brief description of the image.\n<image>"},
    {"from": "gpt", "value": "a red square on a pale background"}]}


@pytest.mark.parametrize("im_start_end", [False, True])
def test_plain_template_tokenises_an_lcs_558k_row_as_the_original(tmp_path, im_start_end):
    """``preprocess_plain``: the human turn becomes ``<image>`` alone (its text and any
    ``<im_start>``/``<im_end>`` wrapping dropped), then the caption and ``\n``; labels ignore
    BOS and the image. Ids and labels equal the original's, worked out from the tokenizer."""
    import copy
    import os

    from mmtune.data.formats import normalize_row
    from mmtune.data.tokenize import encode_sample
    from mmtune.llava import LlavaLlamaProcessor
    from mmtune.plugins import get_mm_plugin
    from mmtune.templates import get_template
    from mmtune.testing import make_image_file

    from .conftest import original_plain_ids_and_labels

    tok = build_llama_tokenizer(("<image>",))
    tok.add_bos_token = True  # Vicuna's tokenizer, as stage 1 runs with it
    processor = LlavaLlamaProcessor(_clip_processor(), tok, mm_use_im_start_end=im_start_end)
    os.makedirs(tmp_path / "00453")
    make_image_file(str(tmp_path / LCS_558K_ROW["image"]), 90, 60)
    sample = normalize_row(copy.deepcopy(LCS_558K_ROW), media_dir=str(tmp_path))
    enc = encode_sample(sample, get_template("llava_llama_plain"), get_mm_plugin("llava_llama"), tok, processor)
    human, caption = (turn["value"] for turn in LCS_558K_ROW["conversations"])
    want_ids, want_labels = original_plain_ids_and_labels(human, caption, tok)
    assert want_ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX] and len(want_ids) > 4
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels


# ---------------------------------------------------------------- merging as the original
def _grid_rows(tiles: list[torch.Tensor], cols: int, rows: int) -> list[list[torch.Tensor]]:
    """Feature rows of the assembled grid: row r, column c is tile (r // 4) * cols + c // 4 at
    patch (r % 4, c % 4) (4 x 4 patches per tile, each tile's patches row-major)."""
    return [[tiles[(r // 4) * cols + c // 4][(r % 4) * 4 + c % 4] for c in range(cols * 4)] for r in range(rows * 4)]


def test_spatial_unpad_of_a_square_image_stacks_tiles_vertically():
    model = make_model(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                       image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    torch.manual_seed(2)
    tiles = torch.randn(1, 3, 3, 56, 56)
    with torch.no_grad():
        got = model.image_features(tiles, torch.tensor([[56, 56]]))[0]
        enc = model.encode_images(tiles[0])
    newline = model.get_model().image_newline
    # grid 1 column x 2 rows: 8 x 4 patches; unpad: 56 / 56 > 4 / 8, int(56 * (4 / 56)) = 4 rows kept,
    # (8 - 4) // 2 = 2 cut above and below
    rows = _grid_rows(list(enc[1:]), cols=1, rows=2)[2:6]
    want = torch.cat([enc[0], torch.stack([f for row in rows for f in [*row, newline]])])
    assert got.shape == (16 + 4 * 5, 64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_spatial_unpad_with_asymmetric_pinpoints():
    model = make_model(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                       image_grid_pinpoints=[[168, 56], [112, 112]])
    torch.manual_seed(3)
    tiles = torch.randn(1, 5, 3, 56, 56)  # a padded stack: the 100 x 40 image has 1 + 3 views
    with torch.no_grad():
        got = model.image_features(tiles, torch.tensor([[100, 40]]))[0]
        enc = model.encode_images(tiles[0, :4])
    newline = model.get_model().image_newline
    # grid 3 columns x 1 row: 4 x 12 patches; unpad: 100 / 40 < 12 / 4, int(100 * (4 / 40)) = 10
    # columns kept, (12 - 10) // 2 = 1 cut left and right
    rows = [row[1:11] for row in _grid_rows(list(enc[1:]), cols=3, rows=1)]
    want = torch.cat([enc[0], torch.stack([f for row in rows for f in [*row, newline]])])
    assert got.shape == (16 + 4 * 11, 64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]])
    with torch.no_grad():
        assert model(input_ids=ids, images=tiles, image_sizes=torch.tensor([[100, 40]])).logits.shape[1] == 2 + 60


def test_unpad_truncates_the_kept_extent():
    """A 147 x 196 image in a 4 x 8 grid: 147 * (4 / 196) = 2.9999999999999996 in floating point;
    the original keeps int() = 2 columns, (8 - 2) // 2 = 3 cut on each side (rounding would keep 4)."""
    assert 147 * (4 / 196) < 3 and math.floor(147 * (4 / 196)) == 2
    plane = torch.arange(32.0).view(1, 4, 8)
    assert torch.equal(unpad_features(plane, (147, 196)), plane[:, :, 3:5])
    assert torch.equal(unpad_features(plane.transpose(1, 2), (196, 147)), plane.transpose(1, 2)[:, 3:5, :])
