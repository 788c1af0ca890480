"""ProcessSource: the kafka-python consumer in a child process, against a real Tansu broker.

It must behave as KafkaSource does: batches and rebalance callbacks in order, manual commits,
nothing of a revoked partition processed after the revoke (records fetched ahead are read
again by the next owner), a clear error when the child dies, a close that commits.
"""

from __future__ import annotations

import threading
import time

import pytest
from helpers import wait_for

from stream_learner.io.broker import committed_offsets, create_topics
from stream_learner.io.sources import ProcessSource, SourceError

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SESSION_MS = 6000


class Consumer:
    """A worker stand-in: processes what poll returns and, on revoke, hands back the offsets
    it processed (as the worker does after its checkpoint). ``events`` keeps callbacks and
    processed messages in the order they happened."""

    def __init__(self):
        self.events: list[tuple] = []
        self.positions: dict = {}  # next offset to read, per partition, as processed
        self.source: ProcessSource | None = None

    def partitions_revoked(self, partitions):
        self.events.append(("revoked", set(partitions)))
        return {tp: self.positions[tp] for tp in partitions if tp in self.positions}

    def partitions_assigned(self, partitions, committed):
        self.events.append(("assigned", set(partitions), dict(committed)))
        return {}

    def partitions_lost(self, partitions):
        self.events.append(("lost", set(partitions)))

    def poll(self, timeout=0.2):
        messages = self.source.poll(timeout)
        for m in messages:
            self.events.append(("message", m))
            self.positions[m.tp] = m.offset + 1
        return messages

    def processed(self):
        return [e[1] for e in self.events if e[0] == "message"]


def produce(bootstrap, topic, per_partition, partitions=2):
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for p in range(partitions):
        for i in range(per_partition):
            producer.send(topic, key=f"k{p}-{i}".encode(), value=f"v{p}-{i}".encode(), partition=p,
                          headers=[("n", str(i).encode())])
    producer.flush()
    producer.close()


def committed(bootstrap, group, topic, partitions=2):
    offsets = committed_offsets(bootstrap, group, [(topic, p) for p in range(partitions)])
    return {p: offset for (_, p), offset in offsets.items()}


def open_source(broker, topic, group, consumer, **options):
    options.setdefault("max_poll_records", 10)
    consumer.source = ProcessSource(
        [topic], bootstrap_servers=broker.bootstrap_servers, group_id=group, handler=consumer,
        session_timeout_ms=SESSION_MS, **options,
    )
    return consumer.source


