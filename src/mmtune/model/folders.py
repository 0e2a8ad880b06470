"""What a model path is (a model folder, a LoRA adapter folder or a Hub id), checked before
anything loads.

transformers reads any path it cannot open as a Hub repository id, so a mistyped folder reads
as a repo-id error, a LoRA output folder given as the model fails on a missing ``config.json``
and a vision encoder given as the model fails deep inside loading. The checks here run first
(on file names and ``config.json`` alone, no weights, no tokenizer) and raise
:class:`~mmtune.errors.ModelFolderError`, one line that names the path, the option it came from
and what to give instead; the CLI prints it and exits with status 2.

* :func:`locate` decides what a path is: an existing folder is a model folder (``config.json``)
  or an adapter folder (``adapter_config.json``; beside full weights, the folder's own run
  decides, as :func:`mmtune.model.saved.saved_product` says for ``chat`` and ``export``); a
  path that looks local (``./``, ``/``, ``~``, more than one ``/``, not a valid repo id, or
  whose first part is an existing folder) and does not exist is "model folder not found"; any
  other name is tried as a Hub id, and transformers' own message is kept after what was tried.
* :func:`check_model_args` is for a run (``mmtune train``, ``check-data``, ``env``): the model
  must be a model folder of a type mmtune can build, the adapter an adapter folder.
* :func:`check_saved_paths` is for ``mmtune chat`` / ``export``, which also take an adapter
  folder alone as MODEL (its base comes from its ``adapter_config.json``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from mmtune.errors import ModelFolderError
from mmtune.model.saved import saved_product

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: files a tokenizer is read from (a LoRA folder mmtune writes carries one; peft's alone do not)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")

@dataclass(frozen=True)
class ModelPath:
    """A located model path: ``kind`` model (``config`` is its config.json) or adapter (``base`` is
    the ``base_model_name_or_path`` its adapter_config.json names; ``config`` is the config.json
    an adapter of an assembled LLaVA carries, else empty); ``local``: a folder, not a Hub id."""

    path: str
    kind: Literal["model", "adapter"]
    local: bool
    config: dict[str, Any] = field(default_factory=dict)
    base: str | None = None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def looks_local(path: str) -> bool:
    """Whether ``path`` can only be meant as a local path: it starts with ``.``, ``/`` or ``~``,
    is no valid Hub repo id (``name`` or ``org/name``: more than one ``/``, a trailing ``/``,
    spaces ...), or its ``org`` part is an existing local folder."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if path.startswith((".", "/", "~")) or os.sep != "/" and os.sep in path:
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    head, sep, _ = path.partition("/")
    return bool(sep) and os.path.isdir(head)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_json(path: str, option: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{option}: {path} cannot be read as JSON ({_one_line(exc)}); restore the file from "
                               f"where the model came from") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{option}: {path} holds no JSON object; restore the file from where the model "
                               f"came from")
    return data


def has_tokenizer(folder: str) -> bool:
    """Whether ``folder`` holds a tokenizer's files."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def _local(path: str, option: str) -> ModelPath:
    config_file = os.path.join(path, CONFIG_NAME)
    adapter_file = os.path.join(path, ADAPTER_CONFIG_NAME)
    has_config, has_adapter = os.path.isfile(config_file), os.path.isfile(adapter_file)
    if has_adapter and saved_product(path) == "adapter":
        adapter = _read_json(adapter_file, option)
        config = _read_json(config_file, option) if has_config else {}
        return ModelPath(path, "adapter", True, config, adapter.get("base_model_name_or_path") or None)
    if has_config:
        return ModelPath(path, "model", True, _read_json(config_file, option))
    raise ModelFolderError(f"not a model folder (no {CONFIG_NAME}): {path} ({option}); a model folder holds "
                           f"{CONFIG_NAME} and the weights, a LoRA adapter folder {ADAPTER_CONFIG_NAME}")


def _hub(path: str, option: str, hub_kwargs: dict[str, Any]) -> ModelPath:
    """``path`` as a Hub id (or one in the local Hub cache): its config.json, else its
    adapter_config.json; neither is transformers' message after what was tried."""
    from transformers import PretrainedConfig
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "revision") and v is not None}
    try:
        config, _ = PretrainedConfig.get_config_dict(path, **kwargs)
        return ModelPath(path, "model", False, dict(config))
    except (OSError, ValueError) as exc:
        first = exc
    try:
        adapter_file = cached_file(path, ADAPTER_CONFIG_NAME, **kwargs)
    except (OSError, ValueError):
        adapter_file = None
    if adapter_file:
        adapter = _read_json(adapter_file, option)
        return ModelPath(path, "adapter", False, {}, adapter.get("base_model_name_or_path") or None)
    raise ModelFolderError(f"{option} {path}: no local folder of that name, and loading it as a Hub model id failed: "
                           f"{_one_line(first)}") from None


