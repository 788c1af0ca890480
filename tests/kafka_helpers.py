"""Helpers for the tests that run the worker against a real broker."""

from __future__ import annotations

import collections
import os
import random
import re
import subprocess
import sys
import time
import urllib.request

from helpers import poll, wait_for

from stream_learner.core.records import Record
from stream_learner.io.broker import committed_offsets
from stream_learner.runtime.config import load_config
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


def read_topic(bootstrap: str, topic: str, expected: int | None = None, timeout: float = 30.0, settle: float = 0.5):
    """Every message of ``topic`` (all partitions), waiting until ``expected`` have arrived and
    then ``settle`` seconds without more (0: return while the topic is still being written)."""
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
            if expected is not None and len(messages) >= expected and time.monotonic() - idle_since >= settle:
                break
            if expected is None and time.monotonic() - idle_since > 2.0:
                break
        return messages
    finally:
        consumer.close()


def worker_config(client, broker, names, tmp_path, *extra, idle="3"):
    """A worker on ``<names>-in`` for run_worker in the test's process."""
    return load_config(
        [
            "--topic", f"{names}-in",
            "--bootstrap-servers", broker.bootstrap_servers,
            "--group-id", f"{names}-group",
            "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--session-timeout-ms", "3000",
            "--stop-when-idle", idle,
            "--client", client,
            # nb unless a test names its learners: small, fast checkpoints.
            *(() if "--learners" in extra else ("--learners", "nb")),
            *extra,
        ],
        environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY},
    )


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


def wait_for_log(path, text, count=1, timeout=60.0, process=None, since=0):
    """Wait until ``text`` (or any of a tuple of texts) appears ``count`` times in the log,
    after its first ``since`` bytes (``log_size`` before a restart: what earlier runs wrote)."""
    texts = (text,) if isinstance(text, str) else tuple(text)

    def logged():
        if not path.exists():
            return False
        with open(path, "rb") as handle:
            handle.seek(since)
            log = handle.read().decode(errors="replace")
        return any(log.count(t) >= count for t in texts)

    wait_for(f"{texts!r} x{count} in the log", logged, timeout, log=path, process=process, every=0.1)


def log_size(path) -> int:
    return path.stat().st_size if path.exists() else 0


def _served_urls(log_path) -> list[str]:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return re.findall(r"metrics on (http://\S+)/metrics", text)


def served_url(log_path, process=None, timeout=60.0) -> str:
    """The base URL of the HTTP server of a worker process started with ``--metrics-port 0``
    (a port of its own choosing: no race for a port picked in advance)."""
    return wait_for("the worker's metrics server", lambda: (_served_urls(log_path) or [None])[-1], timeout, log_path, process)


def records_handled(log_path) -> float:
    """Records a worker process started with ``--metrics-port 0`` has handled so far, from its
    /metrics (0 until its metrics server is up)."""
    from prometheus_client.parser import text_string_to_metric_families

    urls = _served_urls(log_path)
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


# -- reading what a read_committed consumer of Apache Kafka reads -----------------------------

TIMEOUT_S = 30.0


def drain(consumer, tp, high_watermark: int, *, records: bool = False) -> list:
    """The values (or records) a kafka-python consumer assigned to ``tp`` reads up to
    ``high_watermark``, or until nothing more comes once a fetch has been answered
    (``read_committed`` stops at an open transaction, and ListOffsets does not tell where: see
    ``test_open_transaction_holds_read_committed_readers_at_its_first_offset``)."""
    got, deadline, idle_since = [], time.monotonic() + TIMEOUT_S, None
    while consumer.position(tp) < high_watermark:
        assert time.monotonic() < deadline, "the reader never went idle"
        for batch in consumer.poll(timeout_ms=200).values():
            got.extend(batch if records else (record.value for record in batch))
            idle_since = None
        if consumer.highwater(tp) is None:
            continue  # no fetch answered yet
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since > 1.0:
            break
    return got


