"""The core processor: test-then-train, serving policies, delayed labels, failures, pickling."""

import pickle

import pytest
from river import base, compose, naive_bayes
from synthetic import topic_stream

from stream_learner.cli.evaluate import delay_labels, evaluate
from stream_learner.core.features import TextFeaturizer
from stream_learner.core.processor import LearnerFailure, Outcome, StreamProcessor
from stream_learner.core.records import Reason, Record
from stream_learner.learners.registry import make_learner


def test_matches_rivers_own_prequential_loop():
    records = list(topic_stream(600, seed=1))
    processor = StreamProcessor(["nb"], drift_detector="none")
    evaluate(records, processor)

    model = make_learner("nb")
    correct = scored = 0
    for record in records:
        y_pred = model.predict_one(record.text)
        if y_pred is not None:
            scored += 1
            correct += y_pred == record.label
        model.learn_one(record.text, record.label)
    stats = processor.learner_stats()["nb"]
    assert stats["n"] == scored
    assert stats["accuracy"] == pytest.approx(correct / scored)
    # The learner saw each record once, in order: same state as River's loop.
    ours = processor.learners["nb"]["MultinomialNB"]
    assert ours.class_counts == model["MultinomialNB"].class_counts
    assert ours.feature_counts == model["MultinomialNB"].feature_counts


def test_learners_share_one_tokenization_per_config():
    processor = StreamProcessor(["nb", "cnb", "softmax"], drift_detector="none")
    calls = []
    featurizers = [slot.featurizer for slot in processor._slots]
    for featurizer in featurizers:
        original = featurizer.transform_one
        featurizer.transform_one = lambda x, original=original: calls.append(1) or original(x)
    processor.process(Record("1", "some text here", "a"))
    # nb and cnb share counts; softmax uses L2-normalized features: two configs, two calls.
    assert len(calls) == 2


class AlwaysWrong(base.Classifier):
    def learn_one(self, x, y):
        pass

    def predict_proba_one(self, x):
        return {"nonsense": 1.0}


def test_fixed_serving_serves_the_named_learner():
    processor = StreamProcessor(["nb", "softmax"], serving="fixed:softmax", drift_detector="none")
    results = [processor.process(r) for r in topic_stream(50)]
    assert {r.prediction.learner for r in results} == {"softmax"}


def test_leader_serving_follows_the_best_rolling_accuracy():
    learners = {"good": make_learner("nb"), "bad": AlwaysWrong()}
    processor = StreamProcessor(learners, serving="leader", drift_detector="none")
    results = [processor.process(r) for r in topic_stream(300)]
    assert results[-1].prediction.learner == "good"
    assert processor.served_stats()["accuracy"] > 0.7


def test_ensemble_serving_weights_recent_accuracy():
    learners = {"good": make_learner("nb"), "bad": AlwaysWrong()}
    processor = StreamProcessor(learners, serving="ensemble", drift_detector="none")
    results = [processor.process(r) for r in topic_stream(400, noise=0.0)]
    last = results[-1].prediction
    assert last.learner == "ensemble"
    assert sum(last.proba.values()) == pytest.approx(1.0)
    assert last.proba.get("nonsense", 0) < 0.01  # the always-wrong learner has ~no weight
    assert processor.served_stats()["rolling_accuracy"] > 0.9


def test_delayed_labels_are_joined_and_scored_on_the_old_prediction():
    records = list(topic_stream(500, seed=3))
    immediate = StreamProcessor(["nb"], drift_detector="none")
    delayed = StreamProcessor(["nb"], drift_detector="none")
    evaluate(records, immediate)
    outcomes = [delayed.process(r).outcome for r in delay_labels(records, delay=0)]
    assert outcomes.count(Outcome.PREDICTED) == 500 and outcomes.count(Outcome.LABEL_JOINED) == 500
    # With a zero delay the join reproduces the immediate run exactly.
    assert delayed.learner_stats()["nb"] == immediate.learner_stats()["nb"]

    late = StreamProcessor(["nb"], drift_detector="none")
    for record in delay_labels(records, delay=50):
        late.process(record)
    stats = late.learner_stats()["nb"]
    assert stats["learned"] == 500 and late.label_buffer_stats()["joined"] == 500
    # Predictions were made before up to 50 newer records were learned: scored on what was served.
    assert 0.5 < stats["accuracy"] <= immediate.learner_stats()["nb"]["accuracy"] + 0.05


