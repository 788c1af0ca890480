"""StreamMetrics and HealthServer: what a Prometheus scrape and a Kubernetes probe see."""

from __future__ import annotations

import gzip
import math
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import Reason, Record
from stream_learner.runtime.metrics import (
    DEAD_LETTER_REASONS,
    MAX_LABEL_VALUES,
    OUTCOMES,
    TRANSACTION_OUTCOMES,
    HealthServer,
    Heartbeat,
    Readiness,
    StreamMetrics,
    _observe_many,
)


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def metrics(registry):
    return StreamMetrics(
        registry, learners=["nb", "softmax"], detector="adwin", config_info={"topic": "texts"}
    )


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_every_labelled_series_exists_from_the_start(registry, metrics):
    for outcome in OUTCOMES:
        assert value(registry, "stream_learner_records_total", outcome=outcome) == 0
    for reason in Reason:
        assert value(registry, "stream_learner_dead_letters_total", reason=reason.value) == 0
    for learner in ("nb", "softmax"):
        assert value(registry, "stream_learner_drift_events_total", learner=learner, detector="adwin") == 0
        assert value(registry, "stream_learner_drift_warning", learner=learner) == 0
        # No data yet is NaN, not 0: a 0 accuracy would page someone at start-up.
        assert math.isnan(
            value(registry, "stream_learner_accuracy_ratio", learner=learner, window="rolling")
        )
    assert value(registry, "stream_learner_predictions_total") == 0
    assert value(registry, "stream_learner_checkpoint_failures_total") == 0


def test_names_follow_prometheus_conventions(registry, metrics):
    for family in registry.collect():
        if family.name.startswith(("process_", "python_")):
            continue
        assert family.name.startswith("stream_learner_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_records")), family.name


def test_the_metric_catalogue_in_the_docs_lists_every_family_with_its_labels(registry, metrics):
    """docs/metrics.md is what dashboards and alerts are written from: it must not drift."""
    from pathlib import Path

    catalogue = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    documented = {
        name: set(re.findall(r"`(\w+)`", labels))
        for name, labels in re.findall(r"^\| `(stream_learner_\w+)` \|[^|]*\|([^|]*)\|", catalogue, re.M)
    }
    metrics.set_lag("texts", 0, 5)  # the one family whose series appear with their partition
    exposed = {}
    for family in registry.collect():
        if family.name.startswith(("process_", "python_")):
            continue
        name = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        exposed[name] = {key for sample in family.samples for key in sample.labels} - {"le"}
    assert set(documented) == set(exposed)
    for name, labels in exposed.items():
        if name != "stream_learner_config_info":  # its labels are the worker's configuration
            assert documented[name] == labels, name


def test_outcomes_are_counted_in_batches(registry, metrics):
    metrics.record_outcomes({"learned": 480, "predicted": 20, "label_joined": 0})
    metrics.record_outcomes({"learned": 20, "label_unmatched": 2})
    assert value(registry, "stream_learner_records_total", outcome="learned") == 500
    assert value(registry, "stream_learner_records_total", outcome="predicted") == 20
    assert value(registry, "stream_learner_records_total", outcome="label_unmatched") == 2
    with pytest.raises(ValueError, match="unknown outcome 'bogus'"):
        metrics.record_outcomes({"bogus": 1})


def test_dead_letters_count_once_by_reason_and_as_an_outcome(registry, metrics):
    metrics.dead_lettered(Reason.INVALID_JSON)
    metrics.dead_lettered("learner_error", 2)
    # A dead_lettered entry in the outcome counts is ignored: dead_lettered() counted them.
    metrics.record_outcomes({"dead_lettered": 3, "learned": 1})
    assert value(registry, "stream_learner_dead_letters_total", reason="invalid_json") == 1
    assert value(registry, "stream_learner_dead_letters_total", reason="learner_error") == 2
    assert value(registry, "stream_learner_records_total", outcome="dead_lettered") == 3


def test_an_unknown_dead_letter_reason_does_not_create_a_series(registry, metrics):
    metrics.dead_lettered("message id 12345: something odd")
    assert value(registry, "stream_learner_dead_letters_total", reason="other") == 1
    reasons = {
        s.labels["reason"]
        for s in registry.collect()
        for s in s.samples
        if s.name == "stream_learner_dead_letters_total"
    }
    assert reasons == set(DEAD_LETTER_REASONS)


