"""Prequential (test-then-train) scores of one learner.

Every labelled record is first predicted, then learned; :class:`PrequentialScore` sees the
prediction made *before* the learner learned the record, so every number here is measured on
data the learner had not yet seen.

>>> score = PrequentialScore(window=2)
>>> score.update("a", "a", {"a": 0.8, "b": 0.2})
True
>>> score.update("b", "a", {"a": 0.6, "b": 0.4})
False
>>> score.update("b", "b", {"a": 0.1, "b": 0.9})
True
>>> round(score.accuracy, 4), score.rolling_accuracy
(0.6667, 0.5)
>>> round(score.macro_f1, 4)  # F1(a) = 2/3, F1(b) = 2/3
0.6667
>>> round(score.log_loss, 4)  # -(ln 0.8 + ln 0.4 + ln 0.9) / 3
0.4149

"""

from __future__ import annotations

import collections
import math

__all__ = ["PrequentialScore", "ClassCounts"]

_EPS = 1e-15


class ClassCounts:
    """True positives, false positives and false negatives per class."""

    __slots__ = ("tp", "fp", "fn", "support")

    def __init__(self):
        self.tp = 0
        self.fp = 0
        self.fn = 0
        self.support = 0

    @property
    def f1(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "support": self.support,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "f1": self.f1,
        }


class PrequentialScore:
    """Cumulative and rolling accuracy, macro-F1, log loss and per-class counts.

    Parameters
    ----------
    window
        Size of the rolling window for ``rolling_accuracy``.

    """

    def __init__(self, window: int = 1000):
        self.window = window
        self.n = 0
        self.correct = 0
        self.log_loss_sum = 0.0
        self.classes: dict = {}
        self._recent: collections.deque[int] = collections.deque(maxlen=window)
        self._recent_correct = 0

    def update(self, y_true, y_pred, proba: dict | None = None) -> bool:
        """Score one prediction; returns whether it was correct."""
        hit = y_pred == y_true
        self.n += 1
        self.correct += hit
        recent = self._recent
        if len(recent) == recent.maxlen:
            self._recent_correct -= recent[0]
        recent.append(hit)
        self._recent_correct += hit

        classes = self.classes
        truth = classes.get(y_true)
        if truth is None:
            truth = classes[y_true] = ClassCounts()
        truth.support += 1
        if hit:
            truth.tp += 1
        else:
            truth.fn += 1
            if y_pred is not None:
                predicted = classes.get(y_pred)
                if predicted is None:
                    predicted = classes[y_pred] = ClassCounts()
                predicted.fp += 1
        p = proba.get(y_true, 0.0) if proba else 0.0
        self.log_loss_sum -= math.log(min(max(p, _EPS), 1.0))
        return bool(hit)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def rolling_accuracy(self) -> float:
        return self._recent_correct / len(self._recent) if self._recent else 0.0

    @property
    def macro_f1(self) -> float:
        if not self.classes:
            return 0.0
        return sum(c.f1 for c in self.classes.values()) / len(self.classes)

    @property
    def log_loss(self) -> float:
        return self.log_loss_sum / self.n if self.n else 0.0

    def snapshot(self) -> dict[str, float]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "rolling_accuracy": self.rolling_accuracy,
            "macro_f1": self.macro_f1,
            "log_loss": self.log_loss,
        }

    def per_class(self) -> dict:
        return {label: counts.as_dict() for label, counts in self.classes.items()}

    # -- state: plain data with a schema version (checkpoints) --

    STATE_SCHEMA = "stream-learner/score"
    STATE_VERSION = 1

    def state_dict(self) -> dict:
        """The score as plain data; :meth:`from_state` rebuilds an identical one."""
        return {
            "schema": self.STATE_SCHEMA,
            "version": self.STATE_VERSION,
            "window": self.window,
            "n": self.n,
            "correct": self.correct,
            "log_loss_sum": self.log_loss_sum,
            # [label, tp, fp, fn, support], in order of first appearance
            "classes": [[label, c.tp, c.fp, c.fn, c.support] for label, c in self.classes.items()],
            "recent": [bool(hit) for hit in self._recent],
        }

    @classmethod
    def from_state(cls, state: dict) -> PrequentialScore:
        from stream_learner.state.schema import StateError, check_schema

        check_schema(state, cls.STATE_SCHEMA, (cls.STATE_VERSION,))
        try:
            score = cls(window=int(state["window"]))
            score.n = int(state["n"])
            score.correct = int(state["correct"])
            score.log_loss_sum = float(state["log_loss_sum"])
            for label, tp, fp, fn, support in state["classes"]:
                counts = score.classes[label] = ClassCounts()
                counts.tp, counts.fp, counts.fn, counts.support = (
                    int(tp),
                    int(fp),
                    int(fn),
                    int(support),
                )
            score._recent.extend(bool(hit) for hit in state["recent"])
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f"score state does not fit: {type(error).__name__}: {error}") from None
        score._recent_correct = sum(score._recent)
        return score
