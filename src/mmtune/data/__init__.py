"""Datasets: formats -> samples -> token ids (cached) -> padded multimodal batches."""

from .collator import MultiModalCollator
from .formats import Sample, normalize_row
from .loader import DataArguments, build_dataset, load_samples
from .tokenize import EncodeResult, encode_sample

__all__ = ["DataArguments", "EncodeResult", "MultiModalCollator", "Sample", "build_dataset", "encode_sample",
           "load_samples", "normalize_row"]