def test_batch_timing_gives_per_record_and_per_batch_histograms(registry, metrics):
    metrics.observe_batch(100, 0.05)  # 0.5 ms a record
    metrics.observe_batch(10, 0.5)  # 50 ms a record
    assert value(registry, "stream_learner_batch_processing_seconds_count") == 2
    assert value(registry, "stream_learner_batch_processing_seconds_sum") == pytest.approx(0.55)
    assert value(registry, "stream_learner_record_processing_seconds_count") == 110
    assert value(registry, "stream_learner_record_processing_seconds_sum") == pytest.approx(0.55)
    assert value(registry, "stream_learner_record_processing_seconds_bucket", le="0.0005") == 100
    assert value(registry, "stream_learner_record_processing_seconds_bucket", le="0.025") == 100
    assert value(registry, "stream_learner_record_processing_seconds_bucket", le="0.05") == 110
    assert value(registry, "stream_learner_batch_records_sum") == 110
    metrics.observe_batch(0, 0.001)  # an empty poll is a batch, not a record
    assert value(registry, "stream_learner_record_processing_seconds_count") == 110
    metrics.observe_batch(3, 0.1, [0.0004, 0.0004, 0.0992])  # records timed one by one
    assert value(registry, "stream_learner_record_processing_seconds_count") == 113
    assert value(registry, "stream_learner_record_processing_seconds_bucket", le="0.0005") == 102
    assert value(registry, "stream_learner_record_processing_seconds_bucket", le="0.05") == 112


def test_the_worker_times_each_record_on_its_own(registry, metrics):
    """One slow record in a batch shows as one slow observation, not as a slower mean."""
    from river import base

    from stream_learner.core.processor import StreamProcessor
    from stream_learner.core.records import Decoder, Record
    from stream_learner.io.sinks import MemorySink, Outputs
    from stream_learner.io.sources import MemorySource
    from stream_learner.runtime.worker import Worker

    class SlowOnSomeTexts(base.Classifier):
        def learn_one(self, x, y):
            if "slow" in x:
                time.sleep(0.06)

        def predict_proba_one(self, x):
            return {}

    encode = Decoder().encode
    values = [encode(Record(f"r{i}", "slow" if i == 50 else "fast", "a")) for i in range(100)]
    processor = StreamProcessor({"slow": SlowOnSomeTexts()})
    worker = Worker(processor, Outputs(MemorySink(), predictions_topic="p", dead_letter_topic="d"), None, metrics=metrics)
    source = MemorySource({("in", 0): values})
    worker.source = source
    while batch := source.poll(0):
        worker.process_batch(batch)
    assert value(registry, "stream_learner_record_processing_seconds_count") == 100
    at_most_50ms = value(registry, "stream_learner_record_processing_seconds_bucket", le="0.05")
    assert 1 <= 100 - at_most_50ms < 100  # the slow record alone, not the whole batch


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-10, max_value=1e6, allow_nan=False), max_size=50))
def test_observing_many_at_once_equals_observing_one_by_one(values):
    buckets = (0.001, 0.01, 0.1, 1.0, 10.0)
    one_by_one = Histogram("h", "h", registry=CollectorRegistry(), buckets=buckets)
    for v in values:
        one_by_one.observe(v)
    at_once = Histogram("h", "h", registry=CollectorRegistry(), buckets=buckets)
    _observe_many(at_once, values)

    def samples(histogram):
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in histogram.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected, got = samples(one_by_one), samples(at_once)
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key


def test_end_to_end_delay_counts_every_record_and_clips_clock_skew(registry, metrics):
    metrics.observe_end_to_end_delay([0.2, 3.0, 7200.0, -1.5])
    assert value(registry, "stream_learner_end_to_end_delay_seconds_count") == 4
    assert value(registry, "stream_learner_end_to_end_delay_seconds_bucket", le="0.005") == 1
    assert value(registry, "stream_learner_end_to_end_delay_seconds_bucket", le="0.25") == 2
    assert value(registry, "stream_learner_end_to_end_delay_seconds_bucket", le="3600.0") == 3
    assert value(registry, "stream_learner_end_to_end_delay_seconds_sum") == pytest.approx(7203.2)


