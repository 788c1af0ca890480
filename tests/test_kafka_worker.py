"""The Kafka worker against a real Tansu broker: end to end, crashes, bad input, rebalances,
shutdown, an unreachable broker."""

from __future__ import annotations

import collections
import json
import random
import signal
import threading
import time

import pytest
from helpers import wait_for
from kafka_helpers import (
    ASSIGNED,
    KEY,
    load_final_state,
    log_size,
    messages_checkpointed,
    read_topic,
    records_handled,
    start_worker_process,
    synthetic_records,
    wait_for_log,
    worker_config,
)
from worker_helpers import nb_parameters

from stream_learner.cli.evaluate import delay_labels, evaluate
from stream_learner.cli.produce import produce_messages, produce_records
from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import Record
from stream_learner.io.broker import EmbeddedBroker, committed_offsets, create_topics, free_port
from stream_learner.runtime.worker import read_state, run_worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(autouse=True)
def checkpoint_key(monkeypatch):
    """run_worker in this process reads the group secret from the environment."""
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)


def run_in_process(config):
    """run_worker in this process; returns (exit code, worker)."""
    captured = {}
    code = run_worker(config, on_ready=lambda worker: captured.setdefault("worker", worker))
    return code, captured.get("worker")


# -- end to end ------------------------------------------------------------------------


def test_end_to_end_predictions_match_evaluate_on_the_same_records(kafka_broker, kafka_names, tmp_path, kafka_client):
    records = synthetic_records(3000, seed=1)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1, f"{topic}.predictions": 1, f"{topic}.dlq": 1})
    produce_records(records, bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)

    code, worker = run_in_process(worker_config(kafka_client, kafka_broker, kafka_names, tmp_path, "--learners", "nb,pa"))
    assert code == 0
    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=3000)
    values = [json.loads(m.value) for m in predictions]
    assert len(values) == 3000
    assert [m.key.decode() for m in predictions] == [r.id for r in records]
    assert all(v["id"] == r.id for v, r in zip(values, records, strict=True))
    assert {v["learner"] for v in values} <= {"nb", "pa"}
    assert all(v["latency_ms"] >= 0 and v["model_version"] >= 0 for v in values)

    reference = StreamProcessor(["nb", "pa"])
    expected_labels = [reference.process(r, now=0.0).prediction.label for r in records]
    assert [v["label"] for v in values] == expected_labels
    for name in ("nb", "pa"):
        assert worker.processor.learner_stats()[name]["accuracy"] == pytest.approx(
            evaluate(records, StreamProcessor([name])).processor.learner_stats()[name]["accuracy"]
        )
    assert worker.summary()["learned"] == 3000


def test_mini_batches_predict_and_learn_every_record(kafka_broker, kafka_names, tmp_path, kafka_client):
    records = synthetic_records(2000, seed=4)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 2, f"{topic}.dlq": 1})
    produce_records(records, bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)

    config = worker_config(kafka_client, kafka_broker, kafka_names, tmp_path, "--learners", "nb,neural", "--mini-batch", "64")
    code, worker = run_in_process(config)
    assert code == 0
    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=2000)
    assert sorted(m.key.decode() for m in predictions) == sorted(r.id for r in records)
    summary = worker.summary()
    assert summary["learned"] == 2000 and summary.get("dead_lettered", 0) == 0
    # Counts do not depend on how records are batched: naive Bayes learned what evaluate learns.
    reference = evaluate(records, StreamProcessor(["nb"])).processor
    assert nb_parameters(worker.processor) == nb_parameters(reference)
    assert worker.processor.heads()["neural"][1].n_seen == 2000


def test_delayed_labels_in_the_same_topic_are_joined_like_evaluate(kafka_broker, kafka_names, tmp_path, kafka_client):
    records = synthetic_records(1500, seed=2)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1})
    produce_records(records, bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic, labels_delay=40)

    code, worker = run_in_process(worker_config(kafka_client, kafka_broker, kafka_names, tmp_path))
    assert code == 0
    summary = worker.summary()
    assert summary["predicted"] == 1500 and summary["label_joined"] == 1500
    assert summary["learned"] == 0 and summary["label_unmatched"] == 0
    reference = evaluate(delay_labels(records, 40), StreamProcessor(["nb"])).processor
    assert worker.processor.learner_stats()["nb"]["accuracy"] == pytest.approx(
        reference.learner_stats()["nb"]["accuracy"]
    )
    assert nb_parameters(worker.processor) == nb_parameters(reference)


