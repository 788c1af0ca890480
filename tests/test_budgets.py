"""Bounded memory under hostile input: the label buffer in bytes, classes, drift events."""

from __future__ import annotations

import collections
import pickle
import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import base
from worker_helpers import ENCODE, drain, make_worker

from stream_learner.cli.evaluate import delay_labels, evaluate
from stream_learner.core.labels import LabelBuffer, PendingRecord, SparseFeatures
from stream_learner.core.processor import Outcome, Prediction, RecordRejected, StreamProcessor
from stream_learner.core.records import Reason, Record
from stream_learner.io.sources import MemorySource
from stream_learner.learners.registry import make_learner
from stream_learner.runtime.config import ConfigError, load_config
from stream_learner.state.checkpoint import CheckpointStore

MiB = 2**20
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def big_text(rng: random.Random, size: int = 60_000) -> str:
    """~``size`` characters of words that are nearly all distinct: the costliest features."""
    words = []
    length = 0
    while length < size:
        word = "".join(rng.choices(LETTERS, k=7))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def features_of(processor: StreamProcessor, text: str) -> dict:
    """Each learner's input for ``text``, as the processor keys them."""
    return {slot.key: slot.features(text) for slot in processor._slots}


def traced(build):
    """(result of ``build()``, bytes it still holds) measured with tracemalloc."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = build()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


# -- the label buffer in bytes ----------------------------------------------------------------


def test_unlabelled_60kb_records_keep_the_label_buffer_under_its_byte_budget():
    budget = 2 * MiB
    processor = StreamProcessor(["nb", "softmax"], drift_detector="none", label_buffer_bytes=budget)
    rng = random.Random(1)
    for i in range(4):  # a few known classes, so that predictions are real dicts
        processor.process(Record(f"l{i}", big_text(rng, 2000), f"c{i}"), now=0.0)
    for i in range(40):
        result = processor.process(Record(f"u{i}", big_text(rng)), now=float(i))
        assert result.outcome == Outcome.PREDICTED
        assert processor.labels.nbytes <= budget
    stats = processor.label_buffer_stats()
    assert 0 < stats["size"] < 40 and stats["evicted"] == 40 - stats["size"]
    assert stats["bytes"] == processor.labels.nbytes
    # The newest records are the ones kept, and they still join.
    newest = processor.process(Record("u39", None, "c1"), now=40.0)
    assert newest.outcome == Outcome.LABEL_JOINED
    assert processor.process(Record("u0", None, "c1"), now=40.0).outcome == Outcome.LABEL_UNMATCHED


def test_a_record_larger_than_the_whole_budget_is_not_kept():
    buffer = LabelBuffer(max_bytes=10_000)
    buffer.put("small", features={"k": {1: 1}}, predictions={}, now=0.0)
    buffer.put("huge", features={"k": {i: 1 for i in range(10_000)}}, predictions={}, now=1.0)
    assert len(buffer) == 1 and buffer.evicted == 1 and buffer.nbytes <= 10_000
    assert buffer.pop("small", now=2.0) is not None


def test_bytes_are_accounted_honestly_and_a_pending_60kb_record_costs_its_arrays_not_dicts():
    processor = StreamProcessor(["nb", "softmax"], drift_detector="none")
    rng = random.Random(2)
    probas = {
        "nb": {f"c{i}": 1 / 300 for i in range(300)},
        "softmax": {f"c{i}": 1 / 300 for i in range(300)},
    }
    served = Prediction("c0", probas["nb"], "nb")

    texts = [big_text(rng) for _ in range(5)]
    inputs, as_dicts = traced(lambda: [features_of(processor, text) for text in texts])
    buffer, held = traced(lambda: _filled(inputs, probas, served))
    n_features = sum(len(x) for features in inputs for x in features.values())

    # What the buffer counts is what it holds, within a margin for allocator rounding.
    assert 0.8 * held <= buffer.nbytes <= 1.25 * held
    # Compact: ~12 bytes a feature (int32 id, float64 or int32 weight), not a dict's ~100.
    assert buffer.nbytes < 16 * n_features + 5 * 20_000
    assert buffer.nbytes < as_dicts / 5


def _filled(inputs, probas, served) -> LabelBuffer:
    buffer = LabelBuffer(max_bytes=1 << 40)
    for i, features in enumerate(inputs):
        buffer.put(str(i), features=features, predictions=probas, served=served, now=0.0)
    return buffer


# -- exactness: a label joined later learns what it would have learned at once ---------------


@pytest.mark.parametrize("learners", [["nb", "softmax"], ["hat"], ["logreg", "neural"]])
def test_a_record_labelled_later_learns_exactly_what_the_dict_path_learns(learners):
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(60)]
    stream = [
        Record(
            str(i),
            " ".join(rng.choice(vocabulary) for _ in range(rng.randrange(1, 12))),
            rng.choice("abc"),
        )
        for i in range(300)
    ]
    late = StreamProcessor(
        {name: make_learner(name, n_buckets=2**12) for name in learners}, drift_detector="none"
    )
    for record in delay_labels(stream, 20):
        late.process(record, now=0.0)
    assert late.label_buffer_stats()["joined"] == 300
    # The old path: the featurizer's dict kept as is, predicted on, learned when the label comes.
    for name in learners:
        featurizer, head = list(make_learner(name, n_buckets=2**12).steps.values())
        waiting = {}
        for record in delay_labels(stream, 20):
            if record.text is not None:
                waiting[record.id] = featurizer.transform_one(record.text)
                head.predict_proba_one(waiting[record.id])
            else:
                head.learn_one(waiting.pop(record.id), record.label)
        probes = [featurizer.transform_one(record.text) for record in stream]
        assert _state(late.learners[name].steps[type(head).__name__], probes) == _state(
            head, probes
        )


def _state(head, probes) -> tuple:
    """Naive Bayes: its counts, key for key; any learner: its exact probabilities on ``probes``
    (a tree's pickle is not deterministic)."""
    predictions = [head.predict_proba_one(x) for x in probes]
    if hasattr(head, "class_counts"):
        counts = {f: dict(c) for f, c in head.feature_counts.items()}
        return dict(head.class_counts), counts, dict(head.class_totals), predictions
    return predictions


texts = st.text(st.characters(codec="utf-8"), max_size=300) | st.lists(
    st.sampled_from(["good", "bad", "http://x.io/a", "a@b.co", "42", "!!!", "día", "東京"]),
    max_size=40,
).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(text=texts, learner=st.sampled_from(["nb", "softmax", "hat", "neural"]))
def test_compact_features_give_back_the_featurizer_dict_key_for_key(text, learner):
    featurizer = list(make_learner(learner, n_buckets=2**12).steps.values())[0]
    x = featurizer.transform_one(text)
    buffer = LabelBuffer()
    buffer.RECENT = 0  # every record made compact at once
    buffer.put("r", features={"k": x}, predictions={}, now=0.0)
    back = buffer.pop("r", now=0.0).features["k"]
    assert list(back.items()) == list(x.items())
    assert [type(v) for v in back.values()] == [type(v) for v in x.values()]
    if not featurizer.dense:
        batch = featurizer.buckets_many([text, "other words"])
        record = batch.record(0)
        kept = SparseFeatures.from_dict(record)
        compact = kept.to_dict() if kept is not None else record
        assert list(compact.items()) == list(record.items())


# -- classes past the cap ---------------------------------------------------------------------


def test_labels_past_max_classes_are_rejected_and_known_ones_stay_learnable():
    processor = StreamProcessor(["nb"], drift_detector="none", max_classes=3)
    for label in ["a", "b", "c"]:
        assert processor.process(Record(label, f"text {label}", label)).outcome == Outcome.LEARNED
    with pytest.raises(RecordRejected) as rejected:
        processor.process(Record("d", "text d", "d"))
    assert rejected.value.reason == Reason.TOO_MANY_CLASSES == "too_many_classes"
    assert processor.process(Record("a2", "text a", "a")).outcome == Outcome.LEARNED
    # A late label of a fresh class is refused too, and its waiting prediction dropped.
    processor.process(Record("p", "pending text"))
    with pytest.raises(RecordRejected):
        processor.process(Record("p", None, "e"))
    assert len(processor.labels) == 0
    assert set(processor.learners["nb"].steps["MultinomialNB"].class_counts) == {"a", "b", "c"}
    assert processor.learner_stats()["nb"]["learned"] == 4


def _outcome(result):
    return result.reason if isinstance(result, RecordRejected) else result.outcome


kinds = st.lists(
    st.tuples(
        st.sampled_from(["labelled", "unlabelled", "label-only"]),
        st.integers(0, 9),
        st.integers(0, 7),
    ),
    max_size=50,
)


@settings(max_examples=60, deadline=None)
@given(
    spec=kinds,
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=10),
    learner=st.sampled_from(["nb", "neural"]),
)
def test_max_classes_gives_the_same_outcomes_whatever_the_batches(spec, cuts, learner):
    stream = []
    for kind, key, label in spec:
        text = f"word{key} word{label} text"
        label = f"class{label}"
        stream.append(
            {"labelled": Record(f"r{key}", text, label), "unlabelled": Record(f"r{key}", text)}.get(
                kind, Record(f"r{key}", None, label)
            )
        )

    def build():
        return StreamProcessor(
            {learner: make_learner(learner, n_buckets=2**10)}, drift_detector="none", max_classes=3
        )

    one_by_one = build()
    expected = []
    for record in stream:
        try:
            expected.append(one_by_one.process(record, now=0.0).outcome)
        except RecordRejected as rejected:
            expected.append(rejected.reason)
    batched = build()
    got, start, i = [], 0, 0
    while start < len(stream):
        part = stream[start : start + cuts[i % len(cuts)]]
        got += [_outcome(r) for r in batched.process_many(part, [0.0] * len(part))]
        start, i = start + len(part), i + 1
    assert got == expected
    assert list(batched.classes) == list(one_by_one.classes) and len(batched.classes) <= 3
    assert (
        batched.learner_stats()[learner]["learned"]
        == one_by_one.learner_stats()[learner]["learned"]
    )