def test_learner_stats_from_a_real_processor_are_published(registry, metrics):
    processor = StreamProcessor(["nb", "softmax"], window=50)
    texts = [("cheap pills buy now", "spam"), ("lunch at noon with the team", "ham")]
    for i in range(60):
        text, label = texts[i % 2]
        processor.process(Record(id=str(i), text=text, label=label), now=1000.0 + i)
    stats = processor.learner_stats()
    metrics.set_learner_stats(stats)
    for learner in ("nb", "softmax"):
        row = stats[learner]
        assert value(
            registry, "stream_learner_accuracy_ratio", learner=learner, window="rolling"
        ) == pytest.approx(row["rolling_accuracy"])
        assert value(
            registry, "stream_learner_accuracy_ratio", learner=learner, window="cumulative"
        ) == pytest.approx(row["accuracy"])
        assert value(registry, "stream_learner_macro_f1_ratio", learner=learner) == pytest.approx(
            row["macro_f1"]
        )
        assert value(registry, "stream_learner_log_loss", learner=learner) == pytest.approx(
            row["log_loss"]
        )
        assert value(registry, "stream_learner_learner_records", learner=learner) == 60
        assert 0 <= value(registry, "stream_learner_accuracy_ratio", learner=learner, window="rolling") <= 1


def test_learner_stats_without_data_show_as_nan_and_warnings_as_one(registry, metrics):
    metrics.set_learner_stats(
        {"nb": {"n": 0, "accuracy": float("nan"), "rolling_accuracy": None, "warning": True}}
    )
    assert math.isnan(value(registry, "stream_learner_accuracy_ratio", learner="nb", window="cumulative"))
    assert math.isnan(value(registry, "stream_learner_accuracy_ratio", learner="nb", window="rolling"))
    assert value(registry, "stream_learner_drift_warning", learner="nb") == 1
    metrics.set_learner_stats({"nb": {"n": 5, "accuracy": 0.8, "warning": False}})
    assert value(registry, "stream_learner_drift_warning", learner="nb") == 0


def test_drift_events_count_per_learner_and_detector_with_the_last_time(registry, metrics):
    metrics.drift_detected("nb", "adwin", when=1_700_000_000.0)
    metrics.drift_detected("nb", "adwin", when=1_700_000_100.0)
    metrics.drift_detected("softmax", "adwin", when=1_700_000_050.0)
    assert value(registry, "stream_learner_drift_events_total", learner="nb", detector="adwin") == 2
    assert value(registry, "stream_learner_drift_events_total", learner="softmax", detector="adwin") == 1
    assert value(registry, "stream_learner_last_drift_timestamp_seconds", learner="nb") == 1_700_000_100.0
    assert value(registry, "stream_learner_last_drift_timestamp_seconds", learner="softmax") == 1_700_000_050.0


def test_learner_label_values_are_bounded(registry):
    metrics = StreamMetrics(registry, learners=["nb"], process_metrics=False)
    for i in range(MAX_LABEL_VALUES + 20):
        metrics.drift_detected(f"learner-{i}", "adwin", when=1.0)
    learners = {
        s.labels["learner"]
        for family in registry.collect()
        for s in family.samples
        if s.name == "stream_learner_drift_events_total"
    }
    assert len(learners) == MAX_LABEL_VALUES + 1  # the cap plus "other"
    assert value(registry, "stream_learner_drift_events_total", learner="other", detector="adwin") == 21


def test_lag_per_partition_and_forgetting_a_revoked_partition(registry, metrics):
    metrics.set_lag("texts", 0, 120)
    metrics.set_lag("texts", 1, -3)  # a stale highwater must not show negative lag
    metrics.set_assigned_partitions(2)
    assert value(registry, "stream_learner_consumer_lag_records", topic="texts", partition="0") == 120
    assert value(registry, "stream_learner_consumer_lag_records", topic="texts", partition="1") == 0
    assert value(registry, "stream_learner_assigned_partitions") == 2
    metrics.forget_partition("texts", 0)
    metrics.forget_partition("texts", 7)  # never reported: no error
    assert value(registry, "stream_learner_consumer_lag_records", topic="texts", partition="0") is None
    assert value(registry, "stream_learner_consumer_lag_records", topic="texts", partition="1") == 0


def test_checkpoints(registry, metrics):
    assert value(registry, "stream_learner_checkpoint_last_success_timestamp_seconds") == 0
    metrics.checkpoint_succeeded(0.25, when=1_700_000_000.0)
    metrics.checkpoint_failed()
    metrics.checkpoint_failed()
    assert value(registry, "stream_learner_checkpoint_duration_seconds_count") == 1
    assert value(registry, "stream_learner_checkpoint_duration_seconds_sum") == 0.25
    assert value(registry, "stream_learner_checkpoint_last_success_timestamp_seconds") == 1_700_000_000.0
    assert value(registry, "stream_learner_checkpoint_failures_total") == 2


