"""The adversarial corpus through the Kafka worker on a real broker: every message handled
(predicted or dead-lettered by reason), liveness never lost, every offset committed."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from kafka_helpers import KEY, committed_offset, read_topic

from stream_learner.data.adversarial import worst_cases
from stream_learner.io.broker import create_topics
from stream_learner.runtime.config import load_config
from stream_learner.runtime.worker import run_worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_the_adversarial_corpus_through_the_worker(kafka_broker, kafka_names, tmp_path, monkeypatch):
    from kafka import KafkaProducer

    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)

    topic, group = f"{kafka_names}-in", f"{kafka_names}-g"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1, f"{topic}.predictions": 1, f"{topic}.dlq": 1})
    corpus = worst_cases(60_000)
    values = []
    for i, (name, text) in enumerate(corpus.items()):
        values.append(json.dumps({"id": name, "text": text, "label": "abc"[i % 3]}).encode("utf-8", "surrogatepass"))
        values.append(text.encode("utf-8", "surrogatepass"))  # the same text as a plain message
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, max_request_size=4 * 2**20)
    for value in values:
        producer.send(topic, value, partition=0)
    producer.flush()
    producer.close()

    config = load_config(
        ["--topic", topic, "--bootstrap-servers", kafka_broker.bootstrap_servers, "--group-id", group,
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--session-timeout-ms", "6000", "--stop-when-idle", "4",
         "--learners", "nb,neural", "--metrics-port", "0", "--max-poll-records", "20"],
        environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY},
    )  # fmt: skip
    probes: list[tuple[int, str]] = []
    done = threading.Event()
    captured = {}

    def probe(worker):
        captured["worker"] = worker

        def loop():
            while not done.wait(0.2):
                try:
                    with urllib.request.urlopen(worker.metrics_url + "/healthz", timeout=5) as response:
                        probes.append((response.status, response.read().decode()))
                except urllib.error.HTTPError as error:
                    probes.append((error.code, error.read().decode()))
                except OSError as error:
                    if isinstance(getattr(error, "reason", error), TimeoutError):
                        continue  # a slow answer on a loaded machine: probe again
                    break  # the server is closing at the end of the run

        threading.Thread(target=loop, daemon=True).start()

    try:
        assert run_worker(config, on_ready=probe) == 0
    finally:
        done.set()
    worker = captured["worker"]
    assert worker.counts["messages"] == len(values)
    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=1)
    dead = read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", expected=len(values) - len(predictions))
    assert len(predictions) + len(dead) == len(values)
    assert {dict(m.headers)["reason"].decode() for m in dead} <= {"empty_text"}  # only the text without content
    # Liveness never lost while the worker ran; it fails once the worker has stopped, which a
    # probe may see in the moment between the stop and the server's close.
    while probes and "worker stopped" in probes[-1][1]:
        probes.pop()
    assert probes and {status for status, _ in probes} == {200}, probes
    assert committed_offset(kafka_broker.bootstrap_servers, group, topic) == len(values)
