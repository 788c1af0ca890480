"""A broker that goes away: readiness says so, liveness does not, idleness is not an outage,
the shutdown keeps its bound, a stop during the group join leaves the group usable, and a
broker whose port was taken starts on another."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import wait_for
from kafka_helpers import (
    ASSIGNED,
    messages_checkpointed,
    served_url,
    start_worker_process,
    synthetic_records,
    wait_for_log,
)

from stream_learner.cli.produce import produce_records
from stream_learner.io.broker import EmbeddedBroker, create_topics, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # a loaded machine
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:  # not listening yet
        return 0, str(error)


def _status_is(url, status, contains=""):
    def check():
        got, body = _get(url)
        return (got, body) if got == status and contains in body else None

    return check


def _frozen(broker):
    broker._process.send_signal(signal.SIGSTOP)  # the broker hangs: no answers, no errors


def _thawed(broker):
    broker._process.send_signal(signal.SIGCONT)


def _produce(broker, topic, n, rate=None):
    records = synthetic_records(n, seed=5)
    produce_records(records, bootstrap_servers=broker.bootstrap_servers, topic=topic, rate=rate)


@pytest.mark.parametrize("variant", ["kafka-python", "consumer-process", "confluent"])
def test_readiness_turns_503_while_the_broker_is_frozen_and_liveness_stays_200(
    variant, kafka_names, tmp_path
):
    if variant == "confluent":
        pytest.importorskip("confluent_kafka")
    client = "confluent" if variant == "confluent" else "kafka-python"
    extra = ["--consumer-process", "true"] if variant == "consumer-process" else []
    with EmbeddedBroker() as broker:  # its own broker: this test freezes it
        topic = f"{kafka_names}-in"
        create_topics(
            broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1}
        )
        _produce(broker, topic, 200)
        log_path, checkpoint_dir = tmp_path / "worker.log", tmp_path / "ckpt"
        process = start_worker_process(
            broker,
            kafka_names,
            checkpoint_dir,
            log_path,
            "--metrics-port",
            "0",
            "--broker-timeout",
            "4",
            "--checkpoint-every-seconds",
            "1",
            *extra,
            client=client,
        )
        frozen = False
        try:
            url = served_url(log_path, process)
            wait_for("/readyz 200", _status_is(url + "/readyz", 200), 60, log_path, process)
            _frozen(broker)
            frozen = True
            status, body = wait_for(
                "/readyz 503 for the lost broker",
                _status_is(url + "/readyz", 503, "broker unreachable"),
                40,
                log_path,
                process,
            )
            assert "limit 4 s" in body
            assert _get(url + "/healthz")[0] == 200  # waiting for the broker is alive
            wait_for_log(log_path, "/readyz reports not ready", process=process)
            _thawed(broker)
            frozen = False
            wait_for("/readyz 200 again", _status_is(url + "/readyz", 200), 60, log_path, process)
            wait_for_log(log_path, "broker reachable again", process=process)
            assert _get(url + "/healthz")[0] == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=40) == 0, log_path.read_text()[-3000:]
        finally:
            if frozen:
                _thawed(broker)
            if process.poll() is None:
                process.kill()
    assert "Traceback" not in log_path.read_text()


def test_liveness_stays_200_while_waiting_for_a_broker_that_never_answers(kafka_names, tmp_path):
    """No broker at all: alive and not ready, until the configured liveness limit."""

    class Nowhere:
        bootstrap_servers = f"127.0.0.1:{free_port()}"  # nothing listens there

    log_path, checkpoint_dir = tmp_path / "worker.log", tmp_path / "ckpt"
    process = start_worker_process(
        Nowhere,
        kafka_names,
        checkpoint_dir,
        log_path,
        "--metrics-port",
        "0",
        "--broker-timeout",
        "2",
        "--broker-liveness-timeout",
        "12",
    )
    try:
        url = served_url(log_path, process)
        status, body = wait_for(
            "/readyz 503 naming the broker",
            _status_is(url + "/readyz", 503, "last error"),
            60,
            log_path,
            process,
        )
        assert "broker not reached in" in body
        assert "producer" in body or "consumer" in body  # the last error says what waited
        assert _get(url + "/healthz")[0] == 200
        wait_for_log(log_path, "broker unreachable", process=process)
        # Past the configured limit the worker asks to be restarted.
        status, body = wait_for(
            "/healthz 503 after the liveness limit",
            _status_is(url + "/healthz", 503, "liveness limit"),
            60,
            log_path,
            process,
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    log = log_path.read_text()
    assert "Traceback" not in log
    # No retry is logged after the stop was asked for.
    assert "retrying" not in log[log.index("SIGTERM received") :]


def _trickle(broker, topic: str, *, seed: int, rate: float) -> threading.Event:
    """Produce synthetic records to ``topic`` at ``rate`` a second until the event is set."""
    stop = threading.Event()
    threading.Thread(
        target=produce_records,
        args=(synthetic_records(100_000, seed=seed),),
        kwargs={"bootstrap_servers": broker.bootstrap_servers, "topic": topic, "rate": rate, "stop": stop},
        daemon=True,
    ).start()
    return stop


def test_an_outage_is_not_idleness(kafka_names, tmp_path):
    with EmbeddedBroker() as broker:
        topic = f"{kafka_names}-in"
        create_topics(
            broker.bootstrap_servers, {topic: 1, f"{topic}.predictions": 1, f"{topic}.dlq": 1}
        )
        stop_producing = _trickle(broker, topic, seed=3, rate=50)
        log_path, checkpoint_dir = tmp_path / "worker.log", tmp_path / "ckpt"
        process = start_worker_process(
            broker,
            kafka_names,
            checkpoint_dir,
            log_path,
            "--stop-when-idle",
            "8",
            "--broker-timeout",
            "3",
            "--checkpoint-every-seconds",
            "1",
        )
        frozen = False
        try:
            wait_for_log(log_path, ASSIGNED, process=process)
            wait_for(
                "records learned",
                lambda: messages_checkpointed(checkpoint_dir) > 0,
                60,
                log_path,
                process,
            )
            stop_producing.set()  # records flowed until now: the stream is not idle
            _frozen(broker)
            frozen = True
            # Logged at 3, 6, 9 and 12 s of silence: longer than --stop-when-idle 8.
            wait_for_log(
                log_path, "/readyz reports not ready", count=4, timeout=90, process=process
            )
            assert process.poll() is None, log_path.read_text()[-3000:]
            _thawed(broker)
            frozen = False
            # Back to a quiet stream with a broker that answers: now it is idle, and stops.
            assert process.wait(timeout=90) == 0, log_path.read_text()[-3000:]
        finally:
            stop_producing.set()
            if frozen:
                _thawed(broker)
            if process.poll() is None:
                process.kill()
    log = log_path.read_text()
    assert log.index("broker reachable again") < log.index("no records for 8 s: stopping")


def test_shutdown_keeps_its_bound_while_the_broker_is_frozen(kafka_names, tmp_path):
    shutdown_timeout = 12.0
    with EmbeddedBroker() as broker:
        topic = f"{kafka_names}-in"
        create_topics(
            broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1}
        )
        stop_producing = _trickle(broker, topic, seed=4, rate=200)
        log_path, checkpoint_dir = tmp_path / "worker.log", tmp_path / "ckpt"
        process = start_worker_process(
            broker,
            kafka_names,
            checkpoint_dir,
            log_path,
            "--checkpoint-every-seconds",
            "1",
            "--shutdown-timeout",
            str(shutdown_timeout),
        )
        frozen = False
        try:
            wait_for_log(log_path, ASSIGNED, process=process)
            wait_for(
                "records learned",
                lambda: messages_checkpointed(checkpoint_dir) > 0,
                60,
                log_path,
                process,
            )
            _frozen(broker)
            frozen = True
            # A checkpoint is waiting for its outputs to be confirmed when the stop comes.
            wait_for_log(
                log_path,
                ("checkpoint (periodic) postponed", "offset commit failed"),
                timeout=60,
                process=process,
            )
            process.send_signal(signal.SIGTERM)
            asked = time.monotonic()
            process.wait(timeout=shutdown_timeout + 30)  # a guard against a hang, not the bound
            took = time.monotonic() - asked
        finally:
            stop_producing.set()
            if frozen:
                _thawed(broker)
            if process.poll() is None:
                process.kill()
    log = log_path.read_text()
    # Slack for the watchdog's wake-up and the exit on a loaded machine; a hang in a retry
    # loop would take the whole 30 s guard.
    assert took <= shutdown_timeout + 3.0, f"shutdown took {took:.1f} s: " + log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    after_stop = log[log.index("SIGTERM received") :]
    assert "retrying in" not in after_stop and "will retry" not in after_stop, after_stop[-3000:]


def test_a_worker_stopped_during_its_group_join_leaves_the_group_usable(
    kafka_client, kafka_names, tmp_path, monkeypatch
):
    """Tansu 0.6 keeps a member that leaves a forming group as its leader: without the
    workaround (sources._skip_leave_during_join, ConfluentSource._finish_join) the second
    worker is never assigned."""
    with EmbeddedBroker() as broker:  # a fresh broker: the group coordinator has no other work
        topic = f"{kafka_names}-in"
        create_topics(
            broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1}
        )
        first_log = tmp_path / "first.log"
        monkeypatch.setenv("STREAM_LEARNER_LOG_LEVEL", "DEBUG")  # its join steps in the log
        first = start_worker_process(
            broker, kafka_names, tmp_path / "ckpt-1", first_log, client=kafka_client
        )
        monkeypatch.delenv("STREAM_LEARNER_LOG_LEVEL", raising=False)
        try:
            if kafka_client == "kafka-python":
                # The broker gave it a member id; its JoinGroup with that id waits for the group.
                wait_for_log(first_log, "Received member id", process=first)
            else:
                wait_for_log(first_log, "first poll: the group join starts", process=first)
            # The broker frozen until the worker has decided how to leave: on a loaded machine
            # the join could otherwise complete before the stop reaches the consumer.
            _frozen(broker)
            try:
                first.send_signal(signal.SIGTERM)
                wait_for_log(first_log, "stopping during the group join", timeout=40, process=first)
            finally:
                _thawed(broker)
            assert first.wait(timeout=40) == 0, first_log.read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
        log = first_log.read_text()
        if kafka_client == "kafka-python":  # it leaves silently; librdkafka completes the join
            assert ASSIGNED not in log, log[-3000:]
        second_log = tmp_path / "second.log"
        second = start_worker_process(
            broker, kafka_names, tmp_path / "ckpt-2", second_log, client=kafka_client
        )
        try:
            # The group forms again: after the first member's session timeout (kafka-python),
            # or at once after its LeaveGroup (confluent).
            wait_for_log(second_log, ASSIGNED, timeout=90, process=second)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=40) == 0, second_log.read_text()[-3000:]
        finally:
            if second.poll() is None:
                second.kill()


def test_the_embedded_broker_tries_another_port_when_its_port_is_taken(monkeypatch, caplog):
    """free_port is a snapshot: another process may bind the port before the broker does."""
    from stream_learner.io import broker as broker_module

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port])  # the first pick is the taken port, then real free ones
        pick = broker_module.free_port
        monkeypatch.setattr(broker_module, "free_port", lambda host="127.0.0.1": next(picks, None) or pick(host))
        with caplog.at_level(logging.INFO, logger="stream_learner.io.broker"), EmbeddedBroker() as broker:
            assert broker.port != port
            create_topics(broker.bootstrap_servers, {"answers": 1})
    assert f"could not start on port {port}" in caplog.text