def test_labels_from_a_separate_topic_are_joined_by_id(kafka_broker, kafka_names, tmp_path, kafka_client):
    records = synthetic_records(800, seed=3)
    topic, labels_topic = f"{kafka_names}-in", f"{kafka_names}-labels"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2, labels_topic: 2})
    unlabelled = [Record(r.id, r.text) for r in records]
    produce_records(unlabelled, bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)
    # Stops once every label is joined; the idle stop only bounds a failing run.
    config = worker_config(kafka_client, kafka_broker, kafka_names, tmp_path, "--labels-topic", labels_topic, idle="60")

    def send_labels_once_predicted():
        read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=800, timeout=60, settle=0)
        labels = [Record(r.id, None, r.label) for r in records]
        produce_records(labels, bootstrap_servers=kafka_broker.bootstrap_servers, topic=labels_topic)

    sender = threading.Thread(target=send_labels_once_predicted, daemon=True)
    sender.start()
    all_joined = threading.Event()
    captured = {}
    code = run_worker(
        config,
        stop=all_joined,
        progress=lambda w: w.summary()["label_joined"] >= 800 and all_joined.set(),
        progress_every=0.2,
        on_ready=lambda w: captured.setdefault("worker", w),
    )
    sender.join()
    worker = captured["worker"]
    assert code == 0
    summary = worker.summary()
    assert summary["predicted"] == 800 and summary["label_joined"] == 800
    assert worker.processor.learner_stats()["nb"]["learned"] == 800


# -- bad input -------------------------------------------------------------------------

MALFORMED = {
    "invalid_utf8": [b"\xff\xfe broken", b'{"id": "x", "text": "caf\xe9"}'],
    "invalid_json": [b'{"id": 1, "text": ', b"{not json at all}"],
    "not_an_object": [b"[1, 2, 3]", b'["text"]'],
    "empty_message": [b"", b"   \n", None],
    "missing_text": [b'{"id": "m1"}', b'{"id": "m2", "label": null}'],
    "empty_text": [b'{"id": "e1", "text": "   "}', b'{"text": ""}'],
    "text_not_string": [b'{"id": "t1", "text": 42}', b'{"id": "t2", "text": ["a"]}'],
    "invalid_id": [b'{"id": [1], "text": "hello"}', b'{"id": true, "text": "hello"}'],
    "invalid_label": [b'{"id": "l1", "text": "hi", "label": {"a": 1}}', b'{"id": "l2", "text": "hi", "label": 1.5}'],
    "invalid_timestamp": [b'{"id": "s1", "text": "hi", "ts": {"at": 1}}', b'{"id": "s2", "text": "hi", "ts": true}'],
    "label_without_id": [b'{"label": "spam"}'],
}


def test_bad_input_is_dead_lettered_with_reason_and_original_bytes(kafka_broker, kafka_names, tmp_path, kafka_client):
    rng = random.Random(4)
    good = synthetic_records(2000, seed=4)
    bad = []
    for reason, values in MALFORMED.items():
        for i in range(30):
            bad.append((reason, values[i % len(values)]))
    assert len(bad) / (len(bad) + len(good)) >= 0.10 and len(MALFORMED) >= 8
    stream = [("good", r) for r in good] + [("bad", b) for b in bad]
    rng.shuffle(stream)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 3})
    from stream_learner.core.records import Decoder

    encode = Decoder().encode
    messages = [
        (topic, item.id.encode(), encode(item)) if kind == "good" else (topic, f"bad{i}".encode(), item[1])
        for i, (kind, item) in enumerate(stream)
    ]
    produce_messages(messages, bootstrap_servers=kafka_broker.bootstrap_servers)

    code, worker = run_in_process(worker_config(kafka_client, kafka_broker, kafka_names, tmp_path))
    assert code == 0
    dead = read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", expected=len(bad))
    assert len(dead) == len(bad)
    by_reason = collections.defaultdict(list)
    for message in dead:
        headers = dict(message.headers)
        by_reason[headers["reason"].decode()].append(message.value)
        assert headers["source_topic"].decode() == topic
        assert int(headers["source_partition"]) in (0, 1, 2)
        assert int(headers["source_offset"]) >= 0
    expected = collections.defaultdict(list)
    for reason, value in bad:
        expected[reason].append(value or b"")
    assert {r: sorted(v) for r, v in by_reason.items()} == {r: sorted(v) for r, v in expected.items()}
    summary = worker.summary()
    assert summary["learned"] == len(good)
    assert summary["dead_lettered"] == len(bad)
    assert summary["messages"] == len(good) + len(bad)
    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=len(good))
    assert sorted(m.key.decode() for m in predictions) == sorted(r.id for r in good)

    # Dead-lettered offsets are committed like any other: the group is at the end.
    group = f"{kafka_names}-group"
    committed = committed_offsets(kafka_broker.bootstrap_servers, group, [(topic, p) for p in range(3)])
    assert sum(offset or 0 for offset in committed.values()) == len(good) + len(bad)


