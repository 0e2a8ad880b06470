"""A shortened embedded demo still beats the best text-only answer by a wide margin: images
really reach the model (a pipeline that drops or misplaces image features cannot pass)."""

from mmtune.demo import run_demo


def test_short_demo_beats_text_only(tmp_path):
    result = run_demo(str(tmp_path), n_train=600, n_test=60, max_steps=350, chat_examples=2)
    assert result.text_only_baseline < 0.35
    assert result.accuracy >= result.text_only_baseline + 0.3, (result.accuracy, result.text_only_baseline)
    assert (tmp_path / "run" / "training_loss.png").exists()
    assert len(result.chat) == 2 and all(isinstance(reply, str) for _, _, reply, _ in result.chat)
