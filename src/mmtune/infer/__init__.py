"""Inference: a chat engine over a trained model (or base + adapter), and LoRA export."""

from .chat import ChatEngine, ChatSession, GenerationOptions
from .export import export_model

__all__ = ["ChatEngine", "ChatSession", "GenerationOptions", "export_model"]
