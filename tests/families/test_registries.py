"""The registries are complete at ``import mmtune`` and every family declares itself: its model
class and packing layout (the values below are the tables ``model/loader.py`` and
``data/packing.py`` kept before the families declared them), and no other module of the product
names a family's model type."""

import ast
import json
import pathlib
import subprocess
import sys
import types

import pytest

import mmtune
from mmtune.model.composite import (
    COMPOSITE_MODELS,
    CompositeModel,
    packable_model_types,
    packing_layout,
)
from mmtune.plugins import PLUGINS
from mmtune.templates import TEMPLATES

SRC = pathlib.Path(mmtune.__file__).parent

#: the packing tables data/packing.py kept before the families declared their layout
OLD_MROPE_MODEL_TYPES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"}
#: types that declared a packing layout since, each checked exact in tests/data/test_packing.py
NEW_MROPE_MODEL_TYPES = {"glm46v"}
OLD_CAUSAL_MODEL_TYPES = {"llava", "llava_next", "llava_next_video", "llava_onevision", "video_llava", "qwen2_audio",
                          "internvl", "mistral3", "idefics3", "smolvlm"}
#: the class table model/loader.py kept (AUDIO_CLASSES) before the families declared their class
OLD_AUDIO_CLASSES = {"qwen2_audio": "Qwen2AudioForConditionalGeneration",
                     "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration"}
#: classes declared since (the thinker alone trains)
NEW_CLASSES = {"qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerForConditionalGeneration"}

#: (module of src/mmtune, model type) pairs allowed to name a family's model type outside its
#: family file, and why
ALLOWED = {
    # mmtune's native LLaVA: the package defines the llava_llama model type (its config class)
    # and the loader assembles it around a plain language model, which no family file can do
    **{(f"llava/{name}", "llava_llama"): "the native LLaVA's own model type"
       for name in ("__init__.py", "builder.py", "configuration.py")},
    ("llava/builder.py", "llava"): "the original LLaVA code's rule on model names holding 'llava'",
    ("model/loader.py", "llava_llama"): "the loader assembles the native LLaVA",
    ("model/folders.py", "llava_llama"): "a native LLaVA folder is buildable",
    # an upstream mend names the architecture whose release it mends (mmtune.compat)
    ("compat.py", "llama4"): "transformers 5.24's Llama 4 mend",
    # the demo trains one family, chosen by name
    ("demo.py", "qwen2_vl"): "the demo's family",
}


def test_registries_are_complete_right_after_import_mmtune():
    """A fresh interpreter that imports only ``mmtune`` reads the full tables (no lookup first)."""
    code = ("import json, mmtune\n"
            "from mmtune.model.composite import COMPOSITE_MODELS\n"
            "from mmtune.plugins.registry import PLUGINS\n"
            "from mmtune.templates.template import TEMPLATES\n"
            "print(json.dumps([sorted(COMPOSITE_MODELS), sorted(PLUGINS), sorted(TEMPLATES)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    composite, plugins, templates = json.loads(out.stdout.strip().splitlines()[-1])
    assert composite == sorted(COMPOSITE_MODELS) and len(composite) >= 25
    assert plugins == sorted(PLUGINS)
    assert templates == sorted(TEMPLATES)
    # every family's plugin and template is in: those named by any composite entry, and each family file's
    assert {entry.template for entry in COMPOSITE_MODELS.values() if entry.template} <= set(templates)
    assert {TEMPLATES[name].plugin for name in templates if TEMPLATES[name].plugin} <= set(plugins)


def test_every_family_module_is_imported_and_no_list_of_them_is_kept():
    import mmtune.families as families

    names = families.family_modules()
    assert len(names) >= 20 and "qwen2_vl" in names and "base" in names
    assert all(f"mmtune.families.{name}" in sys.modules for name in names)
    assert not hasattr(families, "load_families") and not hasattr(families, "FAMILY_MODULES")


def test_every_stand_in_is_registered_with_mmtune_testing():
    import mmtune.testing.stand_ins as stand_ins
    from mmtune.testing import FIXTURES

    modules = stand_ins.stand_in_modules()
    assert set(modules) <= set(mmtune.families.family_modules())  # one stand-in file per family at most
    assert {"qwen2_vl", "llava", "llava_llama"} <= set(modules)
    assert {"qwen2_vl", "qwen2_5_vl", "llava", "llava_llama", "mistral3", "smolvlm"} <= set(FIXTURES)


def test_family_files_hold_no_test_fixture():
    """A family file is product code: plugin, template(s), composite entry; its stand-ins live in
    mmtune/testing/stand_ins/."""
    for path in sorted((SRC / "families").glob("*.py")):
        text = path.read_text()
        assert "mmtune.testing" not in text and "register_fixture" not in text, path.name


def test_packing_layouts_are_the_old_tables():
    mrope = OLD_MROPE_MODEL_TYPES | NEW_MROPE_MODEL_TYPES
    assert {t for t in COMPOSITE_MODELS if packing_layout(t) == "mrope"} == mrope
    assert {t for t in COMPOSITE_MODELS if packing_layout(t) == "causal"} == OLD_CAUSAL_MODEL_TYPES
    assert packable_model_types() == mrope | OLD_CAUSAL_MODEL_TYPES
    assert packing_layout("no_such_model_type") is None


def test_model_classes_are_the_old_table():
    import transformers

    from mmtune.model.loader import model_class_for

    declared = {t: entry.model_class for t, entry in COMPOSITE_MODELS.items() if entry.model_class is not None}
    assert declared == {**OLD_AUDIO_CLASSES, **NEW_CLASSES}
    for model_type, name in {**OLD_AUDIO_CLASSES, **NEW_CLASSES}.items():
        assert model_class_for(types.SimpleNamespace(model_type=model_type)) is getattr(transformers, name)
    assert model_class_for(types.SimpleNamespace(model_type="qwen2_vl")) is transformers.AutoModelForImageTextToText
    assert model_class_for(types.SimpleNamespace(model_type="llama")) is transformers.AutoModelForCausalLM


def test_an_unknown_packing_layout_is_refused():
    with pytest.raises(ValueError, match="packing"):
        CompositeModel(model_type="x", projector_key="p", packing="rows")  # type: ignore[arg-type]


def _string_constants(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_family_model_type_is_named_outside_its_family_file():
    """The product names a family's model type only in that family's file (and its stand-ins);
    the short list ``ALLOWED`` says where else, and why."""
    model_types = set(COMPOSITE_MODELS)
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("families/", "testing/stand_ins/")):
            continue
        found += [f"{rel}:{line}: {value!r}" for line, value in _string_constants(path)
                  if value in model_types and (rel, value) not in ALLOWED]
    assert not found, "model types named outside their family file:\n" + "\n".join(found)


def test_no_default_template_is_made_up():
    """A model type whose family declares no template has none: resolving it is an error that
    names the choices (no silent fallback to another family's template)."""
    from mmtune.config import ConfigError
    from mmtune.model.saved import resolve_template

    undeclared = [t for t, entry in COMPOSITE_MODELS.items() if entry.template is None]
    assert undeclared  # e.g. VipLLaVA: its own format has no template here
    with pytest.raises(ConfigError, match="known: "):
        resolve_template(None, undeclared[0], None, option="--template")
