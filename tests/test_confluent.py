"""The confluent-kafka (librdkafka) client: option translation, and its source and sink on a
real broker where kafka-python's semantics must hold (the worker suite runs on both clients)."""

from __future__ import annotations

import logging
import signal
import time

import pytest
from helpers import wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka_helpers import read_topic

from stream_learner.io.broker import committed_offsets
from stream_learner.runtime.config import ConfigError, load_config

confluent_kafka = pytest.importorskip("confluent_kafka")

from stream_learner.io.confluent import (  # noqa: E402
    _NAMES,
    SECRET_OPTIONS,
    ConfluentSink,
    ConfluentSource,
    librdkafka_options,
)
from stream_learner.io.sinks import SinkError  # noqa: E402
from stream_learner.io.sources import SourceUnavailable  # noqa: E402

# -- option translation ----------------------------------------------------------------


def test_the_workers_security_settings_become_librdkafka_settings():
    config = load_config(
        [
            "--topic", "t",
            "--client-id", "worker-7",
            "--security-protocol", "SASL_SSL",
            "--sasl-mechanism", "SCRAM-SHA-512",
            "--sasl-plain-username", "alice",
            "--ssl-cafile", "/etc/ca.pem",
            "--ssl-certfile", "/etc/client.pem",
            "--ssl-keyfile", "/etc/client.key",
            "--ssl-check-hostname", "false",
        ],
        # Passwords never come from flags.
        environ={"STREAM_LEARNER_SASL_PLAIN_PASSWORD": "s3cret", "STREAM_LEARNER_SSL_PASSWORD": "keypass"},
    )
    assert librdkafka_options(config.client_options()) == {
        "client.id": "worker-7",
        "security.protocol": "SASL_SSL",
        "socket.connection.setup.timeout.ms": 5000,
        "reconnect.backoff.max.ms": 5000,
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "alice",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/etc/client.pem",
        "ssl.key.location": "/etc/client.key",
        "ssl.key.password": "keypass",
        "ssl.endpoint.identification.algorithm": "none",
    }


def test_kafka_python_assignor_classes_translate_and_eager_sticky_is_refused():
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

    strategy = [RangePartitionAssignor, RoundRobinPartitionAssignor]
    assert librdkafka_options({"partition_assignment_strategy": strategy}) == {
        "partition.assignment.strategy": "range,roundrobin"
    }
    with pytest.raises(ValueError, match="partition_assignment_strategy.*sticky"):
        librdkafka_options({"partition_assignment_strategy": [StickyPartitionAssignor]})


def test_librdkafka_accepts_every_name_the_translation_produces():
    samples = {
        "client_id": "c", "security_protocol": "PLAINTEXT", "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u", "sasl_plain_password": "p", "sasl_kerberos_service_name": "kafka",
        "ssl_cafile": "/nonexistent/ca.pem", "ssl_certfile": "/nonexistent/c.pem",
        "ssl_keyfile": "/nonexistent/c.key", "ssl_password": "p", "ssl_crlfile": "/nonexistent/crl.pem",
        "ssl_ciphers": "HIGH", "ssl_check_hostname": True, "bootstrap_timeout_ms": 5000,
        "reconnect_backoff_ms": 50, "reconnect_backoff_max_ms": 5000, "request_timeout_ms": 30000,
        "connections_max_idle_ms": 60000, "metadata_max_age_ms": 60000, "receive_buffer_bytes": 65536,
        "send_buffer_bytes": 65536, "partition_assignment_strategy": "range", "session_timeout_ms": 10000,
        "heartbeat_interval_ms": 2000, "max_poll_interval_ms": 300000, "fetch_max_wait_ms": 100,
        "fetch_min_bytes": 1, "fetch_max_bytes": 52428800, "max_partition_fetch_bytes": 1048576,
        "isolation_level": "read_uncommitted", "enable_idempotence": True, "acks": -1, "linger_ms": 5,
        "batch_size": 16384, "compression_type": "gzip", "delivery_timeout_ms": 120000,
        "transaction_timeout_ms": 120000,
    }
    assert set(samples) == set(_NAMES)  # a new translation needs a sample here
    quiet = logging.getLogger("test.librdkafka")
    quiet.setLevel(logging.CRITICAL)
    config = librdkafka_options(samples)
    # Construction validates every name and value; it connects to nothing.
    confluent_kafka.Consumer({"group.id": "g", **config, "logger": quiet}).close()
    confluent_kafka.Producer({**config, "logger": quiet})


def test_a_name_librdkafka_does_not_know_is_refused_by_it():
    with pytest.raises(ValueError, match="refused its configuration.*no.such.property"):
        ConfluentSink(bootstrap_servers="127.0.0.1:1", client_options={"no.such.property": 1})


_known = st.sampled_from(sorted(set(_NAMES) - {"partition_assignment_strategy"}))
_plain_values = st.one_of(st.text(min_size=1, max_size=8), st.integers(0, 10**6), st.booleans())
_unknown = st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True).filter(lambda name: name not in _NAMES)


