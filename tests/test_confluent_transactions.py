"""The confluent-kafka sink's transactional mode (``--processing-guarantee exactly-once``) and
the source's part in it, on the embedded broker: outputs and consumed offsets committed
together, aborts that move nothing, a commit across a broker freeze, and a fenced producer.

Where Tansu differs from Kafka (aborted records reach ``read_committed`` readers, fencing error
codes), see ``tests/test_broker_transactions.py`` and ``docs/exactly-once.md``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
from kafka_helpers import committed_offset, read_committed_dropping_aborted

from stream_learner.io.broker import EmbeddedBroker, create_topics

confluent_kafka = pytest.importorskip("confluent_kafka")

from stream_learner.io import confluent  # noqa: E402
from stream_learner.io.confluent import ConfluentSink, ConfluentSource  # noqa: E402
from stream_learner.io.sinks import TransactionAbortable, TransactionFatal  # noqa: E402
from stream_learner.io.sources import StartAtCommitted  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TIMEOUT_S = 30.0


def joined_source(bootstrap: str, topic: str, group: str, **options) -> ConfluentSource:
    """A ConfluentSource that has its partitions (group metadata of a real member); what
    it read meanwhile is in its ``early`` list."""
    source = ConfluentSource(
        [topic],
        bootstrap_servers=bootstrap,
        group_id=group,
        handler=StartAtCommitted(),
        session_timeout_ms=6000,
        **options,
    )
    source.early = []
    deadline = time.monotonic() + TIMEOUT_S
    while not source.assignment():
        assert time.monotonic() < deadline, "the source got no partitions"
        source.early += source.poll(0.2)
    return source


@pytest.fixture
def topics(kafka_broker, kafka_names):
    """(input topic, output topic, group), one partition each."""
    names = {f"{kafka_names}-in": 1, f"{kafka_names}-out": 1}
    create_topics(kafka_broker.bootstrap_servers, names)
    return f"{kafka_names}-in", f"{kafka_names}-out", f"{kafka_names}-group"


def transactional_sink(
    bootstrap: str, transactional_id: str, transaction_timeout: float = TIMEOUT_S, **options
):
    return ConfluentSink(
        bootstrap_servers=bootstrap,
        transactional_id=transactional_id,
        transaction_timeout=transaction_timeout,
        client_options=options,
    )


def test_committed_outputs_and_offsets_are_visible_once(kafka_broker, topics):
    bootstrap = kafka_broker.bootstrap_servers
    source_topic, out, group = topics
    source = joined_source(bootstrap, source_topic, group, read_committed=True)
    try:
        sink = transactional_sink(bootstrap, f"{group}-w1")
        sink.begin_transaction()
        for i in range(3):
            sink.send(out, f"k{i}".encode(), f"first-{i}".encode())
        sink.dispatch()
        assert committed_offset(bootstrap, group, source_topic) is None  # only at commit
        sink.commit_transaction({(source_topic, 0): 3}, source.group_metadata())
        assert committed_offset(bootstrap, group, source_topic) == 3

        # The next cycle: begin is implicit at the first dispatch.
        sink.send(out, b"k3", b"second-0")
        sink.commit_transaction({(source_topic, 0): 4}, source.group_metadata())
        assert committed_offset(bootstrap, group, source_topic) == 4
        # Nothing to commit: no transaction, no offsets.
        sink.commit_transaction({}, source.group_metadata())
        sink.close()
    finally:
        source.close()
    assert read_committed_dropping_aborted(bootstrap, out) == [
        b"first-0",
        b"first-1",
        b"first-2",
        b"second-0",
    ]


def test_abort_drops_the_outputs_and_leaves_the_offsets_unmoved(kafka_broker, topics):
    bootstrap = kafka_broker.bootstrap_servers
    source_topic, out, group = topics
    source = joined_source(bootstrap, source_topic, group)
    try:
        sink = transactional_sink(bootstrap, f"{group}-w1")
        sink.send(out, None, b"committed")
        sink.commit_transaction({(source_topic, 0): 1}, source.group_metadata())

        sink.begin_transaction()
        sink.send(out, None, b"aborted-delivered")
        sink.flush(TIMEOUT_S)  # on the broker, inside the open transaction
        sink.send(out, None, b"aborted-unsent")
        sink.abort_transaction()
        assert committed_offset(bootstrap, group, source_topic) == 1

        sink.send(out, None, b"after-abort")  # the producer goes on after an abort
        sink.commit_transaction({(source_topic, 0): 2}, source.group_metadata())
        assert committed_offset(bootstrap, group, source_topic) == 2
        sink.close()
    finally:
        source.close()
    assert read_committed_dropping_aborted(bootstrap, out) == [b"committed", b"after-abort"]


def test_a_read_committed_source_reads_no_open_transaction(kafka_broker, topics):
    """The exactly-once source never learns from an upstream transaction that may abort."""
    bootstrap = kafka_broker.bootstrap_servers
    source_topic, _out, group = topics
    upstream = transactional_sink(bootstrap, f"{group}-upstream")
    upstream.send(source_topic, None, b"committed")
    upstream.commit_transaction({}, None)
    upstream.begin_transaction()
    upstream.send(source_topic, None, b"open")
    upstream.flush(TIMEOUT_S)
    source = joined_source(bootstrap, source_topic, group, read_committed=True)
    try:
        values, deadline = [m.value for m in source.early], time.monotonic() + TIMEOUT_S
        while not values:
            assert time.monotonic() < deadline, "the committed record never came"
            values += [m.value for m in source.poll(0.2)]
        # A non-event: the open record does not come while the transaction is open.
        quiet_until = time.monotonic() + 2.0
        while time.monotonic() < quiet_until:
            values += [m.value for m in source.poll(0.2)]
        assert values == [b"committed"]
        upstream.commit_transaction({}, None)
        deadline = time.monotonic() + TIMEOUT_S
        while len(values) < 2:
            assert time.monotonic() < deadline, "the committed transaction never came"
            values += [m.value for m in source.poll(0.2)]
        assert values == [b"committed", b"open"]
    finally:
        source.close()
        upstream.close()


def test_commit_across_a_broker_freeze_completes_when_it_resumes(kafka_names, caplog, monkeypatch):
    """librdkafka's commit times out (retriable) while the broker is frozen; the sink calls it
    again within its bound and the commit completes once the broker resumes. A broker of its
    own: freezing the shared one would stall the other tests."""
    monkeypatch.setattr(confluent, "_TRANSACTION_CALL_SLICE", 1.0)
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        source_topic, out, group = f"{kafka_names}-in", f"{kafka_names}-out", f"{kafka_names}-group"
        create_topics(bootstrap, {source_topic: 1, out: 1})
        source = joined_source(bootstrap, source_topic, group)
        try:
            # Each request waits 5 s for an answer (a frozen broker gives none), then is sent again.
            sink = transactional_sink(
                bootstrap, f"{group}-w1", transaction_timeout=120, request_timeout_ms=5000
            )
            sink.begin_transaction()
            sink.send(out, None, b"across-freeze")
            sink.flush(TIMEOUT_S)
            metadata = source.group_metadata()
            outcome = []

            def commit():
                try:
                    sink.commit_transaction({(source_topic, 0): 1}, metadata)
                    outcome.append("committed")
                except Exception as error:  # noqa: BLE001 - reported by the assertion below
                    outcome.append(error)

            caplog.set_level(logging.WARNING, logger="stream_learner.io.confluent")
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                committing = threading.Thread(target=commit, daemon=True)
                committing.start()
                deadline = time.monotonic() + TIMEOUT_S
                while "calling it again" not in caplog.text:
                    assert time.monotonic() < deadline, "the commit never timed out while frozen"
                    assert committing.is_alive(), outcome
                    time.sleep(0.1)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            committing.join(TIMEOUT_S)
            assert outcome == ["committed"]
            assert committed_offset(bootstrap, group, source_topic) == 1
            sink.close()
        finally:
            source.close()
        assert read_committed_dropping_aborted(bootstrap, out) == [b"across-freeze"]


def test_a_commit_that_outlasts_its_bound_is_fatal(kafka_names, monkeypatch):
    """Never block for ever: a broker frozen past the transaction timeout makes the commit
    fatal (the worker exits; the restart tells from the committed offsets what happened)."""
    monkeypatch.setattr(confluent, "_TRANSACTION_CALL_SLICE", 1.0)
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        out = f"{kafka_names}-out"
        create_topics(bootstrap, {out: 1})
        sink = transactional_sink(bootstrap, f"{kafka_names}-w1", transaction_timeout=3)
        sink.begin_transaction()
        sink.send(out, None, b"frozen")
        sink.flush(TIMEOUT_S)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TransactionFatal, match="within the transaction timeout"):
                sink.commit_transaction({}, None)
            assert time.monotonic() - started < TIMEOUT_S  # a guard against a hang, not a timing
        finally:
            os.kill(broker.pid, signal.SIGCONT)


def test_a_fenced_producer_raises_the_fatal_class(kafka_broker, topics):
    """A second producer with the same transactional id (the worker restarted elsewhere)
    fences the first: its next send and its commit are fatal, never abortable, and nothing of
    it is committed. On Kafka the zombie's commit fails PRODUCER_FENCED at once; on Tansu its
    Produce fails PRODUCER_FENCED (which librdkafka calls abortable: the sink makes it fatal)."""
    bootstrap = kafka_broker.bootstrap_servers
    source_topic, out, group = topics
    source = joined_source(bootstrap, source_topic, group)
    try:
        zombie = transactional_sink(bootstrap, f"{group}-w1")
        zombie.begin_transaction()
        zombie.send(out, None, b"zombie-open")
        zombie.flush(TIMEOUT_S)
        successor = transactional_sink(bootstrap, f"{group}-w1")  # init_transactions fences

        zombie.send(out, None, b"zombie-late")
        with pytest.raises(TransactionFatal, match="FENCED"):
            zombie.commit_transaction({(source_topic, 0): 9}, source.group_metadata())
        with pytest.raises(TransactionFatal):  # it stays fatal, at once
            zombie.abort_transaction()
        with pytest.raises(TransactionFatal):
            zombie.begin_transaction()

        successor.send(out, None, b"successor")
        successor.commit_transaction({(source_topic, 0): 1}, source.group_metadata())
        assert committed_offset(bootstrap, group, source_topic) == 1
        successor.close()
    finally:
        source.close()
    assert read_committed_dropping_aborted(bootstrap, out) == [b"successor"]


def test_a_fenced_producers_commit_without_sending_is_fatal_within_its_bound(kafka_broker, topics):
    """Tansu never answers a fenced producer's EndTxn (librdkafka: retriable ``_TIMED_OUT``
    for ever; Kafka answers PRODUCER_FENCED at once): the sink's bound makes it fatal."""
    bootstrap = kafka_broker.bootstrap_servers
    _source_topic, out, group = topics
    zombie = transactional_sink(bootstrap, f"{group}-w1", transaction_timeout=3)
    zombie.begin_transaction()
    zombie.send(out, None, b"zombie-open")
    zombie.flush(TIMEOUT_S)
    transactional_sink(bootstrap, f"{group}-w1")  # fences the zombie, aborts its transaction
    started = time.monotonic()
    with pytest.raises(TransactionFatal):
        zombie.commit_transaction({}, None)
    assert time.monotonic() - started < TIMEOUT_S  # a guard against a hang, not a timing