def poll_until(consumers, done, timeout=60.0, pause=0.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        for consumer in consumers:
            consumer.poll(0.1)
        time.sleep(pause)


def fetched_ahead(source: ProcessSource, partition: int | None = None) -> int:
    """Records the child process has sent that the handler has not taken yet."""
    source._read_available(0.1)
    return sum(
        len(records)
        for item in source._inbox
        if item[0] == "batch"
        for _topic, p, records in item[1]
        if partition is None or p == partition
    )


def stop_polling(stop: threading.Event, thread: threading.Thread | None) -> None:
    """Stop the thread polling a second consumer before its source closes: a ProcessSource
    belongs to one thread, and a poll racing the close fails on the closed pipe."""
    stop.set()
    if thread is not None:
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_batches_callbacks_commits_lag_and_close_in_order(kafka_broker, kafka_names):
    topic, group = f"{kafka_names}-in", f"{kafka_names}-group"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    produce(kafka_broker.bootstrap_servers, topic, 25)
    consumer = Consumer()
    source = open_source(kafka_broker, topic, group, consumer)
    try:
        poll_until([consumer], lambda: len(consumer.processed()) >= 50)
        # The assignment comes first, as a KafkaConsumer's listener does before any record.
        assert consumer.events[0] == ("assigned", {(topic, 0), (topic, 1)}, {(topic, 0): None, (topic, 1): None})
        assert source.assignment() == {(topic, 0), (topic, 1)}
        messages = consumer.processed()
        for p in range(2):
            mine = [m for m in messages if m.partition == p]
            assert [m.offset for m in mine] == list(range(25))  # in order, once each
            assert [m.value for m in mine] == [f"v{p}-{i}".encode() for i in range(25)]
            assert [m.key for m in mine] == [f"k{p}-{i}".encode() for i in range(25)]
            assert [m.headers for m in mine] == [(("n", str(i).encode()),) for i in range(25)]
            assert all(abs(m.timestamp - time.time()) < 120 for m in mine)
        assert source.lag({(topic, 0): 20, (topic, 1): 25}) == {(topic, 0): 5, (topic, 1): 0}

        source.commit({(topic, 0): 7, (topic, 1): 9})  # the child commits; no answer awaited
        deadline = time.monotonic() + 20
        while committed(kafka_broker.bootstrap_servers, group, topic) != {0: 7, 1: 9}:
            assert time.monotonic() < deadline, committed(kafka_broker.bootstrap_servers, group, topic)
            source.poll(0.2)
    finally:
        source.close()
    # Closing revokes through the handler, which hands back what it processed: committed.
    assert consumer.events[-1] == ("revoked", {(topic, 0), (topic, 1)})
    assert committed(kafka_broker.bootstrap_servers, group, topic) == {0: 25, 1: 25}
    assert source._process.poll() == 0


def test_close_with_records_fetched_ahead_lets_the_next_owner_read_them(kafka_broker, kafka_names):
    topic, group = f"{kafka_names}-in", f"{kafka_names}-group"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    produce(kafka_broker.bootstrap_servers, topic, 100)
    first = Consumer()
    source = open_source(kafka_broker, topic, group, first, prefetch=3)
    try:
        poll_until([first], lambda: first.processed())
        wait_for("records fetched ahead", lambda: fetched_ahead(source), 30)
    finally:
        source.close()
    processed = first.processed()
    assert 0 < len(processed) < 200
    second = Consumer()
    source = open_source(kafka_broker, topic, group, second)
    try:
        poll_until([second], lambda: len(second.processed()) >= 200 - len(processed))
        second.poll(1.0)  # nothing more may come
    finally:
        source.close()
    seen = sorted((m.partition, m.offset) for m in processed + second.processed())
    assert seen == [(p, i) for p in range(2) for i in range(100)]  # all, once each


def test_a_rebalance_drops_records_of_revoked_partitions_fetched_ahead(kafka_broker, kafka_names):
    topic, group = f"{kafka_names}-in", f"{kafka_names}-group"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    per_partition = 300
    produce(kafka_broker.bootstrap_servers, topic, per_partition)
    a, b = Consumer(), Consumer()
    open_source(kafka_broker, topic, group, a, prefetch=2)
    sources = [a.source]
    stop, thread = threading.Event(), None
    try:
        poll_until([a], lambda: a.processed())
        open_source(kafka_broker, topic, group, b)
        sources.append(b.source)

        def run_b():  # b answers its own callbacks while a is polled slowly
            while not stop.is_set():
                b.poll(0.1)

        thread = threading.Thread(target=run_b, daemon=True)
        thread.start()
        # a takes a batch now and then, so batches fetched ahead wait in its pipe when the
        # revoke arrives behind them.
        poll_until([a], lambda: any(e[0] == "revoked" for e in a.events), pause=0.3)
        poll_until([a], lambda: len(a.processed()) + len(b.processed()) >= 2 * per_partition, timeout=90)
        a.poll(1.5)  # nothing more may come
    finally:
        stop_polling(stop, thread)
        for source in sources:
            source.close()
    # Exactly once across both owners: what a fetched ahead and dropped, someone read again.
    seen = sorted((m.partition, m.offset) for m in a.processed() + b.processed())
    assert seen == [(p, i) for p in range(2) for i in range(per_partition)]
    # After a revoke, a processes only partitions assigned to it again.
    owned: set = set()
    for event in a.events:
        if event[0] == "assigned":
            owned |= event[1]
        elif event[0] in ("revoked", "lost"):
            owned -= event[1]
        else:
            assert event[1].tp in owned, event
    assert any(e[0] == "assigned" for e in b.events[:1])


def test_the_death_of_the_consumer_process_is_a_clear_error(kafka_broker, kafka_names):
    topic, group = f"{kafka_names}-in", f"{kafka_names}-group"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    produce(kafka_broker.bootstrap_servers, topic, 10)
    consumer = Consumer()
    source = open_source(kafka_broker, topic, group, consumer)
    try:
        poll_until([consumer], lambda: len(consumer.processed()) >= 20)
        source._process.kill()
        source._process.wait()
        with pytest.raises(SourceError, match="consumer process has stopped .*resumes from its last checkpoint"):
            for _ in range(50):
                source.poll(0.1)
        with pytest.raises(SourceError):
            source.poll(0.1)  # and again: it does not come back by itself
        source.commit({(topic, 0): 10})  # nothing can be committed any more; no hang, no crash
    finally:
        started = time.monotonic()
        source.close()
        assert time.monotonic() - started < 5
    assert committed(kafka_broker.bootstrap_servers, group, topic) == {0: None, 1: None}


def test_records_dropped_at_a_revoke_are_read_again_when_the_partition_stays(kafka_broker, kafka_names):
    # kafka-python keeps the fetch position of a partition assigned again in the same
    # rebalance; records of it fetched ahead and dropped at the revoke must not be skipped.
    from kafka import KafkaProducer

    topic, group = f"{kafka_names}-in", f"{kafka_names}-group"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for i in range(10):
        producer.send(topic, value=f"a{i}".encode(), partition=0)
    producer.flush()
    a, b = Consumer(), Consumer()
    # The range assignor orders members by id (client id first): b takes partition 0, a keeps 1.
    # Room for every batch of partition 1 the child may fetch ahead (a fetch can arrive in
    # pieces): a child with its prefetch full stops polling, and would never see the rebalance.
    open_source(kafka_broker, topic, group, a, prefetch=25, client_options={"client_id": "z-member"})
    sources = [a.source]
    stop, thread = threading.Event(), None
    try:
        poll_until([a], lambda: len(a.processed()) >= 10)
        for i in range(20):  # two batches of partition 1, fetched ahead, not taken yet
            producer.send(topic, value=f"b{i}".encode(), partition=1)
        producer.flush()
        wait_for("partition 1 fetched ahead", lambda: fetched_ahead(a.source, partition=1) >= 20, 30)
        open_source(kafka_broker, topic, group, b, client_options={"client_id": "a-member"})
        sources.append(b.source)
        thread = threading.Thread(target=lambda: [b.poll(0.1) for _ in iter(stop.is_set, True)], daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not any(item[0] == "revoked" for item in a.source._inbox):  # behind the batches
            assert time.monotonic() < deadline, "no rebalance"
            a.source._read_available(0.2)
        poll_until([a], lambda: len(a.processed()) >= 30)
        a.poll(1.0)  # nothing more may come
    finally:
        stop_polling(stop, thread)
        producer.close()
        for source in sources:
            source.close()
    kinds = [e[0] if e[0] != "message" else (e[1].partition, e[1].offset) for e in a.events]
    revoke = kinds.index("revoked")
    assert kinds[1:revoke] == [(0, i) for i in range(10)]  # partition 1 not processed before
    assert kinds[revoke + 1] == "assigned" and a.events[revoke + 1][1] == {(topic, 1)}
    assert kinds[revoke + 2 : revoke + 22] == [(1, i) for i in range(20)]  # none skipped
    assert len(a.processed()) == 30 and not b.processed()


def test_a_worker_whose_consumer_process_dies_stops_and_a_restart_learns_every_record_once(
    kafka_broker, kafka_names, tmp_path, caplog, monkeypatch
):
    import logging

    from kafka_helpers import KEY, synthetic_records

    from stream_learner.cli.produce import produce_records
    from stream_learner.runtime.config import load_config
    from stream_learner.runtime.worker import run_worker

    n = 3000
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1})
    produce_records(synthetic_records(n, seed=3), bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)
    config = load_config(
        [
            "--topic", topic, "--bootstrap-servers", kafka_broker.bootstrap_servers,
            "--group-id", f"{kafka_names}-group", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--session-timeout-ms", str(SESSION_MS), "--stop-when-idle", "3", "--max-poll-records", "50",
            "--learners", "nb", "--consumer-process", "true",
        ],
        environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY},
    )
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)  # run_worker reads the secret from there
    workers = []

    def kill_the_consumer_process_mid_stream(worker):
        workers.append(worker)
        process_batch = worker.process_batch

        def process_and_kill(messages):
            process_batch(messages)
            if worker.counts["messages"] >= 500 and worker.source._process.poll() is None:
                worker.source._process.kill()
                worker.source._process.wait()

        worker.process_batch = process_and_kill

    with caplog.at_level(logging.ERROR, logger="stream_learner.runtime.worker"):
        assert run_worker(config, on_ready=kill_the_consumer_process_mid_stream) == 1
    assert "consumer process has stopped" in caplog.text
    assert 500 <= workers[0].counts["messages"] < n

    assert run_worker(config, on_ready=workers.append) == 0
    assert workers[1].counts["messages"] == n  # resumed from the checkpoint: nothing twice
    assert workers[1].processor.learner_stats()["nb"]["learned"] == n
