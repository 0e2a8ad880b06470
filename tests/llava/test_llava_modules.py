"""Towers, projectors, vision-module initialisation, stage-1 projector files, tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig

from mmtune.testing.stand_ins.llava_llama import TINY_TOWER, plain_llama_dir, tiny_tokenizer
from mmtune.llava import (
    IMAGE_TOKEN_INDEX,
    LlavaConfig,
    LlavaLlamaForCausalLM,
    VisionTower,
    build_vision_projector,
)

from .conftest import make_model

TOWER = {k: v for k, v in TINY_TOWER.items() if k != "model_type"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(3)
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(path)
    return str(path)


def test_tower_select_layer_and_feature(clip_dir):
    images = torch.randn(2, 3, 56, 56)
    patch = VisionTower(clip_dir, select_layer=-2, select_feature="patch")
    cls = VisionTower(clip_dir, select_layer=-1, select_feature="cls_patch")
    with torch.no_grad():
        hidden = patch.vision_tower(images, output_hidden_states=True).hidden_states
        torch.testing.assert_close(patch(images), hidden[-2][:, 1:])
        torch.testing.assert_close(cls(images), hidden[-1])
    assert patch.num_tokens == 16 and cls.num_tokens == 17 and patch.hidden_size == 32
    assert not any(p.requires_grad for p in patch.parameters())


def test_delayed_tower_loads_on_request(clip_dir):
    tower = VisionTower(clip_dir, delay_load=True)
    assert not tower.is_loaded and tower.hidden_size == 32
    with pytest.raises(RuntimeError, match="not loaded"):
        tower(torch.randn(1, 3, 56, 56))
    tower.load_model()
    assert tower(torch.randn(1, 3, 56, 56)).shape == (1, 16, 32)


def test_siglip_tower_has_no_cls():
    vc = SiglipVisionConfig(**TOWER).to_dict()
    tower = VisionTower(None, vision_config=vc)
    assert tower(torch.randn(1, 3, 56, 56)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="no CLS token"):
        VisionTower(None, select_feature="cls_patch", vision_config=vc)
    assert type(tower.image_processor()).__name__ == "SiglipImageProcessor"


@pytest.mark.parametrize("kind,shapes", [
    ("linear", [(64, 32), (64,)]),
    ("mlp2x_gelu", [(64, 32), (64,), (64, 64), (64,)]),
    ("mlp3x_gelu", [(64, 32), (64,), (64, 64), (64,), (64, 64), (64,)]),
])
def test_projector_types(kind, shapes):
    proj = build_vision_projector(LlavaConfig(hidden_size=64, num_attention_heads=4, mm_hidden_size=32,
                                              mm_projector_type=kind))
    assert [tuple(p.shape) for p in proj.parameters()] == shapes
    assert proj(torch.randn(3, 32)).shape == (3, 64)


def test_projector_errors():
    with pytest.raises(ValueError, match="identity projector needs"):
        build_vision_projector(LlavaConfig(hidden_size=64, num_attention_heads=4, mm_hidden_size=32,
                                           mm_projector_type="identity"))
    with pytest.raises(ValueError, match="unknown mm_projector_type"):
        build_vision_projector(LlavaConfig(hidden_size=64, num_attention_heads=4, mm_hidden_size=32,
                                           mm_projector_type="conv"))


def _plain_lm(tmp_path):
    """A base Llama LM saved to disk (what stage 1 starts from)."""
    return plain_llama_dir(str(tmp_path))


class Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_stage1_projector_file_loads_into_stage2_model(clip_dir, tmp_path):
    from safetensors.torch import save_file

    base = _plain_lm(tmp_path)
    stage1 = LlavaLlamaForCausalLM.from_pretrained(base)
    stage1.get_model().initialize_vision_modules(Args(vision_tower=clip_dir, mm_projector_type="mlp2x_gelu"))
    assert stage1.config.mm_hidden_size == 32 and stage1.config.vision_config["model_type"] == "clip_vision_model"
    with torch.no_grad():
        for p in stage1.get_model().mm_projector.parameters():
            p.normal_()
    tower = stage1.get_vision_tower()
    position = next(m for n, m in tower.named_modules() if n.endswith("position_embedding")).weight
    state = {f"model.mm_projector.{k}": v for k, v in stage1.get_model().mm_projector.state_dict().items()}
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"] = position + 1
    save_file(state, str(tmp_path / "mm_projector.safetensors"))
    torch.save({k: v for k, v in state.items() if "mm_projector" in k}, tmp_path / "mm_projector.bin")

    for name in ("mm_projector.safetensors", "mm_projector.bin"):
        stage2 = LlavaLlamaForCausalLM.from_pretrained(base)
        stage2.get_model().initialize_vision_modules(Args(vision_tower=clip_dir, mm_projector_type="mlp2x_gelu",
                                                          pretrain_mm_mlp_adapter=str(tmp_path / name)))
        for a, b in zip(stage1.get_model().mm_projector.parameters(), stage2.get_model().mm_projector.parameters()):
            assert torch.equal(a, b)
        pos2 = next(m for n, m in stage2.get_vision_tower().named_modules() if n.endswith("position_embedding"))
        assert torch.equal(pos2.weight, position + 1) == (name.endswith("safetensors"))


def test_mismatched_or_corrupt_projector_is_a_clear_error(clip_dir, tmp_path):
    from safetensors.torch import save_file

    base = _plain_lm(tmp_path)
    model = LlavaLlamaForCausalLM.from_pretrained(base)
    save_file({"model.mm_projector.weight": torch.zeros(64, 32), "model.mm_projector.bias": torch.zeros(64)},
              str(tmp_path / "linear.safetensors"))
    with pytest.raises(ValueError, match="does not match mm_projector_type='mlp2x_gelu'.*missing"):
        model.get_model().initialize_vision_modules(Args(vision_tower=clip_dir, mm_projector_type="mlp2x_gelu",
                                                         pretrain_mm_mlp_adapter=str(tmp_path / "linear.safetensors")))
    save_file({"mm_projector.weight": torch.zeros(64, 16), "mm_projector.bias": torch.zeros(64)},
              str(tmp_path / "narrow.safetensors"))
    model.get_model().initialize_vision_modules(Args(vision_tower=clip_dir, mm_projector_type="linear"))
    with pytest.raises(ValueError, match=r"shape mismatches \['weight: file \(64, 16\) vs model \(64, 32\)'\]"):
        model.get_model().load_projector(str(tmp_path / "narrow.safetensors"))
    (tmp_path / "corrupt.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read projector file .*corrupt.bin"):
        model.get_model().load_projector(str(tmp_path / "corrupt.bin"))
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no mm_projector weights"):
        model.get_model().load_projector(str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError):
        model.get_model().load_projector(str(tmp_path / "absent.bin"))


def test_initialize_vision_tokenizer_adds_start_end_rows():
    model = make_model()
    tok = tiny_tokenizer()
    rows = model.get_input_embeddings().weight.shape[0]
    added = model.initialize_vision_tokenizer(Args(mm_use_im_start_end=True), tok)
    assert added == 2 and model.get_input_embeddings().weight.shape[0] == rows + 2
    start = tok.convert_tokens_to_ids("<im_start>")
    torch.testing.assert_close(model.get_input_embeddings().weight[start],
                               model.get_input_embeddings().weight[:rows].mean(0))
    assert model.config.mm_use_im_start_end
    assert model.initialize_vision_tokenizer(Args(mm_use_im_start_end=True), tok) == 0  # idempotent
    assert len(tok.tokenize("<image>")) == 1


def test_anyres_spatial_unpad_feature_count_equals_llava_next():
    """The unpadded grid + newline count equals transformers' LLaVA-NeXT count for the same tiling."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaNextProcessor

    from mmtune.llava import preprocess_images

    pinpoints = [[56, 112], [112, 56], [112, 112]]
    model = make_model(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=pinpoints)
    ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    images = [Image.new("RGB", (100, 40)), Image.new("RGB", (50, 90)), Image.new("RGB", (56, 56))]
    batch = preprocess_images(images, ip, "anyres", pinpoints)
    feats = model.image_features(batch["images"], batch["image_sizes"])
    ref = LlavaNextProcessor.__new__(LlavaNextProcessor)
    ref.patch_size, ref.vision_feature_select_strategy, ref.num_additional_image_tokens = 14, "full", 0
    ref.image_processor = type("P", (), {"image_grid_pinpoints": pinpoints})()
    for f, image in zip(feats, images):
        want = ref._get_number_of_features(image.height, image.width, 56, 56)
        assert f.shape == (want, 64)
    # a batch of anyres images runs through forward and splices each image's own count
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5], [1, 6, IMAGE_TOKEN_INDEX]])
    with torch.no_grad():
        out = model(input_ids=ids, images=batch["images"][:2], image_sizes=batch["image_sizes"][:2])
    assert out.logits.shape[1] == 2 + max(feats[0].shape[0], feats[1].shape[0])


def test_pad_aspect_ratio_fills_with_the_mean_colour():
    from PIL import Image
    from transformers import CLIPImageProcessor

    from mmtune.llava import expand2square, preprocess_images

    ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    square = expand2square(Image.new("RGB", (40, 20), (255, 0, 0)), (1, 2, 3))
    assert square.size == (40, 40) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((20, 20)) == (255, 0, 0)
    out = preprocess_images([Image.new("RGB", (112, 56), (255, 0, 0))], ip, "pad")
    # the padded band is the mean colour, which normalises to ~0
    assert out["images"].shape == (1, 3, 56, 56)
    assert out["images"][0, :, 2, 28].abs().max() < 0.02
    assert out["images"][0, :, 28, 28].abs().max() > 0.5
