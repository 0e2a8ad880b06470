"""Argument dataclasses (low in the tree: model/ and train/ both read them)."""

from .finetuning_args import FinetuningArguments
from .model_args import ModelArguments
from .parsing import ConfigError

__all__ = ["ConfigError", "FinetuningArguments", "ModelArguments"]
