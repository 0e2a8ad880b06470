"""Every example YAML names only options mmtune knows (a typo would fail at the user's first run)."""

import glob
import os

import pytest

from mmtune.train import parse_config

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "*.yaml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_config_parses(path, tmp_path):
    model_args, data_args, finetuning_args, _, training_args = parse_config(
        path, [f"output_dir={tmp_path}", "bf16=false", "use_cpu=true"])
    assert model_args.model_name_or_path and data_args.dataset and data_args.template
    assert finetuning_args.finetuning_type in ("lora", "full", "freeze")


def test_llava_examples_are_the_two_stages():
    stage1 = parse_config(os.path.join(os.path.dirname(EXAMPLES[0]), "llava_llama_stage1_pretrain.yaml"), ["bf16=false"])
    stage2 = parse_config(os.path.join(os.path.dirname(EXAMPLES[0]), "llava_llama_stage2_finetune.yaml"), ["bf16=false"])
    assert stage1[2].train_mm_proj_only and stage1[2].freeze_language_model
    assert not stage2[2].freeze_language_model and not stage2[2].freeze_multi_modal_projector
    assert stage2[2].freeze_vision_tower
    assert stage2[0].pretrain_mm_mlp_adapter.endswith("mm_projector.safetensors")
