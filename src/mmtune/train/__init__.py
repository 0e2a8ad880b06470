"""Training: the recipe that assembles the pipeline, the SFT run on HF Trainer, progress and plots.

Arguments are parsed by :func:`mmtune.config.parse_config`."""

from .recipe import Parts, build, build_saved
from .sft import run_sft

__all__ = ["Parts", "build", "build_saved", "run_sft"]
