"""Exactly-once cycles of the worker with in-memory sources and sinks: one transaction per
cycle with its offsets, pending then final checkpoints, aborts that restore the learners, the
reaction to a lost group membership and to fencing, and the error classes (docs/exactly-once.md).
The same on the real broker: tests/test_exactly_once.py."""

from __future__ import annotations

import collections

import pytest
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    UnknownMemberIdError,
)
from worker_helpers import nb_parameters, uninterrupted

from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import Decoder, Record
from stream_learner.io.retry import CallTimedOut, call_within, transaction_error_kind
from stream_learner.io.sinks import MemorySink, Outputs, TransactionAbortable, TransactionFatal
from stream_learner.io.sources import MemorySource
from stream_learner.runtime.config import ConfigError, load_config
from stream_learner.runtime.metrics import TRANSACTION_OUTCOMES, StreamMetrics
from stream_learner.runtime.worker import Worker, read_state
from stream_learner.state.checkpoint import CheckpointStore

KEY = b"exactly-once-test-key-0123456789"
ENCODE = Decoder().encode
WORDS = {"pos": ["good", "great", "fine", "love", "nice"], "neg": ["bad", "awful", "hate", "poor", "sad"]}


def records(n, seed=0):
    import random

    rng = random.Random(seed)
    return [
        Record(f"id{i}", " ".join(rng.choice(WORDS[label]) for _ in range(5)), label)
        for i, label in enumerate(rng.choice(["pos", "neg"]) for _ in range(n))
    ]


def partitioned(recs, partitions=2):
    by_partition = {("in", p): [] for p in range(partitions)}
    for i, record in enumerate(recs):
        by_partition[("in", i % partitions)].append(ENCODE(record))
    return by_partition


class GroupSink(MemorySink):
    """A transactional MemorySink whose committed offsets are the group's (the source's)."""

    def __init__(self, group: dict):
        super().__init__()
        self.committed_offsets = group


def restore_from(store):
    def reload():
        checkpoint = store.load_latest()
        if checkpoint is None:
            return StreamProcessor(["nb"]), {}, {}
        state = read_state(checkpoint.state)
        return state["processor"], checkpoint.offsets, state["counts"]

    return reload


def setup(tmp_path, recs, *, every=7, committed=None, checkpoint=None, metrics=None):
    """A worker, its source and sink; the group's committed offsets are ``source.committed``."""
    store = CheckpointStore(tmp_path / "ckpt", KEY)
    source = MemorySource(partitioned(recs), max_poll_records=5, committed=committed)
    sink = GroupSink(source.committed)
    state = {} if checkpoint is None else {
        "processor": read_state(checkpoint.state)["processor"],
        "offsets": checkpoint.offsets,
        "counts": checkpoint.state["counts"],
    }
    worker = Worker(
        state.get("processor") or StreamProcessor(["nb"]),
        Outputs(sink, predictions_topic="in.predictions", dead_letter_topic="in.dlq"),
        store,
        offsets=state.get("offsets"),
        counts=state.get("counts"),
        checkpoint_every_records=every,
        exactly_once=True,
        reload=restore_from(store),
        metrics=metrics,
    )
    source.handler = worker
    worker.source = source
    return worker, source, sink, store


def drain(worker, source, max_batches=1000):
    for _ in range(max_batches):
        batch = source.poll(0)
        if worker.fatal_error is not None:
            raise worker.fatal_error
        if not batch:
            worker.checkpoint("idle")
            return
        worker.process_batch(batch)
        if worker.checkpoint_due():
            worker.checkpoint()


def prediction_ids(sink):
    return [key.decode() for key, _, _ in sink.on("in.predictions")]


def test_each_cycle_commits_its_outputs_and_offsets_in_one_transaction(tmp_path):
    recs = records(40)
    worker, source, sink, store = setup(tmp_path, recs)
    worker.process_batch(source.poll(0))
    # Inside the open transaction: nothing visible, nothing committed.
    assert sink.transaction and prediction_ids(sink) == [] and source.committed == {}
    drain(worker, source)
    assert sorted(prediction_ids(sink)) == sorted(r.id for r in recs)
    assert source.committed == {("in", 0): 20, ("in", 1): 20}
    # Batches of 5, a cycle of at least 7 records: a transaction every two batches.
    assert sink.commits == 4 and sink.aborts == 0 and sink.transaction is None
    assert store.pending_paths() == []
    assert store.load_latest().offsets == source.committed


