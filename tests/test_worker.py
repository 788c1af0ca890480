"""The worker loop with in-memory sources and sinks: outputs, dead letters, checkpoints,
crash recovery, rebalance decisions, and its configuration."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from worker_helpers import (
    ENCODE,
    ExplodingClassifier,
    drain,
    make_worker,
    nb_parameters,
    partitioned,
    records,
)

from stream_learner.core.processor import StreamProcessor
from stream_learner.io.sinks import MemorySink, SinkError
from stream_learner.io.sources import MemorySource
from stream_learner.runtime.config import (
    ConfigError,
    WorkerConfig,
    add_config_arguments,
    load_config,
)
from stream_learner.runtime.worker import read_state, run_worker
from stream_learner.state.checkpoint import CheckpointStore

KEY = b"worker-test-key-0123456789abcdef"


def test_every_record_gets_a_prediction_and_offsets_point_to_the_next_record(tmp_path):
    recs = records(300)
    worker = make_worker(CheckpointStore(tmp_path, KEY))
    source = MemorySource(partitioned(recs), handler=worker, max_poll_records=50)
    worker.owned = source.assignment()
    drain(worker, source)
    predictions = worker.outputs.sink.on("in.predictions")
    assert len(predictions) == 300
    assert sorted(key.decode() for key, _, _ in predictions) == sorted(r.id for r in recs)
    value = json.loads(predictions[-1][1])
    assert set(value) == {"id", "label", "proba", "learner", "model_version", "latency_ms", "source"}
    assert worker.offsets == {("in", 0): 150, ("in", 1): 150}
    assert worker.summary()["learned"] == 300


def test_offsets_are_committed_only_after_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, KEY)
    worker = make_worker(store, checkpoint_every_records=100, checkpoint_every_seconds=1e9)
    source = MemorySource(partitioned(records(250), 1), handler=worker, max_poll_records=60)
    worker.owned = source.assignment()
    drain(worker, source)
    # 250 records, checkpoints after batches crossing 100 and 200: 120 and 240 are committed.
    assert source.committed == {("in", 0): 240}
    assert store.load_latest().offsets == {("in", 0): 240}
    assert worker.offsets == {("in", 0): 250}


def test_bad_messages_and_learner_errors_go_to_the_dead_letter_topic(tmp_path):
    processor = StreamProcessor({"nb": StreamProcessor(["nb"]).learners["nb"], "fragile": ExplodingClassifier()})
    worker = make_worker(processor=processor)
    good = records(40)
    values = [ENCODE(r) for r in good]
    values[5:5] = [b"\xff", b"[1]", None, b'{"id": "b1", "text": "boom goes the model", "label": "pos"}']
    source = MemorySource({("in", 0): values})
    worker.owned = source.assignment()
    drain(worker, source)
    dead = worker.outputs.sink.on("in.dlq")
    reasons = [dict(headers)["reason"].decode() for _, _, headers in dead]
    assert reasons == ["invalid_utf8", "not_an_object", "empty_message", "learner_error"]
    assert [value for _, value, _ in dead] == [b"\xff", b"[1]", b"", values[8]]
    assert dict(dead[3][2])["detail"].startswith(b"fragile")
    assert worker.summary()["learned"] == 40 and worker.summary()["dead_lettered"] == 4
    assert worker.offsets == {("in", 0): 44}  # dead letters are consumed like any record


def test_a_crash_between_checkpoints_replays_exactly_the_unsaved_records(tmp_path):
    recs = records(1000, seed=1)
    data = partitioned(recs, 3)
    store = CheckpointStore(tmp_path, KEY)
    first = make_worker(store, checkpoint_every_records=170, checkpoint_every_seconds=1e9)
    source = MemorySource(data, handler=first, max_poll_records=40)
    first.source = source
    for _ in range(12):  # part of the stream, then the process "dies" without a shutdown
        first.process_batch(source.poll(0))
        if first.checkpoint_due() and first.checkpoint():
            first.commit()
    assert 0 < sum(source.committed.values()) < first.counts["messages"]

    checkpoint = store.load_latest()
    second = make_worker(
        store,
        processor=read_state(checkpoint.state)["processor"],
        offsets=checkpoint.offsets,
        counts=checkpoint.state["counts"],
    )
    restarted = MemorySource(data, handler=second, committed=source.committed, max_poll_records=40)
    drain(second, restarted)
    assert second.counts["messages"] == 1000 and second.counts["learned"] == 1000
    uninterrupted = StreamProcessor(["nb"])
    for record in recs:
        uninterrupted.process(record)
    assert nb_parameters(second.processor) == nb_parameters(uninterrupted)


def test_assignment_trusts_the_checkpoint_except_after_a_hand_over():
    worker = make_worker(offsets={("in", 0): 50, ("in", 1): 70})
    # First assignment after start: the checkpoint wins even if Kafka says otherwise.
    seeks = worker.partitions_assigned({("in", 0), ("in", 1), ("in", 2)}, {("in", 0): 80, ("in", 1): 60, ("in", 2): 5})
    assert seeks == {("in", 0): 50, ("in", 1): 70}  # in-2: never read, start at the committed 5
    # in-0 moves to another worker, which reads on to 120, then comes back.
    assert worker.partitions_revoked({("in", 0)}) == {("in", 0): 50}
    assert worker.partitions_assigned({("in", 0)}, {("in", 0): 120}) == {("in", 0): 120}


def test_a_failed_flush_postpones_the_checkpoint_and_keeps_state(tmp_path):
    class FlakySink(MemorySink):
        fail = True

        def flush(self, timeout):
            if self.fail:
                raise SinkError("broker away")

    sink = FlakySink()
    store = CheckpointStore(tmp_path, KEY)
    worker = make_worker(store, sink=sink)
    source = MemorySource(partitioned(records(30), 1))
    worker.source, worker.owned = source, source.assignment()
    worker.process_batch(source.poll(0))
    assert worker.checkpoint() is False
    assert store.paths() == [] and source.committed == {}
    sink.fail = False
    assert worker.checkpoint() is True
    worker.commit()
    assert source.committed == {("in", 0): 30}
    assert store.load_latest().state["counts"]["learned"] == 30


def _config(tmp_path, *extra):
    return load_config(
        ["--topic", "in", "--bootstrap-servers", "127.0.0.1:1", "--checkpoint-dir", str(tmp_path), *extra],
        environ={"STREAM_LEARNER_CHECKPOINT_KEY": KEY.decode()},
    )


def test_run_refuses_a_tampered_checkpoint_before_touching_kafka(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY.decode())
    (tmp_path / "ckpt-000000000001.slck").write_bytes(pickle.dumps({"format": 1}))
    unfinished = tmp_path / ".ckpt-000000000002.slck.4242.tmp"  # a save killed before its rename
    unfinished.write_bytes(b"half a save")
    assert run_worker(_config(tmp_path)) == 2
    assert "refusing to start" in caplog.text
    assert not unfinished.exists()  # the worker owns the directory: it cleans up first


def test_run_refuses_a_checkpoint_of_other_learners(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("STREAM_LEARNER_CHECKPOINT_KEY", KEY.decode())
    CheckpointStore(tmp_path, KEY).save({"format": 1, "processor": StreamProcessor(["nb"]), "counts": {}}, {})
    assert run_worker(_config(tmp_path, "--learners", "pa")) == 2
    assert "holds learners nb" in caplog.text


# -- configuration -------------------------------------------------------------------------


def test_flags_beat_environment_beat_toml_beat_defaults(tmp_path):
    toml = tmp_path / "worker.toml"
    toml.write_text('topics = ["a", "b"]\n[kafka]\ngroup_id = "from-file"\nmax_poll_records = 7\n')
    env = {"STREAM_LEARNER_CONFIG": str(toml), "STREAM_LEARNER_MAX_POLL_RECORDS": "9"}
    config = load_config(["--max-poll-records", "11"], environ=env)
    assert config.topics == ("a", "b") and config.group_id == "from-file"
    assert config.max_poll_records == 11
    assert load_config([], environ=env).max_poll_records == 9
    assert load_config(["--config", str(toml)], environ={}).max_poll_records == 7
    assert load_config(["--topic", "x"], environ={}).max_poll_records == WorkerConfig(topics=("x",)).max_poll_records


def test_secrets_are_never_shown(tmp_path):
    password_file = tmp_path / "sasl-password"
    password_file.write_text("hunter2-secret\n")
    config = load_config(
        ["--topic", "t", "--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN",
         "--sasl-plain-username", "me", "--sasl-plain-password-file", str(password_file)],
        environ={"STREAM_LEARNER_SSL_PASSWORD": "key-secret"},
    )
    assert "hunter2-secret" not in repr(config) and "key-secret" not in repr(config)
    assert "hunter2-secret" not in str(config.describe()) and config.describe()["ssl_password"] == "***"
    options = config.client_options()
    assert options["sasl_plain_password"] == "hunter2-secret" and options["ssl_password"] == "key-secret"
    with pytest.raises(ConfigError) as error:
        load_config(["--topic", "t", "--ssl-check-hostname", "hunter2-secret"], environ={})
    assert "ssl-check-hostname" in str(error.value)


def test_help_names_the_environment_variables():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    assert "STREAM_LEARNER_BOOTSTRAP_SERVERS" in text and "STREAM_LEARNER_CHECKPOINT_DIR" in text


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no input topic"):
        load_config([], environ={})
    with pytest.raises(ConfigError, match="STREAM_LEARNER_WINDOW"):
        load_config(["--topic", "t"], environ={"STREAM_LEARNER_WINDOW": "many"})
    with pytest.raises(ConfigError, match="read its own output"):
        load_config(["--topic", "t", "--predictions-topic", "t"], environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("unknown_setting = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(["--config", str(bad)], environ={})


names = st.text(alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="._-"), min_size=1, max_size=20)


@settings(max_examples=100, deadline=None)
@given(topics=st.lists(names, min_size=1, max_size=5, unique=True), spaces=st.booleans())
def test_comma_separated_topics_parse_back_from_the_environment(topics, spaces):
    joined = (", " if spaces else ",").join(topics)
    config = load_config([], environ={"STREAM_LEARNER_TOPICS": joined, "STREAM_LEARNER_PREDICTIONS_TOPIC": "none", "STREAM_LEARNER_DEAD_LETTER_TOPIC": "none"})
    assert config.topics == tuple(topics)


@settings(max_examples=100, deadline=None)
@given(value=st.text(max_size=12))
def test_any_environment_value_is_accepted_or_a_config_error(value):
    try:
        config = load_config(["--topic", "t"], environ={"STREAM_LEARNER_CHECKPOINT_EVERY_RECORDS": value})
    except ConfigError:
        return
    assert config.checkpoint_every_records >= 1


def test_a_long_text_is_dead_lettered_or_cut_and_processed_as_configured():
    from prometheus_client import CollectorRegistry

    from stream_learner.runtime.metrics import StreamMetrics

    long_text = "good great fine " * 6000  # 96,000 bytes
    values = [
        json.dumps({"id": "long", "text": long_text, "label": "pos"}).encode(),
        b'{"id": "short", "text": "bad awful poor", "label": "neg"}',
    ]
    # The default: over 64 KiB is a dead letter with its reason.
    worker = make_worker(decoder=load_config(["--topic", "in"], environ={}).decoder())
    source = MemorySource({("in", 0): list(values)})
    worker.owned = source.assignment()
    drain(worker, source)
    assert [dict(h)["reason"] for _, _, h in worker.outputs.sink.on("in.dlq")] == [b"text_too_long"]
    assert worker.summary()["learned"] == 1
    # --on-oversize truncate: learned from and predicted on its first --max-text-bytes, counted.
    config = load_config(["--topic", "in", "--on-oversize", "truncate", "--max-text-bytes", "32KiB"], environ={})
    registry = CollectorRegistry()
    worker = make_worker(decoder=config.decoder(), metrics=StreamMetrics(registry, process_metrics=False))
    source = MemorySource({("in", 0): list(values)})
    worker.owned = source.assignment()
    drain(worker, source)
    assert worker.outputs.sink.on("in.dlq") == []
    assert [key for key, _, _ in worker.outputs.sink.on("in.predictions")] == [b"long", b"short"]
    assert worker.summary()["learned"] == 2 and worker.counts["text_truncated"] == 1
    assert registry.get_sample_value("stream_learner_truncated_texts_total") == 1
    # A longer text makes the message too large for the decoder: still a dead letter.
    config = load_config(["--topic", "in", "--on-oversize", "truncate", "--max-text-bytes", "1KiB"], environ={})
    worker = make_worker(decoder=config.decoder())
    source = MemorySource({("in", 0): list(values)})
    worker.owned = source.assignment()
    drain(worker, source)
    assert [dict(h)["reason"] for _, _, h in worker.outputs.sink.on("in.dlq")] == [b"message_too_large"]


def test_oversize_settings_are_checked():
    with pytest.raises(ConfigError, match="on_oversize must be one of dead-letter, truncate"):
        load_config(["--topic", "in", "--on-oversize", "cut"], environ={})
    for size in ("0", "17MiB"):
        with pytest.raises(ConfigError, match="max_text_bytes must be from 1 to"):
            load_config(["--topic", "in", "--max-text-bytes", size], environ={})
    config = load_config([], environ={"STREAM_LEARNER_TOPICS": "in", "STREAM_LEARNER_MAX_TEXT_BYTES": "1MiB"})
    assert config.decoder().max_text_bytes == 2**20 and config.decoder().oversize == "error"


def test_an_unreadable_timestamp_is_dropped_and_counted_and_the_record_kept():
    worker = make_worker()
    values = [
        b'{"id": "t1", "text": "good great fine", "label": "pos", "ts": "2016/12/30 7:11"}',
        b'{"id": "t2", "text": "bad awful poor", "label": "neg", "ts": "the day after"}',
        b'{"id": "t3", "text": "good nice", "label": "pos", "ts": " 1483081860000 "}',
    ]
    source = MemorySource({("in", 0): values})
    worker.owned = source.assignment()
    drain(worker, source)
    assert worker.outputs.sink.on("in.dlq") == []
    assert worker.summary()["learned"] == 3
    assert worker.counts["timestamp_dropped"] == 1