# -- crashes ---------------------------------------------------------------------------


def test_kill_9_five_times_every_record_learned_exactly_once(kafka_broker, kafka_names, tmp_path, kafka_client):
    n = 20_000
    records = synthetic_records(n, seed=5)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 3, f"{topic}.predictions": 3, f"{topic}.dlq": 1})
    producer = threading.Thread(
        target=produce_records,
        args=(records,),
        kwargs={"bootstrap_servers": kafka_broker.bootstrap_servers, "topic": topic, "rate": 450},
        daemon=True,
    )
    producer.start()
    checkpoint_dir = tmp_path / "ckpt"
    log_path = tmp_path / "worker.log"
    cadence = ["--checkpoint-every-records", "700", "--checkpoint-every-seconds", "1", "--max-poll-records", "200"]
    rng = random.Random(5)
    kills = 0
    sizes_at_kill = []
    while kills < 5:
        run_starts = log_size(log_path)  # the log is shared by the runs: count this run's lines
        process = start_worker_process(kafka_broker, kafka_names, checkpoint_dir, log_path, *cadence, client=kafka_client)
        # Kill at a random moment once it is consuming (after it joined the group).
        wait_for_log(log_path, ASSIGNED, since=run_starts, process=process)
        time.sleep(rng.uniform(0.3, 2.5))
        assert process.poll() is None, log_path.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        sizes_at_kill.append(messages_checkpointed(checkpoint_dir))
    producer.join()
    process = start_worker_process(
        kafka_broker, kafka_names, checkpoint_dir, log_path, *cadence, "--stop-when-idle", "4", client=kafka_client
    )
    assert process.wait(timeout=120) == 0, log_path.read_text()[-3000:]

    # The kills landed at different points of the stream, not all before or after it.
    assert len(set(sizes_at_kill)) >= 3 and max(sizes_at_kill) < n

    final = load_final_state(checkpoint_dir)
    processor = read_state(final.state)["processor"]
    assert final.state["counts"]["messages"] == n
    assert final.state["counts"]["learned"] == n
    assert processor.learner_stats()["nb"]["learned"] == n
    assert sum(final.offsets.values()) == n

    uninterrupted = StreamProcessor(["nb"])
    for record in records:
        uninterrupted.process(record, now=0.0)
    assert nb_parameters(processor) == nb_parameters(uninterrupted)

    # Outputs are at-least-once: every record has a prediction (maybe more than one).
    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=n, timeout=60)
    assert {m.key.decode() for m in predictions} == {r.id for r in records}


# -- shutdown, rebalance, broker outage -----------------------------------------------


def test_sigterm_finishes_the_batch_checkpoints_commits_and_exits_0(kafka_broker, kafka_names, tmp_path, kafka_client):
    n = 6000
    records = synthetic_records(n, seed=6)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    producer = threading.Thread(
        target=produce_records,
        args=(records,),
        kwargs={"bootstrap_servers": kafka_broker.bootstrap_servers, "topic": topic, "rate": 400},
        daemon=True,
    )
    producer.start()
    checkpoint_dir, log_path = tmp_path / "ckpt", tmp_path / "worker.log"
    # A long checkpoint cadence: only the shutdown can have written the checkpoint.
    slow = ["--checkpoint-every-records", "1000000", "--checkpoint-every-seconds", "3600"]
    process = start_worker_process(
        kafka_broker, kafka_names, checkpoint_dir, log_path, *slow, "--metrics-port", "0", client=kafka_client
    )
    wait_for_log(log_path, ASSIGNED, process=process)
    wait_for("records handled", lambda: records_handled(log_path), 60, log_path, process)
    assert process.poll() is None, log_path.read_text()[-3000:]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    first = load_final_state(checkpoint_dir)
    seen = first.state["counts"]["messages"]
    assert 0 < seen < n

    committed = committed_offsets(kafka_broker.bootstrap_servers, f"{kafka_names}-group", [(topic, p) for p in range(2)])
    assert {tp: o for tp, o in committed.items() if o is not None} == first.offsets

    producer.join()
    process = start_worker_process(
        kafka_broker, kafka_names, checkpoint_dir, log_path, *slow, "--stop-when-idle", "3", client=kafka_client
    )
    assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    final = load_final_state(checkpoint_dir)
    assert final.state["counts"]["learned"] == n
    assert read_state(final.state)["processor"].learner_stats()["nb"]["learned"] == n


