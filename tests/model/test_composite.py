"""The composite registry against real (tiny, random) models: keys resolve, flags hold."""

import copy

import pytest
import torch

from mmtune.compat import LlavaMultiModalProjectorForYiVL
from mmtune.config import FinetuningArguments, ModelArguments
from mmtune.model.adapters import count_parameters, init_adapter
from mmtune.model.composite import (
    COMPOSITE_MODELS,
    autocast_projector_dtype,
    configure_visual_model,
    get_forbidden_modules,
    has_prefix,
    patch_target_modules,
)

from .conftest import tiny_configs, tiny_model

# model types registered without a transformers class here, and why
NOT_IN_TRANSFORMERS = {"minicpmv": "remote code only", "llava_llama": "mmtune's own (tested in tests/llava)"}


def test_registry_has_25_model_types():
    assert len(COMPOSITE_MODELS) >= 25, sorted(COMPOSITE_MODELS)


@pytest.mark.parametrize("model_type", sorted(tiny_configs()))
def test_keys_resolve_and_cover_every_parameter(model_type):
    if model_type not in COMPOSITE_MODELS:
        pytest.fail(f"fixture config of type {model_type} has no composite entry")
    entry = COMPOSITE_MODELS[model_type]
    model = tiny_model(model_type)
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    assert entry.get_projector(model) is not None
    for key in entry.vision_model_keys + entry.language_model_keys + [entry.projector_key]:
        assert any(n == key or n.startswith(key + ".") for n in names), f"{model_type}: {key} matches no module"
    keys = entry.vision_model_keys + entry.language_model_keys + [entry.projector_key]
    uncovered = [n for n, _ in model.named_parameters() if not has_prefix(n, keys)]
    assert not uncovered, f"{model_type}: parameters outside every component: {uncovered[:5]}"


def test_every_registered_type_with_a_transformers_class_is_built():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    missing = [t for t in COMPOSITE_MODELS if t in CONFIG_MAPPING_NAMES and t not in tiny_configs()]
    assert not missing, f"registered types with no tiny config to check their keys: {missing}"


FLAGS = [
    dict(),
    dict(freeze_vision_tower=False),
    dict(freeze_multi_modal_projector=False),
    dict(freeze_language_model=True, freeze_multi_modal_projector=False),
    dict(train_mm_proj_only=True),
]
FAMILIES = ["qwen2_vl", "llava", "gemma3", "qwen2_audio", "idefics3", "mllama"]


def _fresh(model_type):
    return copy.deepcopy(tiny_model(model_type))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f) or "defaults")
def test_full_and_freeze_requires_grad_follow_flags(model_type, flags):
    entry = COMPOSITE_MODELS[model_type]
    for method in ("full", "freeze"):
        args = FinetuningArguments(finetuning_type=method, **flags)
        model = init_adapter(_fresh(model_type), ModelArguments(), args)
        forbidden = get_forbidden_modules(model.config, args)
        for name, param in model.named_parameters():
            if has_prefix(name, forbidden):
                assert not param.requires_grad, f"{method}: {name} trains but is frozen by {flags}"
            elif method == "full":
                assert param.requires_grad, f"full: {name} should train"
        stats = count_parameters(model)
        if not args.freeze_multi_modal_projector:
            assert stats["projector"]["trainable"] == stats["projector"]["total"] > 0
        if args.freeze_vision_tower:
            assert stats["vision"]["trainable"] == 0
        if method == "freeze" and not args.freeze_language_model:
            assert 0 < stats["language"]["trainable"] < stats["language"]["total"]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f) or "defaults")
def test_lora_never_lands_on_forbidden_or_conflicting_modules(model_type, flags):
    entry = COMPOSITE_MODELS[model_type]
    args = FinetuningArguments(finetuning_type="lora", **flags)
    base = _fresh(model_type)
    targets = patch_target_modules(base, args, "all")
    forbidden = get_forbidden_modules(base.config, args)
    assert not any(has_prefix(t, forbidden) for t in targets)
    if args.freeze_language_model and args.freeze_vision_tower:  # only the projector is left: it trains in full
        model = init_adapter(base, ModelArguments(), args)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(has_prefix(n, [entry.projector_key]) for n in trainable)
        assert not any("lora_" in n for n, _ in model.named_parameters())
        return
    assert targets
    assert not any(c in t for t in targets for c in entry.lora_conflict_keys)
    model = init_adapter(base, ModelArguments(), args)
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert not has_prefix(name, forbidden), name
        elif param.requires_grad:  # only the projector (modules_to_save) trains besides LoRA
            assert has_prefix(name, [entry.projector_key]) and not args.freeze_multi_modal_projector, name
    if not args.freeze_vision_tower:
        assert any("lora_" in n and has_prefix(n, entry.vision_model_keys) for n, _ in model.named_parameters())


