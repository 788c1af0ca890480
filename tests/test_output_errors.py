"""Outputs the broker refuses for good never stall the worker; refused credentials stop it.

A message over the producer's limit used to be re-sent in a tight loop forever, and checkpoints
and commits stopped behind it. Now a dead letter too large is replaced by a truncated copy
with headers saying so, any other refused output is counted and dropped, and the worker goes
on processing, checkpointing and committing.

Tansu (the embedded test broker) accepts ``max.message.bytes`` when a topic is created but
does not enforce it: DescribeConfigs returns no configs for the topic and it appends records
of any size (a 3 MiB record to a topic created with ``max.message.bytes=10000``; see
:func:`test_tansu_does_not_enforce_max_message_bytes`). The broker's refusal (error code 10,
MESSAGE_TOO_LARGE, or 18, RECORD_LIST_TOO_LARGE) reaches the sinks as the same error class
(kafka-python's ``MessageSizeTooLargeError``) or code (librdkafka's ``MSG_SIZE_TOO_LARGE``)
as the client's own size check, so these tests make the client refuse (a 2 MiB dead letter
over the default 1 MiB producer limit, or a producer limit set low) and ``test_retry.py``
checks the broker codes are classified alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import wait_for
from kafka_helpers import (
    ASSIGNED,
    KEY,
    committed_offset,
    messages_checkpointed,
    read_topic,
    start_worker_process,
    synthetic_records,
    wait_for_log,
)

from stream_learner.core.records import Decoder
from stream_learner.io.broker import create_topics
from stream_learner.io.sinks import TRUNCATED_BYTES

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _sink(client, bootstrap, max_bytes, truncate_topics):
    """A sink of ``client`` whose producer refuses messages over ``max_bytes``."""
    if client == "confluent":
        from stream_learner.io.confluent import ConfluentSink

        return ConfluentSink(
            bootstrap_servers=bootstrap,
            client_options={"message.max.bytes": max_bytes},
            batch_size=max_bytes,
            truncate_topics=truncate_topics,
        )
    from stream_learner.io.sinks import KafkaSink

    return KafkaSink(
        bootstrap_servers=bootstrap,
        client_options={"max_request_size": max_bytes},
        truncate_topics=truncate_topics,
    )


def test_refused_outputs_are_truncated_or_dropped_counted_and_logged_a_bounded_number_of_times(
    kafka_broker, kafka_names, kafka_client, caplog
):
    bootstrap = kafka_broker.bootstrap_servers
    predictions, dlq = f"{kafka_names}.predictions", f"{kafka_names}.dlq"
    create_topics(bootstrap, {predictions: 1, dlq: 1})
    original = os.urandom(20_000)
    sink = _sink(kafka_client, bootstrap, 8000, (dlq,))
    try:
        with caplog.at_level(logging.WARNING, logger="stream_learner.io.sinks"):
            for i in range(40):
                sink.send(predictions, f"big{i}".encode(), b"p" * 10_000, partition_hint=0)
            sink.send(predictions, b"small", b"fits", partition_hint=0)
            sink.send(dlq, b"d", original, [("reason", b"message_too_large")], partition_hint=0)
            started = time.monotonic()
            sink.flush(30.0)  # returns: nothing refused for good is waited for
            assert time.monotonic() - started < 20.0
            assert sink.take_output_errors() == {
                (predictions, "message_too_large"): 40,
                (dlq, "truncated"): 1,
            }
            sink.flush(5.0)
            assert sink.take_output_errors() == {}
        dropped = [r for r in caplog.records if "refused for good" in r.getMessage()]
        assert 1 <= len(dropped) <= 5  # 40 refusals, a bounded number of lines
        assert not [r for r in caplog.records if "re-sending" in r.getMessage()]
    finally:
        sink.close()
    assert [m.value for m in read_topic(bootstrap, predictions, expected=1)] == [b"fits"]
    (copy,) = read_topic(bootstrap, dlq, expected=1)
    headers = dict(copy.headers)
    assert copy.value == original[:TRUNCATED_BYTES]
    assert headers["reason"] == b"message_too_large" and headers["truncated"] == b"true"
    assert int(headers["original_size"]) == len(original)
    assert headers["original_sha256"].decode() == hashlib.sha256(original).hexdigest()


def test_a_dead_letter_whose_truncated_copy_is_refused_too_is_dropped(
    kafka_broker, kafka_names, kafka_client
):
    bootstrap = kafka_broker.bootstrap_servers
    dlq = f"{kafka_names}.dlq"
    create_topics(bootstrap, {dlq: 1})
    sink = _sink(kafka_client, bootstrap, 2000, (dlq,))  # under the truncated copy's 4 KiB
    try:
        sink.send(dlq, b"d", b"x" * 10_000, [("reason", b"message_too_large")], partition_hint=0)
        sink.send(dlq, b"e", b"small", [("reason", b"invalid_json")], partition_hint=0)
        sink.flush(30.0)
        assert sink.take_output_errors() == {(dlq, "truncated"): 1, (dlq, "message_too_large"): 1}
    finally:
        sink.close()
    assert [m.value for m in read_topic(bootstrap, dlq, expected=1)] == [b"small"]


def _scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics") as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _committed(bootstrap, group, topic) -> int:
    return committed_offset(bootstrap, group, topic) or 0


def test_a_2_mib_message_is_dead_lettered_truncated_and_the_worker_goes_on(
    kafka_broker, kafka_names, tmp_path, kafka_client
):
    from kafka import KafkaProducer

    bootstrap = kafka_broker.bootstrap_servers
    topic = f"{kafka_names}-in"
    create_topics(bootstrap, {topic: 1, f"{topic}.predictions": 1, f"{topic}.dlq": 1})
    decoder = Decoder()
    good = synthetic_records(120, seed=3)
    padding = 2 * 1024 * 1024 - len(b'{"id": "big0", "text": ""}')
    oversized = [
        f'{{"id": "big{i}", "text": "'.encode() + bytes([97 + i]) * padding + b'"}'
        for i in range(8)
    ]
    assert all(len(value) == 2 * 1024 * 1024 for value in oversized)
    values = (
        [decoder.encode(r) for r in good[:60]] + oversized + [decoder.encode(r) for r in good[60:]]
    )
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=4 * 1024 * 1024, linger_ms=0
    )
    try:
        for i, value in enumerate(values):
            producer.send(topic, key=str(i).encode(), value=value, partition=0)
        producer.flush(60)
    finally:
        producer.close()

    log_path, checkpoint_dir = tmp_path / "worker.log", tmp_path / "ckpt"
    process = start_worker_process(
        kafka_broker, kafka_names, checkpoint_dir, log_path,
        "--learners", "nb", "--checkpoint-every-seconds", "1", "--metrics-port", "0", client=kafka_client,
    )  # fmt: skip
    try:
        wait_for_log(log_path, ASSIGNED, process=process)
        wait_for(
            "every message checkpointed and committed",
            lambda: messages_checkpointed(checkpoint_dir) >= len(values)
            and _committed(bootstrap, f"{kafka_names}-group", topic) >= len(values),
            120,
            log_path,
            process,
            every=0.5,
        )
        assert messages_checkpointed(checkpoint_dir) == len(values), log_path.read_text()[-3000:]
        assert _committed(bootstrap, f"{kafka_names}-group", topic) == len(values)
        url = re.search(r"metrics on (http://\S+)/metrics", log_path.read_text()).group(1)
        scraped = _scrape(url)
        assert (
            scraped[("stream_learner_dead_letters_total", (("reason", "message_too_large"),))] == 8
        )
        truncated = (("output", "dead_letters"), ("reason", "truncated"))
        assert scraped[("stream_learner_output_errors_total", truncated)] == 8
        dropped = sum(
            v for (name, labels), v in scraped.items()
            if name == "stream_learner_output_errors_total" and ("reason", "truncated") not in labels
        )  # fmt: skip
        assert dropped == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    predictions = read_topic(bootstrap, f"{topic}.predictions", expected=len(good))
    assert sorted(json.loads(m.value)["id"] for m in predictions) == sorted(r.id for r in good)
    copies = read_topic(bootstrap, f"{topic}.dlq", expected=8)
    assert len(copies) == 8
    for copy, value in zip(sorted(copies, key=lambda m: m.value), oversized, strict=True):
        headers = dict(copy.headers)
        assert copy.value == value[:TRUNCATED_BYTES]
        assert headers["reason"] == b"message_too_large" and headers["truncated"] == b"true"
        assert int(headers["original_size"]) == len(value)
        assert headers["original_sha256"].decode() == hashlib.sha256(value).hexdigest()
    log = log_path.read_text()
    assert 1 <= log.count("sending its first") <= 5  # 8 truncations, a bounded number of lines
    assert "re-sending" not in log and "postponed" not in log


def test_a_sasl_mechanism_the_broker_does_not_offer_exits_2_with_one_line(
    kafka_broker, kafka_names, tmp_path, kafka_client
):
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY, STREAM_LEARNER_SASL_PLAIN_PASSWORD="not-a-real-secret")
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run",
        "--topic", f"{kafka_names}-in",
        "--bootstrap-servers", kafka_broker.bootstrap_servers,
        "--group-id", f"{kafka_names}-group",
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--client", kafka_client,
        "--security-protocol", "SASL_PLAINTEXT",
        "--sasl-mechanism", "SCRAM-SHA-512",
        "--sasl-plain-username", "worker",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    errors = [line for line in output.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert len(errors) == 1, output
    assert "--sasl-mechanism" in errors[0] and "refused" in errors[0]
    assert "retrying" not in output and "not-a-real-secret" not in output


def test_tansu_does_not_enforce_max_message_bytes(kafka_broker, kafka_names):
    """Pins the broker behaviour the module docstring describes. If this fails, Tansu enforces
    the topic's limit now: test the worker against a topic with a small max.message.bytes."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    bootstrap = kafka_broker.bootstrap_servers
    topic = f"{kafka_names}-small"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "10000"})])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        future = producer.send(topic, value=b"x" * 200_000)
        producer.flush(30)
        assert future.succeeded()
    finally:
        producer.close()