def test_unmatched_evicted_and_expired_labels_are_counted():
    processor = StreamProcessor(["nb"], drift_detector="none", label_buffer_size=2, label_ttl=10.0)
    processor.process(Record("a", "one", None), now=0.0)
    processor.process(Record("b", "two", None), now=1.0)
    processor.process(Record("c", "three", None), now=2.0)  # evicts a
    assert processor.process(Record("a", None, "x"), now=3.0).outcome == Outcome.LABEL_UNMATCHED
    assert processor.process(Record("zzz", None, "x"), now=3.0).outcome == Outcome.LABEL_UNMATCHED
    assert processor.process(Record("c", None, "x"), now=100.0).outcome == Outcome.LABEL_UNMATCHED
    stats = processor.label_buffer_stats()
    assert stats == {"size": 0, "evicted": 1, "expired": 2, "unmatched": 3, "joined": 0, "bytes": 0}


def test_a_failing_learner_raises_learner_failure_and_the_others_go_on():
    class Fragile(base.Classifier):
        def learn_one(self, x, y):
            if "boom" in x:
                raise RuntimeError("cannot learn this")

        def predict_proba_one(self, x):
            return {}

    processor = StreamProcessor(
        {"nb": make_learner("nb"), "fragile": Fragile()}, drift_detector="none"
    )
    processor.process(Record("1", "fine words", "a"))
    with pytest.raises(LearnerFailure) as caught:
        processor.process(Record("2", "boom words", "b"))
    assert caught.value.reason == Reason.LEARNER_ERROR and "fragile" in caught.value.detail
    assert processor.learner_stats()["nb"]["learned"] == 2
    assert processor.process(Record("3", "more words", "a")).outcome == Outcome.LEARNED


def test_pickled_processor_continues_identically():
    records = list(topic_stream(400, seed=5))
    processor = StreamProcessor(["nb", "softmax"], serving="ensemble", drift_detector="adwin")
    for record in records[:200]:
        processor.process(record)
    clone = pickle.loads(pickle.dumps(processor))
    for record in records[200:]:
        a = processor.process(record)
        b = clone.process(record)
        assert a.prediction == b.prediction
    assert clone.learner_stats() == processor.learner_stats()


def test_custom_pipeline_without_our_featurizer():
    from river import feature_extraction

    model = compose.Pipeline(feature_extraction.BagOfWords(), naive_bayes.MultinomialNB())
    processor = StreamProcessor({"bow": model}, drift_detector="none")
    evaluate(list(topic_stream(200)), processor)
    assert processor.learner_stats()["bow"]["accuracy"] > 0.6


def test_bad_configuration_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="unknown serving"):
        StreamProcessor(["nb"], serving="best")
    with pytest.raises(ValueError, match="names no learner"):
        StreamProcessor(["nb"], serving="fixed:other")
    with pytest.raises(ValueError, match="unknown drift detector"):
        StreamProcessor(["nb"], drift_detector="adwn")
    with pytest.raises(ValueError, match="unknown drift reaction"):
        StreamProcessor(["nb"], drift_reaction="panic")
    with pytest.raises(ValueError, match="unique"):
        StreamProcessor(["nb", "nb"])


def test_featurizer_split_keeps_the_pipeline_semantics():
    pipeline = compose.Pipeline(TextFeaturizer(), naive_bayes.MultinomialNB())
    processor = StreamProcessor({"p": pipeline}, drift_detector="none")
    for record in topic_stream(100):
        processor.process(record)
    # The processor learned into the very pipeline object it was given.
    assert pipeline.predict_one("goal match team") == "sports"
