"""`mmtune predict` on tiny Qwen2-VL models: the files and metrics on a known set (a model forced
to emit one known token, so some answers are exact), resuming after a crash without redoing
finished rows, the held-out split of a config, and the vLLM request mapping (vLLM not installed)."""

import json
import os

import pytest

from ..helpers import force_token_model
from mmtune.demo import build_model_dir
from mmtune.errors import OutputFolderError
from mmtune.infer import ChatEngine
from mmtune.infer.predict import PREDICTIONS_FILE, RESULTS_FILE, predict_folder
from mmtune.testing import make_image_file


def _word_token(tokenizer):
    """A token that decodes to a lower-case word of 3+ letters, and that word."""
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if len(text) >= 3 and text.isalpha() and text.islower():
            return token_id, text
    raise AssertionError("no word token in the tiny vocabulary")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("predict")
    base = build_model_dir(str(root), hidden=64)
    token_id, word = _word_token(AutoTokenizer.from_pretrained(base))
    forced = force_token_model(base, root / "forced", token_id)
    images = [make_image_file(str(root / f"{i}.png"), 56, 48 + 8 * i, seed=i) for i in range(3)]
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    answer = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    rows = [
        {"messages": [user("<image>What is it?"), answer(word)], "images": [os.path.basename(images[0])]},
        {"messages": [user("Say the word."), answer(word)]},  # text-only
        {"messages": [user("<image>And this?"), answer(f" The {word.capitalize()}. ")],
         "images": [os.path.basename(images[1])]},  # right only through the normaliser
        {"messages": [user("<image>Something else?"), answer("zebra crossing")], "images": [os.path.basename(images[2])]},
        {"messages": [user("hi"), answer("hello"), user("<image>what now?")], "images": [os.path.basename(images[0])]},
    ]  # the last: a second user turn, no label
    data = root / "known.json"
    data.write_text(json.dumps(rows))
    return {"root": root, "base": base, "forced": forced, "word": word, "data": str(data), "images": images}


def _rows(folder):
    with open(os.path.join(folder, PREDICTIONS_FILE)) as fh:
        return [json.loads(line) for line in fh]


def test_predict_writes_predictions_and_metrics_of_a_known_set(ws):
    import sacrebleu

    out = ws["root"] / "known"
    results = predict_folder(ws["forced"], ws["data"], str(out), max_new_tokens=1, predict_batch_size=2)
    rows = _rows(out)
    word = ws["word"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]  # data order, though generated sorted by length
    assert all(r["prediction"] == word and r["new_tokens"] == 1 and r["finish_reason"] == "length" for r in rows)
    assert rows[0]["media"] == {"images": [ws["images"][0]]} and rows[1]["media"] == {}
    assert "<image>What is it?" in rows[0]["prompt"] and rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert rows[4]["label"] is None and "hello" in rows[4]["prompt"]  # the earlier turns are the prompt's
    labels = [r["label"] for r in rows[:4]]
    assert results["predict_samples"] == 5 and results["labelled_samples"] == 4
    assert results["exact_match"] == pytest.approx(2 / 4)  # rows 0 and 1
    assert results["accuracy"] == pytest.approx(3 / 4)  # row 2 too, through the normaliser
    assert results["bleu-4"] == pytest.approx(sacrebleu.corpus_bleu([word] * 4, [labels]).score)
    assert 0 < results["rouge-1"] < 100 and results["predict_samples_per_second"] > 0
    assert json.loads((out / RESULTS_FILE).read_text()) == results


