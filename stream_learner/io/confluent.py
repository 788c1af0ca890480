"""The second Kafka client: confluent-kafka (librdkafka) behind the same Source and Sink.

Chosen with ``--client confluent`` (``pip install 'stream-learner[confluent]'``). The semantics
are those of :class:`~stream_learner.io.sources.KafkaSource` and
:class:`~stream_learner.io.sinks.KafkaSink`: manual commits of the offsets the worker hands over,
the range assignor, the rebalance handler told on revoke (commit what it returns), on assign
(start where it says, else at the committed offset) and on loss; an idempotent producer whose
unconfirmed outputs are kept and sent again. With ``--processing-guarantee exactly-once`` the
producer is transactional (outputs and consumed offsets committed together, every call bounded
by ``--transaction-timeout``) and the consumer reads ``read_committed`` (docs/exactly-once.md).

The worker's settings use kafka-python's option names; :func:`librdkafka_options` translates
them (a name it does not know is refused, so nothing is silently dropped):

>>> librdkafka_options({"client_id": "w1", "ssl_check_hostname": False, "fetch_max_wait_ms": 100})
{'client.id': 'w1', 'ssl.endpoint.identification.algorithm': 'none', 'fetch.wait.max.ms': 100}
>>> librdkafka_options({"api_version": (2, 8)})
Traceback (most recent call last):
...
ValueError: client option 'api_version' has no librdkafka equivalent; give its librdkafka name (with dots) instead
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from stream_learner.io.retry import Backoff, FatalBrokerError, fatal_message, is_fatal
from stream_learner.io.sinks import (
    Headers,
    SinkError,
    TransactionAbortable,
    TransactionFatal,
    _raise_if_fatal,
    _Refusals,
    output_refusal,
)
from stream_learner.io.sources import (
    Message,
    Partition,
    RebalanceHandler,
    SourceUnavailable,
    assign_with_metadata,
    commit_metadata,
    describe_starts,
)

__all__ = [
    "ConfluentSink",
    "ConfluentSource",
    "librdkafka_options",
    "transaction_error_kind",
]

log = logging.getLogger(__name__)

# kafka-python option → librdkafka property. Values pass unchanged unless _convert says otherwise.
_NAMES = {
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites",
    "ssl_check_hostname": "ssl.endpoint.identification.algorithm",
    # kafka-python gives up a bootstrap connection after this long; librdkafka bounds every
    # connection setup (TCP, TLS, SASL) the same way.
    "bootstrap_timeout_ms": "socket.connection.setup.timeout.ms",
    "reconnect_backoff_ms": "reconnect.backoff.ms",
    "reconnect_backoff_max_ms": "reconnect.backoff.max.ms",
    "request_timeout_ms": "socket.timeout.ms",
    "connections_max_idle_ms": "connections.max.idle.ms",
    "metadata_max_age_ms": "metadata.max.age.ms",
    "receive_buffer_bytes": "socket.receive.buffer.bytes",
    "send_buffer_bytes": "socket.send.buffer.bytes",
    "partition_assignment_strategy": "partition.assignment.strategy",
    "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms",
    "max_poll_interval_ms": "max.poll.interval.ms",
    "fetch_max_wait_ms": "fetch.wait.max.ms",
    "fetch_min_bytes": "fetch.min.bytes",
    "fetch_max_bytes": "fetch.max.bytes",
    "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "isolation_level": "isolation.level",
    "enable_idempotence": "enable.idempotence",
    "acks": "acks",
    "linger_ms": "linger.ms",
    "batch_size": "batch.size",
    "compression_type": "compression.type",
    "delivery_timeout_ms": "message.timeout.ms",
    "transaction_timeout_ms": "transaction.timeout.ms",
}
SECRET_OPTIONS = frozenset({"sasl_plain_password", "ssl_password", "sasl.password", "ssl.key.password"})
# kafka-python's assignor names → librdkafka's (kafka-python's "sticky" is eager; librdkafka
# has only the cooperative one, which needs a different rebalance protocol: not offered).
_ASSIGNORS = {"range": "range", "roundrobin": "roundrobin", "cooperative-sticky": "cooperative-sticky"}


def librdkafka_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """kafka-python-style client options → a librdkafka configuration.

    Names that already contain a dot are librdkafka's own and pass through; ``None`` means
    "the client's default" and is left out. A name with no translation raises ValueError
    naming it (never showing a secret value).

    >>> librdkafka_options({"security_protocol": "SASL_SSL", "sasl_plain_password": None})
    {'security.protocol': 'SASL_SSL'}
    >>> librdkafka_options({"partition_assignment_strategy": ["range"]})
    {'partition.assignment.strategy': 'range'}
    """
    translated: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if not isinstance(name, str):
            raise ValueError(f"client option names are strings, not {name!r}")
        if "." in name:
            librdkafka_name = name
        elif name in _NAMES:
            librdkafka_name = _NAMES[name]
            value = _convert(name, value)
        else:
            raise ValueError(
                f"client option {name!r} has no librdkafka equivalent; "
                "give its librdkafka name (with dots) instead"
            )
        if librdkafka_name in translated:
            raise ValueError(f"client option {name!r} is given twice (as {librdkafka_name!r})")
        translated[librdkafka_name] = value
    return translated


def _convert(name: str, value: Any) -> Any:
    if name == "ssl_check_hostname":
        return "https" if value else "none"
    if name == "partition_assignment_strategy":
        items = [value] if isinstance(value, str | type) else list(value)
        names = []
        for item in items:
            # kafka-python takes assignor classes; each has a ``name``.
            assignor = getattr(item, "name", item)
            if not isinstance(assignor, str) or assignor not in _ASSIGNORS:
                raise ValueError(
                    f"client option {name!r}: assignor {assignor!r} has no librdkafka equivalent "
                    f"(one of {', '.join(_ASSIGNORS)})"
                )
            names.append(_ASSIGNORS[assignor])
        if not names:
            raise ValueError(f"client option {name!r} names no assignor")
        return ",".join(names)
    if name == "bootstrap_timeout_ms" and isinstance(value, int | float):
        return max(1000, int(value))  # librdkafka's least connection-setup timeout
    if name == "compression_type":
        return str(value)
    if name == "acks":
        return "all" if value in (-1, "-1") else value
    if name in SECRET_OPTIONS:
        if not isinstance(value, str):
            raise ValueError(f"client option {name!r} must be a string")
        return value
    if isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"client option {name!r}: a {type(value).__name__} has no librdkafka form")


class _LibrdkafkaLog:
    """librdkafka's log lines into Python logging; connection churn only at DEBUG.

    We report an unreachable broker ourselves, once per retry; librdkafka would repeat
    "Connect ... failed" every reconnect backoff.
    """

    _CHURN = frozenset({"FAIL", "CONNECT", "REQTMOUT", "BROKERFAIL"})

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def log(self, level, message, *args):
        # confluent-kafka calls log(python_level, "%s [%s] %s", facility, client_name, text)
        facility = str(args[0]) if args else ""
        if facility in self._CHURN:
            level = logging.DEBUG
        self.logger.log(level, message, *args)


_LIBRDKAFKA_LOG = _LibrdkafkaLog(logging.getLogger("stream_learner.io.confluent.librdkafka"))


def _require():
    try:
        import confluent_kafka
    except ImportError:
        raise ImportError(
            "the confluent client needs confluent-kafka: pip install 'stream-learner[confluent]'"
        ) from None
    return confluent_kafka


def _check_reachable(client, timeout: float, what: str, error_class: type[Exception], errors: list) -> None:
    """Fail now, as kafka-python does, when no broker answers (the worker retries); raise
    :class:`FatalBrokerError` when the broker answered but refused our credentials.
    ``errors`` is where the client's ``error_cb`` puts what it is told."""
    from confluent_kafka import KafkaException

    try:
        client.list_topics(timeout=timeout)
    except KafkaException as error:
        client.poll(0)  # serves error_cb: a refused SASL handshake is only said there
        refused = next((e for e in errors if is_fatal(e)), None)
        if refused is not None:
            raise FatalBrokerError(f"{what}: {fatal_message(refused)}") from None
        raise error_class(f"{what}: no broker answered within {timeout:.0f} s ({_text(error)})") from None


