"""Event-time alignment across partitions (--max-event-time-skew): a backlog is read in time
order, whatever order the consumer fetches partitions in."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from kafka_helpers import KEY, synthetic_records
from worker_helpers import make_worker

from stream_learner.core.records import Decoder
from stream_learner.io.broker import create_topics
from stream_learner.io.sources import MemorySource
from stream_learner.runtime.alignment import PartitionAlignment
from stream_learner.runtime.config import ConfigError, load_config
from stream_learner.runtime.worker import run_worker

ENCODE = Decoder().encode


def timed_records(n, partitions=2):
    """Record i has event time i seconds; partition p holds every p-th record."""
    records = [dataclasses.replace(r, ts=1.7e9 + i) for i, r in enumerate(synthetic_records(n, seed=5))]
    return {("in", p): [ENCODE(r) for r in records[p::partitions]] for p in range(partitions)}


def read_in_order(worker, source, *, align, max_polls=10_000):
    """Drive the worker as its run loop does; → the (partition, event time) of each record read."""
    order = []
    worker.source = source
    worker.owned = source.assignment()
    for _ in range(max_polls):
        batch = source.poll(0)
        order += [(m.partition, json.loads(m.value)["ts"]) for m in batch]
        worker.process_batch(batch)
        if align:
            worker.align(source, polled=bool(batch))
        if not batch and not any(source.lag(worker.offsets).values()):
            break
    return order


def widest_gap(order, partitions=2):
    """The largest event-time gap between partitions that still had records to read (one not
    read yet stands at its first record's time)."""
    first = {p: min(t for q, t in order if q == p) for p in range(partitions)}
    last = {p: max(t for q, t in order if q == p) for p in range(partitions)}
    newest = dict(first)
    gap = 0.0
    for p, t in order:
        newest[p] = t
        unfinished = [newest[q] for q in range(partitions) if newest[q] < last[q]]
        if len(unfinished) > 1:
            gap = max(gap, max(unfinished) - min(unfinished))
    return gap


def test_a_partition_does_not_run_ahead_of_the_others():
    data = timed_records(2000)
    aligned = make_worker(alignment=PartitionAlignment(20))
    order = read_in_order(aligned, MemorySource(data, handler=aligned, max_poll_records=50), align=True)
    assert sorted(t for _, t in order) == [1.7e9 + i for i in range(2000)]  # nothing lost or doubled
    # A batch may overshoot the limit by its own length (50 records of one partition: 100 s).
    assert widest_gap(order) <= 20 + 100
    assert aligned.summary()["learned"] == 2000

    unaligned = make_worker()
    order = read_in_order(unaligned, MemorySource(data, handler=unaligned, max_poll_records=50), align=False)
    assert widest_gap(order) > 1000  # one partition first, then the other


class StaleLagSource(MemorySource):
    """Reports one record more than partition 1 holds, as an old highwater would."""

    def lag(self, positions):
        lags = super().lag(positions)
        lags[("in", 1)] += 1
        return lags


def test_a_partition_that_claims_records_it_never_gives_holds_nobody_back():
    data = timed_records(600)
    worker = make_worker(alignment=PartitionAlignment(5))
    source = StaleLagSource(data, handler=worker, max_poll_records=50)
    worker.source = source
    worker.owned = source.assignment()
    for _ in range(100):
        batch = source.poll(0)
        worker.process_batch(batch)
        worker.align(source, polled=bool(batch))
        if worker.summary().get("learned", 0) == 600:
            break
    assert worker.summary()["learned"] == 600


class BacklogSource:
    """Two partitions with records left to read, both paused or resumed on request."""

    def __init__(self):
        self.paused = set()

    def assignment(self):
        return {("in", 0), ("in", 1)}

    def lag(self, positions):
        return {("in", 0): 10, ("in", 1): 10}

    def pause(self, partitions):
        self.paused |= partitions

    def resume(self, partitions):
        self.paused -= partitions


def test_one_slow_fetch_does_not_release_the_partition_ahead():
    alignment, source = PartitionAlignment(30), BacklogSource()
    owned, offsets = source.assignment(), {("in", 0): 5, ("in", 1): 5}
    alignment.saw(("in", 0), 1000.0)
    alignment.saw(("in", 1), 0.0)
    alignment.align(source, owned, offsets)
    assert source.paused == {("in", 0)}
    alignment.align(source, owned, offsets, polled=False)  # a fetch slower than the poll
    assert source.paused == {("in", 0)}
    alignment.gave([("in", 1)])
    alignment.align(source, owned, offsets)
    alignment.align(source, owned, offsets, polled=False)  # the count starts again
    assert source.paused == {("in", 0)}
    alignment.align(source, owned, offsets, polled=False)  # behind, yet it gives nothing
    assert source.paused == set()


class RefusingSource(MemorySource):
    """A consumer that cannot pause partitions."""

    def pause(self, partitions):
        raise RuntimeError("pause refused")


def test_a_source_that_cannot_pause_is_read_unaligned_and_said_so(caplog):
    data = timed_records(400)
    worker = make_worker(alignment=PartitionAlignment(5))
    source = RefusingSource(data, handler=worker, max_poll_records=50)
    with caplog.at_level(logging.WARNING, logger="stream_learner.runtime.alignment"):
        order = read_in_order(worker, source, align=True)
    assert sorted(t for _, t in order) == [1.7e9 + i for i in range(400)]
    assert worker.summary()["learned"] == 400
    assert "could not pause or resume partitions" in caplog.text and "pause refused" in caplog.text
    assert worker.alignment.paused == set()


def test_the_skew_setting_is_checked():
    with pytest.raises(ConfigError):
        load_config(["--topic", "t", "--max-event-time-skew", "-1"], environ={})
    with pytest.raises(ConfigError):
        load_config(["--topic", "t", "--max-event-time-skew", "5", "--consumer-process", "true"], environ={})
    assert load_config(["--topic", "t", "--max-event-time-skew", "60"], environ={}).max_event_time_skew == 60.0


@pytest.mark.kafka
@pytest.mark.slow
def test_on_kafka_a_backlog_is_read_in_time_order(kafka_broker, kafka_names, tmp_path, kafka_client, monkeypatch):
    data = timed_records(3000)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1})
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for (_, partition), values in data.items():  # all of partition 0, then all of partition 1
        for value in values:
            producer.send(topic, value, partition=partition)
    producer.flush()
    producer.close()
    config = load_config(
        [
            "--topic", topic,
            "--bootstrap-servers", kafka_broker.bootstrap_servers,
            "--group-id", f"{kafka_names}-group",
            "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--session-timeout-ms", "6000",
            "--stop-when-idle", "3",
            "--client", kafka_client,
            "--max-poll-records", "50",
            "--max-event-time-skew", "30",
            "--learners", "nb",
        ],
        environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY},
    )
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)
    order = []

    def watch(worker):
        process_batch = worker.process_batch

        def recording(messages):
            order.extend((m.partition, json.loads(m.value)["ts"]) for m in messages)
            process_batch(messages)

        worker.process_batch = recording
        captured.append(worker)

    captured = []
    assert run_worker(config, on_ready=watch) == 0
    missing = sorted(set(1.7e9 + i for i in range(3000)) - {t for _, t in order})
    assert not missing, (len(missing), [m - 1.7e9 for m in missing[:5]], captured[0].summary())
    assert captured[0].summary()["learned"] == 3000
    assert sorted(t for _, t in order) == [1.7e9 + i for i in range(3000)]
    assert widest_gap(order) <= 30 + 100
