"""Export (LoRA merge), chat (streaming, CLI) and check-data on tiny models and bad data."""

import json
import os

import pytest
import torch

from mmtune.demo import build_model_dir, make_dataset
from mmtune.config import parse_config
from mmtune.train import run_sft


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data, test_items = make_dataset(str(root / "data"), n_train=16, n_test=2, size=56)
    model = build_model_dir(str(root), hidden=64)
    out = root / "lora"
    run_sft(*parse_config(None, extra=dict(  # no template: the model type's declared one (qwen2_vl)
        model_name_or_path=model, dataset=data, finetuning_type="lora", lora_rank=4,
        torch_dtype="fp32", output_dir=str(out), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        save_strategy="no", use_cpu=True, disable_tqdm=True, plot_loss=False)))
    return {"root": root, "base": model, "adapter": str(out), "data_dir": str(root / "data"), "items": test_items}


def test_export_merges_lora_and_transformers_loads_it(trained):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmtune.cli import main

    out = trained["root"] / "export"
    assert main(["export", trained["adapter"], str(out)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    base = AutoModelForImageTextToText.from_pretrained(trained["base"])
    peft_model = PeftModel.from_pretrained(base, trained["adapter"]).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
    assert os.path.exists(out / "processor_config.json") or os.path.exists(out / "preprocessor_config.json")


def test_chat_streams_an_answer_about_an_image(trained, capsys):
    from mmtune.cli import main
    from mmtune.infer import ChatEngine

    image = os.path.join(trained["data_dir"], trained["items"][0]["images"][0])
    engine = ChatEngine(trained["adapter"], max_new_tokens=5)
    assert engine.template.name == "qwen2_vl" and type(engine.plugin).__name__ == "Qwen2VLPlugin"
    pieces = list(engine.stream([{"role": "user", "content": "<image>What colour is the shape?"}], images=[image]))
    assert isinstance("".join(pieces), str)
    export = trained["root"] / "export_chat"
    assert main(["export", trained["adapter"], str(export)]) == 0
    assert json.loads((export / "mmtune_config.json").read_text())["template"] == "qwen2_vl"
    assert main(["chat", str(export), "--image", image, "--prompt", "What shape is this?",
                 "--max-new-tokens", "4"]) == 0
    assert "assistant>" in capsys.readouterr().out


def test_check_data_reports_every_problem_by_index_and_file(trained, tmp_path, capsys):
    from mmtune.cli import main
    from mmtune.testing import make_image_file

    good = make_image_file(str(tmp_path / "good.png"), 56, 56)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    turn = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}]  # noqa: E731
    rows = [
        {"messages": turn("<image>ok"), "images": ["good.png"]},
        {"messages": turn("<image>missing"), "images": ["missing.png"]},
        {"messages": turn("<image>corrupt"), "images": ["corrupt.png"]},
        {"messages": turn("<image><image>two placeholders"), "images": ["good.png"]},
        {"messages": turn("<image>" + " long" * 400), "images": ["good.png"]},
    ]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {trained['base']}\ndataset: {data}\ncutoff_len: 64\n")  # default template
    assert main(["check-data", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "5 samples read, 3 with errors, 1 over cutoff_len" in out
    for index, what in ((1, "missing.png"), (2, "corrupt.png"), (3, "placeholder")):
        line = next(l for l in out.splitlines() if f"sample {index} of {data}" in l)
        assert what in line, line
    assert f"sample 4 of {data}" in out and "cutoff_len=64" in out
    assert good
