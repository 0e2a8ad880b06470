"""Inference: a chat engine over a trained model (or base + adapter), batch prediction with
metrics, an OpenAI-compatible server (:mod:`mmtune.infer.serve`, imported on its own: it needs
FastAPI), and LoRA export."""

from .chat import ChatEngine, ChatSession, Generated, GenerationOptions
from .export import export_model
from .metrics import compute_metrics
from .predict import predict, predict_folder

__all__ = ["ChatEngine", "ChatSession", "Generated", "GenerationOptions", "compute_metrics", "export_model", "predict",
           "predict_folder"]
