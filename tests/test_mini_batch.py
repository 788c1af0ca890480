"""Mini-batch mode: StreamProcessor.process_many, the worker's --mini-batch and evaluate's."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from worker_helpers import ENCODE, ExplodingClassifier, drain, make_worker, records

from stream_learner.cli.evaluate import evaluate
from stream_learner.core.processor import LearnerFailure, Outcome, StreamProcessor
from stream_learner.core.records import Record
from stream_learner.io.sources import MemorySource
from stream_learner.learners.neural.model import NeuralClassifier
from stream_learner.learners.registry import make_learner
from stream_learner.runtime.config import ConfigError, load_config

WORDS = {"pos": ["good", "great", "fine", "love", "nice"], "neg": ["bad", "awful", "hate", "poor", "sad"]}


def neural_processor(**kwargs):
    return StreamProcessor({"neural": make_learner("neural", n_buckets=2**12)}, **kwargs)


def neural_parameters(processor):
    head = processor.heads()["neural"][1]
    return {name: array.copy() for name, array in head.parameters().items()}


def test_every_record_of_a_batch_is_predicted_before_any_is_learned():
    processor = StreamProcessor(["nb"], drift_detector="none")
    batch = [Record(str(i), "cheap pills now", "spam") for i in range(4)]
    results = processor.process_many(batch)
    assert [r.outcome for r in results] == [Outcome.LEARNED] * 4
    # Nothing was learned when the batch was predicted: no record saw the ones before it.
    assert [r.prediction.label for r in results] == [None] * 4
    assert processor.learner_stats()["nb"]["learned"] == 4
    assert processor.process(Record("x", "cheap pills now")).prediction.label == "spam"


def test_the_numpy_learner_takes_one_step_per_batch_exactly_as_its_own_learn_many():
    recs = records(300, seed=3)
    processor = neural_processor(drift_detector="none")
    featurizer, reference = make_learner("neural", n_buckets=2**12).steps.values()
    for start in range(0, len(recs), 64):
        batch = recs[start : start + 64]
        results = processor.process_many(batch)
        features = featurizer.buckets_many([r.text for r in batch])
        expected = reference.predict_many(features)
        assert [r.prediction.label for r in results] == expected
        reference.learn_many(features, [r.label for r in batch])
    got = neural_parameters(processor)
    for name, array in reference.parameters().items():
        assert np.array_equal(got[name], array), name
    assert processor.learner_stats()["neural"]["learned"] == 300


records_strategy = st.lists(
    st.tuples(
        st.sampled_from(["labelled", "unlabelled", "label-only"]),
        st.integers(0, 15),  # id
        st.sampled_from(["pos", "neg"]),
    ),
    max_size=60,
)


def _stream(spec):
    out = []
    for kind, key, label in spec:
        text = " ".join(WORDS[label][: 2 + key % 3])
        if kind == "labelled":
            out.append(Record(f"r{key}", text, label))
        elif kind == "unlabelled":
            out.append(Record(f"r{key}", text))
        else:
            out.append(Record(f"r{key}", None, label))
    return out


@settings(max_examples=60, deadline=None)
@given(spec=records_strategy, size=st.integers(1, 9), learners=st.sampled_from(["nb", "neural", "both"]))
def test_batches_give_each_record_the_outcome_one_at_a_time_gives(spec, size, learners):
    """Joins, buffered predictions and learning happen in stream order whatever the batches."""
    stream = _stream(spec)

    def build():
        names = {"nb": ["nb"], "neural": ["neural"], "both": ["nb", "neural"]}[learners]
        return StreamProcessor(
            {name: make_learner(name, n_buckets=2**10) for name in names}, drift_detector="none"
        )

    one_by_one = build()
    expected = [one_by_one.process(record, now=0.0).outcome for record in stream]
    batched = build()
    got = []
    for start in range(0, len(stream), size):
        part = stream[start : start + size]
        got += [result.outcome for result in batched.process_many(part, [0.0] * len(part))]
    assert got == expected
    assert batched.labelled == one_by_one.labelled
    # Bytes may differ: a record predicted within its batch has seen fewer classes.
    assert {**batched.label_buffer_stats(), "bytes": 0} == {**one_by_one.label_buffer_stats(), "bytes": 0}
    assert {n: s["learned"] for n, s in batched.learner_stats().items()} == {
        n: s["learned"] for n, s in one_by_one.learner_stats().items()
    }


def test_a_record_a_learner_fails_on_fails_alone():
    processor = StreamProcessor(
        {"nb": make_learner("nb"), "fragile": ExplodingClassifier()}, drift_detector="none"
    )
    batch = [Record("a", "good day", "pos"), Record("b", "boom goes it", "neg"), Record("c", "bad day", "neg")]
    results = processor.process_many(batch)
    assert isinstance(results[1], LearnerFailure) and results[1].learner == "fragile"
    assert [results[0].outcome, results[2].outcome] == [Outcome.LEARNED, Outcome.LEARNED]
    assert processor.learner_stats()["nb"]["learned"] == 2


class StubbornBatchLearner(NeuralClassifier):
    """Refuses batches, and learns no record whose features hold ``REFUSED``."""

    REFUSED = None

    def learn_many(self, X, y):
        raise RuntimeError("no batches today")

    def learn_one(self, x, y):
        if self.REFUSED in x:
            raise ValueError("refused")
        super().learn_one(x, y)


def test_a_failed_batch_step_falls_back_to_one_record_at_a_time():
    featurizer = make_learner("neural", n_buckets=2**10).steps["TextFeaturizer"]
    StubbornBatchLearner.REFUSED = featurizer.buckets("boom")[0]
    model = featurizer | StubbornBatchLearner(n_buckets=2**10)
    processor = StreamProcessor({"stubborn": model}, drift_detector="none")
    batch = [Record("a", "good day", "pos"), Record("b", "boom", "neg"), Record("c", "bad day", "neg")]
    results = processor.process_many(batch)
    assert isinstance(results[1], LearnerFailure)
    assert [results[0].outcome, results[2].outcome] == [Outcome.LEARNED, Outcome.LEARNED]
    assert processor.heads()["stubborn"][1].n_seen == 2


def test_the_worker_in_mini_batches_outputs_every_prediction_and_dead_letters_the_bad():
    processor = StreamProcessor(
        {"neural": make_learner("neural", n_buckets=2**10), "fragile": ExplodingClassifier()},
        drift_detector="none",
    )
    worker = make_worker(processor=processor, mini_batch=8)
    good = records(40)
    values = [ENCODE(r) for r in good]
    values[5:5] = [b"\xff", b"[1]", None, b'{"id": "b1", "text": "boom goes the model", "label": "pos"}']
    source = MemorySource({("in", 0): values}, handler=worker, max_poll_records=20)
    worker.owned = source.assignment()
    drain(worker, source)
    dead = worker.outputs.sink.on("in.dlq")
    reasons = [dict(headers)["reason"].decode() for _, _, headers in dead]
    assert reasons == ["invalid_utf8", "not_an_object", "empty_message", "learner_error"]
    predictions = worker.outputs.sink.on("in.predictions")
    assert sorted(key.decode() for key, _, _ in predictions) == sorted(r.id for r in good)
    assert worker.summary()["learned"] == 40 and worker.summary()["dead_lettered"] == 4
    assert worker.offsets == {("in", 0): 44}
    assert processor.heads()["neural"][1].n_seen == 40


def test_evaluate_in_mini_batches_is_close_to_one_record_at_a_time():
    rng = random.Random(7)
    stream = []
    for i in range(3000):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(WORDS[label]) for _ in range(3)] + [f"w{rng.randrange(200)}" for _ in range(3)]
        stream.append(Record(str(i), " ".join(words), label))
    single = evaluate(stream, neural_processor(drift_detector="none"))
    batched = evaluate(stream, neural_processor(drift_detector="none"), mini_batch=64)
    assert batched.records == single.records == 3000
    one = single.processor.learner_stats()["neural"]["accuracy"]
    many = batched.processor.learner_stats()["neural"]["accuracy"]
    assert many > 0.9 and abs(one - many) < 0.05


@pytest.mark.parametrize("value", ["-1", "x"])
def test_a_bad_mini_batch_setting_is_a_config_error(value):
    with pytest.raises(ConfigError):
        load_config(["--topic", "t", "--mini-batch", value], environ={})
    assert load_config(["--topic", "t", "--mini-batch", "256"], environ={}).mini_batch == 256
