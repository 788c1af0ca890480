"""Prequential scores equal a hand computation on a tiny stream."""

import math

import pytest

from stream_learner.core.evaluation import PrequentialScore


def test_scores_match_hand_computation():
    stream = [
        # (truth, predicted, probabilities given to the classes)
        ("a", "a", {"a": 0.7, "b": 0.3}),
        ("b", "a", {"a": 0.6, "b": 0.4}),
        ("b", "b", {"a": 0.2, "b": 0.8}),
        ("c", "b", {"a": 0.1, "b": 0.9}),  # c never predicted: probability 0 → clipped
        ("a", "a", {"a": 0.9, "b": 0.05, "c": 0.05}),
    ]
    score = PrequentialScore(window=3)
    for truth, predicted, proba in stream:
        score.update(truth, predicted, proba)

    assert score.n == 5
    assert score.accuracy == pytest.approx(3 / 5)
    assert score.rolling_accuracy == pytest.approx(2 / 3)  # last three: b✓, c✗, a✓
    # a: tp 2, fp 1 (b→a), fn 0 → F1 = 4/5; b: tp 1, fp 1 (c→b), fn 1 → 1/2; c: tp 0 → 0
    assert score.macro_f1 == pytest.approx((4 / 5 + 1 / 2 + 0) / 3)
    expected_log_loss = (
        -(math.log(0.7) + math.log(0.4) + math.log(0.8) + math.log(1e-15) + math.log(0.9)) / 5
    )
    assert score.log_loss == pytest.approx(expected_log_loss)
    per_class = score.per_class()
    assert (
        per_class["a"]["support"] == 2 and per_class["c"]["fn"] == 1 and per_class["b"]["fp"] == 1
    )


def test_empty_score_is_zero_not_an_error():
    score = PrequentialScore()
    assert score.snapshot() == {
        "n": 0,
        "accuracy": 0.0,
        "rolling_accuracy": 0.0,
        "macro_f1": 0.0,
        "log_loss": 0.0,
    }