def transactions_counted(metrics):
    return {
        outcome: metrics.registry.get_sample_value("stream_learner_transactions_total", {"outcome": outcome})
        for outcome in TRANSACTION_OUTCOMES
    }


def test_an_abortable_commit_restores_the_learners_and_writes_every_output_once(tmp_path):
    recs = records(60, seed=1)
    metrics = StreamMetrics(process_metrics=False)
    worker, source, sink, store = setup(tmp_path, recs, metrics=metrics)
    original = sink.commit_transaction
    calls = collections.Counter()

    def commit(offsets, metadata):
        calls["n"] += 1
        if calls["n"] in (3, 5):
            raise TransactionAbortable("IllegalGenerationError (stale generation)")
        original(offsets, metadata)

    sink.commit_transaction = commit
    drain(worker, source)
    assert sink.aborts == 2 and store.pending_paths() == []
    assert transactions_counted(metrics) == {"committed": sink.commits, "postponed": 0, "aborted": 2}
    # An abort loses nothing (the records are learned again): not a checkpoint failure.
    assert metrics.registry.get_sample_value("stream_learner_checkpoint_failures_total") == 0
    assert sorted(prediction_ids(sink)) == sorted(r.id for r in recs)  # each exactly once
    assert nb_parameters(worker.processor) == uninterrupted(recs)  # counts: order-free
    assert worker.counts["learned"] == len(recs)


def test_a_worker_the_group_no_longer_counts_as_member_aborts_and_writes_nothing(tmp_path):
    """The reaction to ILLEGAL_GENERATION / UNKNOWN_MEMBER_ID, which Kafka returns to a
    zombie's TxnOffsetCommit and which the membership probe gets from the embedded broker."""
    recs = records(20, seed=2)
    worker, source, sink, store = setup(tmp_path, recs, every=1000)
    refusals = [UnknownMemberIdError(), IllegalGenerationError()]
    source.probe_membership = lambda timeout: (_ for _ in ()).throw(refusals.pop(0)) if refusals else None
    for _ in range(2):
        worker.process_batch(source.poll(0))
        assert worker.checkpoint() is False
        assert sink.sent == [] and source.committed == {}
        assert store.pending_paths() == [] and store.paths() == []
    # Learners restored (empty: no checkpoint yet) and the records read again.
    assert worker.counts["learned"] == 0
    drain(worker, source)
    assert sorted(prediction_ids(sink)) == sorted(r.id for r in recs)
    assert nb_parameters(worker.processor) == uninterrupted(recs)


def test_fenced_producer_is_fatal_and_the_restart_settles_the_pending_checkpoint(tmp_path, monkeypatch):
    import threading

    from stream_learner.runtime.worker import _settle_pending

    recs = records(30, seed=3)
    worker, source, sink, store = setup(tmp_path, recs, every=10)
    drain_until = 2  # two cycles commit, the third is fenced
    original = sink.commit_transaction

    def commit(offsets, metadata):
        if sink.commits == drain_until:
            raise TransactionFatal("commit: ProducerFencedError")
        original(offsets, metadata)

    sink.commit_transaction = commit
    with pytest.raises(TransactionFatal):
        drain(worker, source)
    assert len(store.pending_paths()) == 1  # written, its transaction never committed
    config = load_config(["--topic", "in", "--processing-guarantee", "exactly-once"], environ={})
    import stream_learner.io.broker as broker_module

    group = dict(source.committed)
    monkeypatch.setattr(
        broker_module, "committed_offsets", lambda servers, group_id, partitions, options: {tp: group.get(tp) for tp in partitions}
    )
    assert _settle_pending(config, store, threading.Event()) is None  # committed ≠ its offsets: discarded
    assert store.pending_paths() == []
    # A pending checkpoint whose offsets the group holds was committed: it becomes final.
    final = store.load_latest()
    path = store.save(final.state, final.offsets, info={
        "transaction_offsets": [[t, p, o] for (t, p), o in sorted(group.items())],
    }, pending=True)
    settled = _settle_pending(config, store, threading.Event())
    assert settled is not None and settled.sequence > final.sequence and not path.exists()
    assert store.load_latest().sequence == settled.sequence