def end_offset(bootstrap: str, topic: str, partition: int = 0, isolation: str = "read_uncommitted") -> int:
    """The high watermark (``read_uncommitted``) or last stable offset (``read_committed``)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation)
    try:
        tp = TopicPartition(topic, partition)
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()


def aborted_from_markers(buffer: bytes) -> list:
    """The aborted transactions of a fetched record set, found from its abort markers: what
    Kafka sends in FetchResponse ``AbortedTransactions`` and Tansu does not. A transaction
    whose records and abort marker come in different fetch responses is missed here (see
    :func:`aborted_transactions` for a whole partition)."""
    return [AbortedTransaction(pid, first) for pid, first, _ in _aborted_in(buffer, {})]


AbortedTransaction = collections.namedtuple("AbortedTransaction", "producer_id first_offset")


def _aborted_in(buffer: bytes, first_offsets: dict) -> list[tuple[int, int, int]]:
    """``(producer id, first offset, abort marker offset)`` of the transactions whose abort
    marker is in ``buffer``; ``first_offsets`` carries open transactions across buffers."""
    from kafka.record import MemoryRecords

    aborted = []
    records = MemoryRecords(buffer)
    while (batch := records.next_batch()) is not None:
        if batch.magic != 2 or not batch.is_transactional:
            continue
        if batch.is_control_batch:
            first_offset = first_offsets.pop(batch.producer_id, None)
            marker = next(iter(batch), None)
            if first_offset is not None and marker is not None and marker.abort:
                aborted.append((batch.producer_id, first_offset, batch.base_offset))
        else:
            first_offsets.setdefault(batch.producer_id, batch.base_offset)
    return aborted


def _hooked_consumer(bootstrap: str, isolation: str, on_records):
    """A kafka-python consumer whose fetched record sets pass through ``on_records(fetch
    offset, records, options)`` first (kafka-python 3.0 internals: ``Fetcher.PartitionRecords``)."""
    from kafka import KafkaConsumer
    from kafka.consumer.fetcher import Fetcher

    class PartitionRecords(Fetcher.PartitionRecords):
        def __init__(self, fetch_offset, tp, records, **options):
            on_records(fetch_offset, records, options)
            super().__init__(fetch_offset, tp, records, **options)

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation,
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=64 * 1024 * 1024,
    )
    consumer._fetcher.PartitionRecords = PartitionRecords
    return consumer


def aborted_transactions(bootstrap: str, topic: str, partition: int = 0) -> list[tuple[int, int, int]]:
    """Every aborted transaction of a partition, ``(producer id, first offset, marker offset)``,
    from the abort markers, however the partition is split into fetches."""
    from kafka import TopicPartition

    first_offsets: dict = {}
    aborted: list = []
    consumer = _hooked_consumer(
        bootstrap, "read_uncommitted", lambda _, records, __: aborted.extend(_aborted_in(records._buffer, first_offsets))
    )
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        drain(consumer, tp, end_offset(bootstrap, topic, partition))
    finally:
        consumer.close()
    return aborted


def read_committed_dropping_aborted(
    bootstrap: str, topic: str, partition: int = 0, *, records: bool = False
) -> list:
    """Values (or records) a ``read_committed`` reader gets from a broker that lists aborted
    transactions, as Apache Kafka does: kafka-python's own filter, fed each fetch the aborted
    transactions it overlaps (what Kafka's FetchResponse ``AbortedTransactions`` holds), found
    from the abort markers by :func:`aborted_transactions`. The embedded Tansu broker leaves
    aborted records readable to ``read_committed`` readers (see
    ``test_aborted_records_reach_read_committed_readers``): this is the reader that lets
    exactly-once tests assert what a Kafka reader would see."""
    from kafka import TopicPartition

    aborted = aborted_transactions(bootstrap, topic, partition)

    def give_aborted(fetch_offset, _records, options):
        if not options.get("aborted_transactions"):
            options["aborted_transactions"] = [
                AbortedTransaction(pid, first) for pid, first, marker in aborted if marker >= fetch_offset
            ]

    consumer = _hooked_consumer(bootstrap, "read_committed", give_aborted)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        return drain(consumer, tp, end_offset(bootstrap, topic, partition), records=records)
    finally:
        consumer.close()


def read_committed_topic(bootstrap: str, topic: str, partitions: int) -> list:
    """:func:`read_committed_dropping_aborted` records of every partition."""
    return [
        record
        for partition in range(partitions)
        for record in read_committed_dropping_aborted(bootstrap, topic, partition, records=True)
    ]


def committed_offset(bootstrap: str, group: str, topic: str, partition: int = 0) -> int | None:
    """The group's committed offset, read without joining the group."""
    return committed_offsets(bootstrap, group, [(topic, partition)])[(topic, partition)]