def _batch(model_type, model):
    from mmtune.testing import get_fixture, load_processor, make_image
    from mmtune.plugins import get_mm_plugin
    from mmtune.testing.parity import MMSample, plugin_ids

    name = {"qwen2_vl": "qwen2_vl", "llava": "llava", "gemma3": "gemma3"}[model_type]
    processor = load_processor(name)
    plugin = get_mm_plugin(name)
    img = make_image(64, 48)
    sample = MMSample([{"role": "user", "content": "<image>what"}, {"role": "assistant", "content": "a red circle"}], [img])
    ids = torch.tensor([plugin_ids(plugin, processor, sample)])
    mm = plugin.get_mm_inputs([img], [], [], [1], [0], [0], [ids[0].tolist()], processor)
    batch = {"input_ids": ids, "labels": ids.clone(), **mm}
    if plugin.token_type_key:
        batch[plugin.token_type_key] = plugin.mm_token_type_ids(ids, processor)
    return batch


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava", "gemma3"])
@pytest.mark.parametrize("method", ["lora", "freeze", "full"])
def test_one_step_changes_only_trainable_parameters(model_type, method):
    args = FinetuningArguments(finetuning_type=method, freeze_multi_modal_projector=False)
    model = init_adapter(_fresh(model_type), ModelArguments(), args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = model(**_batch(model_type, model)).loss
    loss.backward()
    optim.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if not param.requires_grad:
            assert not changed, f"{method}: frozen {name} changed"
    trained = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p.detach())]
    assert trained, "nothing trained"


def test_adapter_round_trip_and_merge(tmp_path):
    from peft import PeftModel

    args = FinetuningArguments(finetuning_type="lora", freeze_multi_modal_projector=False, lora_rank=4)
    model = init_adapter(_fresh("qwen2_vl"), ModelArguments(), args)
    for name, param in model.named_parameters():  # make the adapter non-trivial (lora_B starts at zero)
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    batch = _batch("qwen2_vl", model)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_fresh("qwen2_vl"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(**batch).logits, logits, atol=1e-5)


def test_adapter_weights_take_the_compute_dtype_unless_fp32_is_asked():
    for fp32, expected in ((False, torch.bfloat16), (True, torch.float32)):
        base = _fresh("qwen2_vl").to(torch.bfloat16)
        model = init_adapter(base, ModelArguments(), FinetuningArguments(adapter_fp32=fp32))
        dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert dtypes == {expected}


def test_projector_autocast_hook_only_for_quantised_models():
    model = _fresh("llava")
    assert autocast_projector_dtype(model, ModelArguments()) is None
    handle = autocast_projector_dtype(model, ModelArguments(quantization_bit=4, torch_dtype="bf16"))
    projector = COMPOSITE_MODELS["llava"].get_projector(model)
    out = projector(torch.randn(1, 3, model.config.vision_config.hidden_size))
    assert out.dtype == torch.bfloat16
    handle.remove()


def test_yi_vl_projector_is_swapped_in_while_building():
    from mmtune.model.loader import load_model

    config = copy.deepcopy(tiny_configs()["llava"])
    config.is_yi_vl_derived_model = True
    config = configure_visual_model(config)
    model = load_model(ModelArguments(torch_dtype="fp32"), FinetuningArguments(finetuning_type="full"), config=config)
    projector = COMPOSITE_MODELS["llava"].get_projector(model)
    assert isinstance(projector, LlavaMultiModalProjectorForYiVL)
    assert isinstance(projector.linear_2, torch.nn.LayerNorm) and isinstance(projector.linear_4, torch.nn.LayerNorm)
    from transformers.models.llava import modeling_llava

    assert modeling_llava.LlavaMultiModalProjector is not LlavaMultiModalProjectorForYiVL  # restored


def test_qlora_without_bitsandbytes_fails_clearly():
    import importlib.util

    from mmtune.model.adapters import prepare_quantization

    with pytest.raises(ValueError, match="4 or 8"):
        prepare_quantization(ModelArguments(quantization_bit=3))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="bitsandbytes"):
            prepare_quantization(ModelArguments(quantization_bit=4))
    else:
        assert prepare_quantization(ModelArguments()) == {}


def test_dora_adapters_and_checkpointing_with_a_frozen_tower_still_train():
    from mmtune.model.loader import enable_gradient_checkpointing

    model = _fresh("qwen2_vl")
    enable_gradient_checkpointing(model)
    model = init_adapter(model, ModelArguments(), FinetuningArguments(use_dora=True, lora_rank=4))
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())  # DoRA's magnitudes
    model.train()
    loss = model(**_batch("qwen2_vl", model)).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A gets 0 while B starts at 0
    assert grads and all(g is not None for g in grads)  # the frozen tower/embeddings did not cut the graph
    assert any(g.abs().sum() > 0 for g in grads)