def test_a_revoke_commits_the_open_transaction_before_the_partitions_go(tmp_path):
    recs = records(20, seed=4)
    worker, source, sink, store = setup(tmp_path, recs, every=1000)
    worker.process_batch(source.poll(0))
    worker.process_batch(source.poll(0))
    assert sink.transaction
    assert worker.partitions_revoked({("in", 0), ("in", 1)}) == {}  # no plain commit
    assert sink.transaction is None and sink.commits == 1
    # Two polls of five: the first ten records of partition 0 (even ids).
    assert sorted(prediction_ids(sink)) == sorted(f"id{i}" for i in range(0, 20, 2))
    assert source.committed == {("in", 0): 10}


def test_an_older_checkpoint_re_learns_without_writing_committed_outputs_again(tmp_path):
    """Falling back to an older checkpoint than the group's committed offsets (the newer ones
    corrupt): the records between are learned again, their outputs not written again."""
    recs = records(40, seed=5)
    worker, source, sink, store = setup(tmp_path, recs, every=10)
    drain(worker, source)
    older = store.read(store.paths()[-2])
    assert older.offsets == {("in", 0): 20, ("in", 1): 10}
    worker, source, sink, _ = setup(tmp_path / "again", recs, committed=dict(source.committed), checkpoint=older)
    drain(worker, source)
    assert prediction_ids(sink) == []
    assert nb_parameters(worker.processor) == uninterrupted(recs)


def test_store_pending_checkpoints_are_final_only_once_finalized(tmp_path):
    store = CheckpointStore(tmp_path, KEY, keep=2)
    store.save({"n": 1}, {("t", 0): 1})
    pending = store.save({"n": 2}, {("t", 0): 2}, pending=True)
    assert store.load_latest().state == {"n": 1}
    assert store.latest_pending().state == {"n": 2}
    store.finalize(pending)
    assert store.load_latest().state == {"n": 2} and store.pending_paths() == []
    stale = store.save({"n": 3}, {("t", 0): 3}, pending=True)
    store.save({"n": 4}, {("t", 0): 4})  # a final one newer than the pending: it can never count
    assert store.latest_pending() is None and not stale.exists()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ProducerFencedError(), "fatal"),
        (CommitFailedError(IllegalGenerationError()), "abortable"),
        (UnknownMemberIdError(), "abortable"),
        (KafkaTimeoutError(), "abortable"),
        (KafkaError("Cannot execute transactional method because we are in an error state"), "fatal"),
    ],
)
def test_transaction_errors_are_fatal_or_abortable(error, kind):
    assert transaction_error_kind(error) == kind


def test_an_error_state_takes_the_kind_of_its_cause():
    try:
        try:
            raise CommitFailedError(IllegalGenerationError())
        except CommitFailedError as cause:
            raise KafkaError("Cannot execute transactional method because we are in an error state") from cause
    except KafkaError as error:
        assert transaction_error_kind(error) == "abortable"


def test_call_within_bounds_a_call_that_never_returns():
    import threading

    never = threading.Event()
    with pytest.raises(CallTimedOut, match="commit_transaction did not finish within 0 s"):
        call_within(never.wait, 0.2, "commit_transaction")
    assert call_within(lambda: 42, 5, "quick") == 42


