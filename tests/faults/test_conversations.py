"""Issue "Bad input and faults", conversations and what encoding reports: turns never dropped or
reordered, malformed rows named, empty answers dropped (or kept with a note), truncation and
audio cuts noted, templates that do not fit the model refused, media the processor refuses
named by image, size and what the processor says."""

import copy
import json
import os

import numpy as np
import pytest

from mmtune.data import encode_sample, normalize_row
from mmtune.data.formats import RowError
from mmtune.errors import DataError, UserError
from mmtune.media import MediaError, sample_context
from mmtune.plugins import get_mm_plugin
from mmtune.templates import TEMPLATES, TemplateFitError, get_template
from mmtune.testing import get_fixture, load_processor, make_audio_file, make_image_file

IGNORE = -100


def _normalize(row, media_dir=None):
    """normalize_row on a copy, asserting the row itself is left as it was (nothing lost)."""
    before = copy.deepcopy(row)
    try:
        return normalize_row(row, media_dir)
    finally:
        assert row == before


def _qwen():
    processor = load_processor("qwen2_vl")
    return get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"), processor.tokenizer, processor


def _encode(sample, **kwargs):
    template, plugin, tokenizer, processor = _qwen()
    return encode_sample(sample, template, plugin, tokenizer, processor, **kwargs)


def _trained(result, tokenizer):
    return tokenizer.decode([t for t, y in zip(result.input_ids, result.labels) if y != IGNORE])


# ---------------------------------------------------------------- 1. turn order
def test_two_user_turns_in_a_row_are_refused_naming_both_turns():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "<image>first"},
                             {"from": "human", "value": "second"}, {"from": "gpt", "value": "answer"}],
           "images": ["a.png"]}
    with sample_context(4, "data.json"), pytest.raises(RowError) as info:
        _normalize(row)
    assert str(info.value) == ("sample 4 of data.json: turns 2 and 3 are both from the user: merge them into one "
                               "turn, or put the assistant's answer between them")
    assert isinstance(info.value, DataError) and isinstance(info.value, UserError)


def test_two_assistant_turns_in_a_row_are_refused_naming_both_turns():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "assistant", "content": "b"}]}
    with pytest.raises(RowError, match=r"^turns 2 and 3 are both from the assistant: merge them into one answer, or "
                                       r"put the user's turn between them$"):
        _normalize(row)


def test_no_template_drops_a_turn_of_a_conversation_given_directly():
    """Every registered template refuses a conversation it cannot render turn for turn;
    before, render_turns kept only the second of two user turns (and lost the system prompt)."""
    get_fixture("qwen2_vl")  # loads every family's templates
    messages = [{"role": "user", "content": "FIRST"}, {"role": "user", "content": "SECOND"},
                {"role": "assistant", "content": "ANSWER"}]
    for name in sorted(TEMPLATES):
        with pytest.raises(DataError, match="turns 1 and 2 are both from the user"):
            TEMPLATES[name].render(messages)
    assert "FIRST" in get_template("qwen2_vl").render([messages[0], messages[2]])  # a good one renders whole


def test_a_conversation_starting_with_the_assistant_is_refused():
    with pytest.raises(RowError, match=r"starts with an assistant turn \(turn 1\): an assistant turn must follow a "
                                       r"user turn; add the user's prompt before it"):
        _normalize({"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match="an assistant turn must follow a user turn"):
        get_template("llava").render([{"role": "assistant", "content": "hello"}])


def test_a_system_turn_after_the_start_is_refused_not_moved():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "system", "content": "late"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    with pytest.raises(RowError, match="turn 3 is a system turn after the conversation started"):
        _normalize(row)


def test_a_conversation_ending_with_a_user_turn_is_dropped_with_its_reason():
    """Training drops it, saying why (before: trained with an unanswered prompt at the end);
    normalize_row keeps it (chat's generation prompt)."""
    sample = _normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                      {"role": "user", "content": "and?"}]})
    result = _encode(sample)
    assert result.dropped == "the conversation ends with a user turn (turn 3) that has no answer"
    assert result.input_ids == [] and result.notes == []


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mmtune.testing import tiny_model_dir

    return tiny_model_dir("qwen2_vl", str(tmp_path_factory.mktemp("model")))


def _run_sft_config(tmp_path, model, rows, **extra):
    from mmtune.config import parse_config

    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows, indent=1))
    make_image_file(str(tmp_path / "a.png"), 56, 56)
    cfg = dict(model_name_or_path=model, dataset=str(data), finetuning_type="lora", lora_rank=4, torch_dtype="fp32",
               output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, max_steps=1, use_cpu=True,
               dataloader_num_workers=0, disable_tqdm=True, overwrite_cache=True)
    cfg.update(extra)
    return parse_config(None, extra=cfg), tmp_path / "out"