def test_transactions_are_counted_by_outcome_from_zero(registry, metrics):
    assert [value(registry, "stream_learner_transactions_total", outcome=o) for o in TRANSACTION_OUTCOMES] == [0, 0, 0]
    metrics.transaction_ended("committed")
    metrics.transaction_ended("committed")
    metrics.transaction_ended("aborted")
    metrics.transaction_ended("postponed")
    with pytest.raises(ValueError, match="unknown transaction outcome"):
        metrics.transaction_ended("something new")
    assert [value(registry, "stream_learner_transactions_total", outcome=o) for o in TRANSACTION_OUTCOMES] == [2, 1, 1]
    assert value(registry, "stream_learner_transactions_total", outcome="something new") is None


def test_label_buffer_counts_turn_into_counter_increments_after_a_baseline(registry, metrics):
    # The first call is the baseline (counts restored from a checkpoint are not new events).
    metrics.set_label_buffer({"size": 10, "expired": 100, "evicted": 5, "unmatched": 7})
    assert value(registry, "stream_learner_label_buffer_records") == 10
    assert value(registry, "stream_learner_label_buffer_expired_total") == 0
    metrics.set_label_buffer({"size": 4, "expired": 103, "evicted": 5, "unmatched": 9})
    assert value(registry, "stream_learner_label_buffer_records") == 4
    assert value(registry, "stream_learner_label_buffer_expired_total") == 3
    assert value(registry, "stream_learner_label_buffer_evicted_total") == 0
    assert value(registry, "stream_learner_label_buffer_unmatched_total") == 2
    # A new processor (counts start again) only sets a new baseline.
    metrics.set_label_buffer({"size": 0, "expired": 1, "evicted": 0, "unmatched": 0})
    metrics.set_label_buffer({"size": 0, "expired": 2, "evicted": 0, "unmatched": 0})
    assert value(registry, "stream_learner_label_buffer_expired_total") == 4


def test_predictions_build_and_config_info(registry):
    metrics = StreamMetrics(
        registry, config_info={"learners": "nb,softmax", "drift-detector": "adwin", "9x": 1}
    )
    metrics.predictions_produced(5)
    metrics.predictions_produced(0)
    assert value(registry, "stream_learner_predictions_total") == 5
    build = next(f for f in registry.collect() if f.name == "stream_learner_build")
    assert build.samples[0].labels["version"]
    assert build.samples[0].labels["river_version"]
    config = next(f for f in registry.collect() if f.name == "stream_learner_config")
    assert config.samples[0].labels == {
        "learners": "nb,softmax",
        "drift_detector": "adwin",
        "_9x": "1",
    }


def test_process_metrics_of_the_client_library(registry, metrics):
    names = {family.name for family in registry.collect()}
    assert "python_info" in names
    assert "process_cpu_seconds" in names or "process_start_time_seconds" in names


def test_registries_are_independent():
    first, second = CollectorRegistry(), CollectorRegistry()
    StreamMetrics(first).record_outcomes({"learned": 1})
    StreamMetrics(second)
    assert value(first, "stream_learner_records_total", outcome="learned") == 1
    assert value(second, "stream_learner_records_total", outcome="learned") == 0


