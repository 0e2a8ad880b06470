"""Argument dataclasses (low in the tree: model/ and train/ both read them)."""

from .finetuning_args import FinetuningArguments
from .model_args import ModelArguments

__all__ = ["FinetuningArguments", "ModelArguments"]