def _text(error) -> str:
    inner = error.args[0] if getattr(error, "args", None) else error
    return inner.str() if hasattr(inner, "str") else str(inner)


def _fmt(offsets: Mapping[Partition, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items())) or "-"


class ConfluentSource:
    """A confluent-kafka consumer in a consumer group, with manual commits.

    Neither offsets nor commits are automatic: only what the worker has checkpointed is
    committed. Rebalance callbacks run inside :meth:`poll` (and :meth:`close`) on the
    caller's thread, so unlike kafka-python's they may block: the revoke commit is synchronous.
    :meth:`commit` is asynchronous (its failure is logged at a later poll): the checkpoint, not
    the committed offset, is where a restarted worker starts.
    """

    def __init__(
        self,
        topics: Iterable[str],
        *,
        bootstrap_servers: str,
        group_id: str,
        handler: RebalanceHandler,
        max_poll_records: int = 500,
        session_timeout_ms: int = 10_000,
        auto_offset_reset: str = "earliest",
        client_options: Mapping | None = None,
        read_committed: bool = False,
    ):
        confluent_kafka = _require()
        options = dict(client_options or {})
        # Range assignment gives the same partition numbers of co-partitioned topics (records
        # and their late labels, both keyed by id) to the same worker.
        options.setdefault("partition_assignment_strategy", "range")
        # The broker may hold an empty fetch this long: it bounds the latency of a quiet stream.
        options.setdefault("fetch_max_wait_ms", 100)
        bootstrap_timeout = options.get("bootstrap_timeout_ms", 10_000) / 1000.0
        config = {
            "heartbeat.interval.ms": max(100, session_timeout_ms // 5),
            # kafka-python's default (librdkafka's is read_committed); exactly-once reads
            # read_committed, so that it never learns from an aborted upstream transaction.
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
            # Every second, how long since each broker last sent us anything: broker_contact.
            "statistics.interval.ms": 1000,
            "stats_cb": self._on_stats,
            **librdkafka_options(options),
            # Last, so that no client option can turn on automatic commits.
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": auto_offset_reset,
            "session.timeout.ms": session_timeout_ms,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
            "logger": _LIBRDKAFKA_LOG,
        }
        self.topics = list(topics)
        self.handler = handler
        # Eager assignors hand over the whole assignment each time; cooperative-sticky only changes.
        self._cooperative = "cooperative" in config["partition.assignment.strategy"]
        self.max_poll_records = max_poll_records
        self._broker_error = None
        self._startup_errors: list | None = []
        self._contact: float | None = None
        self._join_state: str | None = None  # librdkafka's, from its statistics
        self._auto_offset_reset = auto_offset_reset  # for the "starting at" log line
        self._polled = False
        self._rebalances = 0
        self._in_revoke = False
        self._eof = confluent_kafka.KafkaError._PARTITION_EOF
        try:
            self._consumer = confluent_kafka.Consumer(config)
        except confluent_kafka.KafkaException as error:
            raise ValueError(f"the confluent consumer refused its configuration: {_text(error)}") from None
        try:
            _check_reachable(self._consumer, bootstrap_timeout, "consumer", SourceUnavailable, self._startup_errors)
        except (SourceUnavailable, FatalBrokerError):
            self._consumer.close()
            raise
        self._startup_errors = None
        self._consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    @property
    def consumer(self):
        return self._consumer

    # -- callbacks (run inside poll / consume / close, on our thread) ---------------------

    def _on_error(self, error) -> None:
        from confluent_kafka import KafkaError

        if self._startup_errors is not None:
            self._startup_errors.append(error)
        if error.fatal() or error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._AUTHENTICATION):
            self._broker_error = error
        else:  # one connection dropped: librdkafka reconnects by itself
            log.debug("consumer: %s", error.str())

    def _on_commit(self, error, partitions) -> None:
        failed = [tp for tp in partitions or () if tp.error is not None]
        if error is not None or failed:
            reason = error.str() if error is not None else failed[0].error.str()
            log.warning("offset commit failed (will retry at the next checkpoint): %s", reason)

    def _on_assign(self, consumer, assigned) -> None:
        from confluent_kafka import OFFSET_INVALID, KafkaException, TopicPartition

        self._rebalances += 1
        by_name = {(tp.topic, tp.partition): tp for tp in assigned}
        seeks: dict[Partition, int] = {}
        try:
            if not assigned:
                self.handler.partitions_assigned(set(), {})
                return
            try:
                committed = consumer.committed(list(assigned), timeout=10)
            except KafkaException as error:  # our checkpoint still says where to start
                log.warning("could not read committed offsets (%s); using the checkpoint's", _text(error))
                committed = []
            known: dict[Partition, int | None] = {name: None for name in by_name}
            metadata: dict[Partition, str] = {}
            for tp in committed:
                if tp.error is None and tp.offset >= 0:
                    known[(tp.topic, tp.partition)] = tp.offset
                    metadata[(tp.topic, tp.partition)] = tp.metadata or ""
            seeks = {
                name: offset
                for name, offset in assign_with_metadata(self.handler, set(by_name), known, metadata).items()
                if name in by_name
            }
        finally:
            # An offset given to assign() is where reading starts: the seek wins over the
            # committed offset (OFFSET_INVALID means "use the committed one").
            start = [
                TopicPartition(topic, partition, seeks.get((topic, partition), OFFSET_INVALID))
                for topic, partition in by_name
            ]
            if self._cooperative:
                consumer.incremental_assign(start)
            else:
                consumer.assign(start)
        log.info(
            "assigned %s; starting at %s",
            sorted(by_name),
            describe_starts(by_name, seeks, self._auto_offset_reset, known),
        )

    def _on_revoke(self, consumer, revoked) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        self._rebalances += 1
        self._in_revoke = True
        partitions = {(tp.topic, tp.partition) for tp in revoked}
        try:
            if not partitions:
                return
            offsets = self.handler.partitions_revoked(partitions)
            wanted = {tp: offsets[tp] for tp in partitions if tp in offsets}
            if not wanted:
                return
            try:
                metadata = commit_metadata(self.handler)
                consumer.commit(
                    offsets=[TopicPartition(t, p, o, metadata) for (t, p), o in wanted.items()], asynchronous=False
                )
            except KafkaException as error:  # the checkpoint has them; the next owner may re-read some
                log.warning("commit on revoke failed (%s); the next owner may re-read records", _text(error))
            else:
                log.info("committed offsets on revoke: %s", _fmt(wanted))
        finally:
            self._in_revoke = False
            if self._cooperative:
                consumer.incremental_unassign(list(revoked))
            else:
                consumer.unassign()

    def _on_lost(self, consumer, lost) -> None:
        self._rebalances += 1
        try:
            self.handler.partitions_lost({(tp.topic, tp.partition) for tp in lost})
        finally:
            if self._cooperative:
                consumer.incremental_unassign(list(lost))
            else:
                consumer.unassign()

    def _on_stats(self, text: str) -> None:
        import json

        try:
            stats = json.loads(text)
            brokers = stats.get("brokers", {}).values()
            self._join_state = stats.get("cgrp", {}).get("join_state")
        except (ValueError, AttributeError):
            return
        # rxidle: microseconds since the last bytes received from that broker (-1: never);
        # bootstrap placeholders have no node id.
        idle = [b["rxidle"] for b in brokers if b.get("nodeid", -1) >= 0 and b.get("rxidle", -1) >= 0]
        if idle:
            self._contact = time.monotonic() - min(idle) / 1e6

    def broker_contact(self) -> float | None:
        """``time.monotonic()`` when a broker last sent this consumer anything (librdkafka's
        statistics, every second); None before the first."""
        return self._contact

    # -- the Source interface ----------------------------------------------------------

    def poll(self, timeout: float) -> list[Message]:
        # As kafka-python's poll: wait for the first message only, then take what is ready
        # (consume(n, timeout) would wait the whole timeout for n messages).
        if not self._polled:
            log.debug("first poll: the group join starts")
            self._polled = True
        first = self._consumer.poll(timeout)
        if first is None:
            raw = []
        elif self.max_poll_records > 1:
            rebalances = self._rebalances
            more = self._consumer.consume(self.max_poll_records - 1, 0)
            # A rebalance served by consume() came after ``first`` was fetched: the handler
            # has checkpointed without it and librdkafka dropped the rest of that fetch, so
            # drop it too (the new owner, or our own seek, reads it again).
            raw = more if self._rebalances != rebalances else [first, *more]
        else:
            raw = [first]
        messages: list[Message] = []
        errors = []
        for record in raw:
            error = record.error()
            if error is not None:
                if error.code() != self._eof:
                    errors.append(error)
                continue
            kind, milliseconds = record.timestamp()
            messages.append(
                Message(
                    topic=record.topic(),
                    partition=record.partition(),
                    offset=record.offset(),
                    key=record.key(),
                    value=record.value(),
                    timestamp=milliseconds / 1000.0 if kind and milliseconds >= 0 else None,
                    headers=tuple(record.headers() or ()),
                )
            )
        if messages:
            self._broker_error = None
        for error in errors:  # never drop the good messages of this batch for them
            if is_fatal(error):  # credentials or permissions: no retry can help
                raise FatalBrokerError(f"consumer: {fatal_message(error)}")
            if not messages and (error.fatal() or _is_transport(error)):
                raise SourceUnavailable(f"consumer: {error.str()}")
            log.warning("consumer: %s", error.str())
        if not messages and self._broker_error is not None:
            error, self._broker_error = self._broker_error, None
            if is_fatal(error):
                raise FatalBrokerError(f"consumer: {fatal_message(error)}")
            raise SourceUnavailable(f"consumer: {error.str()}")
        messages.sort(key=lambda m: (m.topic, m.partition))  # stable: offsets stay in order
        return messages

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        from confluent_kafka import TopicPartition

        owned = self.assignment()
        # Never commit for a partition another worker owns now: that would move its offset.
        metadata = commit_metadata(self.handler)
        wanted = [TopicPartition(t, p, o, metadata) for (t, p), o in offsets.items() if (t, p) in owned]
        if wanted:
            # Asynchronous: a broker that does not answer must not stall the loop (librdkafka's
            # sync commit waits up to socket.timeout.ms, 60 s). The result arrives in a later
            # poll (_on_commit); the revoke commit, which must land before the hand-over, is sync.
            self._consumer.commit(offsets=wanted, asynchronous=True)

    def assignment(self) -> set[Partition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def group_metadata(self):
        """The consumer group's metadata (member id, generation) for
        :meth:`ConfluentSink.commit_transaction`: Kafka refuses offsets of a member that is
        no longer in the group, which fences a worker that lost its partitions (Tansu does not
        check it: docs/exactly-once.md)."""
        return self._consumer.consumer_group_metadata()

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        """Read these owned partitions from these offsets next (after an aborted transaction);
        librdkafka drops what it fetched ahead for them."""
        from confluent_kafka import KafkaException, TopicPartition

        owned = self.assignment()
        for (topic, partition), offset in offsets.items():
            if (topic, partition) not in owned:
                continue
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    self._consumer.seek(TopicPartition(topic, partition, offset))
                    break
                except KafkaException as error:
                    # _STATE: a partition just assigned whose fetcher has not started yet.
                    if time.monotonic() > deadline:
                        raise SourceUnavailable(f"consumer: cannot seek {topic}[{partition}]: {_text(error)}") from None
                    time.sleep(0.05)

    def probe_membership(self, timeout: float = 10.0) -> None:
        """Ask the group whether it still counts us as a member, before a transaction commits:
        raises :class:`~stream_learner.io.sinks.TransactionAbortable` when it does not
        (UNKNOWN_MEMBER_ID, ILLEGAL_GENERATION), KafkaException when it cannot tell (a slow
        coordinator: the worker postpones the commit). A rebalance under way still counts us in.

        Tansu ignores the generation in TxnOffsetCommit (no KIP-447 fencing) but checks the
        member of a plain OffsetCommit, and librdkafka has no call that heartbeats now: we
        commit again, synchronously, the offsets the group already holds (a no-op for a
        member; nobody else commits for our partitions while we are one). Not from a
        rebalance callback: there the rebalance itself tells (a lost member gets on_lost)."""
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        if self._in_revoke:
            return
        assigned = self._consumer.assignment()
        if not assigned:
            return
        held = [
            TopicPartition(tp.topic, tp.partition, tp.offset, tp.metadata or "")
            for tp in self._consumer.committed(assigned, timeout=max(0.1, timeout))
            if tp.error is None and tp.offset >= 0
        ]
        if not held:
            return
        try:
            self._consumer.commit(offsets=held, asynchronous=False)
        except KafkaException as exception:
            code = exception.args[0].code()
            if code == KafkaError.REBALANCE_IN_PROGRESS:
                return
            if code in (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.FENCED_INSTANCE_ID):
                raise TransactionAbortable(f"consumer: {exception.args[0].name()}: {_text(exception)}") from None
            raise

    def lag(self, positions: Mapping[Partition, int]) -> dict[Partition, int]:
        from confluent_kafka import TopicPartition

        lags = {}
        for topic, partition in self.assignment():
            if (topic, partition) not in positions:
                continue
            # The high watermark of the last fetch response (no request: end offsets from the
            # broker can be stale on Tansu, fetch responses are not).
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            if high is not None and high >= 0:
                lags[(topic, partition)] = max(0, high - positions[(topic, partition)])
        return lags

    def pause(self, partitions: set[Partition]) -> None:
        from confluent_kafka import TopicPartition

        # librdkafka drops what it fetched ahead for them and resumes at the last consumed offset.
        self._consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: set[Partition]) -> None:
        from confluent_kafka import TopicPartition

        self._consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def close(self, timeout: float | None = None) -> None:
        # close() revokes our partitions through on_revoke, which checkpoints and commits.
        self._finish_join(10.0 if timeout is None else 0.7 * timeout)
        self._consumer.close()

    def _finish_join(self, seconds: float) -> None:
        """Let a group join in flight complete before close() sends its LeaveGroup.

        Tansu 0.6.0 keeps a member that leaves a forming group as the group's leader, and the
        group then never gets an assignment again (see sources._skip_leave_during_join, the
        kafka-python side). librdkafka cannot close without leaving, so we wait (within the
        shutdown's bound) for the join to end; what is fetched meanwhile is not processed.
        """
        first_join = self._polled and self._rebalances == 0  # polling starts the join
        joining = first_join or self._join_state not in (None, "init", "steady")
        if not joining:
            return
        log.info("stopping during the group join: letting it complete before leaving the group")
        deadline = time.monotonic() + seconds
        before = self._rebalances
        while time.monotonic() < deadline:
            self._consumer.poll(0.1)  # serves the rebalance callbacks; records are dropped
            # Statistics come every second: "steady" after the assignment is the join done.
            if self._rebalances != before and self._join_state in (None, "steady"):
                return