@pytest.mark.parametrize(
    "client, consumer_process",
    [("kafka-python", False), ("kafka-python", True), ("confluent", False)],
)
def test_a_consumer_refused_by_the_broker_is_fatal_not_retried(
    kafka_broker, kafka_names, tmp_path, client, consumer_process
):
    import threading

    from stream_learner.io.retry import FatalBrokerError
    from stream_learner.runtime.config import load_config
    from stream_learner.runtime.worker import _with_retries, make_source

    if client == "confluent":
        pytest.importorskip("confluent_kafka")
    config = load_config(
        [
            "--topic", f"{kafka_names}-in",
            "--bootstrap-servers", kafka_broker.bootstrap_servers,
            "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--client", client,
            "--consumer-process", str(consumer_process).lower(),
            "--security-protocol", "SASL_PLAINTEXT",
            "--sasl-mechanism", "SCRAM-SHA-256",
            "--sasl-plain-username", "worker",
        ],
        environ={"STREAM_LEARNER_SASL_PLAIN_PASSWORD": "not-a-real-secret"},
    )  # fmt: skip
    attempts = []

    def connect():
        attempts.append(1)
        return make_source(config, handler=None)

    with pytest.raises(FatalBrokerError) as raised:
        _with_retries("consumer", connect, threading.Event())
    assert len(attempts) == 1
    assert str(raised.value).startswith("consumer: the broker refused us")
    assert "--sasl-mechanism" in str(raised.value)