@pytest.mark.parametrize("mini_batch", [0, 16])
def test_the_worker_dead_letters_labels_past_the_cap(mini_batch):
    processor = StreamProcessor(["nb"], drift_detector="none", max_classes=2)
    worker = make_worker(processor=processor, mini_batch=mini_batch)
    values = [ENCODE(Record(f"id{i}", f"some text {i}", f"label{i % 5}")) for i in range(50)]
    drain(worker, MemorySource({("in", 0): values}, handler=worker, max_poll_records=20))
    dead = worker.outputs.sink.on("in.dlq")
    assert len(dead) == 30
    assert {dict(headers)["reason"].decode() for _, _, headers in dead} == {"too_many_classes"}
    assert worker.summary()["learned"] == 20 and worker.offsets == {("in", 0): 50}


def test_evaluate_counts_records_past_the_cap_as_skipped():
    stream = [Record(str(i), f"text {i % 7}", f"label{i % 7}") for i in range(70)]
    for mini_batch in (0, 8):
        result = evaluate(
            stream,
            StreamProcessor(["nb"], drift_detector="none", max_classes=5),
            mini_batch=mini_batch,
        )
        assert result.skipped == {"too_many_classes": 20} and result.learner_errors == 0


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], (256 * MiB, 500)),
        (["--label-buffer-bytes", "64MiB", "--max-classes", "50"], (64 * MiB, 50)),
        (["--label-buffer-bytes", "1000000"], (1_000_000, 500)),
    ],
)
def test_byte_budget_and_class_cap_settings(flags, expected):
    config = load_config(["--topic", "t", *flags], environ={})
    assert (config.label_buffer_bytes, config.max_classes) == expected
    env = load_config(["--topic", "t"], environ={"STREAM_LEARNER_LABEL_BUFFER_BYTES": "1GiB"})
    assert env.label_buffer_bytes == 2**30


