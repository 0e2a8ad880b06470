"""``mmtune predict``: batched generation over a data set, the predictions and their metrics.

The model is any folder mmtune writes (or a base model, or base + adapter), reopened through
:func:`~mmtune.train.recipe.build_saved` as ``chat`` reopens it. The samples are the rows of
``dataset``; with ``val_size`` only the part training held out (the same split: the data is
tokenised with the folder's template and split as :func:`~mmtune.data.build_dataset` splits
it). A row's prompt is its conversation up to the last user turn; its label is the answer
after it (a row that ends with a user turn has no label: it is generated, not scored).

Outputs, in ``output_dir``:

- ``generated_predictions.jsonl``: one line a sample (``index``, ``source``, ``sample_index``,
  ``prompt``: the template's text with media placeholders, ``media``, ``label``,
  ``prediction``, ``finish_reason``, ``new_tokens``), in data order once the run completes;
- ``predict_results.json``: :func:`~mmtune.infer.metrics.compute_metrics` over the labelled
  rows, and throughput (samples and new tokens a second, of the rows this run generated);
- ``predict_run.json``: the settings the rows were generated with.

Resuming: every batch is appended and flushed as it finishes, so a crash keeps the finished
rows (a line cut short by the crash is dropped); a rerun with the same settings generates only
the missing rows. Other settings in a folder that holds rows are refused
(``overwrite_output_dir`` starts over), so rows of two runs never mix.

Speed (the transformers backend): prompts are sorted by length, longest first, and batched
(``predict_batch_size``), so a batch pads little and an out-of-memory batch shows at once;
padding is on the left; each sample's media are decoded and encoded once, in the prefill; the
KV cache is ``cache_implementation`` (default: dynamic). ``backend: vllm`` hands the same
prompts to vLLM (:func:`vllm_request`), with the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmtune.config import ConfigError, DataArguments, ModelArguments, PredictArguments
from mmtune.errors import DataError, OutputFolderError
from mmtune.media import describe, sample_context

from .chat import ChatEngine, Generated, GenerationOptions
from .metrics import compute_metrics

logger = logging.getLogger(__name__)

__all__ = ["PREDICTIONS_FILE", "RESULTS_FILE", "PredictSample", "load_predict_samples", "predict", "predict_folder",
           "vllm_request", "vllm_sampling_kwargs"]

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"
RUN_FILE = "predict_run.json"
MEDIA_KINDS = ("images", "videos", "audios")


@dataclass
class PredictSample:
    """One prompt to answer: ``index`` is its place in the prediction set (the key that resuming
    goes by); ``source`` and ``sample_index`` name the row it comes from."""

    index: int
    source: str
    sample_index: int
    messages: list[dict[str, str]]
    label: str | None
    system: str | None = None
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)

    def where(self) -> str:
        return f"sample {self.sample_index} of {self.source}"


def generation_options(args: PredictArguments) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                             min_new_tokens=args.min_new_tokens,
                             cache_implementation=None if args.cache_implementation == "dynamic"
                             else args.cache_implementation)


def _prompt_sample(row: dict[str, Any], index: int, source: str, sample_index: int,
                   media_dir: str | None) -> PredictSample:
    """A dataset row as a prompt and its label (the last answer), errors naming the row."""
    from mmtune.data import normalize_row

    with sample_context(sample_index, source):
        try:
            sample = normalize_row(row, media_dir)
        except DataError as exc:
            raise DataError(f"sample {sample_index} of {source}: {exc}") from exc
    messages = sample.messages
    label = None
    if messages and messages[-1]["role"] == "assistant":
        label = messages[-1]["content"]
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"sample {sample_index} of {source}: no user turn to answer")
    return PredictSample(index, source, sample_index, [dict(m) for m in messages], label, sample.system,
                         list(sample.images), list(sample.videos), list(sample.audios))


def load_predict_samples(data_args: DataArguments, datasets: dict[str, Any] | None = None) -> list[PredictSample]:
    """The prompts of ``data_args.dataset``: with ``datasets`` holding ``eval`` (``val_size``),
    the held-out rows, read back from their source files by ``source`` / ``sample_index``;
    else every row of every entry (the first ``max_samples`` of each)."""
    from mmtune.data.loader import default_media_dir, load_samples

    cache: dict[str, Any] = {}

    def rows_of(entry: str) -> Any:
        if entry not in cache:
            cache[entry] = load_samples(entry, data_args.max_samples)
        return cache[entry]

    def media_dir(entry: str) -> str | None:
        return data_args.media_dir or default_media_dir(entry)

    samples: list[PredictSample] = []
    if datasets is not None and "eval" in datasets:
        held_out = datasets["eval"].select_columns(["source", "sample_index"])
        for source, index in zip(held_out["source"], held_out["sample_index"]):
            samples.append(_prompt_sample(rows_of(source)[int(index)], len(samples), source, int(index),
                                          media_dir(source)))
        return samples
    entries = [p.strip() for p in data_args.dataset.split(",") if p.strip()]
    if not entries:
        raise DataError("no dataset given: set `dataset` to the file(s) to predict on")
    for entry in entries:
        for k, row in enumerate(rows_of(entry)):
            samples.append(_prompt_sample(row, len(samples), entry, k, media_dir(entry)))
    return samples


def _media_record(sample: PredictSample) -> dict[str, list[str]]:
    """The sample's media as the jsonl records them: paths as given, embedded media described."""
    return {kind: [item if isinstance(item, str) and not item.startswith("data:") else describe(item, kind[:-1])
                   for item in getattr(sample, kind)]
            for kind in MEDIA_KINDS if getattr(sample, kind)}


