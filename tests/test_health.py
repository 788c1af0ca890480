"""Broker health, liveness and readiness, and the shutdown's bound, without a broker."""

from __future__ import annotations

import json
import threading
import time

from stream_learner.core.processor import StreamProcessor
from stream_learner.io.sinks import MemorySink, Outputs, SinkError
from stream_learner.io.sources import MemorySource
from stream_learner.runtime.metrics import BrokerHealth, Heartbeat, Readiness
from stream_learner.runtime.worker import Worker


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_waiting_for_the_broker_is_alive_and_not_ready():
    clock = Clock()
    broker = BrokerHealth(timeout=30.0, clock=clock)
    heartbeat = Heartbeat(max_silence=60.0, clock=clock, broker=broker)
    readiness = Readiness(broker=broker)
    readiness.assigned_partitions, readiness.checkpoint_loaded = 2, True
    for _ in range(20):  # 150 s of retries every 7.5 s; the loop never beats
        clock.now += 7.5
        broker.retrying("consumer", "NoBrokersAvailable")
        assert heartbeat.check()[0], heartbeat.check()
    ok, reason = readiness.check()
    assert (
        not ok
        and "broker not reached in 150 s" in reason
        and "consumer: NoBrokersAvailable" in reason
    )
    clock.now += 61.0  # the retries stop too: a hung loop
    assert not heartbeat.check()[0]


def test_readiness_follows_the_broker_s_answers():
    clock = Clock()
    broker = BrokerHealth(timeout=30.0, clock=clock)
    readiness = Readiness(broker=broker)
    readiness.assigned_partitions, readiness.checkpoint_loaded = 1, True
    assert readiness.check() == (False, "not ready: broker not reached yet")
    broker.contact()
    assert readiness.check()[0]
    clock.now = 30.0
    assert readiness.check()[0]  # the limit itself is still fine
    clock.now = 31.0
    broker.failed("offset commit", "KafkaTimeoutError")
    ok, reason = readiness.check()
    assert not ok
    assert reason == (
        "not ready: broker unreachable for 31 s (limit 30 s; last error: offset commit: KafkaTimeoutError)"
    )
    broker.contact()
    assert readiness.check()[0]
    broker.contact(when=5.0)  # an older answer reported late changes nothing
    assert broker.last_contact == 31.0


def test_the_loss_is_logged_once_per_timeout_and_the_return_once(caplog):
    clock = Clock()
    broker = BrokerHealth(timeout=10.0, clock=clock)
    broker.contact()
    with caplog.at_level("INFO", logger="stream_learner.runtime.metrics"):
        for _ in range(250):  # 25 s of a loop observing every 0.1 s
            clock.now += 0.1
            broker.observe()
        broker.contact()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("broker unreachable for" in line for line in lines) == 2, lines  # at 10 s and 20 s
    assert lines[-1].startswith("broker reachable again")


def test_liveness_fails_after_the_configured_time_without_the_broker():
    clock = Clock()
    broker = BrokerHealth(timeout=30.0, liveness_timeout=300.0, clock=clock)
    heartbeat = Heartbeat(max_silence=60.0, clock=clock, broker=broker)
    broker.contact()
    clock.now = 299.0
    heartbeat.beat()
    assert heartbeat.check()[0]
    clock.now = 301.0
    ok, reason = heartbeat.check()
    assert not ok and "liveness limit" in reason
    assert BrokerHealth(timeout=30.0, clock=clock).liveness_problem() is None  # off by default


class FrozenSink(MemorySink):
    """A producer whose broker never confirms: every flush waits its whole timeout."""

    def __init__(self):
        super().__init__()
        self.flush_timeouts = []
        self.closed_with = None

    def flush(self, timeout):
        self.flush_timeouts.append(timeout)
        threading.Event().wait(timeout)
        raise SinkError("outputs not confirmed")

    def close(self, timeout=10.0):
        self.closed_with = timeout


def test_the_shutdown_fits_its_deadline_when_outputs_cannot_be_confirmed():
    sink = FrozenSink()
    worker = Worker(
        StreamProcessor(["nb"]),
        Outputs(sink, predictions_topic="p", dead_letter_topic="d"),
        flush_timeout=10.0,
    )
    messages = [
        json.dumps({"id": f"r{i}", "text": "free money now", "label": "spam"}).encode()
        for i in range(3)
    ]
    source = MemorySource({("t", 0): messages})
    source.handler = worker
    worker.owned = {("t", 0)}
    worker.source = source
    worker.process_batch(source.poll(0))
    started = time.monotonic()
    assert worker.shutdown(source, sink, deadline=started + 1.0) is False
    took = time.monotonic() - started
    assert took < 5.0  # a guard against the 10 s flush timeout, not a timing measurement
    # One flush only, cut to the time left; the revoke on close does not wait again.
    assert len(sink.flush_timeouts) == 1 and sink.flush_timeouts[0] <= 1.0
    assert sink.closed_with is not None and sink.closed_with <= 1.0
    assert source.committed == {}
