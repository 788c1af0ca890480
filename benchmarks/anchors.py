"""Shared anchors for benchmarks: the same stream through well-known learners, in one run.

* :func:`run_vw` — Vowpal Wabbit (PyPI ``vowpalwabbit``) reading a data file itself, in C++:
  ``Workspace("-d FILE --oaa K --ngram 2 ...")`` parses, hashes and learns the whole file
  inside the constructor. Its progressive validation loss (``get_sum_loss() /
  get_weighted_examples()``; each example is predicted before it is learned, and for
  ``--oaa`` the loss is 0/1) is the prequential error. The file holds the tokens of
  :meth:`TextFeaturizer.tokens`, so VW sees the same words as our learners; writing the file
  is not timed.
* :func:`run_sklearn` — scikit-learn ``HashingVectorizer`` + ``SGDClassifier.partial_fit``,
  predict-then-learn one record at a time (the class list is given up front, as
  ``partial_fit`` requires).
* :func:`run_river` — River's plain loop ``for x, y: model.predict_one(x);
  model.learn_one(x, y)`` over a learner from the registry (raw text in, so the pipeline
  tokenizes twice per record, as the stream processor does).

Each returns an :class:`AnchorResult` with the prequential accuracy, the records per second
and the seconds measured.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence

from stream_learner.core.features import TextFeaturizer

__all__ = ["AnchorResult", "run_vw", "write_vw_file", "run_sklearn", "run_river", "prequential"]


@dataclasses.dataclass
class AnchorResult:
    name: str
    accuracy: float
    records: int
    seconds: float
    cpu_seconds: float | None = None  # this process's CPU time: robust on a shared machine

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")

    @property
    def records_per_cpu_second(self) -> float | None:
        if self.cpu_seconds is None:
            return None
        return self.records / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


def _escape(token: str) -> str:
    # VW's text format: '|' starts a namespace and ':' separates a feature's value.
    return token.replace("|", "¦").replace(":", "∶")


def characters(text: str) -> list[str]:
    """The text's characters without whitespace, NFKC-casefolded: the plain tokenization for
    scripts written without spaces (with ``--ngram 2``: character unigrams and bigrams)."""
    import unicodedata

    return [c for c in unicodedata.normalize("NFKC", text).casefold() if not c.isspace()]


def write_vw_file(
    texts: Sequence[str], labels: Sequence, path, classes: Sequence, *, tokenize=None
) -> None:
    """One VW line ``<class number> |t tokens...`` per record (class numbers from 1);
    ``tokenize`` defaults to the featurizer's :meth:`TextFeaturizer.tokens`."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    tokenize = tokenize or TextFeaturizer().tokens
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in zip(texts, labels, strict=True):
            tokens = " ".join(_escape(t) for t in tokenize(text))
            fh.write(f"{index[label]} |t {tokens}\n")


def run_vw(
    texts: Sequence[str],
    labels: Sequence,
    *,
    extra: str = "",
    bits: int = 18,
    name: str = "vw --oaa K --ngram 2",
    tokenize=None,
) -> AnchorResult:
    """Vowpal Wabbit ``--oaa K --ngram 2`` reading a file in C++; prequential accuracy.
    ``tokenize``: text → tokens (default: the featurizer's words; :func:`characters` for
    unspaced scripts)."""
    import vowpalwabbit

    classes = sorted(set(labels), key=str)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stream.vw")
        write_vw_file(texts, labels, path, classes, tokenize=tokenize)
        args = f"-d {path} --oaa {len(classes)} --ngram 2 -b {bits} --quiet {extra}".strip()
        start, cpu_start = time.perf_counter(), time.process_time()
        workspace = vowpalwabbit.Workspace(args)  # parses and learns the whole file, in C++
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        examples = workspace.get_weighted_examples()
        loss = workspace.get_sum_loss()
        workspace.finish()
    if examples != len(texts):
        raise RuntimeError(f"VW read {examples} examples of {len(texts)}")
    return AnchorResult(name, 1.0 - loss / examples, len(texts), seconds, cpu)


def run_sklearn(
    texts: Sequence[str], labels: Sequence, *, n_features: int = 2**18, batch: int = 1
) -> AnchorResult:
    """HashingVectorizer(1-2 grams) + SGDClassifier.partial_fit, prequential by batches of
    ``batch`` records (each batch predicted before it is learned; 1 = record by record)."""
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import SGDClassifier

    classes = np.array(sorted(set(labels), key=str), dtype=object)
    vectorizer = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False)
    model = SGDClassifier(loss="hinge", alpha=1e-5, random_state=0)
    correct = 0
    fitted = False
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        rows = vectorizer.transform(texts[i : i + batch])
        ys = list(labels[i : i + batch])
        if fitted:
            correct += int(sum(p == y for p, y in zip(model.predict(rows), ys, strict=True)))
        model.partial_fit(rows, ys, classes=classes)
        fitted = True
    seconds = time.perf_counter() - start
    name = "sklearn SGD partial_fit" + (f" (batches of {batch})" if batch > 1 else "")
    return AnchorResult(name, correct / len(texts), len(texts), seconds)


def prequential(model, texts: Sequence, labels: Sequence, *, max_seconds: float | None = None):
    """River's plain loop; returns (accuracy, seconds, records done). With ``max_seconds``,
    stops early once that much time has passed (accuracy over the records done)."""
    correct = done = 0
    start = time.perf_counter()
    for x, y in zip(texts, labels, strict=True):
        correct += model.predict_one(x) == y
        model.learn_one(x, y)
        done += 1
        if max_seconds is not None and done % 64 == 0 and time.perf_counter() - start > max_seconds:
            break
    return correct / done, time.perf_counter() - start, done


def run_river(
    name: str, texts: Sequence[str], labels: Sequence, *, seed: int = 0, max_seconds: float | None = None
) -> AnchorResult:
    """A registry learner (a River pipeline over raw text) in River's plain loop. With
    ``max_seconds`` a learner too slow for the stream is stopped: ``records`` says how far it
    got (compare only complete runs)."""
    from stream_learner.learners.registry import make_learner

    accuracy, seconds, done = prequential(
        make_learner(name, seed=seed), texts, labels, max_seconds=max_seconds
    )
    return AnchorResult(f"river:{name}", accuracy, done, seconds)