def _is_transport(error) -> bool:
    from confluent_kafka import KafkaError

    return error.code() in (
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError._RESOLVE,
    )


@functools.cache
def _producer_broken_codes() -> frozenset:
    """Delivery errors after which this producer cannot deliver any more (e.g. Tansu answers
    librdkafka's epoch bump after a timed-out in-flight batch with PRODUCER_FENCED)."""
    from confluent_kafka import KafkaError

    names = ("PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "_FENCED", "_FATAL", "UNKNOWN_PRODUCER_ID",
             "OUT_OF_ORDER_SEQUENCE_NUMBER")
    return frozenset(getattr(KafkaError, name) for name in names if hasattr(KafkaError, name))


def transaction_error_kind(error) -> str:
    """``"fatal"``, ``"abortable"`` or ``"retriable"`` for a librdkafka transaction error.

    PRODUCER_FENCED is fatal even when librdkafka flags it abortable: Tansu answers a fenced
    Produce with it (Kafka: INVALID_PRODUCER_EPOCH, abortable, then PRODUCER_FENCED on EndTxn,
    fatal), and the abort that would follow never gets an answer. An error of no class
    (``_STATE``, ``_CONFLICT``: a call the transaction's state does not allow) is fatal too.

    >>> from confluent_kafka import KafkaError
    >>> transaction_error_kind(KafkaError(KafkaError._TIMED_OUT, retriable=True))
    'retriable'
    >>> transaction_error_kind(KafkaError(KafkaError.PRODUCER_FENCED, txn_requires_abort=True))
    'fatal'
    >>> transaction_error_kind(KafkaError(KafkaError._CONFLICT))
    'fatal'
    """
    if error.fatal() or error.code() in _fenced_codes():
        return "fatal"
    if error.txn_requires_abort():
        return "abortable"
    if error.retriable():
        return "retriable"
    return "fatal"