def _no_model_load(monkeypatch):
    import mmtune.train.recipe as recipe

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(recipe, "load_model", refuse)


def _nothing_written(out):
    written = [] if not out.exists() else [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in written if p.suffix in (".safetensors", ".bin", ".jsonl", ".png")], written


def test_two_user_turns_fail_check_data_and_training_alike_before_the_model_loads(tmp_path, tiny_model,
                                                                                  monkeypatch):
    """The case of the issue: the first of two user turns holds the <image>; check-data used to
    say 0 errors and training died at step 1 naming no sample."""
    from mmtune.data.check import check_dataset
    from mmtune.train import run_sft

    good = {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "ok"}],
            "images": ["a.png"]}
    bad = {"messages": [{"role": "user", "content": "<image>look"}, {"role": "user", "content": "what is it?"},
                        {"role": "assistant", "content": "a shape"}], "images": ["a.png"]}
    args, out = _run_sft_config(tmp_path, tiny_model, [good, bad])
    model_args, data_args, *_ = args
    processor = load_processor("qwen2_vl")
    report = check_dataset(data_args, get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"), processor.tokenizer,
                           processor)
    assert not report.ok
    assert "sample 1" in report.render() and "turns 1 and 2 are both from the user" in report.render()
    _no_model_load(monkeypatch)
    with pytest.raises(DataError) as info:
        run_sft(*args)
    assert "sample 1" in str(info.value) and "turns 1 and 2 are both from the user" in str(info.value)
    _nothing_written(out)


# ---------------------------------------------------------------- 2. malformed rows
MALFORMED = [
    ({"conversations": "hello there"},
     "conversations must be a list of {from, value} or {role, content} turns, got a str ('hello there')"),
    ({"conversations": {"from": "human", "value": "hi"}},
     "conversations must be a list of {from, value} or {role, content} turns, got a dict (keys: from, value)"),
    ({"messages": ["hi", "there"]}, "turn 1 is a str ('hi'): expected a {from, value} or {role, content} dict"),
    ({"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}]},
     "the content of turn 1 is an int (42): expected a string or a list of content parts"),
    ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]},
     "turn 1 (human) has no text: its 'content' or 'value' is missing or null"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}]},
     "content part 1 of turn 1 is a str ('a'): expected a dict"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
     "turn 1 has no role: expected a 'role' or 'from' key (keys: content)"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "turn 1 has the unknown role 'alien': expected one of"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_call", "id": 1}]},
                   {"role": "assistant", "content": "x"}]},
     "content part 1 of turn 1 has the unknown type 'tool_call': expected one of text, image, image_url, video"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "x"}]},
     "content part 1 of turn 1 is a text part whose text is null (missing)"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
     "content part 1 of turn 1 is of type 'image' but holds no image"),
    ({"instruction": 7, "output": "x"}, "the Alpaca row's instruction is an int (7): expected a string"),
    ({"instruction": ["a"], "output": "x"}, "the Alpaca row's instruction is a list of 1: expected a string"),
    ({"instruction": "do", "output": None}, "the Alpaca row's output is null (missing): expected the answer"),
    ({"conversations": []}, "the row's conversations is empty"),
]


@pytest.mark.parametrize("row, expected", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_a_malformed_row_says_what_it_has_and_what_is_expected(row, expected):
    with sample_context(2, "rows.jsonl"), pytest.raises(RowError) as info:
        _normalize(row)
    assert str(info.value).startswith("sample 2 of rows.jsonl: " + expected), str(info.value)
    assert isinstance(info.value, MediaError) and isinstance(info.value, DataError)


def test_turns_stored_column_wise_or_with_mixed_keys_are_read_turn_by_turn():
    """A datasets.Sequence of turns comes as a dict of lists; rows of one file that spell turns
    differently come out of Arrow with every key, the absent ones None (before: "unknown role None")."""
    s = _normalize({"conversations": {"from": ["human", "gpt"], "value": ["<image>q", "a"]}, "images": ["i.png"]})
    assert s.messages == [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]
    s = _normalize({"conversations": [{"from": "human", "value": "q", "role": None, "content": None},
                                      {"from": None, "value": None, "role": "assistant", "content": "a"}]})
    assert s.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


# ---------------------------------------------------------------- 3. empty answers
@pytest.mark.parametrize("answer", ["", "  \n"])
def test_an_empty_answer_is_dropped_by_default_with_its_turn(answer):
    sample = _normalize({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                           {"from": "gpt", "value": answer}]})
    result = _encode(sample)
    assert result.dropped == "empty answer in turn 3"
    assert result.input_ids == [] and result.labels == []


