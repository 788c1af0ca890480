"""Exactly-once outputs on the real embedded broker (issue 16, docs/exactly-once.md): kill -9s,
a zombie, a rebalance and a broker freeze in the middle of transactions.

What a downstream ``read_committed`` consumer sees is read with
:func:`kafka_helpers.read_committed_dropping_aborted`, not a plain ``read_committed`` consumer:
the embedded Tansu broker never lists aborted transactions in its fetch responses, so its
``read_committed`` readers also get the records of aborted transactions
(``test_broker_transactions.test_aborted_records_reach_read_committed_readers``). That reader
finds the aborted transactions from the abort markers Tansu does write and drops them, as
every Kafka client does with the list Apache Kafka sends: it reads what a ``read_committed``
reader of Kafka reads.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time

import pytest
from kafka_helpers import (
    ASSIGNED,
    KEY,
    load_final_state,
    log_size,
    messages_checkpointed,
    read_committed_topic,
    read_topic,
    start_worker_process,
    synthetic_records,
    wait_for_log,
    worker_config,
)
from worker_helpers import nb_parameters, uninterrupted

from stream_learner.cli.produce import produce_messages
from stream_learner.core.records import Decoder
from stream_learner.io.broker import EmbeddedBroker, committed_offsets, create_topics
from stream_learner.runtime.worker import read_state, run_worker
from stream_learner.state.checkpoint import CheckpointStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EXACTLY_ONCE = ("--processing-guarantee", "exactly-once")


def stream(topic: str, n: int, seed: int, bad_every: int = 97):
    """``(records, messages)``: ``n`` labelled records keyed by id, and one undecodable
    message (a dead letter, keyed ``bad-<i>``) every ``bad_every``."""
    records = synthetic_records(n, seed=seed)
    messages = []
    for i, record in enumerate(records):
        messages.append((topic, record.id.encode(), Decoder().encode(record)))
        if i % bad_every == 0:
            messages.append((topic, f"bad-{i}".encode(), b"{not json"))
    return records, messages


def producing(broker, messages, rate):
    thread = threading.Thread(
        target=produce_messages,
        args=(messages,),
        kwargs={"bootstrap_servers": broker.bootstrap_servers, "rate": rate},
        daemon=True,
    )
    thread.start()
    return thread


def committed_outputs(broker, topic: str, partitions: int):
    """``(prediction ids, dead-letter keys)`` a read_committed consumer of Kafka reads."""
    predictions = read_committed_topic(broker.bootstrap_servers, f"{topic}.predictions", partitions)
    dead = read_committed_topic(broker.bootstrap_servers, f"{topic}.dlq", 1)
    return [json.loads(m.value)["id"] for m in predictions], [m.key.decode() for m in dead]


def assert_each_once(ids, expected):
    repeated = {i: c for i, c in collections.Counter(ids).items() if c > 1}
    assert not repeated, f"{len(repeated)} outputs written more than once, e.g. {list(repeated.items())[:5]}"
    assert set(ids) == set(expected), f"missing {sorted(set(expected) - set(ids))[:5]}"


def group_committed(broker, group: str, topic: str, partitions: int) -> int:
    offsets = committed_offsets(broker.bootstrap_servers, group, [(topic, p) for p in range(partitions)])
    return sum(offset or 0 for offset in offsets.values())


@pytest.mark.parametrize(
    "client, producer",
    [("kafka-python", "producer-process"), ("kafka-python", "in-process"), ("confluent", "in-process")],
)
def test_a_cycle_commits_outputs_and_offsets_in_one_transaction(kafka_broker, kafka_names, tmp_path, client, producer, monkeypatch):
    if client == "confluent":
        pytest.importorskip("confluent_kafka")
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1})
    records, messages = stream(topic, 900, seed=1, bad_every=45)
    produce_messages(messages, bootstrap_servers=kafka_broker.bootstrap_servers)
    config = worker_config(
        client, kafka_broker, kafka_names, tmp_path, *EXACTLY_ONCE,
        "--transaction-every-records", "150", "--producer-process", str(producer == "producer-process"),
    )
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)
    assert run_worker(config) == 0
    predictions, dead = committed_outputs(kafka_broker, topic, 2)
    assert_each_once(predictions, [r.id for r in records])
    assert_each_once(dead, [key.decode() for _, key, value in messages if value == b"{not json"])
    assert group_committed(kafka_broker, f"{kafka_names}-group", topic, 2) == len(messages)
    store = CheckpointStore(tmp_path / "ckpt", KEY.encode())
    assert store.pending_paths() == []
    assert sum(store.load_latest().offsets.values()) == len(messages)


def test_kill_9_ten_times_every_output_once_and_the_model_exact(kafka_client, kafka_broker, kafka_names, tmp_path):
    n = 8000
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 3, f"{topic}.predictions": 3, f"{topic}.dlq": 1})
    records, messages = stream(topic, n, seed=5)
    # A restart takes ~6 s (start, group join after the dead member expires): the stream
    # lasts longer than ten of them.
    producer = producing(kafka_broker, messages, rate=110)
    checkpoint_dir, log_path = tmp_path / "ckpt", tmp_path / "worker.log"
    # Short cycles: the kills land before, inside and after transactions and checkpoints.
    cadence = [
        *EXACTLY_ONCE,
        "--transaction-every-records", "300",
        "--transaction-every-seconds", "0.5",
        "--max-poll-records", "100",
        "--worker-id", "node-a",
    ]
    rng = random.Random(5)
    sizes_at_kill = []
    for _ in range(10):
        run_starts = log_size(log_path)  # the log is shared by the runs: count this run's lines
        process = start_worker_process(kafka_broker, kafka_names, checkpoint_dir, log_path, *cadence, client=kafka_client)
        wait_for_log(log_path, ASSIGNED, since=run_starts, process=process)
        time.sleep(rng.uniform(0.2, 2.0))  # a random moment to kill at, not a wait for an event
        assert process.poll() is None, log_path.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait()
        sizes_at_kill.append(messages_checkpointed(checkpoint_dir))
    producer.join()
    process = start_worker_process(
        kafka_broker, kafka_names, checkpoint_dir, log_path, *cadence, "--stop-when-idle", "4", client=kafka_client,
    )
    assert process.wait(timeout=180) == 0, log_path.read_text()[-3000:]

    final = load_final_state(checkpoint_dir)
    assert final.state["counts"]["messages"] == len(messages)
    assert final.state["counts"]["learned"] == n
    assert nb_parameters(read_state(final.state)["processor"]) == uninterrupted(records)

    predictions, dead = committed_outputs(kafka_broker, topic, 3)
    assert_each_once(predictions, [r.id for r in records])
    assert_each_once(dead, [key.decode() for _, key, value in messages if value == b"{not json"])
    # The killed transactions' outputs are in the log all the same (aborted): a reader that
    # ignores transactions sees them again.
    raw = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=n, timeout=60)
    assert len(raw) > n
    # The kills landed at different points of the stream, not all before or after it.
    assert len(set(sizes_at_kill)) >= 6 and max(sizes_at_kill) < len(messages), sizes_at_kill


def test_a_rebalance_commits_the_open_transaction_before_the_partitions_go(kafka_client, kafka_broker, kafka_names, tmp_path):
    n = 6000
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 4, f"{topic}.predictions": 4, f"{topic}.dlq": 1})
    records, messages = stream(topic, n, seed=7)
    half = len(messages) // 2
    producer = producing(kafka_broker, messages[:half], rate=500)
    # Transactions far longer than the test: the first worker's is open when the second joins.
    cadence = [*EXACTLY_ONCE, "--transaction-every-records", "1000000", "--transaction-every-seconds", "3600"]
    first = start_worker_process(
        kafka_broker, kafka_names, tmp_path / "a", tmp_path / "a.log", *cadence, "--worker-id", "a",
        "--stop-when-idle", "10", client=kafka_client,
    )
    wait_for_log(tmp_path / "a.log", ASSIGNED, process=first)
    # Outputs in flight, and the stream still flowing: the first worker is busy when the second joins.
    read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=1, settle=0)
    assert producer.is_alive(), "the first half of the stream ended before the second worker started"
    second = start_worker_process(
        kafka_broker, kafka_names, tmp_path / "b", tmp_path / "b.log", *cadence, "--worker-id", "b",
        "--stop-when-idle", "10", client=kafka_client,
    )
    wait_for_log(tmp_path / "b.log", ASSIGNED, process=second)
    producer.join()
    produce_messages(messages[half:], bootstrap_servers=kafka_broker.bootstrap_servers)
    assert first.wait(timeout=120) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert second.wait(timeout=120) == 0, (tmp_path / "b.log").read_text()[-3000:]

    a, b = load_final_state(tmp_path / "a"), load_final_state(tmp_path / "b")
    assert a.state["counts"]["learned"] > 0 and b.state["counts"]["learned"] > 0
    assert a.state["counts"]["learned"] + b.state["counts"]["learned"] == n  # each learned once
    reasons = [CheckpointStore(tmp_path / "a", KEY.encode(), keep=10).read(p).info["reason"] for p in CheckpointStore(tmp_path / "a", KEY.encode()).paths()]
    assert "revoke" in reasons
    predictions, dead = committed_outputs(kafka_broker, topic, 4)
    assert_each_once(predictions, [r.id for r in records])
    assert_each_once(dead, [key.decode() for _, key, value in messages if value == b"{not json"])


def test_a_zombie_resumed_after_losing_its_partitions_writes_nothing_visible(kafka_client, kafka_broker, kafka_names, tmp_path):
    """A worker SIGSTOPped past its session timeout with a transaction open, while a second
    worker takes its partitions; then SIGCONT.

    Kafka fences the zombie by its group generation (KIP-447: TxnOffsetCommit answers
    ILLEGAL_GENERATION, the transaction aborts). The embedded broker does not check the
    generation in TxnOffsetCommit (``test_txn_offset_commit_ignores_the_group_generation``),
    but it does check the member id of a plain OffsetCommit: the worker probes its membership
    that way before each commit (``KafkaSource.probe_membership``), and a member that expired
    is told so by its heartbeat (``on_partitions_lost``); both abort the transaction."""
    n = 3000
    topic = f"{kafka_names}-in"
    group = f"{kafka_names}-group"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1})
    records, messages = stream(topic, n, seed=9)
    produce_messages(messages[: len(messages) // 2], bootstrap_servers=kafka_broker.bootstrap_servers)
    cadence = [*EXACTLY_ONCE, "--transaction-every-records", "1000000", "--transaction-every-seconds", "3600"]
    zombie = start_worker_process(
        kafka_broker, kafka_names, tmp_path / "z", tmp_path / "z.log", *cadence, "--worker-id", "z", group=group, client=kafka_client,
    )
    try:
        wait_for_log(tmp_path / "z.log", ASSIGNED, process=zombie)
        # Its open transaction holds outputs on the broker.
        read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=1)
        zombie.send_signal(signal.SIGSTOP)
        successor = start_worker_process(
            kafka_broker, kafka_names, tmp_path / "s", tmp_path / "s.log", *cadence, "--worker-id", "s",
            "--stop-when-idle", "8", group=group, client=kafka_client,
        )
        wait_for_log(tmp_path / "s.log", ASSIGNED, process=successor)  # after the zombie expired
        produce_messages(messages[len(messages) // 2 :], bootstrap_servers=kafka_broker.bootstrap_servers)
        zombie.send_signal(signal.SIGCONT)
        wait_for_log(tmp_path / "z.log", ("transaction aborted", "exactly-once:"), process=zombie)
        zombie.send_signal(signal.SIGTERM)
        assert zombie.wait(timeout=60) in (0, 1), (tmp_path / "z.log").read_text()[-3000:]
        assert successor.wait(timeout=120) == 0, (tmp_path / "s.log").read_text()[-3000:]
    finally:
        for process in (zombie,):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
    predictions, dead = committed_outputs(kafka_broker, topic, 2)
    assert_each_once(predictions, [r.id for r in records])
    assert_each_once(dead, [key.decode() for _, key, value in messages if value == b"{not json"])


def test_a_broker_freeze_mid_transaction_loses_and_repeats_nothing(kafka_client, kafka_names, tmp_path):
    """The broker SIGSTOPped while a transaction is open, then resumed. A broker of its own:
    freezing the shared one would stall the other tests."""
    n = 3000
    with EmbeddedBroker() as broker:
        topic = f"{kafka_names}-in"
        create_topics(broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1})
        records, messages = stream(topic, n, seed=11)
        produce_messages(messages[: len(messages) // 2], bootstrap_servers=broker.bootstrap_servers)
        cadence = [
            *EXACTLY_ONCE, "--transaction-every-seconds", "1", "--transaction-timeout", "30",
            "--worker-id", "node-a", "--stop-when-idle", "5",
        ]
        log_path = tmp_path / "worker.log"
        process = start_worker_process(broker, kafka_names, tmp_path / "ckpt", log_path, *cadence, client=kafka_client)
        try:
            wait_for_log(log_path, ASSIGNED, process=process)
            producer = producing(broker, messages[len(messages) // 2 :], rate=250)
            # Freeze once the worker predicts on the second half, while it still flows: a
            # transaction is open then.
            first_half = sum(value != b"{not json" for _, _, value in messages[: len(messages) // 2])
            read_topic(broker.bootstrap_servers, f"{topic}.predictions", expected=first_half + 1, settle=0)
            assert producer.is_alive(), "the stream ended before the broker was frozen"
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                # The worker finds its transaction cannot end while the broker is away.
                wait_for_log(log_path, ("not committed yet", "exactly-once:"), process=process)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            producer.join()
            code = process.wait(timeout=180)
            if code != 0:  # a commit cut short by --transaction-timeout: the restart recovers
                process = start_worker_process(broker, kafka_names, tmp_path / "ckpt", log_path, *cadence, client=kafka_client)
                assert process.wait(timeout=180) == 0, log_path.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
        final = load_final_state(tmp_path / "ckpt")
        assert final.state["counts"]["learned"] == n
        assert nb_parameters(read_state(final.state)["processor"]) == uninterrupted(records)
        predictions, dead = committed_outputs(broker, topic, 2)
        assert_each_once(predictions, [r.id for r in records])
        assert_each_once(dead, [key.decode() for _, key, value in messages if value == b"{not json"])


def test_the_membership_probe_tells_a_member_the_group_forgot(kafka_broker, kafka_names):
    """What the worker asks before each commit, since the embedded broker does not check the
    generation of a TxnOffsetCommit: a heartbeat, answered UNKNOWN_MEMBER_ID for a member the
    group no longer has (Kafka would refuse the TxnOffsetCommit itself, KIP-447)."""
    from kafka.coordinator.base import Generation
    from kafka.errors import UnknownMemberIdError

    from stream_learner.io.sources import KafkaSource, StartAtCommitted

    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1})

    source = KafkaSource(
        [topic], bootstrap_servers=kafka_broker.bootstrap_servers, group_id=f"{kafka_names}-group",
        handler=StartAtCommitted(), session_timeout_ms=6000,
    )
    try:
        deadline = time.monotonic() + 30
        while not source.assignment():
            assert time.monotonic() < deadline, "no partitions assigned"
            source.poll(0.2)
        source.probe_membership()  # a member: nothing raised
        coordinator = source.consumer._coordinator
        current = coordinator._generation
        coordinator._generation = Generation(current.generation_id, "forgotten-member", current.protocol)
        with pytest.raises(UnknownMemberIdError):
            source.probe_membership()
    finally:
        source.close(timeout=5)


def test_an_oversized_dead_letter_is_truncated_inside_the_transaction(kafka_client, kafka_broker, kafka_names, tmp_path, monkeypatch):
    """A 2 MiB message is over the producer's 1 MiB limit: its dead letter never enters the
    transaction, and its truncated copy is written in the same transaction instead (Tansu does
    not enforce ``max.message.bytes``, so the broker-side refusal is not reachable here)."""
    from kafka import KafkaProducer

    from stream_learner.io.sinks import TRUNCATED_BYTES

    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1, f"{topic}.predictions": 1, f"{topic}.dlq": 1})
    good = synthetic_records(100, seed=13)
    oversized = [b'{"id": "big%d", "text": "' % i + b"x" * (2 * 1024 * 1024) + b'"}' for i in range(3)]
    values = [Decoder().encode(r) for r in good[:50]] + oversized + [Decoder().encode(r) for r in good[50:]]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, max_request_size=4 * 1024 * 1024)
    try:
        for i, value in enumerate(values):
            producer.send(topic, key=f"k{i}".encode(), value=value, partition=0)
        producer.flush(60)
    finally:
        producer.close()
    config = worker_config(kafka_client, kafka_broker, kafka_names, tmp_path, *EXACTLY_ONCE)
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)
    assert run_worker(config) == 0
    predictions, dead = committed_outputs(kafka_broker, topic, 1)
    assert_each_once(predictions, [r.id for r in good])
    copies = read_committed_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", 1)
    assert sorted(m.value for m in copies) == sorted(value[:TRUNCATED_BYTES] for value in oversized)
    assert all(dict(m.headers)["truncated"] == b"true" for m in copies)
    assert group_committed(kafka_broker, f"{kafka_names}-group", topic, 1) == len(values)