def locate(path: str, option: str = "model_name_or_path", hub_kwargs: dict[str, Any] | None = None,
           what: str = "model folder") -> ModelPath:
    """What ``path`` is (see the module's docstring); a ModelFolderError where it is none of a
    model folder, an adapter folder or a loadable Hub id. ``option`` names where the path came
    from (a config key, or the command's argument) in the messages."""
    if os.path.isdir(path):
        return _local(path, option)
    if os.path.exists(path):
        raise ModelFolderError(f"{option}: {path} is a file, not a {what}; give the folder that holds {CONFIG_NAME} "
                               f"(or {ADAPTER_CONFIG_NAME})")
    if path.startswith("~") and os.path.isdir(os.path.expanduser(path)):
        raise ModelFolderError(f"{what} not found: {path} ({option}; a ~ is not expanded here: write "
                               f"{os.path.expanduser(path)})")
    if looks_local(path):
        where = option if os.path.isabs(path) else f"{option}; a relative path starts from {os.getcwd()}"
        raise ModelFolderError(f"{what} not found: {path} ({where})")
    return _hub(path, option, hub_kwargs or {})


def check_buildable(model: ModelPath, option: str) -> None:
    """A ModelFolderError where mmtune has no model class for ``model``'s config: mmtune trains
    and loads the vision-language families it registers, the image/video/audio-text-to-text
    models of transformers, its native LLaVA and causal language models (text alone); a model
    with its own code (``auto_map``) is left to ``trust_remote_code``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    from .composite import get_composite_model

    config, model_type = model.config, model.model_type
    where = f"{model.path} ({option})"
    if "auto_map" in config:
        return
    if not model_type:
        raise ModelFolderError(f"{where}: its {CONFIG_NAME} names no model_type; restore the file from where the "
                               f"model came from")
    if model_type == "llava_llama" or config.get("mm_vision_tower"):
        return  # mmtune's native LLaVA (its own config class, registered with transformers' Auto classes)
    if get_composite_model(model_type) is not None and model_type not in CONFIG_MAPPING_NAMES:
        import transformers

        raise ModelFolderError(f"{where}: model_type {model_type!r} has an mmtune family but needs a newer "
                               f"transformers than the installed {transformers.__version__}, which does not have it; "
                               f"upgrade transformers")
    if get_composite_model(model_type) is not None:
        return
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    if model_type not in CONFIG_MAPPING_NAMES:
        import transformers

        raise ModelFolderError(f"{where}: model_type {model_type!r} is unknown to transformers "
                               f"{transformers.__version__}; upgrade transformers, or set trust_remote_code for a "
                               f"model that ships its own code")
    from mmtune.llava.encoders import _FULL, TOWERS

    if model_type in TOWERS or model_type in _FULL:  # what native LLaVA takes as its vision_tower
        raise ModelFolderError(f"{where} is not a vision-language model (model_type {model_type}) but a vision "
                               f"encoder: give it as vision_tower: {model.path} beside a Llama-architecture language "
                               f"model as model_name_or_path (mmtune's native LLaVA)")
    raise ModelFolderError(f"{where} is not a vision-language model (model_type {model_type}): mmtune trains the "
                           f"vision-language and audio-language families it knows (README, Families) and causal "
                           f"language models; give one of those")


def adapter_as_model(model: ModelPath) -> str:
    """The error for an adapter folder given where a run needs the model."""
    base = model.base or "(its adapter_config.json names none)"
    return (f"{model.path} is a LoRA adapter folder (its base is {base}): use model_name_or_path: {base} with "
            f"adapter_name_or_path: {model.path}")


def _check_adapter(path: str, option: str, hub_kwargs: dict[str, Any], model_hint: str) -> ModelPath:
    adapter = locate(path, option, hub_kwargs, what="adapter folder")
    if adapter.kind != "adapter":
        raise ModelFolderError(f"{option}: {path} is a full model folder ({CONFIG_NAME} and weights, no "
                               f"{ADAPTER_CONFIG_NAME}), not a LoRA adapter: give it as {model_hint}, or give the "
                               f"folder a LoRA run saved")
    return adapter


def hub_kwargs_of(model_args: Any) -> dict[str, Any]:
    return {"cache_dir": model_args.cache_dir, "revision": model_args.revision}


def check_model_args(model_args: Any, for_tokenizer: bool = False) -> ModelPath | None:
    """The checks of a run's ``model_name_or_path`` and ``adapter_name_or_path``: the model is a
    model folder (an adapter folder is an error naming its base and the two keys to use) of a
    type mmtune can build (a plain LM with ``vision_tower`` becomes a native LLaVA: allowed),
    the adapter an adapter folder. None when there is no path (a model built from a config).

    ``for_tokenizer``: the path is read for its tokenizer alone, so an adapter folder that
    carries one passes, and so does a folder of tokenizer / processor files alone (``chat`` and ``export`` read a LoRA output folder's own tokenizer); a run
    still gets the error from the check of its config, before the data or the model is read."""
    path = model_args.model_name_or_path
    if not path:
        return None
    if for_tokenizer and os.path.isdir(path) and has_tokenizer(path) and not any(
            os.path.isfile(os.path.join(path, name)) for name in (CONFIG_NAME, ADAPTER_CONFIG_NAME)):
        return None  # a tokenizer / processor folder alone (benchmarks and tests read one): nothing to build
    hub = hub_kwargs_of(model_args)
    model = locate(path, "model_name_or_path", hub)
    if model.kind == "adapter" and not (for_tokenizer and (not model.local or has_tokenizer(model.path))):
        raise ModelFolderError(adapter_as_model(model))
    if model_args.adapter_name_or_path:
        _check_adapter(model_args.adapter_name_or_path, "adapter_name_or_path", hub, "model_name_or_path")
    if model.kind == "model" and not model_args.vision_tower:
        check_buildable(model, "model_name_or_path")
    return model


def check_saved_paths(model_path: str, adapter_path: str | None = None) -> ModelPath:
    """The checks of ``mmtune chat MODEL [--adapter A]`` / ``mmtune export MODEL OUT [--adapter A]``:
    MODEL is a model folder or Hub id, or an adapter folder alone whose ``adapter_config.json``
    names a base that exists; ``--adapter`` is an adapter folder. Returns the model that will
    be loaded (the base, for an adapter folder)."""
    model = locate(model_path, "MODEL")
    if model.kind == "adapter":
        if adapter_path:
            raise ModelFolderError(f"MODEL {model_path} is a LoRA adapter folder and --adapter {adapter_path} is "
                                   f"given too: give the base model as MODEL with --adapter, or the adapter folder "
                                   f"alone")
        if not model.base:
            raise ModelFolderError(f"{model_path}/{ADAPTER_CONFIG_NAME} names no base_model_name_or_path; pass the "
                                   f"base model as MODEL and this folder as --adapter")
        option = f"the base_model_name_or_path of {model_path}/{ADAPTER_CONFIG_NAME}; pass the base as MODEL " \
                 f"and {model_path} as --adapter"
        base = locate(model.base, option)
        if base.kind == "adapter":
            raise ModelFolderError(f"{model.base} ({option}) is itself a LoRA adapter folder")
        check_buildable(base, "the base of " + model_path)
        return base
    if adapter_path:
        _check_adapter(adapter_path, "--adapter", {}, "MODEL")
    check_buildable(model, "MODEL")
    return model