# ---------------------------------------------------------------------------------------- vLLM

def vllm_request(sample: PredictSample, template: Any, plugin: Any, processor: Any) -> dict[str, Any]:
    """The vLLM prompt of one sample: ``{"prompt": text, "multi_modal_data": {...}}``, the form
    ``vllm.LLM.generate`` takes. ``plugin`` is the folder's plugin built with
    ``expand_mm_tokens=False``: each medium is the family's placeholder once (vLLM expands it
    itself, from the pixels it is given); images are loaded and capped as training capped them,
    videos are their sampled frames (a ``(frames, height, width, 3)`` uint8 array), audio is
    ``(samples, sampling_rate)``."""
    import numpy as np

    expanded = plugin.process_messages(sample.messages, sample.images, sample.videos, sample.audios, processor)
    request: dict[str, Any] = {"prompt": "".join(p + a for p, a in template.render_turns(expanded, sample.system))}
    data: dict[str, Any] = {}
    with sample_context(sample.sample_index, sample.source):
        if sample.images:
            data["image"] = plugin._regularize_images(sample.images)
        if sample.videos:
            data["video"] = [np.stack([np.asarray(frame.convert("RGB")) for frame in clip.frames])
                             for clip in plugin._regularize_videos(sample.videos)]
        if sample.audios:
            rate = plugin.media.audio_sampling_rate
            data["audio"] = [(wave, rate) for wave in plugin._regularize_audios(sample.audios)]
    if data:
        request["multi_modal_data"] = data
    return request


def vllm_sampling_kwargs(options: GenerationOptions, stop_ids: Sequence[int] | None, seed: int | None = None) -> dict:
    """``vllm.SamplingParams`` keywords deciding as ``options`` decide for transformers:
    temperature 0 is greedy, top-p / top-k only when sampling, the template's end-of-turn ids."""
    kwargs: dict[str, Any] = {"max_tokens": options.max_new_tokens, "temperature": options.temperature,
                              "repetition_penalty": options.repetition_penalty or 1.0,
                              "stop_token_ids": list(stop_ids or ()), "skip_special_tokens": True}
    if options.temperature > 0:
        kwargs["top_p"] = 1.0 if options.top_p is None else options.top_p
        kwargs["top_k"] = options.top_k or -1  # vLLM: -1 is off
        if seed is not None:
            kwargs["seed"] = seed
    if options.min_new_tokens:
        kwargs["min_tokens"] = options.min_new_tokens
    return kwargs