@functools.cache
def _fenced_codes() -> frozenset:
    from confluent_kafka import KafkaError

    return frozenset({KafkaError.PRODUCER_FENCED, KafkaError._FENCED})


# A transaction call waits at most this long before it is called again (and a warning says
# so): the whole call stays bounded by the transaction timeout.
_TRANSACTION_CALL_SLICE = 5.0


def _transactional_config(transactional_id: str, timeout: float, config: Mapping) -> dict:
    """The producer properties of the transactional mode: ``timeout`` bounds each call;
    ``transaction.timeout.ms`` (how long the broker lets a transaction stay open before it
    aborts it, the worker's is three cycles) is the client option's, else ``timeout``.

    >>> _transactional_config("g-w1", 30.0, {"message.timeout.ms": 120_000})
    {'transactional.id': 'g-w1', 'transaction.timeout.ms': 30000, 'message.timeout.ms': 30000, 'socket.timeout.ms': 30000}
    >>> _transactional_config("g-w1", 60.0, {"transaction.timeout.ms": 90_000})["message.timeout.ms"]
    90000
    """
    timeout_ms = int(timeout * 1000)
    if timeout_ms < 1000:
        raise ValueError(f"the transaction timeout must be at least 1 s, not {timeout} s")
    broker_timeout_ms = int(config.get("transaction.timeout.ms", timeout_ms))
    return {
        "transactional.id": transactional_id,
        "transaction.timeout.ms": broker_timeout_ms,
        # librdkafka refuses a message timeout longer than the transaction's.
        "message.timeout.ms": min(int(config.get("message.timeout.ms", broker_timeout_ms)), broker_timeout_ms),
        # A transaction request (AddOffsetsToTxn) waits for its answer this long whatever the
        # call's timeout: keep every call within its bound.
        "socket.timeout.ms": min(int(config.get("socket.timeout.ms", 60_000)), timeout_ms),
    }


