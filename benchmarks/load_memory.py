"""Load a Qwen2-VL-2B-sized model (real config sizes, random weights) with LoRA and a frozen
tower; print trainable parameters per component and GPU memory after load.

    python benchmarks/load_memory.py            # GPU, bf16, LoRA r8 on all LM linears
    python benchmarks/load_memory.py --tiny     # CPU smoke test (tiny sizes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mmtune.config import FinetuningArguments, ModelArguments
from mmtune.model.adapters import count_parameters
from mmtune.model.loader import load_model

#: Qwen2-VL-2B-Instruct's published config (sizes only; weights are random)
QWEN2_VL_2B = dict(
    text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True,
)


def qwen2_vl_config(tiny: bool = False):
    from transformers import AutoConfig

    if tiny:
        from mmtune.testing import get_fixture

        return get_fixture("qwen2_vl").tiny_config()
    return AutoConfig.for_model("qwen2_vl", **QWEN2_VL_2B)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (smoke test)")
    parser.add_argument("--method", default="lora", choices=["lora", "freeze", "full"])
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    config = qwen2_vl_config(args.tiny)
    model_args = ModelArguments(torch_dtype="bf16" if device == "cuda" else "fp32")
    ft_args = FinetuningArguments(finetuning_type=args.method, lora_rank=8, lora_target="all")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.device(device):
        model = load_model(model_args, ft_args, is_trainable=True, config=config)
    seconds = time.perf_counter() - start
    stats = count_parameters(model)
    result = {
        "model": "Qwen2-VL-2B sizes (random weights)" if not args.tiny else "tiny qwen2_vl",
        "method": args.method, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(model_args.compute_dtype()), "load_seconds": round(seconds, 2), "parameters": stats,
    }
    if device == "cuda":
        result["memory_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        result["memory_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 3)
    print(f"{'component':<10} {'trainable':>14} {'total':>14} {'%':>9}")
    for part, s in stats.items():
        pct = 100 * s["trainable"] / s["total"] if s["total"] else 0.0
        print(f"{part:<10} {s['trainable']:>14,} {s['total']:>14,} {pct:>8.4f}%")
    if device == "cuda":
        print(f"GPU memory after load: {result['memory_allocated_gib']} GiB allocated, "
              f"{result['memory_reserved_gib']} GiB reserved")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
