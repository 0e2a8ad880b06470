"""Datasets: formats -> samples -> token ids (cached) -> padded multimodal batches.

Their arguments (:class:`~mmtune.config.DataArguments`) live in :mod:`mmtune.config` with every other."""

from .collator import MultiModalCollator
from .formats import Sample, normalize_row
from .loader import build_dataset, load_samples
from .tokenize import EncodeResult, encode_sample

__all__ = ["EncodeResult", "MultiModalCollator", "Sample", "build_dataset", "encode_sample", "load_samples",
           "normalize_row"]
