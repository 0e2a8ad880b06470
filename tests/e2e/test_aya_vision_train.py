"""Aya Vision trains with mmtune's default levers: its language model scales the logits
(``logit_scale``, applied in the forward by newer transformers releases), which the fused
cross-entropy reproduces, so a default run neither crashes nor declines and logs the losses of
a run with the lever off."""

import json
import logging

import pytest

from mmtune.testing import tiny_model_dir
from mmtune.config import parse_config
from mmtune.train import run_sft


def _data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What colour is shape {i}?"},
                          {"role": "assistant", "content": ["a red circle", "a blue square"][i % 2]}]}
            for i in range(4)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return str(path)


def _losses(out):
    rows = [json.loads(line) for line in open(out / "trainer_log.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


def test_a_default_aya_vision_run_trains_with_the_fused_loss_exactly(tmp_path, caplog):
    from transformers import set_seed

    model, data = tiny_model_dir("aya_vision", str(tmp_path)), _data(tmp_path)

    def train(name, **extra):
        set_seed(0)
        run_sft(*parse_config(None, extra=dict(
            model_name_or_path=model, dataset=data, template="aya_vision", output_dir=str(tmp_path / name),
            per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
            seed=0, disable_tqdm=True, plot_loss=False, **extra)))
        return _losses(tmp_path / name)

    with caplog.at_level(logging.INFO, logger="mmtune"):
        default = train("default")  # every lever at its default
    assert "fused linear cross-entropy on" in caplog.text  # on, and not declined at its first-call check
    assert "fused cross-entropy declined" not in caplog.text and "fused_cross_entropy declined" not in caplog.text
    off = train("off", fused_cross_entropy=False)
    assert len(default) == 2 and default == pytest.approx(off, rel=1e-5, abs=1e-6)
