"""The loss plot: drawn from the run's log, and skipped (no empty figure, no matplotlib warning)
when a run ends before its first logged loss."""

import json
import warnings

from mmtune.train.callbacks import plot_loss


def _log(folder, rows):
    with open(folder / "trainer_log.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_plot_drawn_from_logged_losses(tmp_path):
    _log(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}])
    out = plot_loss(str(tmp_path))
    assert out == str(tmp_path / "training_loss.png") and (tmp_path / "training_loss.png").stat().st_size > 0


def test_run_shorter_than_logging_steps_has_no_plot_and_no_warning(tmp_path, caplog):
    _log(tmp_path, [{"step": 2, "train_runtime": 1.0, "train_loss": 2.0}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" would raise here
        with caplog.at_level("INFO"):
            assert plot_loss(str(tmp_path)) is None
    assert not (tmp_path / "training_loss.png").exists()
    assert "no loss was logged" in caplog.text