@pytest.mark.parametrize(
    "flags",
    [["--label-buffer-bytes", "lots"], ["--label-buffer-bytes", "0"], ["--max-classes", "0"]],
)
def test_bad_budget_settings_are_config_errors(flags):
    with pytest.raises(ConfigError):
        load_config(["--topic", "t", *flags], environ={})


# -- drift events -----------------------------------------------------------------------------


class Constant(base.Classifier):
    """Always predicts "a": its errors follow the labels."""

    def learn_one(self, x, y):
        pass

    def predict_proba_one(self, x):
        return {"a": 1.0}


def test_only_the_newest_drift_events_are_kept_but_every_one_is_reported():
    processor = StreamProcessor(
        {"constant": Constant()}, drift_detector="adwin", drift_events_kept=3
    )
    reported = []
    for i in range(6000):
        label = "a" if i % 1000 < 800 else "b"  # errors rise at every 800th record
        reported += processor.process(Record(str(i), "x", label), now=float(i)).drift_events
    assert len(reported) > 3
    assert list(processor.drift_events) == reported[-3:]
    restored = pickle.loads(pickle.dumps(processor))
    assert restored.drift_events.maxlen == 3 and len(restored.drift_events) == 3


# -- checkpoints ------------------------------------------------------------------------------


def test_the_compact_buffer_survives_a_checkpoint_and_joins_as_before(tmp_path):
    rng = random.Random(4)
    stream = [Record(str(i), big_text(rng, 3000), rng.choice("xyz")) for i in range(30)]
    processor = StreamProcessor(["nb", "softmax"], drift_detector="none")
    for record in stream[:20]:
        processor.process(Record(record.id, record.text), now=0.0)
    store = CheckpointStore(tmp_path, b"k" * 32)
    store.save({"processor": processor.state_dict()}, {("t", 0): 20})
    restored = StreamProcessor.from_state(store.load_latest().state["processor"])
    assert restored.label_buffer_stats() == processor.label_buffer_stats()
    for p in (processor, restored):
        for record in stream[:20]:
            assert (
                p.process(Record(record.id, None, record.label), now=1.0).outcome
                == Outcome.LABEL_JOINED
            )
    probes = [record.text for record in stream]
    for name, (featurizer, head) in processor.heads().items():
        xs = [featurizer.transform_one(text) for text in probes]
        assert _state(restored.heads()[name][1], xs) == _state(head, xs)
    assert restored.labels.nbytes == 0


