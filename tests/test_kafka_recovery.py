"""Recovery against a real Tansu broker: a fallback to an older checkpoint re-learns what the
lost ones had learned, all-corrupt refuses to start unless told, a malicious checkpoint stops
the worker before any of it runs."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
from kafka_helpers import KEY, synthetic_records

from stream_learner.cli.evaluate import evaluate
from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import Decoder
from stream_learner.io.broker import create_topics
from stream_learner.runtime.config import load_config
from stream_learner.runtime.worker import run_worker
from stream_learner.state.checkpoint import MAGIC, CheckpointStore
from stream_learner.state.keys import CHECKPOINT, derive_key

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _key_file(checkpoint_dir):
    path = checkpoint_dir.parent / "group.key"
    if not path.exists():
        path.write_text(KEY)
        path.chmod(0o600)
    return str(path)


def _config(broker, names, checkpoint_dir, client="kafka-python", *extra):
    return load_config(
        [
            "--topic",
            f"{names}-in",
            "--bootstrap-servers",
            broker.bootstrap_servers,
            "--group-id",
            f"{names}-group",
            "--checkpoint-dir",
            str(checkpoint_dir),
            "--session-timeout-ms",
            "3000",
            "--stop-when-idle",
            "3",
            "--client",
            client,
            "--worker-id",
            "node-a",
            "--learners",
            "nb",
            "--checkpoint-key-file",
            _key_file(checkpoint_dir),
            *extra,
        ],
        environ={},
    )


def _run(config):
    captured = {}
    code = run_worker(config, on_ready=lambda worker: captured.setdefault("worker", worker))
    return code, captured["worker"]


def _produce(broker, topic, partition, records):
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    try:
        for record in records:
            producer.send(
                topic, key=record.id.encode(), value=Decoder().encode(record), partition=partition
            )
        producer.flush()
    finally:
        producer.close()


def _nb(processor):
    nb = processor.learners["nb"].steps["MultinomialNB"]
    return dict(nb.class_counts), {k: dict(v) for k, v in nb.feature_counts.items() if v}


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def _two_checkpoints(broker, names, directory, client, *extra):
    """Checkpoint(s) covering partition 0, then newer one(s) covering partitions 0 and 1,
    committed; returns the records and the sequence of the last checkpoint without partition 1."""
    topic = f"{names}-in"
    create_topics(
        broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1}
    )
    first, second = (
        synthetic_records(300, seed=21, prefix="a"),
        synthetic_records(300, seed=22, prefix="b"),
    )
    _produce(broker, topic, 0, first)
    code, worker = _run(_config(broker, names, directory, client, *extra))
    assert code == 0 and worker.summary()["learned"] == 300
    store = CheckpointStore(directory, KEY.encode())
    older = store.load_latest()
    assert set(older.offsets) == {(topic, 0)}

    _produce(broker, topic, 1, second)
    code, worker = _run(_config(broker, names, directory, client, *extra))
    assert code == 0 and worker.summary()["learned"] == 600  # counts carry on across restarts
    newest = store.load_latest()
    assert newest.offsets == {(topic, 0): 300, (topic, 1): 300}
    return first + second, older.sequence


@pytest.mark.parametrize("consumer", ["in-process", "consumer-process"])
def test_a_fallback_re_learns_the_partition_only_the_lost_checkpoint_covered(
    kafka_broker, kafka_names, tmp_path, kafka_client, consumer
):
    # The manifest says what the lost checkpoint covered. (Without it the commit metadata
    # would, but the embedded Tansu broker hands back every commit's metadata as null:
    # test_checkpoint_safety covers that path.)
    if consumer == "consumer-process" and kafka_client != "kafka-python":
        pytest.skip("the consumer process is kafka-python's")
    extra = ("--consumer-process",) if consumer == "consumer-process" else ()
    directory = tmp_path / "ckpt"
    records, older = _two_checkpoints(kafka_broker, kafka_names, directory, kafka_client, *extra)
    store = CheckpointStore(directory, KEY.encode())
    for path in store.paths():
        if int(path.name[5:17]) > older:
            _flip(path)  # every checkpoint that covered partition 1 is damaged

    code, worker = _run(_config(kafka_broker, kafka_names, directory, kafka_client, *extra))
    assert code == 0
    # Partition 1's 300 records were committed by the lost checkpoint; they are learned again
    # on top of checkpoint 1's 300.
    assert worker.summary()["learned"] == 600
    reference = evaluate(records, StreamProcessor(["nb"])).processor
    assert _nb(worker.processor) == _nb(reference)
    assert len(store.corrupt_paths()) >= 1


def test_all_corrupt_refuses_to_start_and_allow_fresh_start_re_reads(
    kafka_broker, kafka_names, tmp_path
):
    directory = tmp_path / "ckpt"
    records, _ = _two_checkpoints(kafka_broker, kafka_names, directory, "kafka-python")
    for path in CheckpointStore(directory, KEY.encode()).paths():
        _flip(path)

    command = [
        sys.executable,
        "-m",
        "stream_learner.cli.main",
        "run",
        "--topic",
        f"{kafka_names}-in",
        "--bootstrap-servers",
        kafka_broker.bootstrap_servers,
        "--group-id",
        f"{kafka_names}-group",
        "--checkpoint-dir",
        str(directory),
        "--worker-id",
        "node-a",
    ]
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "refusing to start" in line]
    assert len(errors) == 1 and str(directory) in errors[0] and "--allow-fresh-start" in errors[0]
    # Starting again without the flag still refuses: the files were moved aside, not forgotten.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2

    code, worker = _run(
        _config(kafka_broker, kafka_names, directory, "kafka-python", "--allow-fresh-start")
    )
    assert code == 0
    # Empty learners, and every partition the lost checkpoints covered is read again.
    assert worker.summary()["learned"] == 600
    assert _nb(worker.processor) == _nb(evaluate(records, StreamProcessor(["nb"])).processor)


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _signed(directory, payload: bytes, key: bytes):
    """A format-2 checkpoint holding ``payload``, signed with the group's key (stolen, say)."""
    header = json.dumps({"sequence": 1, "created": 0.0, "offsets": [], "info": {}}).encode()
    body = struct.pack(">I", len(header)) + header + payload
    signature = hmac.new(derive_key(key, CHECKPOINT), MAGIC + body, hashlib.sha256).digest()
    (directory / "ckpt-000000000001.slck").write_bytes(
        MAGIC + hashlib.sha256(MAGIC + body).digest() + signature + body
    )


def test_a_signed_malicious_checkpoint_stops_the_worker_before_it_runs(
    kafka_broker, kafka_names, tmp_path
):
    marker = tmp_path / "pwned"
    directory = tmp_path / "ckpt"
    directory.mkdir()
    _signed(directory, pickle.dumps(_System(f"touch {marker}")), KEY.encode())
    command = [
        sys.executable,
        "-m",
        "stream_learner.cli.main",
        "run",
        "--topic",
        f"{kafka_names}-in",
        "--bootstrap-servers",
        kafka_broker.bootstrap_servers,
        "--checkpoint-dir",
        str(directory),
    ]
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to load posix.system" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
