"""Every argument a run takes, and the one parser that fills them.

A flat YAML file plus ``key=value`` overrides (:func:`parse_config`) fills five dataclasses:
:class:`ModelArguments` (which model and how it is materialised), :class:`DataArguments` (which
data and how each sample is shaped), :class:`FinetuningArguments` (what trains),
:class:`MMTrainingArguments` (mmtune's training options) and transformers' ``TrainingArguments``.
Each default is stated once, on its field; values are converted and checked, and settings that
contradict each other refused, before anything loads (:class:`ConfigError`, one line).
This package sits low in the tree: data, model and train read it; it imports none of them.
"""

from .data import DataArguments
from .finetuning import FinetuningArguments
from .model import ModelArguments
from .parsing import describe_options, option_groups, parse_config, parse_predict_config
from .predict import PredictArguments
from .training import MMTrainingArguments
from .values import ConfigError

__all__ = ["ConfigError", "DataArguments", "FinetuningArguments", "MMTrainingArguments", "ModelArguments",
           "PredictArguments", "describe_options", "option_groups", "parse_config", "parse_predict_config"]