def test_the_membership_probe_tells_a_member_the_group_forgot(kafka_broker, topics):
    """What the worker asks before each commit, since the embedded broker does not check the
    generation of a TxnOffsetCommit: a consumer that stopped polling past
    ``max.poll.interval.ms`` has left the group (librdkafka leaves by itself; its assignment
    stays until the next poll), and the probe tells it at once."""
    bootstrap = kafka_broker.bootstrap_servers
    source_topic, _out, group = topics
    sink = transactional_sink(bootstrap, f"{group}-w1")
    source = joined_source(
        bootstrap, source_topic, group, client_options={"max_poll_interval_ms": 6000}
    )
    try:
        source.probe_membership()  # a member without committed offsets: nothing to ask, nothing raised
        sink.commit_transaction({(source_topic, 0): 0}, source.group_metadata())
        source.probe_membership()  # a member: nothing raised
        deadline = time.monotonic() + TIMEOUT_S
        while source.consumer.memberid():  # not polling: librdkafka leaves the group
            assert time.monotonic() < deadline, "the consumer never left the group"
            time.sleep(0.2)
        with pytest.raises(TransactionAbortable, match="UNKNOWN_MEMBER_ID|ILLEGAL_GENERATION"):
            source.probe_membership()
    finally:
        source.close()
        sink.close()