class _VLLMBackend:
    """vLLM's engine over the folder's weights (an adapter through a LoRA request)."""

    def __init__(self, parts: Any, options: GenerationOptions, args: PredictArguments, dtype: str) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ConfigError("backend: vllm needs vLLM: pip install 'mmtune[vllm]'") from exc
        from mmtune.plugins import get_mm_plugin

        folder = parts.folder
        self.parts = parts
        self.plugin = get_mm_plugin(parts.plugin_name, expand_mm_tokens=False, media=parts.plugin.media)
        self.engine = ChatEngine.from_parts(parts, options)  # the stop ids (no weights loaded)
        llm_kwargs: dict[str, Any] = {"model": folder.model_path, "tokenizer": folder.files, "seed": args.predict_seed}
        if dtype not in ("auto", None):
            llm_kwargs["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
        self.lora = None
        if folder.adapter_path:
            from vllm.lora.request import LoRARequest

            llm_kwargs["enable_lora"] = True
            self.lora = LoRARequest("adapter", 1, folder.adapter_path)
        self.llm = LLM(**llm_kwargs)
        self.params = SamplingParams(**vllm_sampling_kwargs(options, self.engine.stop_ids, args.predict_seed))

    def prepare(self, samples: Sequence[PredictSample]) -> dict[int, int]:
        return {s.index: 0 for s in samples}

    def generate(self, batch: Sequence[PredictSample]) -> list[Generated]:
        requests = [vllm_request(s, self.parts.template, self.plugin, self.parts.processor) for s in batch]
        outputs = self.llm.generate(requests, self.params, lora_request=self.lora, use_tqdm=False)
        rows = []
        for out in outputs:
            best = out.outputs[0]
            reason = "length" if best.finish_reason == "length" else "stop"
            rows.append(Generated(list(best.token_ids), best.text, reason))
        return rows


class _TransformersBackend:
    def __init__(self, parts: Any, options: GenerationOptions) -> None:
        self.engine = ChatEngine.from_parts(parts, options)
        self.features: dict[int, dict[str, Any]] = {}

    def prepare(self, samples: Sequence[PredictSample]) -> dict[int, int]:
        """Each prompt's ids (media headers read once); returns their lengths, for the sort."""
        from mmtune.data.problems import cause

        for s in samples:
            try:
                with sample_context(s.sample_index, s.source):
                    self.features[s.index] = self.engine.prompt_feature(s.messages, s.images, s.videos, s.audios,
                                                                        s.system)
            except Exception as exc:  # the processor's and the media loaders' own, of any class
                raise DataError(cause(exc, s.sample_index, s.source)) from exc
        return {i: len(f["input_ids"]) for i, f in self.features.items()}

    def generate(self, batch: Sequence[PredictSample]) -> list[Generated]:
        features = [self.features.pop(s.index) for s in batch]
        return self.engine.generate_batch(features)


# ---------------------------------------------------------------------------------------- resuming

def _settings(model_args: ModelArguments, data_args: DataArguments, args: PredictArguments) -> dict[str, Any]:
    """What decides the rows: a rerun resumes only where all of it is the same."""
    keep = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "min_new_tokens", "predict_seed")
    return {"model_name_or_path": model_args.model_name_or_path, "adapter_name_or_path": model_args.adapter_name_or_path,
            "torch_dtype": model_args.torch_dtype, "template": data_args.template, "dataset": data_args.dataset,
            "val_size": data_args.val_size, "max_samples": data_args.max_samples, "backend": args.backend,
            **{k: getattr(args, k) for k in keep}}


def read_finished(path: str) -> dict[int, dict[str, Any]]:
    """The complete rows of a predictions file by index; a last line cut short (a crash while
    writing it) is cut off the file, so that appending continues from a whole line."""
    if not os.path.exists(path):
        return {}
    rows: dict[int, dict[str, Any]] = {}
    good = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            rows[int(row["index"])] = row
            good += len(line)
    if good < os.path.getsize(path):
        logger.warning("%s: dropping an incomplete last line (the run stopped while writing it)", path)
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return rows