def test_health_server_serves_metrics_and_probes(registry, metrics):
    readiness = Readiness()
    server = HealthServer(registry, port=0, liveness=lambda: (True, "alive"), readiness=readiness.check)
    server.start()
    try:
        assert server.port != 0
        metrics.record_outcomes({"learned": 7})

        status, headers, body = get(server.url + "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        learned = [s for s in families["stream_learner_records"].samples if s.labels.get("outcome") == "learned"]
        assert learned[0].value == 7

        status, headers, body = get(
            server.url + "/metrics",
            {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
        )
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert gzip.decompress(body).rstrip().endswith(b"# EOF")

        assert get(server.url + "/healthz")[:3:2] == (200, b"alive\n")

        status, _, body = get(server.url + "/readyz")
        assert status == 503
        assert b"no partitions assigned" in body
        readiness.assigned_partitions = 3
        readiness.broker_reachable = True
        readiness.checkpoint_loaded = True
        status, _, body = get(server.url + "/readyz")
        assert status == 200 and b"3 partitions assigned" in body

        assert get(server.url + "/nope")[0] == 404
        head = urllib.request.Request(server.url + "/healthz", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as response:
            assert response.status == 200 and response.read() == b""
        url = server.url
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):  # closed: the port it served on answers no more
        urllib.request.urlopen(url + "/healthz", timeout=2)


def test_metrics_negotiates_the_format_and_compresses_only_when_asked(registry, metrics):
    metrics.record_outcomes({"learned": 2})
    with HealthServer(registry, port=0) as server:
        status, headers, body = get(server.url + "/metrics", {"Accept-Encoding": "identity"})
        assert status == 200 and "Content-Encoding" not in headers
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert not body.rstrip().endswith(b"# EOF")

        status, headers, body = get(
            server.url + "/metrics",
            {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"},
        )
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert "Content-Encoding" not in headers and body.rstrip().endswith(b"# EOF")

        status, headers, body = get(server.url + "/metrics", {"Accept-Encoding": "br, GZIP;q=0.9"})
        assert headers["Content-Encoding"] == "gzip"
        assert b"stream_learner_records_total" in gzip.decompress(body)

        head = urllib.request.Request(server.url + "/metrics", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as response:
            assert response.status == 200 and response.read() == b""
            assert int(response.headers["Content-Length"]) > 0


def test_metrics_name_filter_returns_only_the_named_families(registry, metrics):
    metrics.record_outcomes({"learned": 4})
    with HealthServer(registry, port=0) as server:
        query = "name[]=stream_learner_records_total&name[]=stream_learner_predictions_total"
        status, _, body = get(server.url + "/metrics?" + query)
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert status == 200
        assert names == {"stream_learner_records", "stream_learner_predictions"}

        status, _, body = get(server.url + "/metrics?name[]=no_such_metric")
        assert status == 200 and body == b""


def test_a_client_that_sends_nothing_neither_blocks_scrapes_nor_holds_its_socket(registry, metrics):
    with HealthServer(registry, port=0, request_timeout=0.5) as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            for _ in range(3):
                status, _, body = get(server.url + "/metrics")
                assert status == 200 and b"stream_learner_records_total" in body
            for connection in silent:
                connection.settimeout(10)  # a guard: the server closes it after 0.5 s
                assert connection.recv(1024) == b""
        finally:
            for connection in silent:
                connection.close()


def test_a_broken_collector_answers_500_and_the_server_goes_on(registry, metrics):
    class Broken:
        def collect(self):
            raise RuntimeError("collector down")

    registry.register(Broken())
    with HealthServer(registry, port=0) as server:
        status, _, body = get(server.url + "/metrics")
        assert status == 500 and b"collector down" in body
        assert get(server.url + "/healthz")[0] == 200


def test_a_failing_or_raising_check_answers_503_with_the_reason(registry):
    def broken():
        raise RuntimeError("consumer gone")

    with HealthServer(
        registry, port=0, liveness=broken, readiness=lambda: (False, "broker unreachable")
    ) as server:
        status, _, body = get(server.url + "/healthz")
        assert status == 503 and b"RuntimeError: consumer gone" in body
        status, _, body = get(server.url + "/readyz")
        assert status == 503 and body == b"broker unreachable\n"


def test_heartbeat_fails_after_silence_and_after_stop():
    now = [100.0]
    heartbeat = Heartbeat(max_silence=30.0, clock=lambda: now[0])
    now[0] = 120.0
    assert heartbeat.check()[0]
    now[0] = 131.0
    ok, message = heartbeat.check()
    assert not ok and "silent for 31s" in message
    heartbeat.beat()
    assert heartbeat.check()[0]
    heartbeat.stop("consumer closed")
    assert heartbeat.check() == (False, "consumer closed")


@pytest.mark.requires("promtool")
def test_promtool_finds_no_problem_in_the_exposition(registry, metrics):
    metrics.record_outcomes({"learned": 5, "predicted": 1})
    metrics.dead_lettered("invalid_json")
    metrics.observe_batch(6, 0.01)
    metrics.observe_end_to_end_delay([0.1] * 6)
    metrics.set_lag("texts", 0, 3)
    metrics.drift_detected("nb", "adwin", when=1.0)
    metrics.checkpoint_succeeded(0.1, when=2.0)
    metrics.set_label_buffer({"size": 1, "expired": 0, "evicted": 0, "unmatched": 0})
    with HealthServer(registry, port=0) as server:
        _, _, body = get(server.url + "/metrics")
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=300), max_size=6))
def test_any_config_info_gives_a_valid_exposition(config_info):
    registry = CollectorRegistry()
    StreamMetrics(registry, config_info=config_info, process_metrics=False)
    from prometheus_client import generate_latest

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    (sample,) = families["stream_learner_config_info"].samples
    assert len(sample.labels) <= len(config_info)
    for name, label_value in sample.labels.items():
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name) and not name.startswith("__")
        assert len(label_value) <= 200
