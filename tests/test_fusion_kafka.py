"""Authenticated fusion on a real Tansu broker: forged, altered and replayed snapshots on the
models topic are dropped and counted; a worker's clean stop makes its peers forget it."""

from __future__ import annotations

import pytest
from helpers import wait_for
from kafka import KafkaProducer
from kafka_helpers import KEY, synthetic_records

from stream_learner.cli.produce import produce_records
from stream_learner.core.processor import StreamProcessor
from stream_learner.fusion.fusion import CountTable, Fusion, ModelFeed
from stream_learner.io.broker import create_topics
from stream_learner.runtime.config import load_config
from stream_learner.runtime.metrics import StreamMetrics
from stream_learner.runtime.worker import run_worker
from stream_learner.state.keys import CHECKPOINT, FUSION, derive_key

pytestmark = [pytest.mark.kafka]

FUSION_KEY = derive_key(KEY.encode(), FUSION)


def _models_topic(broker, name):
    topic = f"{name}.models"
    create_topics(broker.bootstrap_servers, {topic: 1}, configs={"cleanup.policy": "compact"})
    return topic


def _produce(broker, topic, messages):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    try:
        for key, value, headers in messages:
            producer.send(topic, key=key, value=value, headers=list(headers))
        producer.flush(30)
    finally:
        producer.close()


def _feed(broker, topic, worker_id, **kwargs):
    return ModelFeed(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        worker_id=worker_id,
        key=FUSION_KEY,
        **kwargs,
    ).start()


def _total(processor):
    return sum(CountTable.of(processor.heads()["nb"][1]).tables["class_counts"].values())


def test_forged_altered_and_replayed_snapshots_on_the_topic_are_dropped_and_counted(
    kafka_broker, kafka_names
):
    topic = _models_topic(kafka_broker, kafka_names)
    peer = StreamProcessor(["nb", "softmax"], drift_detector="none")
    fusion = Fusion("b", key=FUSION_KEY)
    fusion.attach(peer)
    records = synthetic_records(300, seed=41)
    for record in records[:100]:
        peer.process(record)
    first = fusion.snapshots(peer, full=True)
    for record in records[100:200]:
        peer.process(record)
    second = fusion.snapshots(peer, full=True)
    forger = Fusion("b", key=derive_key(KEY.encode(), CHECKPOINT))  # the other purpose's key
    forger.epoch, forger.seq = fusion.epoch, fusion.seq + 10
    flooded = StreamProcessor(["nb", "softmax"], drift_detector="none")
    for record in records * 20:
        flooded.process(record)
    forged = forger.snapshots(flooded, full=True)
    unsigned = [(k, v, [(n, raw) for n, raw in h if n != "mac"]) for k, v, h in forged]
    heavier = [
        (k, v, [(n, b"999999999" if n == "records" else raw) for n, raw in h]) for k, v, h in second
    ]
    _produce(kafka_broker, topic, first + second + forged + unsigned + heavier + first)

    metrics = StreamMetrics(process_metrics=False)
    feed = _feed(kafka_broker, topic, "a", metrics=metrics)
    try:
        assert feed.wait_caught_up(60)
        n = len(second)  # messages per round: one per learner here
        expected = {"bad_signature": 2 * n, "unsigned": n, "replayed": len(first)}
        wait_for(f"rejections {expected}", lambda: dict(feed.rejected) == expected)
        latest = feed.latest()
        assert {name: h.version for name, h in latest.items()} == {
            ("nb", "b"): (fusion.epoch, fusion.seq),
            ("softmax", "b"): (fusion.epoch, fusion.seq),
        }
        for reason, count in expected.items():
            assert (
                metrics.registry.get_sample_value(
                    "stream_learner_fusion_rejected_total", {"reason": reason}
                )
                == count
            )
        # Folded: the genuine 200 records, never the forged 6,000 or the claimed 10^9.
        me = StreamProcessor(["nb", "softmax"], drift_detector="none")
        mine = Fusion("a", key=FUSION_KEY)
        mine.attach(me)
        mine.fold(me, latest)
        assert _total(me) == 200
        assert [records for records, _ in me._slot("softmax").peers] == [200]
    finally:
        feed.stop()


def test_a_clean_stop_tombstones_its_keys_and_peers_forget_it(
    kafka_broker, kafka_names, tmp_path, monkeypatch
):
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY)
    records = synthetic_records(400, seed=42)
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 1, f"{topic}.predictions": 1})
    models = _models_topic(kafka_broker, f"{kafka_names}-group")
    produce_records(records, bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)
    observer = _feed(kafka_broker, models, "observer")
    try:
        config = load_config(
            [
                "--topic", topic,
                "--bootstrap-servers", kafka_broker.bootstrap_servers,
                "--group-id", f"{kafka_names}-group",
                "--checkpoint-dir", str(tmp_path / "b"),
                "--session-timeout-ms", "6000",
                "--stop-when-idle", "3",
                "--learners", "nb,softmax",
                "--drift-detector", "none",
                "--fusion", "on",
                "--fusion-every-seconds", "1",
                "--worker-id", "b",
            ],
            environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY},
        )  # fmt: skip
        # The observer's peers after each message it takes: it held the worker's snapshots while
        # the worker ran (its reader thread calls feed; no probe to race with it).
        peers_after_each = []
        take = observer.feed

        def recording(key, value, headers):
            snapshot = take(key, value, headers)
            peers_after_each.append(observer.peers)
            return snapshot

        observer.feed = recording
        assert run_worker(config) == 0
        wait_for("the tombstones", lambda: observer.forgotten["tombstone"] == 2)
        assert {"b"} in peers_after_each
        assert observer.peers == set() and observer.rejected == {}
        last = observer.latest()  # b's counts, one last time, then nothing
        assert set(last) == {("nb", "b")}
        me = StreamProcessor(["nb", "softmax"], drift_detector="none")
        mine = Fusion("observer", key=FUSION_KEY)
        mine.attach(me)
        mine.fold(me, last)
        assert _total(me) == 400
        assert observer.latest() == {}
        # The topic keeps b's last full counts (for workers that join later) and nothing else.
        late = _feed(kafka_broker, models, "late")
        try:
            assert late.wait_caught_up(60)
            wait_for("the late reader's tombstones", lambda: late.forgotten["tombstone"] == 2)
            assert set(late.latest()) == {("nb", "b")} and late.rejected == {}
        finally:
            late.stop()
    finally:
        observer.stop()
