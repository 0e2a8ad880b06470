"""Training: arguments from YAML, the SFT recipe on HF Trainer, progress and plots."""

from .args import parse_config
from .sft import run_sft

__all__ = ["parse_config", "run_sft"]
