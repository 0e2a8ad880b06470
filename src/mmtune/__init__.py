"""mmtune: exact, fast fine-tuning of multimodal language models."""

__version__ = "0.1.0"