def test_keep_empty_answers_keeps_the_sample_with_a_note():
    template, plugin, tokenizer, processor = _qwen()
    sample = _normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fine"},
                                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]})
    result = encode_sample(sample, template, plugin, tokenizer, processor, keep_empty_answers=True)
    assert result.dropped is None
    assert result.notes == [("empty_answer", "turn 4")]
    assert _trained(result, tokenizer) == "fine<|im_end|>\n<|im_end|>\n"  # the empty answer: its end of turn alone


# ---------------------------------------------------------------- 4. truncated answers
def test_an_answer_cut_by_cutoff_len_is_kept_and_noted():
    template, plugin, tokenizer, processor = _qwen()
    sample = _normalize({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "word " * 80}]})
    full = encode_sample(sample, template, plugin, tokenizer, processor, cutoff_len=10_000)
    assert full.notes == []  # the default: nothing to report
    cut = encode_sample(sample, template, plugin, tokenizer, processor, cutoff_len=40)
    answer_cut = sum(1 for y in full.labels[40:] if y != IGNORE)
    assert answer_cut > 0 and cut.dropped is None and cut.input_ids == full.input_ids[:40]
    assert cut.notes == [("truncated", f"40 of {len(full.input_ids)} tokens kept; answer tokens cut: {answer_cut}")]


# ---------------------------------------------------------------- 5. audio cut by the feature extractor
def test_audio_longer_than_the_model_takes_is_noted_and_its_tokens_stay_the_processors(tmp_path):
    from mmtune.media import load_audio

    processor = load_processor("qwen2_audio")
    template, plugin = get_template("qwen2_audio"), get_mm_plugin("qwen2_audio")
    short = make_audio_file(str(tmp_path / "short.wav"), seconds=2.0)
    long = make_audio_file(str(tmp_path / "long.wav"), seconds=42.0)
    row = {"messages": [{"role": "user", "content": "<audio><audio>what?"}, {"role": "assistant", "content": "tones"}],
           "audios": [short, long]}
    result = encode_sample(_normalize(row), template, plugin, processor.tokenizer, processor)
    assert result.notes == [("audio_cut", "audio 2: 42.0 s, the model takes 30.0 s")]
    ref = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[load_audio(long, 16000)], return_tensors="np")
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    ours = encode_sample(_normalize({**row, "messages": [{"role": "user", "content": "<audio>"},
                                                         {"role": "assistant", "content": "x"}], "audios": [long]}),
                         template, plugin, processor.tokenizer, processor)
    assert ours.input_ids.count(audio_id) == int((ref["input_ids"][0] == audio_id).sum())
    row["audios"] = [short]
    row["messages"][0]["content"] = "<audio>what?"
    assert encode_sample(_normalize(row), template, plugin, processor.tokenizer, processor).notes == []


def test_gemma3n_audio_over_its_max_length_is_noted_from_the_header_alone(tmp_path, monkeypatch):
    import mmtune.media.audio as audio

    processor = load_processor("gemma3n")
    template, plugin = get_template("gemma3n"), get_mm_plugin("gemma3n")
    long = make_audio_file(str(tmp_path / "long.wav"), seconds=31.5)
    monkeypatch.setattr(audio, "load_audio", lambda *a, **k: pytest.fail("decoded to count its length"))
    row = {"messages": [{"role": "user", "content": "<audio>what?"}, {"role": "assistant", "content": "a tone"}],
           "audios": [long]}
    result = encode_sample(_normalize(row), template, plugin, processor.tokenizer, processor)
    assert result.notes == [("audio_cut", "audio 1: 31.5 s, the model takes 30.0 s")]
    arr = {"array": np.zeros(16000 * 31), "sampling_rate": 16000}
    assert plugin.media_notes([], [], [arr], processor) == [("audio_cut", "audio 1: 31.0 s, the model takes 30.0 s")]


# ---------------------------------------------------------------- 6. a template that does not fit the model
def test_a_template_whose_turn_markers_the_tokenizer_lacks_is_refused_once(monkeypatch):
    processor = load_processor("llava")
    template, plugin = get_template("qwen2_vl"), get_mm_plugin("qwen2_vl")
    sample = _normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    with pytest.raises(TemplateFitError) as info:
        encode_sample(sample, template, plugin, processor.tokenizer, processor)
    message = str(info.value)
    assert message.startswith("template 'qwen2_vl' does not fit the model's tokenizer (LlamaTokenizer")
    assert "it has no <|im_start|>, <|im_end|> tokens" in message and "leave `template` unset" in message
    tokenizer = load_processor("qwen2_vl").tokenizer
    assert plugin.check_fit(template, tokenizer) == ()
    calls = []
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    plugin.check_fit(template, tokenizer)  # the same template and tokenizer: checked once
    assert calls == []


