"""Inference: a chat engine over a trained model (or base + adapter), and LoRA export."""

from .chat import ChatEngine
from .export import export_model

__all__ = ["ChatEngine", "export_model"]