def test_two_workers_split_partitions_and_skip_nothing(kafka_broker, kafka_names, tmp_path, kafka_client):
    n = 8000
    records = synthetic_records(n, seed=7)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 4, f"{topic}.predictions": 2})
    producer = threading.Thread(
        target=produce_records,
        args=(records,),
        kwargs={"bootstrap_servers": kafka_broker.bootstrap_servers, "topic": topic, "rate": 400},
        daemon=True,
    )
    cadence = ["--checkpoint-every-seconds", "2"]
    first = start_worker_process(
        kafka_broker, kafka_names, tmp_path / "a", tmp_path / "a.log", *cadence, "--stop-when-idle", "5", client=kafka_client
    )
    wait_for_log(tmp_path / "a.log", ASSIGNED, process=first)
    producer.start()  # 20 s of stream from here: the second worker joins and leaves within it
    second = start_worker_process(kafka_broker, kafka_names, tmp_path / "b", tmp_path / "b.log", *cadence, client=kafka_client)
    wait_for_log(tmp_path / "b.log", ASSIGNED, process=second)
    # Settled in the group: a periodic checkpoint of the second worker holds records.
    wait_for("a checkpoint of the second worker", lambda: messages_checkpointed(tmp_path / "b"), 60, tmp_path / "b.log", second)
    # The second worker leaves mid-stream: its partitions go back to the first.
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0, (tmp_path / "b.log").read_text()[-3000:]
    producer.join()
    assert first.wait(timeout=90) == 0, (tmp_path / "a.log").read_text()[-3000:]

    a, b = load_final_state(tmp_path / "a"), load_final_state(tmp_path / "b")
    learned_a, learned_b = a.state["counts"]["learned"], b.state["counts"]["learned"]
    assert learned_a > 0 and learned_b > 0, "both workers should have had partitions"
    # Clean hand-overs (checkpoint + commit on revoke): every record learned by exactly one.
    assert learned_a + learned_b == n
    predictions = read_topic(kafka_broker.bootstrap_servers, f"{topic}.predictions", expected=n)
    assert {m.key.decode() for m in predictions} == {r.id for r in records}


def test_worker_waits_for_an_unreachable_broker_and_then_works(kafka_names, tmp_path, kafka_client):
    port = free_port()
    log_path = tmp_path / "worker.log"
    late = EmbeddedBroker(port=port)
    # --create-topics: the worker may reach the empty broker before the test's own create_topics.
    process = start_worker_process(
        late, kafka_names, tmp_path / "ckpt", log_path, "--stop-when-idle", "3", "--create-topics", client=kafka_client
    )
    try:
        wait_for_log(log_path, "broker unreachable", count=2, process=process)
        assert process.poll() is None, log_path.read_text()[-3000:]
        with late:
            topic = f"{kafka_names}-in"
            create_topics(late.bootstrap_servers, {topic: 1})
            produce_records(synthetic_records(500, seed=8), bootstrap_servers=late.bootstrap_servers, topic=topic)
            assert process.wait(timeout=90) == 0, log_path.read_text()[-3000:]
            final = load_final_state(tmp_path / "ckpt")
            assert final.state["counts"]["learned"] == 500
    finally:
        if process.poll() is None:
            process.kill()


def test_the_metrics_endpoint_counts_what_the_worker_did(kafka_broker, kafka_names, tmp_path, kafka_client):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    good = synthetic_records(600, seed=10)
    from stream_learner.core.records import Decoder

    messages = [(topic, r.id.encode(), Decoder().encode(r)) for r in good]
    messages += [(topic, b"bad", b"{not json")] * 40
    produce_messages(messages, bootstrap_servers=kafka_broker.bootstrap_servers)
    config = worker_config(kafka_client, kafka_broker, kafka_names, tmp_path, "--metrics-port", "0")
    scraped, ready = {}, []

    def scrape_at_the_end(worker):
        if worker.counts["messages"] < len(messages) or scraped:
            return
        with urllib.request.urlopen(worker.metrics_url + "/metrics") as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scraped[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        with urllib.request.urlopen(worker.metrics_url + "/readyz") as response:
            ready.append(response.status)

    assert run_worker(config, progress=scrape_at_the_end, progress_every=0.5) == 0
    assert ready == [200]
    assert scraped[("stream_learner_records_total", (("outcome", "learned"),))] == 600
    assert scraped[("stream_learner_dead_letters_total", (("reason", "invalid_json"),))] == 40
    assert scraped[("stream_learner_predictions_total", ())] == 600
    lags = {labels: v for (name, labels), v in scraped.items() if name == "stream_learner_consumer_lag_records"}
    assert len(lags) == 2 and set(lags.values()) == {0.0}
