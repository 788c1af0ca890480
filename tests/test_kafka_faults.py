"""Broker trouble in the middle of a run: the worker keeps its state and loses nothing."""

from __future__ import annotations

import signal
import threading

import pytest
from helpers import poll, wait_for
from kafka_helpers import (
    ASSIGNED,
    load_final_state,
    messages_checkpointed,
    read_topic,
    start_worker_process,
    synthetic_records,
    wait_for_log,
)

from stream_learner.cli.produce import produce_records
from stream_learner.io.broker import EmbeddedBroker, create_topics
from stream_learner.runtime.worker import read_state

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_a_broker_that_stops_answering_mid_run_loses_nothing(kafka_names, tmp_path, kafka_client):
    n = 3000
    records = synthetic_records(n, seed=9)
    with EmbeddedBroker() as broker:  # its own broker: this test freezes it
        topic = f"{kafka_names}-in"
        create_topics(broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1})
        producer = threading.Thread(
            target=produce_records,
            args=(records,),
            kwargs={"bootstrap_servers": broker.bootstrap_servers, "topic": topic, "rate": 150},
            daemon=True,  # a failed test must not leave pytest waiting for it
        )
        producer.start()
        log_path, checkpoint_dir = tmp_path / "worker.log", tmp_path / "ckpt"
        process = start_worker_process(
            broker, kafka_names, checkpoint_dir, log_path, "--checkpoint-every-seconds", "1", client=kafka_client
        )
        try:
            wait_for_log(log_path, ASSIGNED, process=process)
            # Freeze mid-stream: once the worker has checkpointed some records (its start-up
            # time varies; the 20-second stream outlasts it).
            first = wait_for("a checkpoint", lambda: messages_checkpointed(checkpoint_dir), 30, log_path, process)

            def more_than_first():
                saved = messages_checkpointed(checkpoint_dir)
                return saved if saved > first else 0

            before = wait_for("a later checkpoint", more_than_first, 30, log_path, process)
            broker._process.send_signal(signal.SIGSTOP)  # the broker hangs: no answers, no errors
            try:
                # Nothing is lost or reset: the worker says what failed and keeps its state.
                # (librdkafka also notices the silent coordinator by itself, after the session
                # timeout, and gives the partitions up: they are lost, not revoked.)
                wait_for_log(
                    log_path,
                    (
                        "offset commit failed (will retry",
                        "checkpoint (periodic) postponed",
                        "partitions lost without a commit",
                    ),
                    timeout=40,
                    process=process,
                )
                assert process.poll() is None
            finally:
                broker._process.send_signal(signal.SIGCONT)
            producer.join()
            # At most 90 s: the shutdown checkpoint below may still save what is missing.
            poll(lambda: messages_checkpointed(checkpoint_dir) >= n, 90, every=0.5, process=process)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=40) == 0, log_path.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
        final = load_final_state(checkpoint_dir)
        assert 0 < before < n
        assert final.state["counts"]["messages"] == n
        assert final.state["counts"]["learned"] == n
        assert read_state(final.state)["processor"].learner_stats()["nb"]["learned"] == n
        predictions = read_topic(broker.bootstrap_servers, f"{topic}.predictions", expected=n)
        assert {m.key.decode() for m in predictions} == {r.id for r in records}


def test_outputs_from_the_producer_process_arrive_and_its_death_is_reported(kafka_broker, kafka_names):
    from stream_learner.io.sinks import ProcessSink, SinkError

    topic = f"{kafka_names}-out"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    sink = ProcessSink(bootstrap_servers=kafka_broker.bootstrap_servers)
    try:
        for i in range(100):
            sink.send(topic, f"k{i}".encode(), f"v{i}".encode(), [("h", b"1")], partition_hint=i)
        sink.dispatch()
        sink.flush(30)
        received = read_topic(kafka_broker.bootstrap_servers, topic, expected=100)
        assert sorted(m.value for m in received) == sorted(f"v{i}".encode() for i in range(100))
        assert {m.partition for m in received if int(m.key[1:]) % 2 == 0} == {0}  # the hint decides
        sink._process.kill()
        sink._process.wait()
        sink.send(topic, b"k", b"lost")
        with pytest.raises(SinkError, match="producer process has stopped"):
            sink.flush(5)
    finally:
        sink.close(timeout=2)