class ConfluentSink:
    """An idempotent confluent-kafka producer that re-sends what failed until it is confirmed.

    Each message stays in ``_unconfirmed`` until its delivery report says it arrived. A
    message whose report says it failed (or that librdkafka would not take) is sent again at
    the next :meth:`flush`: possibly a duplicate, never a gap. One still in librdkafka's queue
    when a flush times out stays there (librdkafka reports on every message within its
    ``message.timeout.ms``), so a long outage does not pile up copies.

    A message refused for good is handled as :class:`~stream_learner.io.sinks.KafkaSink` does
    (a truncated copy for a dead letter too large, else counted and dropped). Unlike
    kafka-python, librdkafka does not split a batch the broker refuses as too large: every
    message of it is refused. Set ``message.max.bytes`` (a client option) to the topics'
    ``max.message.bytes`` so that only the messages over it are refused, by the client.

    A ``partition_hint`` (the input partition) picks the output partition, as in
    :class:`~stream_learner.io.sinks.KafkaSink`; without one, keys are partitioned by murmur2 as
    kafka-python and the Java client do (librdkafka's default hash differs).

    With a ``transactional_id`` (``--processing-guarantee exactly-once``) it is a transactional
    producer: outputs are sent between :meth:`begin_transaction` and :meth:`commit_transaction`,
    which commits them together with the consumed offsets, and nothing is re-sent (a failed
    delivery makes the transaction abortable: :class:`TransactionAbortable`). Every
    transaction call is bounded by ``transaction_timeout`` seconds (also the broker's
    ``transaction.timeout.ms``), retried within it while librdkafka says retriable (a commit
    across a broker freeze), and raises :class:`TransactionFatal` beyond it or when fenced.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        client_options: Mapping | None = None,
        linger_ms: int = 20,
        batch_size: int = 256 * 1024,
        truncate_topics: Collection[str] = (),
        transactional_id: str | None = None,
        transaction_timeout: float = 60.0,
    ):
        confluent_kafka = _require()
        options = dict(client_options or {})
        bootstrap_timeout = options.get("bootstrap_timeout_ms", 10_000) / 1000.0
        config = {
            "linger.ms": linger_ms,
            "batch.size": batch_size,
            "partitioner": "murmur2_random",
            "message.timeout.ms": 120_000,  # kafka-python's delivery_timeout_ms
            **librdkafka_options(options),
            # Last: outputs are confirmed by every replica, and retries never duplicate.
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "error_cb": self._on_error,
            "logger": _LIBRDKAFKA_LOG,
        }
        if transactional_id is not None:
            config.update(_transactional_config(transactional_id, transaction_timeout, config))
        self.transactional_id = transactional_id  # recorded in the pending checkpoint
        self._transactional = transactional_id is not None
        self._transaction_timeout = transaction_timeout
        self._in_transaction = False
        self._startup_errors: list | None = []
        try:
            self._producer = confluent_kafka.Producer(config)
        except confluent_kafka.KafkaException as error:
            raise ValueError(f"the confluent producer refused its configuration: {_text(error)}") from None
        _check_reachable(self._producer, bootstrap_timeout, "producer", SinkError, self._startup_errors)
        self._startup_errors = None
        self._refusals = _Refusals(truncate_topics)
        self._backoff = Backoff(0.1, 2.0, jitter="decorrelated")  # at least 0.1 s between re-sends
        self._config = config
        self._pending: list[tuple] = []
        # [message, state]: state None while librdkafka holds it, True once delivered, else the error.
        self._unconfirmed: list[list] = []
        self._partitions: dict[str, int] = {}
        self._fatal = None
        if self._transactional:
            # First: fences our previous incarnation and aborts the transaction it left open.
            self._call("init_transactions", self._producer.init_transactions)

    def _on_error(self, error) -> None:
        if self._startup_errors is not None:
            self._startup_errors.append(error)
        if error.fatal():  # the idempotent producer cannot go on: a new one takes over at flush
            self._fatal = error
        log.debug("producer: %s", error.str())

    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers = (), partition_hint: int | None = None
    ) -> None:
        self._pending.append((topic, key, value, list(headers), partition_hint))

    def dispatch(self) -> None:
        if self._transactional:
            self._raise_if_broken()
            if self._pending and not self._in_transaction:
                self.begin_transaction()
        elif self._fatal is not None:
            self._replace_producer()
        pending, self._pending = self._pending, []
        for message in pending:
            entry = [message, None]
            self._unconfirmed.append(entry)
            self._send(entry)
        self._producer.poll(0)  # serve the delivery reports that are ready

    def _partition(self, topic: str, hint: int | None) -> int:
        if hint is None:
            return -1  # librdkafka's partitioner decides
        count = self._partitions.get(topic)
        if count is None:
            try:
                count = len(self._producer.list_topics(topic, timeout=5).topics[topic].partitions)
            except Exception:  # no metadata yet: let the partitioner decide
                return -1
            if count:
                self._partitions[topic] = count
        return hint % count if count else -1

    def _send(self, entry: list) -> None:
        if self._in_transaction:
            message = self._refusals.instead_of(entry[0])
            if message is None:
                entry[1] = True  # refused for good in an aborted transaction: dropped, counted
                return
            entry[0] = message
        topic, key, value, headers, hint = entry[0]
        entry[1] = None

        def delivered(error, _message, entry=entry):
            if error is None:
                entry[1] = True
                return
            entry[1] = error
            if self._transactional and output_refusal(error) is not None:
                self._refusals.remember(entry[0], error)
            # In a transaction only a fenced producer is beyond repair: the rest aborts it.
            broken = _fenced_codes() if self._transactional else _producer_broken_codes()
            if error.fatal() or error.code() in broken:
                self._fatal = error

        try:
            self._producer.produce(
                topic, value, key, partition=self._partition(topic, hint), on_delivery=delivered,
                headers=headers or None,
            )
        except BufferError as error:  # librdkafka's queue is full: retried at the next flush
            entry[1] = error
            self._producer.poll(0)
        except Exception as error:  # e.g. a fatal producer error: retried at the next flush
            entry[1] = error

    def _replace_producer(self) -> None:
        from confluent_kafka import Producer

        log.warning("producer unusable (%s); starting a new one and re-sending", self._fatal.str())
        self._fatal = None
        old, self._producer = self._producer, Producer(self._config)
        old.purge(blocking=False)  # its reports, served now, mark what it held as not delivered
        old.poll(0)
        for entry in self._unconfirmed:
            if entry[1] is not True:
                entry[1] = RuntimeError("not sent")

    def flush(self, timeout: float) -> None:
        if self._transactional:
            self._flush_transactional(timeout)
            return
        self.dispatch()
        deadline = time.monotonic() + timeout
        while True:
            self._producer.flush(max(0.1, deadline - time.monotonic()))
            if self._fatal is not None:
                self._replace_producer()
            self._handle_refused()
            for entry in self._unconfirmed:
                _raise_if_fatal(entry[1] if entry[1] is not True else None)
            failed = [entry for entry in self._unconfirmed if entry[1] is not True and entry[1] is not None]
            waiting = sum(1 for entry in self._unconfirmed if entry[1] is None)
            if not failed and not waiting:
                self._unconfirmed.clear()
                self._backoff.reset()
                return
            if time.monotonic() > deadline:
                self._unconfirmed = [entry for entry in self._unconfirmed if entry[1] is not True]
                raise SinkError(
                    f"{len(failed) + waiting} outputs not confirmed within {timeout:.0f} s; "
                    "they will be sent again"
                )
            if failed:
                delay = min(self._backoff.next(), max(0.0, deadline - time.monotonic()))  # no spinning
                log.warning(
                    "re-sending %d outputs that were not delivered, in %.1f s (%s)", len(failed), delay, _text(failed[0][1])
                )
                time.sleep(delay)
                for entry in failed:
                    self._send(entry)

    def _handle_refused(self, unsent_only: bool = False) -> None:
        """Messages refused for good leave ``_unconfirmed``: a truncated copy is sent in place
        of a dead letter too large, anything else is counted and dropped. ``unsent_only``:
        only those librdkafka refused at ``produce()`` (never part of a transaction)."""
        kept = []
        for entry in self._unconfirmed:
            state = entry[1]
            if unsent_only and not isinstance(state, BaseException):
                kept.append(entry)
                continue
            if state is not True and state is not None and output_refusal(state) is not None:
                copy = self._refusals.handle(entry[0], state)
                if copy is None:
                    continue
                entry = [copy, None]
                self._send(entry)
            kept.append(entry)
        self._unconfirmed = kept

    def take_output_errors(self) -> dict[tuple[str, str], int]:
        return self._refusals.take()

    def close(self, timeout: float = 10.0) -> None:
        if self._transactional and self._in_transaction:
            # Never commit here: the worker commits with its offsets. What is open is aborted
            # (by the broker at our successor's init_transactions if this abort fails).
            try:
                self.abort_transaction()
            except (SinkError, TransactionFatal) as error:
                log.warning("could not abort the open transaction at close: %s", error)
        self._producer.flush(timeout)

    # -- transactions (exactly-once) --------------------------------------------------

    def begin_transaction(self) -> None:
        """Start the transaction of a cycle (a no-op when one is open)."""
        self._raise_if_broken()
        if self._in_transaction:
            return
        from confluent_kafka import KafkaException

        try:
            self._producer.begin_transaction()
        except KafkaException as exception:
            self._raise_transaction_error("begin_transaction", exception.args[0])
        self._in_transaction = True

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata, metadata: str = "") -> None:
        """Commit the outputs sent since :meth:`begin_transaction` and, in the same
        transaction, ``offsets`` (the next offset of each input partition) as the consumer
        group's (``group_metadata``: ``ConfluentSource.group_metadata()``).

        Returns once the broker has committed. Raises :class:`TransactionAbortable` (call
        :meth:`abort_transaction`) or :class:`TransactionFatal`; a commit that timed out is
        called again until ``transaction_timeout`` has passed since this call, then fatal
        (whether it committed is then told by the group's committed offsets at restart).
        """
        from confluent_kafka import TopicPartition

        if not self._in_transaction:
            if not offsets and not self._pending:
                return
            self.begin_transaction()
        deadline = time.monotonic() + self._transaction_timeout
        # Every output delivered first (as librdkafka's commit would): one the client refused,
        # or its full queue, never entered the transaction and must not be committed without.
        self._flush_transactional(self._transaction_timeout)
        if offsets:
            wanted = [TopicPartition(t, p, o, metadata) for (t, p), o in offsets.items()]
            self._call(
                "send_offsets_to_transaction",
                lambda timeout: self._producer.send_offsets_to_transaction(wanted, group_metadata, timeout),
                deadline,
            )
        # librdkafka's commit flushes first, and fails (abortable) if any output failed.
        self._call("commit_transaction", self._producer.commit_transaction, deadline)
        self._in_transaction = False
        self._unconfirmed.clear()

    def abort_transaction(self) -> None:
        """Abort the open transaction: its outputs (sent or not) and offsets are dropped.
        Raises :class:`TransactionFatal` when even the abort fails (fenced, or no answer
        within ``transaction_timeout``)."""
        self._pending.clear()
        if not self._in_transaction:
            return
        self._raise_if_broken()  # a fenced producer's abort is never answered on Tansu
        try:
            self._call("abort_transaction", self._producer.abort_transaction)
        finally:
            self._unconfirmed.clear()
        self._in_transaction = False

    def _flush_transactional(self, timeout: float) -> None:
        """Confirm delivery inside the transaction within ``timeout``. What the broker refused
        makes the transaction abortable (never re-sent: the transaction is all or nothing);
        what the client refused at ``produce()`` never entered it: truncated or dropped as
        outside transactions, or sent again (a full queue). SinkError when not confirmed yet."""
        self.dispatch()
        deadline = time.monotonic() + timeout
        while True:
            self._producer.flush(max(0.1, deadline - time.monotonic()))
            self._raise_if_broken()
            self._handle_refused(unsent_only=True)
            unsent = [entry for entry in self._unconfirmed if isinstance(entry[1], BufferError)]
            for entry in unsent:
                self._send(entry)
            waiting = [entry for entry in self._unconfirmed if entry[1] is None]
            if not waiting or time.monotonic() >= deadline:
                break
        failed = [entry[1] for entry in self._unconfirmed if entry[1] is not True and entry[1] is not None]
        # Refused by the broker, or by produce() for a reason other than its size or a full queue.
        lost = [state for state in failed if not isinstance(state, BufferError)]
        if lost:
            raise TransactionAbortable(f"{len(lost)} outputs were not delivered ({_text(lost[0])})")
        if failed or waiting:
            raise SinkError(f"{len(failed) + len(waiting)} outputs not confirmed within {timeout:.0f} s")
        self._unconfirmed.clear()

    def _raise_if_broken(self) -> None:
        if self._fatal is not None:
            error = self._fatal
            raise TransactionFatal(f"transactional producer: {error.name()}: {error.str()}")

    def _call(self, what: str, call, deadline: float | None = None) -> None:
        """``call(timeout)``, again while librdkafka says retriable, until ``deadline``."""
        from confluent_kafka import KafkaException

        if deadline is None:
            deadline = time.monotonic() + self._transaction_timeout
        while True:
            started = time.monotonic()
            remaining = deadline - started
            try:
                call(max(0.1, min(remaining, _TRANSACTION_CALL_SLICE)))
                return
            except KafkaException as exception:
                error = exception.args[0]
            if transaction_error_kind(error) != "retriable":
                self._raise_transaction_error(what, error)
            if time.monotonic() >= deadline:
                raise TransactionFatal(
                    f"{what} did not complete within the transaction timeout "
                    f"({self._transaction_timeout:.0f} s): {error.str()}"
                )
            log.warning("%s: %s; calling it again (%.0f s left)", what, error.str(), deadline - time.monotonic())
            time.sleep(max(0.0, min(0.5 - (time.monotonic() - started), deadline - time.monotonic())))  # no spinning

    def _raise_transaction_error(self, what: str, error) -> None:
        kind = transaction_error_kind(error)
        if kind == "abortable":
            raise TransactionAbortable(f"{what}: {error.str()} (the transaction must be aborted)")
        self._fatal = self._fatal or error
        raise TransactionFatal(f"{what}: {error.name()}: {error.str()}")
