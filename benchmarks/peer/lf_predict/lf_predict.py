"""Same as `llamafactory-cli train PREDICT.yaml [key=value ...]` on one GPU (LLaMA-Factory's `do_predict`
with `predict_with_generate`), plus:

- every answer exactly NEW_TOKENS long (default: 64), as benchmarks/predict_speed.py forces for mmtune: a
  generation_config folder with min_new_tokens = max_new_tokens = NEW_TOKENS is written and passed as
  Seq2SeqTrainingArguments' `generation_config` (the trainer installs it on the model; LLaMA-Factory's own
  generating arguments have no min_new_tokens), and `max_new_tokens=NEW_TOKENS` is appended;
- a callback recording the wall time of the prediction loop (trainer built -> last batch generated), every
  batch's time and the peak GPU memory, written to BENCH_JSON (default ./bench_predict.json).

LLaMA-Factory scores predict_with_generate's outputs with jieba + rouge_chinese + nltk (ComputeSimilarity, after
the loop). Where one of them is missing (the GPU machine has none), that scorer would fail on its first row, so
the workflow's ComputeSimilarity name is replaced by one returning no scores; the loop figure never includes
scoring either way. Usage: python lf_predict.py PREDICT.yaml [key=value ...]
"""

import importlib.util
import json
import os
import statistics
import sys
import time

import torch
from transformers import GenerationConfig, TrainerCallback

T_START = time.perf_counter()


class PredictBenchCallback(TrainerCallback):
    def __init__(self, path: str, new_tokens: int):
        self.path, self.new_tokens, self.t = path, new_tokens, []

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # the trainer exists; the prediction loop (dataloader, generate, gather) follows right away
        if torch.cuda.is_available():
            self.base_alloc = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.gen = None
        self._sync()
        self.t.append(time.perf_counter())

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if self.gen is None and model is not None:  # what generate() used (the trainer installs ours after init)
            gc = model.generation_config
            self.gen = {k: getattr(gc, k, None) for k in ("max_new_tokens", "min_new_tokens", "do_sample", "num_beams")}
        self._sync()
        self.t.append(time.perf_counter())

    def on_predict(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        self._sync()
        t_end = time.perf_counter()
        dts = [b - a for a, b in zip(self.t, self.t[1:])]
        batch = args.per_device_eval_batch_size
        samples = len(eval_dataloader.dataset) if eval_dataloader is not None else None
        loop = self.t[-1] - self.t[0] if dts else None
        gib = 1024**3
        out = {
            "batches": len(dts),
            "batch_size": batch,
            "new_tokens": self.new_tokens,
            "samples": samples,
            "loop_s": loop,
            "samples_per_second": samples / loop if samples and loop else None,
            "tokens_per_second": samples * self.new_tokens / loop if samples and loop else None,
            "first_batch_s": dts[0] if dts else None,
            "median_batch_s": statistics.median(dts[1:]) if len(dts) > 1 else None,
            "after_loop_s": t_end - self.t[-1],
            "wall_s_with_load": t_end - T_START,
            "lf_metrics": metrics,
            "generation_config": self.gen,
            "batch_times_s": [round(d, 4) for d in dts],
        }
        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name()
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / gib
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / gib
            out["allocated_at_start_gib"] = self.base_alloc / gib
        with open(self.path, "w") as f:
            json.dump(out, f, indent=1)
        print("[bench] " + json.dumps({k: v for k, v in out.items() if k != "batch_times_s"}), flush=True)


class NoScores:
    """Stands in for LLaMA-Factory's ComputeSimilarity where its packages are missing: no scores."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, eval_preds, compute_result: bool = True):
        return {} if compute_result else None


def generation_folder(path: str, new_tokens: int) -> str:
    os.makedirs(path, exist_ok=True)
    GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False).save_pretrained(path)
    return path


if __name__ == "__main__":
    new_tokens = int(os.environ.get("NEW_TOKENS", "64"))
    gen_dir = generation_folder(os.environ.get("GEN_DIR", "/tmp/lfbench/gen_forced"), new_tokens)
    sys.argv += [f"generation_config={gen_dir}", f"max_new_tokens={new_tokens}"]
    if any(importlib.util.find_spec(m) is None for m in ("jieba", "rouge_chinese", "nltk")):
        import llamafactory.train.sft.workflow as workflow

        print("[bench] jieba/rouge_chinese/nltk missing: prediction scores off", flush=True)
        workflow.ComputeSimilarity = NoScores

    from llamafactory.train.tuner import run_exp

    run_exp(callbacks=[PredictBenchCallback(os.environ.get("BENCH_JSON", "bench_predict.json"), new_tokens)])