def test_config_exactly_once_options():
    config = load_config(
        ["--topic", "t", "--processing-guarantee", "exactly-once", "--transaction-every-records", "50",
         "--transaction-every-seconds", "0.5"],
        environ={},
    )
    assert config.exactly_once and config.producer_process  # the producer process owns the transaction
    assert (config.cycle_records, config.cycle_seconds) == (50, 0.5)
    assert load_config(["--topic", "t"], environ={}).cycle_records == 100_000
    env = load_config(["--topic", "t"], environ={"STREAM_LEARNER_PROCESSING_GUARANTEE": "exactly-once"})
    assert env.exactly_once
    for bad in (
        ["--processing-guarantee", "twice"],
        ["--processing-guarantee", "exactly-once", "--consumer-process"],
        ["--processing-guarantee", "exactly-once", "--fusion", "on"],
        ["--transaction-timeout", "0"],
    ):
        with pytest.raises(ConfigError):
            load_config(["--topic", "t", *bad], environ={})


class FakeProducer:
    """The transactional calls of a kafka-python producer, each doing what a test says."""

    def __init__(self, commit=lambda: None, abort=lambda: None):
        self.commit, self.abort = commit, abort
        self.calls = []

    def begin_transaction(self):
        self.calls.append("begin")

    def send_offsets_to_transaction(self, offsets, metadata):
        self.calls.append(("offsets", {(tp.topic, tp.partition): o.offset for tp, o in offsets.items()}))

    def commit_transaction(self):
        self.calls.append("commit")
        self.commit()

    def abort_transaction(self):
        self.calls.append("abort")
        self.abort()

    def flush(self, timeout=None):
        pass


def transactional_sink(producer, timeout=5.0):
    from stream_learner.io.sinks import KafkaSink, _Refusals

    sink = object.__new__(KafkaSink)  # the sink's logic around a fake producer
    sink._producer, sink.transaction_timeout, sink.transactional_id = producer, timeout, "g-w"
    sink._in_transaction, sink._refused, sink._pending, sink._unconfirmed = False, {}, [], []
    sink._refusals, sink._partitions = _Refusals(()), {}
    return sink


def test_kafka_sink_commits_offsets_in_the_transaction_and_classifies_failures():
    import threading

    producer = FakeProducer()
    sink = transactional_sink(producer)
    sink.begin_transaction()
    sink.commit_transaction({("in", 0): 7}, "metadata")
    assert producer.calls == ["begin", ("offsets", {("in", 0): 7}), "commit"]

    stale = FakeProducer(commit=lambda: (_ for _ in ()).throw(CommitFailedError(IllegalGenerationError())))
    sink = transactional_sink(stale)
    sink.begin_transaction()
    with pytest.raises(TransactionAbortable):
        sink.commit_transaction({("in", 0): 7}, "metadata")
    sink.abort_transaction()
    assert stale.calls[-1] == "abort"

    fenced = FakeProducer(commit=lambda: (_ for _ in ()).throw(ProducerFencedError()))
    sink = transactional_sink(fenced)
    sink.begin_transaction()
    with pytest.raises(TransactionFatal, match="ProducerFenced"):
        sink.commit_transaction({}, "metadata")

    # A fenced producer's EndTxn gets no answer from the embedded broker: bounded.
    never = threading.Event()
    sink = transactional_sink(FakeProducer(commit=never.wait), timeout=0.3)
    sink.begin_transaction()
    with pytest.raises(TransactionFatal, match="commit_transaction did not finish"):
        sink.commit_transaction({}, "metadata")
    never.set()


def test_a_coordinator_that_does_not_answer_postpones_the_commit_without_aborting(tmp_path):
    recs = records(20, seed=6)
    metrics = StreamMetrics(process_metrics=False)
    worker, source, sink, store = setup(tmp_path, recs, every=1000, metrics=metrics)
    answers = [CallTimedOut("membership check did not finish within 10 s")]
    source.probe_membership = lambda timeout: (_ for _ in ()).throw(answers.pop(0)) if answers else None
    worker.process_batch(source.poll(0))
    assert worker.checkpoint() is False
    assert sink.transaction and sink.aborts == 0 and worker.counts["learned"] == 5  # kept open
    drain(worker, source)
    assert sorted(prediction_ids(sink)) == sorted(r.id for r in recs) and sink.aborts == 0
    assert transactions_counted(metrics) == {"committed": 1, "postponed": 1, "aborted": 0}
    assert metrics.registry.get_sample_value("stream_learner_checkpoint_failures_total") == 1