def test_a_processor_pickled_before_the_budgets_loads_bounded():
    processor = StreamProcessor(["nb"], drift_detector="none")
    for i, label in enumerate("abcab"):
        processor.process(Record(str(i), f"text {i}", label), now=0.0)
    served = Prediction("a", {"a": 0.6, "b": 0.4}, "nb")
    x = {3: 1, 5: 2}
    # The state an older version pickled: dict entries, a list of events, no bounds.
    old = processor.__dict__.copy()
    old["drift_events"] = []
    del old["classes"], old["max_classes"]
    buffer_state = processor.labels.__dict__.copy()
    buffer_state["_pending"] = collections.OrderedDict(
        {"p": PendingRecord({processor._slots[0].key: x}, {"nb": served.proba}, served, 0.0)}
    )
    del buffer_state["max_bytes"], buffer_state["nbytes"]
    processor.labels.__dict__.clear()
    processor.labels.__setstate__(pickle.loads(pickle.dumps(buffer_state)))
    old["labels"] = processor.labels
    fresh = StreamProcessor.__new__(StreamProcessor)
    fresh.__setstate__(old)
    assert set(fresh.classes) == {"a", "b", "c"}
    assert isinstance(fresh.drift_events, collections.deque) and fresh.drift_events.maxlen
    assert 0 < fresh.labels.nbytes < fresh.labels.max_bytes
    pending = fresh.labels.pop("p", now=0.0)
    assert pending.features == {processor._slots[0].key: x} and pending.served == served