@settings(max_examples=300, deadline=None)
@given(
    options=st.dictionaries(_known, st.one_of(st.none(), _plain_values), max_size=8),
    dotted=st.dictionaries(st.from_regex(r"[a-z]{1,6}\.[a-z.]{1,10}", fullmatch=True), _plain_values, max_size=3),
)
def test_every_known_option_is_translated_none_left_out_dotted_names_kept(options, dotted):
    dotted = {k: v for k, v in dotted.items() if k not in _NAMES.values()}
    options = {k: str(v) if k in SECRET_OPTIONS and v is not None else v for k, v in options.items()}
    translated = librdkafka_options({**options, **dotted})
    given_values = {name for name, value in options.items() if value is not None}
    assert set(translated) == {_NAMES[name] for name in given_values} | set(dotted)
    for name in given_values:
        value = translated[_NAMES[name]]
        if name == "ssl_check_hostname":
            assert value == ("https" if options[name] else "none")
        elif name == "acks" and options[name] == -1:
            assert value == "all"
        elif name == "bootstrap_timeout_ms" and not isinstance(options[name], str):
            assert value == max(1000, int(options[name]))
        elif name != "compression_type":
            assert value == options[name]
    for name, value in dotted.items():
        assert translated[name] == value


@settings(max_examples=200, deadline=None)
@given(
    options=st.dictionaries(_known, _plain_values, max_size=5),
    unknown=_unknown,
    secret=st.text(alphabet="QXZ#@!", min_size=6, max_size=12),
)
def test_an_unknown_option_is_named_and_no_secret_is_shown(options, unknown, secret):
    options = {k: v for k, v in options.items() if k not in SECRET_OPTIONS}
    options = {**options, "sasl_plain_password": secret, "ssl_password": secret, unknown: secret}
    with pytest.raises(ValueError) as raised:
        librdkafka_options(options)
    assert repr(unknown) in str(raised.value)
    assert secret not in str(raised.value)


@given(secret=st.one_of(st.integers(), st.lists(st.text(), min_size=1)))
def test_a_secret_of_the_wrong_type_is_refused_without_showing_it(secret):
    for name in SECRET_OPTIONS - {"sasl.password", "ssl.key.password"}:
        with pytest.raises(ValueError, match=name) as raised:
            librdkafka_options({name: secret})
        assert repr(secret) not in str(raised.value)


