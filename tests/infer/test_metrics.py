"""The answer normaliser and the metrics' wiring to sacrebleu and rouge-score."""

import pytest

from mmtune.infer.metrics import answers_match, choice_letter, compute_metrics, normalize_answer


@pytest.mark.parametrize("text,letter", [("B", "B"), ("B. a square", "B"), ("(c) the circle", "C"), ("D)", "D"),
                                         ("Answer: c", "C"), ("The answer is (A).", "A"), ("option E", "E"),
                                         ("A cat", None), ("none of them", None)])
def test_choice_letters_are_read_from_their_usual_spellings(text, letter):
    assert choice_letter(text) == letter


def test_the_normaliser_ignores_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Red, circle! ") == "red circle"
    assert answers_match("a red circle.", "Red circle") and not answers_match("red square", "red circle")
    assert answers_match("(B) a square", "B") and answers_match("Answer: b", "(B)")
    assert not answers_match("A square", "B") and not answers_match("B", "C")


def test_metrics_against_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["a red circle", "The blue square.", "green", "B"]
    labels = ["a red circle", "blue square", "a yellow cross", "(B)"]
    out = compute_metrics(predictions, labels)
    assert out["labelled_samples"] == 4 and out["exact_match"] == 0.25 and out["accuracy"] == 0.75
    assert out["bleu-4"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [labels]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(scorer.score(l, p)["rougeL"].fmeasure for p, l in zip(predictions, labels)) / 4
    assert out["rouge-l"] == pytest.approx(100 * expected)
    chinese = compute_metrics(["猫坐在垫子上"], ["猫坐在垫子上"])
    assert chinese["rouge-1"] == pytest.approx(100) and chinese["bleu-4"] == pytest.approx(100)
    assert compute_metrics([], []) == {"labelled_samples": 0}
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])
