"""The retry helper: backoff bounds, stop, fatal classification; which output errors are final."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka import errors as kafka_errors

import stream_learner.io.retry as retry_module
from stream_learner.io.retry import (
    Backoff,
    FatalBrokerError,
    RateLimitedLog,
    auth_failure,
    fatal_message,
    is_fatal,
    retry,
    watch_kafka_python_auth,
)
from stream_learner.io.sinks import TRUNCATED_BYTES, output_refusal, truncated_copy

# -- Backoff ---------------------------------------------------------------------------------


@given(
    initial=st.floats(0.001, 5.0),
    factor=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**32),
    attempts=st.integers(1, 80),
)
def test_full_jitter_stays_under_the_doubling_ceiling_and_the_cap(initial, factor, seed, attempts):
    cap = initial * factor
    backoff = Backoff(initial, cap, rng=random.Random(seed))
    for n in range(attempts):
        delay = backoff.next()
        assert 0.0 <= delay <= min(cap, initial * 2**n) + 1e-9


@given(initial=st.floats(0.001, 5.0), factor=st.floats(1.0, 100.0), seed=st.integers(0, 2**32))
def test_decorrelated_jitter_stays_between_the_initial_delay_and_the_cap(initial, factor, seed):
    cap = initial * factor
    backoff = Backoff(initial, cap, jitter="decorrelated", rng=random.Random(seed))
    delays = [backoff.next() for _ in range(50)]
    assert all(initial - 1e-9 <= d <= cap + 1e-9 for d in delays)


def test_without_jitter_the_delays_double_up_to_the_cap_and_reset_starts_again():
    backoff = Backoff(0.5, 3.0, jitter="none")
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_jitter_spreads_the_delays_of_workers_that_failed_together():
    delays = {round(Backoff(1.0, 30.0).next(), 6) for _ in range(50)}
    assert len(delays) > 40  # not 50 workers reconnecting in the same instant


@pytest.mark.parametrize(
    "initial, cap, jitter", [(0, 1, "full"), (2, 1, "full"), (1, 2, "exponential")]
)
def test_backoff_refuses_nonsense(initial, cap, jitter):
    with pytest.raises(ValueError):
        Backoff(initial, cap, jitter=jitter)


# -- retry -----------------------------------------------------------------------------------


def test_retry_returns_once_the_call_works_and_logs_each_retry(caplog):
    attempts = []

    def connect():
        attempts.append(1)
        if len(attempts) < 3:
            raise kafka_errors.KafkaConnectionError()
        return "connected"

    with caplog.at_level(logging.WARNING, logger="stream_learner.io.retry"):
        result = retry("producer", connect, threading.Event(), backoff=Backoff(0.001, 0.002))
    assert result == "connected" and len(attempts) == 3
    lines = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(lines) == 2 and all(
        line.startswith("producer: broker unreachable (") for line in lines
    )


def test_retry_stops_waiting_when_the_stop_event_is_set():
    stop = threading.Event()

    def never():
        stop.set()  # e.g. SIGTERM arrives while the broker is away
        raise OSError("connection refused")

    started = time.monotonic()
    assert retry("consumer", never, stop, backoff=Backoff(60.0, 60.0)) is None
    assert time.monotonic() - started < 10.0  # the 60 s wait was cut short


def test_retry_gives_up_at_once_on_a_fatal_error_naming_the_setting():
    calls = []

    def connect():
        calls.append(1)
        raise kafka_errors.UnsupportedSaslMechanismError()

    with pytest.raises(FatalBrokerError) as raised:
        retry("producer", connect, threading.Event(), fatal=is_fatal, backoff=Backoff(0.001, 0.002))
    assert len(calls) == 1
    message = str(raised.value)
    assert (
        message.startswith("producer: ") and "--sasl-mechanism" in message and "\n" not in message
    )


def test_retry_lets_errors_that_are_not_retriable_through_unchanged():
    def connect():
        raise ValueError("bad option")

    with pytest.raises(ValueError, match="bad option"):
        retry("producer", connect, threading.Event(), retriable=(OSError,))


@pytest.mark.parametrize(
    "error, setting",
    [
        (kafka_errors.UnsupportedSaslMechanismError(), "--sasl-mechanism"),
        (kafka_errors.SaslAuthenticationFailedError(), "--sasl-plain-password"),
        (kafka_errors.TopicAuthorizationFailedError(), "topic ACLs"),
        (kafka_errors.GroupAuthorizationFailedError(), "--group-id"),
        (kafka_errors.ClusterAuthorizationFailedError(), "IdempotentWrite"),
    ],
)
def test_authentication_and_authorization_errors_of_kafka_python_are_fatal(error, setting):
    assert is_fatal(error)
    assert setting in fatal_message(error)


@pytest.mark.parametrize(
    "error",
    [
        kafka_errors.MetadataEmptyBrokerList(),
        kafka_errors.KafkaTimeoutError("Unable to bootstrap from x:1"),
        kafka_errors.NotLeaderForPartitionError(),
        kafka_errors.RequestTimedOutError(),
        kafka_errors.KafkaConnectionError(),
        OSError("connection refused"),
    ],
)
def test_transient_errors_are_not_fatal(error):
    assert not is_fatal(auth_failure(error, within=0.0))


def test_librdkafka_authentication_errors_are_fatal_and_transport_errors_are_not():
    confluent_kafka = pytest.importorskip("confluent_kafka")
    KafkaError, KafkaException = confluent_kafka.KafkaError, confluent_kafka.KafkaException
    refused = KafkaError(
        KafkaError._AUTHENTICATION,
        "SASL PLAIN mechanism handshake failed: Unsupported SASL mechanism",
    )
    assert is_fatal(refused) and is_fatal(KafkaException(refused))
    assert "--sasl-mechanism" in fatal_message(refused)
    assert is_fatal(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))
    assert not is_fatal(KafkaError(KafkaError._TRANSPORT))
    assert not is_fatal(KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN)))


def test_a_bootstrap_timeout_after_a_refused_handshake_is_the_refusal(monkeypatch):
    # kafka-python 3 logs the refusal and raises only KafkaTimeoutError('Unable to bootstrap').
    # The watch is process-wide: what this test makes it remember must not outlive the test
    # (a later in-process worker would read its own bootstrap timeout as this refusal).
    monkeypatch.setattr(retry_module._WATCH, "last", None)
    monkeypatch.setattr(retry_module._WATCH, "when", 0.0)
    watch_kafka_python_auth()
    refusal = kafka_errors.UnsupportedSaslMechanismError()
    logging.getLogger("kafka.net.manager").warning(
        "Bootstrap connection to %s failed: %s (backoff %.2f secs)", "bootstrap-0", refusal, 0.5
    )
    assert auth_failure(kafka_errors.KafkaTimeoutError("Unable to bootstrap from h:1")) is refusal
    assert (
        auth_failure(kafka_errors.KafkaTimeoutError("Unable to bootstrap from h:1"), within=0.0)
        is not refusal
    )
    other = kafka_errors.KafkaTimeoutError("Failed to update metadata after 60.0 secs.")
    assert auth_failure(other) is other


# -- RateLimitedLog --------------------------------------------------------------------------


def test_the_rate_limited_log_holds_back_repeats_per_key_and_says_how_many(caplog):
    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("test.limited"), limit=3, period=60.0, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="test.limited"):
        for i in range(1000):
            limited.warning("a", "dropped %d", i)
            limited.warning("b", "other %d", i)
        assert len(caplog.records) == 6
        now[0] = 61.0
        limited.warning("a", "dropped again")
    messages = [r.getMessage() for r in caplog.records]
    assert "997 more like this (a) in the last 61 s" in messages
    assert messages[-1] == "dropped again"


# -- outputs refused for good ----------------------------------------------------------------


@pytest.mark.parametrize(
    "code, reason",
    [(10, "message_too_large"), (18, "message_too_large"), (17, "invalid_topic"),
     (29, "topic_authorization_failed"), (87, "invalid_record"), (44, "policy_violation")],
)  # fmt: skip
def test_broker_refusals_of_one_message_are_final_in_both_clients(code, reason):
    assert output_refusal(kafka_errors.for_code(code)()) == reason
    confluent_kafka = pytest.importorskip("confluent_kafka")
    error = confluent_kafka.KafkaError(code)
    assert output_refusal(error) == reason
    assert output_refusal(confluent_kafka.KafkaException(error)) == reason


def test_no_retriable_kafka_python_error_is_a_refusal():
    classes = [cls for code, cls in kafka_errors.kafka_errors.items() if code is not None]
    assert len(classes) > 50
    for cls in classes:
        if cls.retriable:
            assert output_refusal(cls()) is None, cls


def test_transient_output_errors_are_retried():
    assert output_refusal(kafka_errors.KafkaTimeoutError()) is None
    assert output_refusal(kafka_errors.NotLeaderForPartitionError()) is None
    assert output_refusal(RuntimeError("not sent")) is None
    confluent_kafka = pytest.importorskip("confluent_kafka")
    KafkaError = confluent_kafka.KafkaError
    for code in (
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.NOT_LEADER_FOR_PARTITION,
    ):
        assert output_refusal(KafkaError(code)) is None


@given(st.binary(max_size=3 * TRUNCATED_BYTES))
def test_a_truncated_copy_says_what_it_was_cut_from(value):
    import hashlib

    headers = [("reason", b"message_too_large")]
    copy = truncated_copy(("t.dlq", b"k", value, headers, 3))
    topic, key, cut, cut_headers, hint = copy
    assert (topic, key, hint) == ("t.dlq", b"k", 3)
    assert cut == value[:TRUNCATED_BYTES]
    named = dict(cut_headers)
    assert named["reason"] == b"message_too_large" and named["truncated"] == b"true"
    assert int(named["original_size"]) == len(value)
    assert named["original_sha256"].decode() == hashlib.sha256(value).hexdigest()
    assert truncated_copy(copy) is None  # never cut twice


# -- the worker ------------------------------------------------------------------------------


class _RefusingSink:
    """A MemorySink whose flushes report refused outputs, or raise once a producer is refused."""

    def __init__(self, errors=None, fatal=None):
        from stream_learner.io.sinks import MemorySink

        self.memory = MemorySink()
        self.send = self.memory.send
        self.dispatch = self.memory.dispatch
        self.errors, self.fatal, self.flushes, self.closed = dict(errors or {}), fatal, 0, False

    def flush(self, timeout):
        self.flushes += 1
        if self.fatal is not None:
            raise self.fatal

    def take_output_errors(self):
        errors, self.errors = self.errors, {}
        return errors

    def close(self):
        self.closed = True


def _worker_and_source(tmp_path, sink, metrics=None):
    from stream_learner.core.processor import StreamProcessor
    from stream_learner.core.records import Decoder, Record
    from stream_learner.io.sinks import Outputs
    from stream_learner.io.sources import MemorySource
    from stream_learner.runtime.worker import Worker
    from stream_learner.state.checkpoint import CheckpointStore

    outputs = Outputs(sink, predictions_topic="in.predictions", dead_letter_topic="in.dlq")
    store = CheckpointStore(tmp_path, b"retry-test-key-0123456789abcdefgh")
    worker = Worker(
        StreamProcessor(["nb"]), outputs, store, metrics=metrics, checkpoint_every_records=10
    )
    values = [Decoder().encode(Record(f"r{i}", "good words here", "pos")) for i in range(25)]
    source = MemorySource({("in", 0): values}, handler=worker, max_poll_records=10)
    return worker, source


def test_the_worker_counts_refused_outputs_and_checkpoints_and_commits_anyway(tmp_path):
    from prometheus_client import CollectorRegistry

    from stream_learner.runtime.metrics import StreamMetrics

    registry = CollectorRegistry()
    metrics = StreamMetrics(registry, learners=["nb"], process_metrics=False)
    sink = _RefusingSink({("in.predictions", "message_too_large"): 3, ("in.dlq", "truncated"): 2})
    worker, source = _worker_and_source(tmp_path, sink, metrics)
    stop = threading.Event()
    worker.run(source, stop=stop, poll_timeout=0.0, stop_when_idle=0.0)
    assert worker.shutdown(source, sink)
    assert source.committed == {("in", 0): 25}

    def errors(output, reason):
        labels = {"output": output, "reason": reason}
        return registry.get_sample_value("stream_learner_output_errors_total", labels)

    assert errors("predictions", "message_too_large") == 3
    assert errors("dead_letters", "truncated") == 2
    assert errors("drift_events", "invalid_topic") == 0  # touched at start: zeros, not gaps


def test_a_producer_refused_for_good_stops_the_worker_without_checkpointing_again(tmp_path):
    refused = FatalBrokerError("producer: the broker refused us (ClusterAuthorizationFailedError)")
    sink = _RefusingSink(fatal=refused)
    worker, source = _worker_and_source(tmp_path, sink)
    with pytest.raises(FatalBrokerError):
        worker.run(source, stop=threading.Event(), poll_timeout=0.0, stop_when_idle=0.0)
    flushes = sink.flushes
    assert worker.shutdown(source, sink) is False  # no second attempt, no commit
    assert sink.flushes == flushes and sink.closed and source.committed == {}


def test_a_kafka_python_delivery_refused_for_lack_of_cluster_acls_is_fatal():
    from kafka.errors import ClusterAuthorizationFailedError, TopicAuthorizationFailedError
    from kafka.future import Future

    from stream_learner.io.sinks import _raise_if_fatal

    with pytest.raises(FatalBrokerError, match="IdempotentWrite"):
        _raise_if_fatal(Future().failure(ClusterAuthorizationFailedError()).exception)
    _raise_if_fatal(TopicAuthorizationFailedError())  # one topic's ACL: that output is dropped
    _raise_if_fatal(None)