def test_the_buffer_bytes_and_the_new_reason_are_exported():
    from prometheus_client import CollectorRegistry

    from stream_learner.runtime.metrics import DEAD_LETTER_REASONS, StreamMetrics

    registry = CollectorRegistry()
    metrics = StreamMetrics(registry, learners=["nb"], detector="adwin")
    metrics.set_label_buffer({"size": 2, "bytes": 4096, "expired": 0, "evicted": 0, "unmatched": 0})
    assert registry.get_sample_value("stream_learner_label_buffer_bytes") == 4096
    assert "too_many_classes" in DEAD_LETTER_REASONS
    metrics.dead_lettered("too_many_classes")
    assert (
        registry.get_sample_value(
            "stream_learner_dead_letters_total", {"reason": "too_many_classes"}
        )
        == 1
    )


operations = st.lists(
    st.tuples(
        st.sampled_from(["put", "pop", "advance"]),
        st.integers(0, 12),  # id
        st.integers(0, 400),  # features in the record
    ),
    max_size=80,
)


@settings(max_examples=100, deadline=None)
@given(ops=operations, max_entries=st.integers(1, 8), max_bytes=st.integers(1, 20_000))
def test_the_buffer_stays_within_its_bounds_and_counts_every_record(ops, max_entries, max_bytes):
    buffer = LabelBuffer(max_entries=max_entries, ttl=5.0, max_bytes=max_bytes)
    now, put, popped = 0.0, 0, 0
    for op, key, size in ops:
        if op == "put":
            features = {"k": {i * 7 + key: 1.0 / (i + 1) for i in range(size)}}
            buffer.expire(now)  # as put does first: an expired record is not a replaced one
            replaced = 1 if str(key) in buffer._pending else 0
            buffer.put(
                str(key), features=features, predictions={"m": {"a": 0.5, "b": 0.5}}, now=now
            )
            put += 1 - replaced
        elif op == "pop":
            popped += buffer.pop(str(key), now=now) is not None
        else:
            now += 2.0
        assert len(buffer) <= max_entries and 0 <= buffer.nbytes <= max_bytes
        assert buffer.nbytes == sum(entry.nbytes for entry in buffer._pending.values())
        assert put == len(buffer) + popped + buffer.evicted + buffer.expired


def test_lower_limits_on_a_restored_processor_evict_the_oldest():
    processor = StreamProcessor(["nb"], drift_detector="none")
    for i in range(10):
        processor.process(Record(str(i), f"some words {i}"), now=float(i))
    per_record = processor.labels.nbytes / 10
    processor.set_limits(
        label_buffer_bytes=int(per_record * 4.5), label_buffer_size=8, max_classes=1
    )
    assert list(processor.labels._pending) == ["6", "7", "8", "9"]
    assert processor.label_buffer_stats()["evicted"] == 6
    assert processor.max_classes == 1


def test_small_records_wait_as_given_then_compact_and_bytes_follow():
    buffer = LabelBuffer(max_bytes=1 << 30)
    buffer.RECENT = 3
    x = {i * 1009: 0.25 for i in range(40)}
    proba = {f"c{i}": 0.05 for i in range(20)}
    for i in range(3):
        buffer.put(str(i), features={"k": dict(x)}, predictions={"m": dict(proba)}, now=0.0)
    raw = buffer.nbytes
    assert all(entry.raw for entry in buffer._pending.values())
    buffer.put(
        "3", features={"k": dict(x)}, predictions={"m": dict(proba)}, now=0.0
    )  # "0" compacts
    assert not buffer._pending["0"].raw and buffer._pending["3"].raw
    assert buffer.nbytes < raw * 4 / 3
    assert buffer.nbytes == sum(entry.nbytes for entry in buffer._pending.values())
    for i in range(4):
        pending = buffer.pop(str(i), now=0.0)
        assert list(pending.features["k"].items()) == list(x.items())
        assert list(pending.predictions["m"].items()) == list(proba.items())
    assert buffer.nbytes == 0
