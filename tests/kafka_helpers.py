"""Helpers for the tests that run the worker against a real broker."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
import urllib.request

from helpers import poll, wait_for

from stream_learner.core.records import Record
from stream_learner.state.checkpoint import CheckpointStore

KEY = "test-checkpoint-key-0123456789abcdef"
VOCABULARY = {
    "spam": ["cheap", "pills", "free", "money", "win", "prize", "offer", "click", "now", "viagra", "casino"],
    "ham": ["meeting", "lunch", "report", "project", "team", "agenda", "notes", "review", "budget", "call"],
    "news": ["election", "market", "storm", "league", "minister", "court", "weather", "score", "vote", "bank"],
}
SHARED = ["the", "a", "and", "to", "of", "in", "is", "for", "on", "with"]
# The log line of a worker that got partitions, whichever client (or consumer process) logs it.
ASSIGNED = "assigned [('"


def synthetic_records(n: int, seed: int = 0, prefix: str = "r") -> list[Record]:
    """Labelled texts: mostly class words, some shared words, some noise."""
    rng = random.Random(seed)
    labels = sorted(VOCABULARY)
    records = []
    for i in range(n):
        label = rng.choice(labels)
        words = [
            rng.choice(VOCABULARY[label] if rng.random() < 0.55 else VOCABULARY[rng.choice(labels)])
            if rng.random() < 0.7
            else rng.choice(SHARED)
            for _ in range(rng.randint(4, 12))
        ]
        records.append(Record(f"{prefix}{i}", " ".join(words), label))
    return records


def read_topic(bootstrap: str, topic: str, expected: int | None = None, timeout: float = 30.0):
    """Every message of ``topic`` (all partitions), waiting until ``expected`` have arrived."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout
        partitions = poll(lambda: consumer.partitions_for_topic(topic), timeout, every=0.2) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        messages = []
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            got = [m for records in batch.values() for m in records]
            messages.extend(got)
            if got:
                idle_since = time.monotonic()
            if expected is not None and len(messages) >= expected and time.monotonic() - idle_since > 0.5:
                break
            if expected is None and time.monotonic() - idle_since > 2.0:
                break
        return messages
    finally:
        consumer.close()


def start_worker_process(broker, names, checkpoint_dir, log_path, *extra, group=None, client="kafka-python"):
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY, PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run",
        "--topic", f"{names}-in",
        "--bootstrap-servers", broker.bootstrap_servers,
        "--group-id", group or f"{names}-group",
        "--checkpoint-dir", str(checkpoint_dir),
        "--session-timeout-ms", "3000",
        "--client", client,
        # nb unless a test names its learners: small, fast checkpoints.
        *(() if "--learners" in extra else ("--learners", "nb")),
        *extra,
    ]
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_log(path, text, count=1, timeout=60.0, process=None):
    """Wait until ``text`` (or any of a tuple of texts) appears ``count`` times in the log."""
    texts = (text,) if isinstance(text, str) else tuple(text)

    def logged():
        log = path.read_text(errors="replace") if path.exists() else ""
        return any(log.count(t) >= count for t in texts)

    wait_for(f"{texts!r} x{count} in the log", logged, timeout, log=path, process=process, every=0.1)


def records_handled(log_path) -> float:
    """Records a worker process started with ``--metrics-port 0`` has handled so far, from its
    /metrics (0 until its metrics server is up)."""
    from prometheus_client.parser import text_string_to_metric_families

    urls = re.findall(r"metrics on (http://\S+)/metrics", log_path.read_text(errors="replace")) if log_path.exists() else []
    if not urls:
        return 0
    try:
        with urllib.request.urlopen(urls[-1] + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "stream_learner_records_total"
    )


def messages_checkpointed(checkpoint_dir) -> int:
    checkpoint = CheckpointStore(checkpoint_dir, KEY.encode()).load_latest()
    return 0 if checkpoint is None else checkpoint.state["counts"]["messages"]


def load_final_state(checkpoint_dir):
    store = CheckpointStore(checkpoint_dir, KEY.encode())
    checkpoint = store.load_latest()
    assert checkpoint is not None, f"no checkpoint in {checkpoint_dir}"
    return checkpoint
