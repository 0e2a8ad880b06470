"""Merge a LoRA adapter into its base and save a model + processor transformers can load,
with mmtune's config, so that ``mmtune chat`` on the export needs no flag."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def export_record(record: dict[str, Any], model_type: str | None, template: str | None, merged: bool,
                  source: str) -> dict[str, Any]:
    """mmtune_config.json of an export: the source's record with the template and family kept,
    ``finetuning_type`` "full" once an adapter is merged (the export is a whole model), and
    where it came from."""
    from mmtune.templates import get_template

    out = dict(record)
    out["model_type"] = model_type or record.get("model_type")
    if template:
        out["template"] = template
        if record.get("template") != template or not record.get("plugin"):
            out["plugin"] = get_template(template).plugin
    if merged:
        out["finetuning_type"] = "full"
    out["exported_from"] = source
    return out


def export_inputs(folder: Any, model_path: str) -> list[tuple[str, str, str | None]]:
    """What an export reads, as :func:`~mmtune.model.saved.check_apart` takes them: the model
    folder, the adapter, and the adapter's base (its ``adapter_config.json``'s
    ``base_model_name_or_path``): a merged model written over that base would leave the adapter
    pointing at weights that already hold it."""
    import json
    import os

    from mmtune.model.saved import ADAPTER_CONFIG_NAME

    if not folder.adapter_path:
        return [("model folder", "MODEL", model_path)]
    if folder.adapter_path == model_path:  # an adapter folder alone: its config names the base
        inputs = [("adapter folder", "MODEL", model_path),
                  ("adapter's base model", "base_model_name_or_path of its adapter_config.json", folder.model_path)]
    else:
        inputs = [("model folder", "MODEL", model_path), ("adapter folder", "--adapter", folder.adapter_path)]
    try:
        with open(os.path.join(folder.adapter_path, ADAPTER_CONFIG_NAME)) as fh:
            base = json.load(fh).get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    if base and base != folder.model_path:  # --adapter on another copy of its base: protect both
        inputs.append(("adapter's base model", "base_model_name_or_path of its adapter_config.json", base))
    return inputs


def prepare_export_dir(output_dir: str, folder: Any, model_path: str, overwrite: bool) -> None:
    """Check ``output_dir`` before anything loads: never the model, the adapter or the adapter's
    base (nor inside or around them), whatever ``overwrite``; a non-empty folder only with
    ``overwrite``, which then removes what an earlier run or export left there (other files are
    kept), so the folder holds this export alone."""
    from mmtune.errors import OutputFolderError
    from mmtune.model.saved import check_apart, clear_run_files, folder_entries, short_list

    check_apart(output_dir, export_inputs(folder, model_path), "export folder")
    entries = folder_entries(output_dir)
    if not entries:
        return
    if not overwrite:
        raise OutputFolderError(f"export folder {output_dir} is not empty ({short_list(entries)}): pick a new or "
                                f"empty folder, or pass --overwrite to replace the model there (files mmtune did "
                                f"not write are kept)")
    clear_run_files(output_dir, "--overwrite")


def export_model(model_path: str, output_dir: str, adapter_path: str | None = None, dtype: str = "auto",
                 template: str | None = None, overwrite: bool = False) -> str:
    """``model_path``: a full model folder (a final output folder or a ``checkpoint-N``), or
    the base when ``adapter_path`` is given (an adapter folder alone is accepted too: its
    ``adapter_config.json`` names the base). Writes the (merged) model, its processor and
    ``mmtune_config.json`` (template, plugin, model type; ``finetuning_type: full`` after a
    merge) to ``output_dir``; returns ``output_dir``. ``template`` overrides the recorded one.
    ``output_dir`` must be new or empty unless ``overwrite`` (see :func:`prepare_export_dir`);
    that is checked before the model loads."""
    from mmtune.model.saved import inspect_folder, write_mmtune_config
    from mmtune.train import recipe

    folder = inspect_folder(model_path, adapter_path)
    prepare_export_dir(output_dir, folder, model_path, overwrite)
    # no template known: the export still works; chat on it will ask for --template
    parts = recipe.build_saved(folder, template=template, dtype=dtype, template_required=False, device="cpu")
    name = parts.template.name if parts.template is not None else None
    logger.info("export: template %s (%s)", name, parts.template_source)
    tokenizer, processor, model = parts.tokenizer, parts.processor, parts.model
    merged = hasattr(model, "merge_and_unload")
    if merged:
        model = model.merge_and_unload()
        logger.info("merged adapter %s into %s", folder.adapter_path, folder.model_path)
    model.config.use_cache = True
    model.save_pretrained(output_dir)
    (processor or tokenizer).save_pretrained(output_dir)
    record = export_record(folder.record, folder.model_type, name, merged, folder.files)
    write_mmtune_config(output_dir, record)
    return output_dir
