"""Arguments of ``mmtune predict``: where predictions go, batching, decoding, the backend.

The model comes from :class:`~mmtune.config.ModelArguments` (``model_name_or_path``: a base,
an output folder, a ``checkpoint-N``, an adapter folder or an export; ``adapter_name_or_path``)
and the samples from :class:`~mmtune.config.DataArguments` (``dataset``; with ``val_size`` the
held-out part training set aside, else every row).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PredictArguments:
    """Batched generation over a data set, its outputs and metrics."""

    output_dir: str = field(default="outputs/predict", metadata={
        "help": "Where generated_predictions.jsonl and predict_results.json are written. A rerun into the same "
                "folder with the same settings resumes: finished rows are kept, not generated again."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an output_dir that holds predictions of other settings (they are removed); off: "
                "such a folder is an error."})
    predict_batch_size: int = field(default=8, metadata={
        "help": "Prompts generated together (sorted by length, so a batch holds prompts of similar lengths)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per answer."})
    temperature: float = field(default=0.0, metadata={
        "help": "0: greedy, the same answer every run; above 0: sampling (as `mmtune chat --temperature`)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling (with temperature > 0)."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling (with temperature > 0)."})
    repetition_penalty: float | None = field(default=None, metadata={"help": "Above 1 discourages repeats."})
    min_new_tokens: int | None = field(default=None, metadata={
        "help": "At least this many new tokens per answer (benchmarks that time a fixed length)."})
    cache_implementation: str | None = field(default=None, metadata={
        "help": "transformers' KV cache for generate: static preallocates it (fixed shapes); default: dynamic.",
        "choices": ("dynamic", "static", "offloaded", "offloaded_static", "quantized")})
    backend: str = field(default="transformers", metadata={
        "help": "transformers (generate, any family mmtune trains); vllm: vLLM's engine where installed "
                "(pip install 'mmtune[vllm]'), the same output files.", "choices": ("transformers", "vllm")})
    predict_seed: int = field(default=0, metadata={"help": "Seed of sampling (temperature > 0)."})

    def __post_init__(self) -> None:
        if self.predict_batch_size < 1:
            raise ValueError(f"predict_batch_size must be >= 1, not {self.predict_batch_size}")
