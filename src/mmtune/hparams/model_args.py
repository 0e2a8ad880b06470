"""Arguments that say which model to load and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class ModelArguments:
    """Where the model comes from and how it is materialised."""

    model_name_or_path: str = field(default="", metadata={"help": "Local folder or hub id."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "A saved LoRA adapter to load on top."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Only when you trust the checkpoint's code."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, bf16, fp16 or fp32."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})
    quantization_bit: int | None = field(default=None, metadata={"help": "4 or 8 for QLoRA (bitsandbytes, GPU)."})
    cache_dir: str | None = None
    revision: str = "main"
    extra: dict[str, Any] = field(default_factory=dict)

    def compute_dtype(self, config_dtype: Any = None) -> torch.dtype:
        """The dtype weights and activations run in: the requested one, else the checkpoint's,
        else bf16 where the device supports it, else fp32."""
        if self.torch_dtype != "auto":
            if self.torch_dtype not in DTYPES:
                raise ValueError(f"torch_dtype must be one of auto, {', '.join(sorted(DTYPES))}; got {self.torch_dtype!r}")
            return DTYPES[self.torch_dtype]
        if isinstance(config_dtype, torch.dtype):
            return config_dtype
        if isinstance(config_dtype, str) and config_dtype in DTYPES:
            return DTYPES[config_dtype]
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
