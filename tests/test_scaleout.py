"""Many workers in one group, against a real Tansu broker: fusion through the models topic,
workers killed mid-stream, a late joiner, ``run --processes``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
from helpers import wait_for
from kafka_helpers import (
    ASSIGNED,
    KEY,
    load_final_state,
    messages_checkpointed,
    read_topic,
    start_worker_process,
    synthetic_records,
    wait_for_log,
)

from stream_learner.cli.produce import produce_records
from stream_learner.core.processor import StreamProcessor
from stream_learner.io.broker import create_topics
from stream_learner.runtime.config import load_config
from stream_learner.runtime.worker import read_state, run_worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _config(client, broker, names, checkpoint_dir, *extra):
    return load_config(
        [
            "--topic", f"{names}-in",
            "--bootstrap-servers", broker.bootstrap_servers,
            "--group-id", f"{names}-group",
            "--checkpoint-dir", str(checkpoint_dir),
            "--session-timeout-ms", "3000",
            "--stop-when-idle", "3",
            "--client", client,
            "--learners", "nb",
            "--drift-detector", "none",
            "--fusion", "on",
            "--fusion-every-seconds", "1",
            *extra,
        ],
        environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY},
    )


@pytest.fixture(autouse=True)
def checkpoint_key(monkeypatch):
    """run_worker in this process reads the group secret from the environment."""
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)


def test_a_late_joiner_continues_from_the_fused_model(kafka_broker, kafka_names, tmp_path, kafka_client):
    """Naive Bayes merges exactly: a worker that joins after another has learned the first
    1,500 records predicts the next 500 exactly as one learner that saw all 2,000."""
    records = synthetic_records(2000, seed=21)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1, f"{topic}.predictions": 1})
    produce_records(records[:1500], bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)
    first = _config(kafka_client, kafka_broker, kafka_names, tmp_path / "a", "--worker-id", "a")
    assert run_worker(first) == 0  # learns 1,500, publishes its snapshot on the way out

    produce_records(records[1500:], bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)
    late = _config(kafka_client, kafka_broker, kafka_names, tmp_path / "b", "--worker-id", "b")
    assert run_worker(late) == 0

    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=2000)
    late_predictions = {m.key.decode(): json.loads(m.value) for m in predictions[1500:]}
    assert sorted(late_predictions) == sorted(r.id for r in records[1500:])
    single = StreamProcessor(["nb"], drift_detector="none")
    for record in records:
        result = single.process(record)
        if record.id in late_predictions:
            got = late_predictions[record.id]
            assert got["label"] == result.prediction.label
            assert got["proba"] == pytest.approx({k: round(v, 6) for k, v in result.prediction.proba.items()}, abs=2e-6)
    # Its own checkpoint counts only its own records; its model holds both workers'.
    state = load_final_state(tmp_path / "b").state
    assert state["counts"]["learned"] == 500
    nb = read_state(state)["processor"].learners["nb"].steps["MultinomialNB"]
    assert sum(nb.class_counts.values()) == 2000


def _kill_tree(supervisor):
    """A failed run must not leave workers behind (they run in sessions of their own)."""
    if supervisor.poll() is None:
        for child in psutil.Process(supervisor.pid).children():
            child.kill()
        supervisor.kill()


def _produce_in_background(records, broker, topic, rate):
    thread = threading.Thread(
        target=produce_records,
        args=(records,),
        kwargs={"bootstrap_servers": broker.bootstrap_servers, "topic": topic, "rate": rate},
        daemon=True,
    )
    thread.start()
    return thread


def test_three_workers_one_killed_nothing_lost_and_they_fuse(kafka_broker, kafka_names, tmp_path, kafka_client):
    n = 6000
    records = synthetic_records(n, seed=8)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 4, f"{topic}.predictions": 4})
    flags = ["--learners", "nb", "--fusion", "on", "--fusion-every-seconds", "1", "--checkpoint-every-seconds", "1",
             "--stop-when-idle", "8"]
    workers = {}
    for name in "abc":
        workers[name] = start_worker_process(
            kafka_broker, kafka_names, tmp_path / name, tmp_path / f"{name}.log", *flags, "--worker-id", name,
            client=kafka_client,
        )
    try:
        for name, process in workers.items():
            wait_for_log(tmp_path / f"{name}.log", ASSIGNED, process=process)
        producer = _produce_in_background(records, kafka_broker, topic, rate=1000)  # records flow for 6 s
        # b has a checkpoint (every second) when it dies: it had partitions and records.
        wait_for("a checkpoint of b", lambda: messages_checkpointed(tmp_path / "b"), 30, tmp_path / "b.log", workers["b"])
        workers["b"].kill()  # SIGKILL mid-stream: no revoke, no final checkpoint
        workers["b"].wait(timeout=10)
        producer.join()
        for name in "ac":
            assert workers[name].wait(timeout=120) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for process in workers.values():  # a failed run must not leave workers behind
            if process.poll() is None:
                process.kill()

    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=n)
    assert {m.key.decode() for m in predictions} >= {r.id for r in records}  # at-least-once across workers
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in "ac"}
    assert all("fused with peers" in text for text in logs.values()), logs
    survivors = [load_final_state(tmp_path / name).state for name in "ac"]
    learned = sum(s["counts"]["learned"] for s in survivors)
    assert learned > n / 2  # the survivors took over the killed worker's partitions
    for state in survivors:
        nb = read_state(state)["processor"].learners["nb"].steps["MultinomialNB"]
        # Each survivor's model holds the records of every worker's last snapshot.
        assert sum(nb.class_counts.values()) >= state["counts"]["learned"]
        assert sum(nb.class_counts.values()) >= n * 0.9


def test_run_processes_restarts_a_killed_worker_and_loses_nothing(kafka_broker, kafka_names, tmp_path, kafka_client):
    n = 6000
    records = synthetic_records(n, seed=9)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 4, f"{topic}.predictions": 4})
    producer = _produce_in_background(records, kafka_broker, topic, rate=1000)
    log_path = tmp_path / "supervisor.log"
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY, PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run",
        "--topic", topic,
        "--bootstrap-servers", kafka_broker.bootstrap_servers,
        "--group-id", f"{kafka_names}-group",
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--session-timeout-ms", "3000",
        "--client", kafka_client,
        "--learners", "nb",
        "--processes", "2",
        "--fusion", "on", "--fusion-every-seconds", "1", "--checkpoint-every-seconds", "1",
        "--stop-when-idle", "6",
    ]
    with open(log_path, "ab") as log:
        supervisor = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_log(log_path, ASSIGNED, count=2, process=supervisor)
        # Both workers have checkpointed records (every second) before one is killed.
        wait_for(
            "a checkpoint of each worker",
            lambda: all(messages_checkpointed(tmp_path / "ckpt" / f"worker-{i}") for i in (0, 1)),
            60,
            log_path,
            supervisor,
        )
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 2
        children[0].send_signal(signal.SIGKILL)
        wait_for_log(log_path, "restarting it", process=supervisor)
        producer.join()
        assert supervisor.wait(timeout=180) == 0, log_path.read_text()[-4000:]
    finally:
        _kill_tree(supervisor)
    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=n)
    assert {m.key.decode() for m in predictions} >= {r.id for r in records}
    for index in (0, 1):
        state = load_final_state(tmp_path / "ckpt" / f"worker-{index}").state
        assert state["counts"]["learned"] > 0


def test_sigterm_stops_every_worker_process_cleanly(kafka_broker, kafka_names, tmp_path):
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    produce_records(synthetic_records(500), bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)
    log_path = tmp_path / "supervisor.log"
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY, PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run", "--topic", topic,
        "--bootstrap-servers", kafka_broker.bootstrap_servers, "--group-id", f"{kafka_names}-group",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--session-timeout-ms", "3000", "--processes", "2",
        "--learners", "nb", "--checkpoint-every-seconds", "1",
    ]
    with open(log_path, "ab") as log:
        supervisor = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_log(log_path, ASSIGNED, count=2, process=supervisor)
        # Every record handled before the stop ("assigned" comes before the first fetch).
        wait_for(
            "the 500 records checkpointed",
            lambda: sum(messages_checkpointed(tmp_path / "ckpt" / f"worker-{i}") for i in (0, 1)) == 500,
            60,
            log_path,
            supervisor,
        )
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        _kill_tree(supervisor)
    assert log_path.read_text().count("stopped: messages") == 2
    learned = sum(load_final_state(tmp_path / "ckpt" / f"worker-{i}").state["counts"]["learned"] for i in (0, 1))
    assert learned == 500