def test_a_plugin_media_token_the_tokenizer_lacks_is_refused_naming_the_sample(tmp_path):
    processor = load_processor("llava")
    template = get_template("llava")
    plugin = get_mm_plugin("llava", image_token="<picture>")  # not a token of llava's tokenizer
    image = make_image_file(str(tmp_path / "a.png"), 40, 40)
    sample = _normalize({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "ok"}],
                         "images": [image]})
    with sample_context(0, "d.json"), pytest.raises(TemplateFitError) as info:
        encode_sample(sample, template, plugin, processor.tokenizer, processor)
    assert "template 'llava' (plugin LlavaPlugin) does not fit the model's tokenizer (LlamaTokenizer" in str(info.value)
    assert "the plugin marks media with <picture>, which is not one of its tokens" in str(info.value)


def test_a_plugin_that_cannot_count_with_the_models_processor_is_a_template_error(tmp_path):
    """InternVL's tokenizer has the chat markers, but the Qwen2-VL plugin cannot count its images
    (before: AttributeError 'merge_size' deep in the plugin)."""
    processor = load_processor("internvl")
    image = make_image_file(str(tmp_path / "a.png"), 40, 40)
    sample = _normalize({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "ok"}],
                         "images": [image]})
    expected = (r"the 'qwen2_vl' template's plugin \(Qwen2VLPlugin\) with the model's processor \(InternVLProcessor\) "
                r"cannot count an image of 224x224 px \(AttributeError: .*merge_size.*\): the template does not fit")
    with pytest.raises(TemplateFitError, match=expected):
        encode_sample(sample, get_template("qwen2_vl"), get_mm_plugin("qwen2_vl"), processor.tokenizer, processor)


def test_a_template_that_does_not_fit_stops_training_before_the_model_loads(tmp_path, tiny_model, monkeypatch):
    from mmtune.train import run_sft

    rows = [{"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "ok"}],
             "images": ["a.png"]}]
    args, out = _run_sft_config(tmp_path, tiny_model, rows, template="llava")
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=r"template 'llava' does not fit the model's tokenizer \(Qwen2Tokenizer.*"
                                        r"it has no </s> token"):
        run_sft(*args)
    _nothing_written(out)


# ---------------------------------------------------------------- 7. images the processor refuses
def test_an_extreme_aspect_ratio_names_the_image_its_size_and_the_processors_limit(tmp_path):
    ok = make_image_file(str(tmp_path / "ok.png"), 56, 56)
    thin = make_image_file(str(tmp_path / "thin.png"), 1000, 4)
    sample = _normalize({"messages": [{"role": "user", "content": "<image><image>two"},
                                      {"role": "assistant", "content": "ok"}], "images": [ok, thin]})
    with sample_context(7, "d.json"), pytest.raises(MediaError) as info:
        _encode(sample)
    assert str(info.value) == (
        f"sample 7 of d.json: image 2 ({thin}, 1000x4 px, aspect ratio 250:1) is refused by the model's processor "
        "(Qwen2VLProcessor): ValueError: absolute aspect ratio must be smaller than 200, got 250.0; crop, pad or "
        "resize it to a size and aspect ratio the model takes")
    assert os.path.getsize(thin) > 0  # the file is left as it was


def test_an_image_pixtral_cannot_tile_is_named_not_a_bare_index_error(tmp_path):
    processor = load_processor("pixtral")
    wide = make_image_file(str(tmp_path / "wide.png"), 20000, 20)
    sample = _normalize({"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "ok"}],
                         "images": [wide]})
    with pytest.raises(MediaError, match=r"^image 1 \(.*wide.png, 20000x20 px, aspect ratio 1000:1\) is refused by "
                                         r"the model's processor \(PixtralProcessor\): IndexError"):
        encode_sample(sample, get_template("pixtral"), get_mm_plugin("pixtral"), processor.tokenizer, processor)


def test_check_data_reports_a_template_that_does_not_fit_once(tmp_path, tiny_model, capsys):
    """One line for the run, not the same line for every sample: `mmtune check-data` checks the
    template against the tokenizer before reading any sample."""
    from mmtune.cli import main

    row = {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "ok"}],
           "images": ["a.png"]}
    (tmp_path / "data.json").write_text(json.dumps([row] * 5))
    make_image_file(str(tmp_path / "a.png"), 56, 56)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model}\ndataset: {tmp_path / 'data.json'}\ntemplate: llava\n")
    assert main(["check-data", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("does not fit") == 0
    lines = [line for line in captured.err.splitlines() if "does not fit" in line]
    assert len(lines) == 1 and lines[0].startswith("mmtune check-data: error: template 'llava' does not fit"), captured