def _claim_output_dir(output_dir: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Record the settings in ``output_dir``; refuse a folder whose rows other settings wrote."""
    os.makedirs(output_dir, exist_ok=True)
    run_file = os.path.join(output_dir, RUN_FILE)
    ours = (RUN_FILE, PREDICTIONS_FILE, RESULTS_FILE)
    if os.path.exists(run_file) or os.path.exists(os.path.join(output_dir, PREDICTIONS_FILE)):
        recorded = None
        if os.path.exists(run_file):
            with open(run_file) as fh:
                recorded = json.load(fh)
        if recorded != json.loads(json.dumps(settings)):
            if not overwrite:
                differ = sorted(k for k in settings if (recorded or {}).get(k) != settings[k]) if recorded else []
                what = f"other settings ({', '.join(differ)} differ)" if differ else "a run without a record"
                raise OutputFolderError(f"{output_dir} holds predictions of {what}; rerun with the same settings to "
                                        "resume, choose another output_dir, or set overwrite_output_dir: true")
            for name in ours:
                if os.path.exists(os.path.join(output_dir, name)):
                    os.remove(os.path.join(output_dir, name))
            logger.info("%s: earlier predictions removed (overwrite_output_dir)", output_dir)
    with open(run_file, "w") as fh:
        json.dump(settings, fh, indent=1)


def _batches(samples: Sequence[PredictSample], lengths: dict[int, int], size: int) -> Iterator[list[PredictSample]]:
    """Batches of prompts of similar lengths, longest first."""
    ordered = sorted(samples, key=lambda s: (-lengths.get(s.index, 0), s.index))
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


# ---------------------------------------------------------------------------------------- the run

def predict(model_args: ModelArguments, data_args: DataArguments, args: PredictArguments) -> dict[str, Any]:
    """Generate an answer to every prompt (see the module), write the outputs and return
    ``predict_results.json``'s content."""
    import torch
    from tqdm.auto import tqdm

    from mmtune.model.folders import check_saved_paths
    from mmtune.train import recipe

    check_saved_paths(model_args.model_name_or_path, model_args.adapter_name_or_path)
    options = generation_options(args)
    settings = _settings(model_args, data_args, args)
    _claim_output_dir(args.output_dir, settings, args.overwrite_output_dir)
    parts = recipe.build_saved(model_args.model_name_or_path, model_args.adapter_name_or_path,
                               template=data_args.template, dtype=model_args.torch_dtype,
                               model=args.backend == "transformers",
                               data_args=data_args if data_args.val_size else None)
    samples = load_predict_samples(data_args, parts.datasets or None)
    path = os.path.join(args.output_dir, PREDICTIONS_FILE)
    finished = read_finished(path)
    known = {s.index for s in samples}
    if set(finished) - known:
        raise OutputFolderError(f"{path} holds rows the data set does not have (indices up to "
                                f"{max(finished)} for {len(samples)} samples): the data changed; set "
                                "overwrite_output_dir: true to start over")
    pending = [s for s in samples if s.index not in finished]
    if finished:
        logger.info("predict: resuming, %d of %d rows done in %s", len(finished), len(samples), path)
    backend = (_VLLMBackend(parts, options, args, model_args.torch_dtype) if args.backend == "vllm"
               else _TransformersBackend(parts, options))
    engine = backend.engine
    lengths = backend.prepare(pending)
    torch.manual_seed(args.predict_seed)
    new_tokens = 0
    start = time.perf_counter()
    with open(path, "a", encoding="utf-8") as fh, tqdm(total=len(samples), initial=len(finished), desc="predict",
                                                       unit="sample") as bar:
        for batch in _batches(pending, lengths, args.predict_batch_size):
            for sample, generated in zip(batch, backend.generate(batch)):
                row = {"index": sample.index, "source": sample.source, "sample_index": sample.sample_index,
                       "prompt": engine.render_prompt(sample.messages, sample.system), "media": _media_record(sample),
                       "label": sample.label, "prediction": generated.text.strip(),
                       "finish_reason": generated.finish_reason, "new_tokens": len(generated.token_ids)}
                finished[sample.index] = row
                new_tokens += len(generated.token_ids)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    rows = [finished[i] for i in sorted(finished)]
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(temporary, path)  # data order, atomically: a crash here leaves the appended file
    labelled = [row for row in rows if row["label"] is not None]
    results = {"predict_samples": len(rows), "generated_this_run": len(pending), "resumed_rows": len(rows) - len(pending),
               **compute_metrics([r["prediction"] for r in labelled], [r["label"] for r in labelled]),
               "predict_runtime": round(seconds, 3),
               "predict_samples_per_second": round(len(pending) / seconds, 3) if pending and seconds else None,
               "predict_tokens_per_second": round(new_tokens / seconds, 3) if pending and seconds else None}
    with open(os.path.join(args.output_dir, RESULTS_FILE), "w") as fh:
        json.dump(results, fh, indent=1)
    logger.info("predict: %d rows in %s; %s", len(rows), args.output_dir,
                ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float)))
    return results


def predict_folder(model: str, dataset: str, output_dir: str, **settings: Any) -> dict[str, Any]:
    """:func:`predict` with settings by keyword (any key ``mmtune predict`` reads), for scripts
    and the demo."""
    from mmtune.config import parse_predict_config

    return predict(*parse_predict_config(None, extra={"model_name_or_path": model, "dataset": dataset,
                                                      "output_dir": output_dir, **settings}))
