"""Arguments that say which model to load and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
#: transformers' attention implementations by name (a Hub kernel ``org/name`` is accepted beside them)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class ModelArguments:
    """Where the model comes from and how it is materialised."""

    model_name_or_path: str = field(default="", metadata={"help": "Local folder or hub id."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "A saved LoRA adapter to load on top."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Only when you trust the checkpoint's code."})
    torch_dtype: str = field(
        default="auto", metadata={"help": "The dtype weights and activations run in. auto: the checkpoint's own on a "
                                          "device that computes in bf16, fp32 for a training run on a device "
                                          "without bf16 (a CPU).",
                                  "choices": ("auto", *DTYPES)})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "transformers' attention: sdpa, eager, flash_attention_2 (needs "
                                          "flash-attn), flash_attention_3, flex_attention, or a Hub kernel "
                                          "(org/name).",
                                  "choices": ATTN_IMPLEMENTATIONS, "pattern": r"[\w.-]+/[\w.:/-]+",
                                  "choices_hint": "a Hub kernel (org/name)"})
    quantization_bit: int | None = field(
        default=None, metadata={"help": "4 or 8 for QLoRA (bitsandbytes, GPU).", "choices": (4, 8)})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached; default: the "
                                                                  "Hugging Face cache."})
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    # training speed levers (mmtune.speed, one module per lever); each logs when applied
    fused_cross_entropy: bool = field(
        default=True, metadata={"help": "Chunked fused LM-head + cross-entropy: logits never materialised whole."})
    compile: bool | None = field(
        default=None, metadata={"help": "torch.compile each repeated block; default: on when training on CUDA."})
    compile_dynamic: bool | None = field(default=True, metadata={"help": "Dynamic shapes: no recompile per length."})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of the blocks."})
    compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode of the blocks, e.g. max-autotune-no-cudagraphs; default: "
                                         "inductor's (reduce-overhead is refused: CUDA graphs do not fit regional compile).",
                                 "choices": ("default", "lite", "max-autotune", "max-autotune-no-cudagraphs")})
    compile_cpp_wrapper: bool | str | None = field(
        default=None, metadata={"help": "inductor's C++ wrapper for the compiled decoder layers (less host time a "
                                        "kernel launch); default: on when training on CUDA. 'all': the vision "
                                        "blocks too, their varlen attention called as an aten op.", "choices": ("layers", "all")})
    compile_lean_guards: bool | None = field(
        default=None, metadata={"help": "Check only the guards a training run can change (training flags, "
                                        "inputs, global state) on each compiled block call; default: on when "
                                        "training on CUDA. Turn off for code that edits module attributes."})
    vision_varlen_attention: bool | None = field(
        default=None, metadata={"help": "Vision tower attention over all images in one varlen kernel; default: on "
                                        "with CUDA when torch has torch.nn.attention.varlen."})
    sync_free_forward: bool = field(
        default=True, metadata={"help": "Build in the collator, on the CPU, what the forward would derive on the GPU "
                                        "with host syncs (vision tower positions and cu_seqlens, placeholder "
                                        "checks, an all-ones mask, the loss rows); changes no result."})
    frozen_tower_no_grad: bool = field(
        default=True, metadata={"help": "Run a fully frozen vision/audio tower without autograd."})
    frozen_block_cuda_graphs: bool | None = field(
        default=None, metadata={"help": "Replay the blocks of a tower that runs without autograd from CUDA graphs, "
                                        "one per input signature seen twice (at most 8); default: on when training "
                                        "on CUDA. Replays the captured kernels: the same results."})
    gradient_checkpointing_layers: int | str = field(
        default="auto", metadata={"help": "Decoder layers to checkpoint; auto: fewest that fit the memory (CUDA), "
                                          "else all or none per gradient_checkpointing.", "choices": ("auto",)})
    memory_budget_gib: float | None = field(
        default=None, metadata={"help": "GPU memory the auto checkpointing plans for; default: what is free."})
    liger_kernels: bool | None = field(
        default=None, metadata={"help": "Liger's RMSNorm and SwiGLU modules; default: on with CUDA when installed."})
    # ---- native LLaVA (llava_llama): assemble a VLM from a Llama-architecture LM + a tower
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP / SigLIP checkpoint: builds llava_llama "
                                                                     "around model_name_or_path (a plain LM)."})
    mm_projector_type: str | None = field(default=None, metadata={"help": "linear, mlp<N>x_gelu or identity.",
                                                                  "choices": ("linear", "identity"),
                                                                  "pattern": r"mlp\d+x_gelu",
                                                                  "choices_hint": "mlp<N>x_gelu"})
    mm_vision_select_layer: int | None = field(
        default=None, metadata={"help": "Tower layer whose features the projector reads (negative: from the end); "
                                        "default: -2, as LLaVA."})
    mm_vision_select_feature: str | None = field(default=None, metadata={"help": "patch or cls_patch.",
                                                                         "choices": ("patch", "cls_patch")})
    mm_patch_merge_type: str | None = field(default=None, metadata={"help": "flat or spatial_unpad.",
                                                                    "choices": ("flat", "spatial", "spatial_unpad")})
    mm_use_im_start_end: bool | None = field(
        default=None, metadata={"help": "Wrap each image's features in <im_start>/<im_end> tokens; default: off."})
    mm_use_im_patch_token: bool | None = field(
        default=None, metadata={"help": "Add LLaVA's <im_patch> token to the tokenizer; default: off."})
    image_aspect_ratio: str | None = field(default=None, metadata={"help": "square, pad or anyres.",
                                                                   "choices": ("square", "pad", "anyres")})
    image_grid_pinpoints: Any = field(
        default=None, metadata={"help": "anyres: candidate grid sizes in pixels, [width, height] pairs as in LLaVA."})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "Stage-1 projector file to load."})

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