def test_without_confluent_kafka_the_worker_says_what_to_install(monkeypatch):
    from stream_learner.runtime.worker import make_sink, make_source

    config = load_config(["--topic", "t", "--client", "confluent"], environ={})
    monkeypatch.setitem(__import__("sys").modules, "confluent_kafka", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'stream-learner\[confluent\]'"):
        make_sink(config)
    with pytest.raises(ConfigError, match=r"pip install 'stream-learner\[confluent\]'"):
        make_source(config, handler=None)


# -- on a broker -----------------------------------------------------------------------


class RecordingHandler:
    def __init__(self, seeks=None, revoke_offsets=None):
        self.seeks = dict(seeks or {})
        self.revoke_offsets = dict(revoke_offsets or {})
        self.calls = []

    def partitions_revoked(self, partitions):
        self.calls.append(("revoked", set(partitions)))
        return {tp: o for tp, o in self.revoke_offsets.items() if tp in partitions}

    def partitions_assigned(self, partitions, committed):
        self.calls.append(("assigned", set(partitions), dict(committed)))
        return {tp: o for tp, o in self.seeks.items() if tp in partitions}

    def partitions_lost(self, partitions):
        self.calls.append(("lost", set(partitions)))


def _committed(bootstrap, group, topic, partitions):
    offsets = committed_offsets(bootstrap, group, [(topic, p) for p in partitions])
    return {p: offset for (_, p), offset in offsets.items()}


@pytest.mark.kafka
def test_source_starts_at_the_handlers_seek_over_the_committed_offset_and_commits_on_close(
    kafka_broker, kafka_names
):
    from stream_learner.cli.produce import produce_messages
    from stream_learner.io.broker import create_topics

    bootstrap = kafka_broker.bootstrap_servers
    topic, group = f"{kafka_names}-in", f"{kafka_names}-group"
    create_topics(bootstrap, {topic: 2})
    produce_messages(
        [(topic, f"k{i}".encode(), f"v{i}".encode()) for i in range(200)], bootstrap_servers=bootstrap
    )
    counts = {p: sum(1 for m in read_topic(bootstrap, topic, expected=200) if m.partition == p) for p in (0, 1)}
    assert min(counts.values()) > 20

    # A first member commits 20 on partition 0 and 5 on partition 1 when it leaves.
    first = ConfluentSource(
        [topic], bootstrap_servers=bootstrap, group_id=group, session_timeout_ms=6000,
        handler=RecordingHandler(revoke_offsets={(topic, 0): 20, (topic, 1): 5}),
    )
    while not first.assignment():
        first.poll(0.5)
    first.close()
    assert first.handler.calls[-1] == ("revoked", {(topic, 0), (topic, 1)})
    assert _committed(bootstrap, group, topic, (0, 1)) == {0: 20, 1: 5}

    # The next one is told the committed offsets; its seek on partition 0 beats the commit.
    handler = RecordingHandler(seeks={(topic, 0): 3})
    source = ConfluentSource([topic], bootstrap_servers=bootstrap, group_id=group, session_timeout_ms=6000, handler=handler)
    try:
        received = []
        deadline = time.monotonic() + 30
        while len(received) < (counts[0] - 3) + (counts[1] - 5) and time.monotonic() < deadline:
            received.extend(source.poll(0.5))
        assert handler.calls[0] == ("assigned", {(topic, 0), (topic, 1)}, {(topic, 0): 20, (topic, 1): 5})
        first_offsets = {p: min(m.offset for m in received if m.partition == p) for p in (0, 1)}
        assert first_offsets == {0: 3, 1: 5}
        assert len(received) == (counts[0] - 3) + (counts[1] - 5)
        message = received[0]
        assert message.value.startswith(b"v") and message.key.startswith(b"k") and message.timestamp > 1e9
        # Lag from the fetched high watermark against the worker's positions.
        assert source.lag({(topic, 0): counts[0] - 2, (topic, 1): counts[1]}) == {(topic, 0): 2, (topic, 1): 0}
        source.commit({(topic, 0): counts[0], (topic, 1): counts[1], (f"{topic}-other", 0): 9})

        def committed():  # the commit is asynchronous; its answer is served by a poll
            source.poll(0.2)
            return _committed(bootstrap, group, topic, (0, 1)) == {0: counts[0], 1: counts[1]}

        wait_for("the committed offsets", committed, 30)
    finally:
        source.close()


@pytest.mark.kafka
def test_sink_partitions_like_kafka_python_and_the_hint_decides(kafka_broker, kafka_names):
    from stream_learner.io.broker import create_topics
    from stream_learner.io.sinks import KafkaSink

    bootstrap = kafka_broker.bootstrap_servers
    ours, theirs = f"{kafka_names}-confluent", f"{kafka_names}-kafka-python"
    create_topics(bootstrap, {ours: 3, theirs: 3})
    for topic, sink in ((ours, ConfluentSink(bootstrap_servers=bootstrap)), (theirs, KafkaSink(bootstrap_servers=bootstrap))):
        for i in range(60):
            sink.send(topic, f"key-{i}".encode(), b"keyed", [("h", b"1")])
            sink.send(topic, f"hinted-{i}".encode(), b"hinted", partition_hint=i)
        sink.flush(30)
        sink.close()
    by_client = {}
    for topic in (ours, theirs):
        messages = read_topic(bootstrap, topic, expected=120)
        assert len(messages) == 120
        assert all(m.partition == int(m.key.split(b"-")[1]) % 3 for m in messages if m.value == b"hinted")
        by_client[topic] = {m.key: m.partition for m in messages if m.value == b"keyed"}
        assert {tuple(m.headers) for m in messages if m.value == b"keyed"} == {(("h", b"1"),)}
    assert by_client[ours] == by_client[theirs]  # the same key lands on the same partition


def test_source_and_sink_refuse_to_start_without_a_broker():
    from stream_learner.io.broker import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(SourceUnavailable, match="no broker answered"):
        ConfluentSource(
            ["t"], bootstrap_servers=nowhere, group_id="g", handler=RecordingHandler(),
            client_options={"bootstrap_timeout_ms": 500},
        )
    with pytest.raises(SinkError, match="no broker answered"):
        ConfluentSink(bootstrap_servers=nowhere, client_options={"bootstrap_timeout_ms": 500})


@pytest.mark.kafka
@pytest.mark.slow
def test_sink_resends_outputs_whose_delivery_failed_and_loses_none(kafka_names, caplog):
    from stream_learner.io.broker import EmbeddedBroker, create_topics

    with EmbeddedBroker() as broker:  # its own broker: this test freezes it
        topic = f"{kafka_names}-out"
        create_topics(broker.bootstrap_servers, {topic: 2})
        # Deliveries give up after 1.5 s, so the outage makes them fail for real.
        sink = ConfluentSink(bootstrap_servers=broker.bootstrap_servers, client_options={"delivery_timeout_ms": 1500})
        try:
            for i in range(50):
                sink.send(topic, f"a{i}".encode(), b"before", partition_hint=i)
            sink.flush(10)
            broker._process.send_signal(signal.SIGSTOP)
            try:
                for i in range(50):
                    sink.send(topic, f"b{i}".encode(), b"during", partition_hint=i)
                # Long enough for librdkafka's 1.5 s delivery timeout and its scan, under load.
                with pytest.raises(SinkError, match=r"\d+ outputs not confirmed") as raised:
                    sink.flush(8)
                # librdkafka reported them as failed; they were sent again, and are still kept.
                # (Under load a partition's batch may still get its answer before the freeze.)
                kept = int(str(raised.value).split()[0])
                assert 0 < kept <= 50
                assert "outputs that were not delivered" in caplog.text
                assert len(sink._unconfirmed) == kept
            finally:
                broker._process.send_signal(signal.SIGCONT)
            sink.flush(30)
        finally:
            sink.close()
        received = read_topic(broker.bootstrap_servers, topic, expected=100)
        keys = {m.key.decode() for m in received}
        assert keys == {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(50)}