def test_a_crash_then_a_rerun_completes_without_redoing_finished_rows(ws, monkeypatch):
    out = ws["root"] / "resume"
    generated = []
    original = ChatEngine.generate_batch

    def crashing(self, features, *args, **kwargs):
        if len(generated) >= 2:
            raise RuntimeError("simulated crash")
        rows = original(self, features, *args, **kwargs)
        generated.extend(f["input_ids"] for f in features)
        return rows

    monkeypatch.setattr(ChatEngine, "generate_batch", crashing)
    settings = dict(max_new_tokens=2, predict_batch_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_folder(ws["base"], ws["data"], str(out), **settings)
    kept = _rows(out)
    assert len(kept) == 2  # the first batch was written before the crash
    with open(out / PREDICTIONS_FILE, "a") as fh:
        fh.write('{"index": 4, "source": "cut sh')  # a line the crash cut short
    monkeypatch.setattr(ChatEngine, "generate_batch", original)
    again = []

    def counting(self, features, *args, **kwargs):
        again.extend(f["input_ids"] for f in features)
        return original(self, features, *args, **kwargs)

    monkeypatch.setattr(ChatEngine, "generate_batch", counting)
    results = predict_folder(ws["base"], ws["data"], str(out), **settings)
    rows = _rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert len(again) == 3 and results["resumed_rows"] == 2 and results["generated_this_run"] == 3
    assert not set(map(tuple, again)) & set(map(tuple, generated))  # no finished row generated again
    assert {r["index"]: r for r in rows}[kept[0]["index"]] == kept[0]  # finished rows kept as they were
    fresh = ws["root"] / "fresh"
    predict_folder(ws["base"], ws["data"], str(fresh), cache_implementation="static", **settings)
    assert [r["prediction"] for r in _rows(fresh)] == [r["prediction"] for r in rows]  # greedy, any KV cache: the same
    assert predict_folder(ws["base"], ws["data"], str(out), **settings)["generated_this_run"] == 0
    with pytest.raises(OutputFolderError, match="max_new_tokens"):
        predict_folder(ws["base"], ws["data"], str(out), max_new_tokens=3, predict_batch_size=2)
    assert predict_folder(ws["base"], ws["data"], str(out), max_new_tokens=3,
                          overwrite_output_dir=True)["generated_this_run"] == 5


def test_cli_predicts_on_the_split_training_held_out(ws, tmp_path, capsys):
    from mmtune.cli import main
    from mmtune.config import DataArguments
    from mmtune.train import recipe

    rows = [{"messages": [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": c}],
             "images": [ws["images"][i % 3]]} for i, c in enumerate(["red", "blue", "green", "red", "blue", "pink"])]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    config = tmp_path / "run.yaml"  # a training config: its training keys are ignored
    config.write_text(f"model_name_or_path: {ws['base']}\ndataset: {data}\nval_size: 2\nlearning_rate: 1.0e-4\n"
                      f"finetuning_type: lora\noutput_dir: {tmp_path / 'pred'}\nmax_new_tokens: 2\n")
    assert main(["predict", str(config), "predict_batch_size=4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    held_out = recipe.build_saved(ws["base"], model=False, data_args=DataArguments(dataset=str(data), val_size=2))
    written = _rows(tmp_path / "pred")
    assert printed["predict_samples"] == 2
    assert [r["sample_index"] for r in written] == list(held_out.datasets["eval"]["sample_index"])
    assert [r["label"] for r in written] == [rows[i]["messages"][1]["content"] for i in held_out.datasets["eval"]["sample_index"]]
    assert main(["predict", str(config), "no_such_key=1"]) == 2


def test_vllm_requests_and_sampling_map_our_samples(ws, tmp_path):
    from PIL import Image

    from mmtune.infer.chat import GenerationOptions
    from mmtune.infer.predict import PredictSample, vllm_request, vllm_sampling_kwargs
    from mmtune.plugins import get_mm_plugin
    from mmtune.testing import make_video_file
    from mmtune.train import recipe

    parts = recipe.build_saved(ws["base"], model=False)
    plugin = get_mm_plugin(parts.plugin_name, expand_mm_tokens=False, media=parts.plugin.media)
    video = make_video_file(str(tmp_path / "v.mp4"), frames=4, width=56, height=56)
    sample = PredictSample(0, "x.json", 0, [{"role": "user", "content": "<image><video>same shape?"}], "yes",
                           images=[ws["images"][1]], videos=[video])
    request = vllm_request(sample, parts.template, plugin, parts.processor)
    prompt = request["prompt"]
    assert prompt.count("<|image_pad|>") == 1 and prompt.count("<|video_pad|>") == 1  # vLLM expands them
    assert "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>same shape?" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    image, = request["multi_modal_data"]["image"]
    assert isinstance(image, Image.Image) and image.size == (56, 56)  # image 1 is 56 x 56
    frames, = request["multi_modal_data"]["video"]
    assert frames.ndim == 4 and frames.shape[1:] == (56, 56, 3) and frames.shape[0] % 2 == 0
    text_only = PredictSample(1, "x.json", 1, [{"role": "user", "content": "hi"}], None)
    assert "multi_modal_data" not in vllm_request(text_only, parts.template, plugin, parts.processor)
    greedy = vllm_sampling_kwargs(GenerationOptions(max_new_tokens=7), [5, 6])
    assert greedy == {"max_tokens": 7, "temperature": 0.0, "repetition_penalty": 1.0, "stop_token_ids": [5, 6],
                      "skip_special_tokens": True}
    sampled = vllm_sampling_kwargs(GenerationOptions(temperature=0.7, top_p=0.9, min_new_tokens=2), [5], seed=3)
    assert sampled["top_p"] == 0.9 and sampled["top_k"] == -1 and sampled["seed"] == 3 and sampled["min_tokens"] == 2
