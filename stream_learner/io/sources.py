"""Where messages come from: a tiny :class:`Source` interface, in memory and on Kafka.

A source hands out :class:`Message` batches, commits the offsets of the *next* message to read
(last processed + 1) and tells a :class:`RebalanceHandler` when partitions come and go, so the
worker can checkpoint before it loses a partition and seek to its checkpoint when it gets one.
Partitions are plain ``(topic, partition)`` tuples.

>>> source = MemorySource({("reviews", 0): [b"a", b"b", b"c"]}, max_poll_records=2)
>>> [m.value for m in source.poll(0)]
[b'a', b'b']
>>> source.commit({("reviews", 0): 2})
>>> source.committed
{('reviews', 0): 2}

"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from stream_learner.io.child import spawn, start_child

__all__ = [
    "Message",
    "Partition",
    "RebalanceHandler",
    "StartAtCommitted",
    "Source",
    "MemorySource",
    "KafkaSource",
    "ProcessSource",
    "SourceUnavailable",
    "SourceError",
]

log = logging.getLogger(__name__)

Partition = tuple[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One message as read: where it came from and its untouched bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None  # seconds since the epoch
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def tp(self) -> Partition:
        return (self.topic, self.partition)


class SourceUnavailable(ConnectionError):
    """The source cannot be reached right now (broker down); retry later."""


class RebalanceHandler(Protocol):
    def partitions_revoked(self, partitions: set[Partition]) -> Mapping[Partition, int]:
        """Partitions about to move away: checkpoint, return the offsets to commit for them."""

    def partitions_assigned(
        self, partitions: set[Partition], committed: Mapping[Partition, int | None]
    ) -> Mapping[Partition, int]:
        """New partitions: return where to start reading each (absent: the committed offset)."""

    def partitions_lost(self, partitions: set[Partition]) -> None:
        """Partitions taken away without a chance to commit (session expired)."""


class StartAtCommitted:
    """The plainest :class:`RebalanceHandler`: every partition starts at the group's committed
    offset, and nothing is committed on revoke (a reader, a benchmark, a probe)."""

    def partitions_revoked(self, partitions: set[Partition]) -> Mapping[Partition, int]:
        return {}

    def partitions_assigned(
        self, partitions: set[Partition], committed: Mapping[Partition, int | None]
    ) -> Mapping[Partition, int]:
        return {}

    def partitions_lost(self, partitions: set[Partition]) -> None:
        pass


class Source(Protocol):
    def poll(self, timeout: float) -> list[Message]: ...

    def commit(self, offsets: Mapping[Partition, int]) -> None: ...

    def assignment(self) -> set[Partition]: ...

    def lag(self, positions: Mapping[Partition, int]) -> dict[Partition, int]: ...

    def pause(self, partitions: set[Partition]) -> None:
        """Return nothing from these partitions until :meth:`resume` (reading resumes where
        it stopped)."""

    def resume(self, partitions: set[Partition]) -> None: ...

    def close(self) -> None: ...

    # Exactly-once (docs/exactly-once.md).

    def group_metadata(self):
        """The consumer's group membership, for ``Sink.commit_transaction`` (KIP-447)."""

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        """Read these owned partitions from these offsets next (after an aborted transaction)."""


class MemorySource:
    """Messages held in memory, one consumer owning every partition.

    ``poll`` calls the handler's ``partitions_assigned`` once before the first batch, as a
    Kafka consumer does after joining its group.
    """

    def __init__(
        self,
        partitions: Mapping[Partition, Sequence[bytes | None | Message]],
        *,
        max_poll_records: int = 500,
        committed: Mapping[Partition, int] | None = None,
        handler: RebalanceHandler | None = None,
    ):
        self.max_poll_records = max_poll_records
        self.handler = handler
        self.committed: dict[Partition, int] = dict(committed or {})
        self._messages: dict[Partition, list[Message]] = {}
        for tp, values in partitions.items():
            self._messages[tp] = [
                value
                if isinstance(value, Message)
                else Message(tp[0], tp[1], offset, None, value)
                for offset, value in enumerate(values)
            ]
        self._positions: dict[Partition, int] | None = None
        self.paused: set[Partition] = set()
        self.closed = False

    def append(self, tp: Partition, value: bytes | None, key: bytes | None = None) -> None:
        messages = self._messages.setdefault(tp, [])
        messages.append(Message(tp[0], tp[1], len(messages), key, value))

    def _assign(self) -> None:
        partitions = set(self._messages)
        self._positions = {tp: self.committed.get(tp, 0) for tp in partitions}
        if self.handler is not None:
            committed = {tp: self.committed.get(tp) for tp in partitions}
            self._positions.update(self.handler.partitions_assigned(partitions, committed))

    def poll(self, timeout: float) -> list[Message]:
        if self.closed:
            raise RuntimeError("source is closed")
        if self._positions is None:
            self._assign()
        batch: list[Message] = []
        for tp in sorted(self._messages):
            if tp in self.paused:
                continue
            take = self.max_poll_records - len(batch)
            if take <= 0:
                break
            start = self._positions[tp]
            chunk = self._messages[tp][start : start + take]
            batch.extend(chunk)
            self._positions[tp] = start + len(chunk)
        return batch

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self.committed.update(offsets)

    def assignment(self) -> set[Partition]:
        return set(self._messages)

    def lag(self, positions: Mapping[Partition, int]) -> dict[Partition, int]:
        return {tp: len(msgs) - positions.get(tp, 0) for tp, msgs in self._messages.items()}

    def pause(self, partitions: set[Partition]) -> None:
        self.paused |= set(partitions)

    def resume(self, partitions: set[Partition]) -> None:
        self.paused -= set(partitions)

    def group_metadata(self):
        return ("memory", 0)

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        if self._positions is None:
            self._assign()
        self._positions.update({tp: o for tp, o in offsets.items() if tp in self._positions})

    def close(self) -> None:
        if not self.closed and self.handler is not None and self._positions is not None:
            self.commit(self.handler.partitions_revoked(set(self._messages)))
        self.closed = True


class KafkaSource:
    """A kafka-python 3.x consumer in a consumer group, with manual commits.

    ``enable_auto_commit`` is off: only offsets the worker has fully processed and
    checkpointed are committed. The rebalance listener is asynchronous because kafka-python
    3 runs listeners on its IO thread, where blocking consumer calls are not allowed; the
    worker's handler itself is quick (it writes one checkpoint).
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
        from kafka import KafkaConsumer
        from kafka.coordinator.assignors.range import RangePartitionAssignor

        from stream_learner.io.retry import watch_kafka_python_auth

        watch_kafka_python_auth()  # a refused SASL handshake surfaces only as a bootstrap timeout
        self.topics = list(topics)
        self.handler = handler
        self.commit_timeout_ms = 5000  # a broker that does not answer must not stall the loop
        self._lock = threading.Lock()
        self._last_contact: float | None = None  # records fetched or offsets committed
        self._paused_any = False  # pause() was used: see _free_parked_records
        self._in_listener = False  # a rebalance callback runs (on the client's IO thread)
        options = dict(client_options or {})
        # Range assignment gives the same partition numbers of co-partitioned topics (records
        # and their late labels, both keyed by id) to the same worker.
        options.setdefault("partition_assignment_strategy", [RangePartitionAssignor])
        # The broker may hold an empty fetch this long: it bounds the latency of a quiet stream.
        options.setdefault("fetch_max_wait_ms", 100)
        if read_committed:  # exactly-once: never learn from an input transaction that may abort
            options["isolation_level"] = "read_committed"
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            enable_auto_commit=False,
            max_poll_records=max_poll_records,
            auto_offset_reset=auto_offset_reset,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 5),
            **options,
        )
        self._consumer.subscribe(self.topics, listener=_Listener(self))

    @property
    def consumer(self):
        return self._consumer

    def poll(self, timeout: float) -> list[Message]:
        if self._paused_any:
            self._free_parked_records()
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000))
        messages: list[Message] = []
        for tp in sorted(batches, key=lambda tp: (tp.topic, tp.partition)):
            for record in batches[tp]:
                messages.append(
                    Message(
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                        key=record.key,
                        value=record.value,
                        timestamp=record.timestamp / 1000.0 if record.timestamp is not None and record.timestamp >= 0 else None,
                        headers=tuple((k, v) for k, v in (record.headers or ())),
                    )
                )
        if messages:
            self._last_contact = time.monotonic()
        return messages

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        owned = self.assignment()
        metadata = commit_metadata(self.handler)
        # Never commit for a partition another worker owns now: that would move its offset.
        wanted = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, metadata, -1)
            for (topic, partition), offset in offsets.items()
            if (topic, partition) in owned
        }
        if wanted:
            self._consumer.commit(wanted, timeout_ms=self.commit_timeout_ms)
            self._last_contact = time.monotonic()

    def assignment(self) -> set[Partition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def lag(self, positions: Mapping[Partition, int]) -> dict[Partition, int]:
        from kafka import TopicPartition

        lags = {}
        for topic, partition in self.assignment():
            highwater = self._consumer.highwater(TopicPartition(topic, partition))
            if highwater is not None and (topic, partition) in positions:
                lags[(topic, partition)] = max(0, highwater - positions[(topic, partition)])
        return lags

    def pause(self, partitions: set[Partition]) -> None:
        from kafka import TopicPartition

        self._consumer.pause(*(TopicPartition(t, p) for t, p in partitions))
        self._paused_any = True

    def resume(self, partitions: set[Partition]) -> None:
        from kafka import TopicPartition

        self._consumer.resume(*(TopicPartition(t, p) for t, p in partitions))

    def group_metadata(self):
        return self._consumer.group_metadata()

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        from kafka import TopicPartition

        owned = self.assignment()
        for (topic, partition), offset in offsets.items():
            if (topic, partition) in owned:
                self._consumer.seek(TopicPartition(topic, partition), offset)

    def probe_membership(self, timeout: float = 10.0) -> None:
        """Ask the group coordinator whether it still counts us as a member of the current
        generation (a heartbeat, writing nothing); raises UnknownMemberIdError or
        IllegalGenerationError when it does not. A rebalance under way still counts us in.

        The embedded broker ignores the generation in TxnOffsetCommit (no KIP-447 fencing), so
        a worker that lost its partitions while paused must find out here, before it commits
        a transaction. Not from a rebalance callback (the IO thread it would wait on): there
        the rebalance itself tells (a member that expired gets on_partitions_lost)."""
        from kafka.errors import RebalanceInProgressError

        from stream_learner.io.retry import call_within

        if self._in_listener:
            return
        coordinator = self._consumer._coordinator
        with contextlib.suppress(RebalanceInProgressError):
            # Bounded: a broker that does not answer holds it for request_timeout_ms (30 s).
            call_within(
                lambda: coordinator._net.run(coordinator._send_heartbeat_request), max(0.1, timeout), "membership check"
            )

    def _free_parked_records(self) -> None:
        # kafka-python 3.0 parks the fetched records of a paused partition and hands them back
        # after resume() only when its in-line slot is None, but leaves a used-up batch there:
        # the parked records, and the partition (its fetches skip parked partitions), would
        # never come back. A used-up slot is an empty one; say so before each poll.
        fetcher = getattr(self._consumer, "_fetcher", None)
        in_line = getattr(fetcher, "_next_partition_records", None)
        if in_line is not None and not in_line:
            fetcher._next_partition_records = None

    def broker_contact(self) -> float | None:
        """``time.monotonic()`` when the broker last answered this consumer: a group heartbeat
        (every ``session_timeout_ms / 5`` while in the group), a fetch that brought records or
        a commit. None before the first answer."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        heartbeat = getattr(getattr(coordinator, "heartbeat", None), "last_receive", None)
        times = [t for t in (heartbeat, self._last_contact) if t is not None and t != float("-inf")]
        return max(times) if times else None

    def close(self, timeout: float | None = None) -> None:
        # close() revokes our partitions through the listener, which checkpoints and commits.
        _skip_leave_during_join(self._consumer)
        timeout_ms = None if timeout is None else max(1, int(timeout * 1000))
        self._consumer.close(autocommit=False, timeout_ms=timeout_ms)


def _skip_leave_during_join(consumer) -> None:
    """Close without a LeaveGroup while our group join is still in flight.

    Tansu 0.6.0 (``Inner<Forming>::leave`` in tansu-broker/src/coordinator/group/
    administrator.rs, unchanged at nisshi-io/nisshi 939be10) removes a member that leaves a
    group still forming but keeps it as the group's leader; the leaving member is then never
    expired (it is no longer a member), every later joiner is told that leader and its
    SyncGroup is refused with REBALANCE_IN_PROGRESS, and the group never gets an assignment.
    A member that simply goes silent is expired after the session timeout and the group
    forms again, so while a join is pending we drop our member id locally: kafka-python's
    close then sends no LeaveGroup (a member that completed its join leaves as usual).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not getattr(coordinator, "_use_group_apis", False):
        return
    from kafka.coordinator.base import MemberState

    if coordinator.state is not MemberState.STABLE and coordinator._generation.has_member_id():
        log.info(
            "stopping during the group join: not leaving the group (the broker expires this "
            "member after the session timeout instead)"
        )
        coordinator.reset_generation()


try:  # the listener needs kafka-python; the in-memory parts above do not
    from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
except ImportError:  # pragma: no cover
    AsyncConsumerRebalanceListener = object


class _Listener(AsyncConsumerRebalanceListener):
    def __init__(self, source: KafkaSource):
        self.source = source

    @property
    def _coordinator(self):
        return self.source._consumer._coordinator

    async def on_partitions_revoked(self, revoked):
        from kafka.structs import OffsetAndMetadata

        partitions = {(tp.topic, tp.partition) for tp in revoked}
        if not partitions:
            return
        self.source._in_listener = True
        try:
            offsets = self.source.handler.partitions_revoked(partitions)
        finally:
            self.source._in_listener = False
        by_tp = {tp: offsets[(tp.topic, tp.partition)] for tp in revoked if (tp.topic, tp.partition) in offsets}
        if not by_tp:
            return
        try:
            # The public commit() blocks on the IO thread we are running on; await the
            # coroutine it wraps instead.
            metadata = commit_metadata(self.source.handler)
            await self._coordinator._commit_offsets_sync_async(
                {tp: OffsetAndMetadata(offset, metadata, -1) for tp, offset in by_tp.items()}
            )
        except Exception as error:  # the checkpoint has them; the next owner may re-read some
            log.warning("commit on revoke failed (%s); the next owner may re-read records", error)
        else:
            log.info("committed offsets on revoke: %s", _fmt(by_tp))

    async def on_partitions_assigned(self, assigned):
        if not assigned:
            self.source.handler.partitions_assigned(set(), {})
            return
        try:
            committed = await self._coordinator.fetch_committed_offsets_async(set(assigned), timeout_ms=10_000)
        except Exception as error:  # our checkpoint still says where to start
            log.warning("could not read committed offsets (%s); using the checkpoint's", error)
            committed = {}
        by_name = {(tp.topic, tp.partition): tp for tp in assigned}
        known = {
            (tp.topic, tp.partition): (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None)
            for tp in assigned
        }
        # (The embedded Tansu broker hands back every commit's metadata as null; Kafka keeps it.)
        metadata = {(tp.topic, tp.partition): committed[tp].metadata for tp in assigned if tp in committed}
        seeks = assign_with_metadata(self.source.handler, set(by_name), known, metadata)
        for name, offset in seeks.items():
            if name in by_name:
                self.source._consumer.seek(by_name[name], offset)
        reset = self.source._consumer.config.get("auto_offset_reset", "earliest")
        log.info("assigned %s; starting at %s", sorted(by_name), describe_starts(by_name, seeks, reset, known))

    async def on_partitions_lost(self, lost):
        self.source._in_listener = True
        try:
            self.source.handler.partitions_lost({(tp.topic, tp.partition) for tp in lost})
        finally:
            self.source._in_listener = False


def commit_metadata(handler) -> str:
    """The metadata string of a commit: who committed (the worker's ``commit_metadata``)."""
    return str(getattr(handler, "commit_metadata", "") or "")


def assign_with_metadata(handler, partitions, committed, metadata):
    """``handler.partitions_assigned``, with the committed offsets' metadata if it takes them."""
    try:
        return handler.partitions_assigned(partitions, committed, metadata=metadata)
    except TypeError as error:
        if "metadata" not in str(error):
            raise
        return handler.partitions_assigned(partitions, committed)


def describe_starts(partitions, seeks: Mapping, reset: str, committed: Mapping | None = None) -> str:
    """Where reading starts on each partition, in words: ``t[0] at 1200`` where we seek,
    ``t[2] at 900 (committed)`` where the group's committed offset decides, ``t[1] from the
    earliest (no committed offset)`` where the consumer's reset policy does.

    >>> describe_starts([("t", 1), ("t", 0), ("t", 2)], {("t", 0): 1200}, "earliest", {("t", 2): 900})
    't[0] at 1200, t[1] from the earliest (no committed offset), t[2] at 900 (committed)'
    """
    committed = committed or {}
    words = []
    for topic, partition in sorted(partitions, key=lambda tp: (str(tp[0]), tp[1])):
        offset = seeks.get((topic, partition))
        if offset is not None:
            words.append(f"{topic}[{partition}] at {offset}")
        elif committed.get((topic, partition)) is not None:
            words.append(f"{topic}[{partition}] at {committed[(topic, partition)]} (committed)")
        else:
            words.append(f"{topic}[{partition}] from the {reset} (no committed offset)")
    return ", ".join(words) or "nothing"


def _fmt(offsets) -> str:
    items = []
    for tp, offset in sorted(offsets.items(), key=lambda item: (str(item[0]),)):
        topic, partition = (tp.topic, tp.partition) if hasattr(tp, "topic") else tp
        items.append(f"{topic}[{partition}]={offset}")
    return ", ".join(items) or "-"


class SourceError(RuntimeError):
    """The source cannot go on (its consumer process has died); restart from the checkpoint."""


class ProcessSource:
    """A :class:`KafkaSource` running in a child process, so consuming uses the second core.

    kafka-python parses every fetched record in Python and runs its network loop on a thread
    of its own; in the worker's process both take GIL time from the learners. Here a child
    interpreter owns the consumer: it polls ahead (at most ``prefetch`` batches the worker has
    not taken yet) and sends each batch as plain tuples down a socket pair.

    The semantics are :class:`KafkaSource`'s. Commits are manual: :meth:`commit` asks the
    child to commit. The child forwards every rebalance callback in order with the batches and
    waits for the answer: the worker first takes every batch sent before the callback, then its
    handler checkpoints (revoke) or says where to start (assign), and the child commits or seeks.
    Records of a revoked or lost partition that were fetched ahead but not yet handed to the
    worker are dropped, never processed after the revoke: the offsets the worker commits on
    revoke (its processed position) make the next owner read them again.

    :meth:`lag` and :meth:`assignment` answer from what the child last sent (highwater marks
    with every batch, the assignment as the callbacks arrive). If the child dies, :meth:`poll`
    raises :class:`SourceError`; nothing more can be committed and a restart resumes from the
    last checkpoint.
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
        prefetch: int = 2,
        startup_timeout: float = 120.0,
    ):
        import collections

        self.topics = list(topics)
        self.handler = handler
        self.prefetch = prefetch
        self._inbox: collections.deque = collections.deque()
        self._assignment: set[Partition] = set()
        self._highwaters: dict[Partition, int] = {}
        self._resume: dict[Partition, int] = {}
        self._contact: float | None = None  # when the child's consumer last heard the broker
        self._closed = False
        self._failed: str | None = None
        self._process, self._conn = spawn("stream_learner.io.sources")
        options = {
            "topics": self.topics,
            "bootstrap_servers": bootstrap_servers,
            "group_id": group_id,
            "max_poll_records": max_poll_records,
            "session_timeout_ms": session_timeout_ms,
            "auto_offset_reset": auto_offset_reset,
            "client_options": dict(client_options or {}),
        }
        try:
            self._conn.send((options, prefetch, logging.getLogger().level))
            reply = self._conn.recv() if self._conn.poll(startup_timeout) else ("error", None)
        except (OSError, EOFError):
            reply = ("error", None)
        if reply[0] != "ready":
            self._stop_process(timeout=1.0)
            error = reply[1]
            if isinstance(error, BaseException):
                raise error  # e.g. NoBrokersAvailable: the caller retries
            raise SourceError(f"the consumer process did not start ({error or self._exit_status()})")

    @property
    def pid(self) -> int:
        return self._process.pid

    # -- the worker's side of the pipe -------------------------------------------------

    def _exit_status(self) -> str:
        code = self._process.poll()
        return "still running" if code is None else f"exit code {code}"

    def _died(self) -> SourceError:
        self._failed = self._failed or f"the consumer process has stopped ({self._exit_status()})"
        return SourceError(f"{self._failed}; restart the worker: it resumes from its last checkpoint")

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except (OSError, EOFError, ValueError):
            raise self._died() from None

    def _read_available(self, timeout: float) -> None:
        """Move what the child sent into the inbox, waiting up to ``timeout`` for the first."""
        try:
            ready = self._conn.poll(timeout)
            while ready:
                self._receive(self._conn.recv())
                ready = self._conn.poll(0)
        except (OSError, EOFError, ValueError):
            raise self._died() from None

    def _receive(self, item) -> None:
        kind = item[0]
        if kind in ("revoked", "lost"):
            # Fetched ahead, not handed to the worker yet: never processed after the revoke.
            gone = item[1]
            for index, queued in enumerate(self._inbox):
                if queued[0] != "batch":
                    continue
                kept = []
                for group in queued[1]:
                    tp = (group[0], group[1])
                    if tp not in gone:
                        kept.append(group)
                    elif kind == "revoked" and group[2]:
                        # kafka-python keeps the position of a partition assigned again
                        # right away; it must go back to the first record dropped.
                        self._resume.setdefault(tp, group[2][0][0])
                self._inbox[index] = ("batch", kept, queued[2])
        self._inbox.append(item)

    def poll(self, timeout: float) -> list[Message]:
        if self._closed:
            raise RuntimeError("source is closed")
        if self._failed:
            raise self._died()
        deadline = time.monotonic() + timeout
        self._read_available(0)
        while True:
            while self._inbox:
                item = self._inbox.popleft()
                if item[0] == "batch":
                    self._send(("ack",))  # a credit: the child may fetch one more batch
                    self._highwaters.update(item[2])
                    self._contact = time.monotonic()
                    messages = [
                        Message(topic, partition, offset, key, value, timestamp, headers)
                        for topic, partition, records in item[1]
                        for offset, key, value, timestamp, headers in records
                    ]
                    if messages:
                        return messages
                else:
                    self._callback(item)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._read_available(remaining)

    def _callback(self, item) -> None:
        kind, argument = item[0], item[1]
        if kind == "state":
            self._highwaters.update(argument)
            if len(item) > 2 and item[2] is not None:
                self._contact = max(self._contact or item[2], item[2])  # one clock for all processes
            return
        if kind == "error":  # the child's poll failed (broker trouble): the worker backs off
            raise argument
        answer = None
        try:
            if kind == "revoked":
                self._assignment -= argument
                answer = (dict(self.handler.partitions_revoked(argument) or {}), commit_metadata(self.handler))
            elif kind == "assigned":
                self._assignment |= argument
                answer = dict(assign_with_metadata(self.handler, argument, item[2], item[3]) or {})
                for tp, offset in self._resume.items():
                    if tp in argument:
                        answer.setdefault(tp, offset)  # the handler's seek knows better
                self._resume.clear()
            elif kind == "lost":
                self._assignment -= argument
                self.handler.partitions_lost(argument)
        except Exception:  # as kafka-python does with a failing listener: log, go on
            log.exception("rebalance handler failed on %s %s", kind, sorted(argument))
        self._send(("answer", answer))

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Ask the child to commit (it commits only partitions it owns, as KafkaSource does)."""
        if self._failed:
            return  # poll has said so: nothing can be committed any more
        if self._closed:
            raise RuntimeError("source is closed")
        if offsets:
            self._send(("commit", dict(offsets), commit_metadata(self.handler)))

    def assignment(self) -> set[Partition]:
        return set(self._assignment)

    def broker_contact(self) -> float | None:
        """As :meth:`KafkaSource.broker_contact`, as the child last reported it."""
        return self._contact

    def lag(self, positions: Mapping[Partition, int]) -> dict[Partition, int]:
        return {
            tp: max(0, self._highwaters[tp] - positions[tp])
            for tp in self._assignment
            if tp in positions and self._highwaters.get(tp) is not None
        }

    def close(self, timeout: float = 60.0) -> None:
        """The child closes its consumer: the revoke comes back to the handler, which commits.
        Bounded by ``timeout`` in all: a child still closing then is killed."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        if not self._failed:
            try:
                self._conn.send(("close", max(0.1, timeout * 0.8)))
                while time.monotonic() < deadline:
                    if self._inbox:
                        item = self._inbox.popleft()
                    elif self._conn.poll(max(0.0, deadline - time.monotonic())):
                        item = self._conn.recv()
                    else:
                        break
                    if item[0] == "closed":
                        break
                    if item[0] in ("revoked", "lost", "assigned"):
                        self._callback(item)
                    # batches fetched ahead are dropped: the revoke commits what was processed
            except (OSError, EOFError, ValueError):
                pass
        self._stop_process(timeout=max(0.1, min(10.0, deadline - time.monotonic())))

    def _stop_process(self, timeout: float) -> None:
        import subprocess

        self._conn.close()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class _ForwardingHandler:
    """In the consumer process: each rebalance callback goes to the worker, which answers."""

    def __init__(self, child: _ConsumerProcess):
        self.child = child
        self.commit_metadata = ""  # the worker's, as of its last commit or revoke answer

    def partitions_revoked(self, partitions):
        answer = self.child.ask(("revoked", set(partitions)))
        if not answer:
            return {}
        offsets, self.commit_metadata = answer
        return offsets

    def partitions_assigned(self, partitions, committed, metadata=None):
        return self.child.ask(("assigned", set(partitions), dict(committed), dict(metadata or {}))) or {}

    def partitions_lost(self, partitions):
        self.child.ask(("lost", set(partitions)))


class _ConsumerProcess:
    """The child of :class:`ProcessSource`: a KafkaSource driven by messages on a socket.

    Its main thread polls the consumer and sends batches; a reader thread takes the worker's
    messages (credits, commits, close, answers to callbacks). Callbacks run on kafka-python's
    IO thread while the main thread is inside ``poll`` or ``close``; they send their question
    and wait for the answer.
    """

    _EOF = ("eof",)

    def __init__(self, conn):
        import queue

        self.conn = conn
        self.commands: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self.send_lock = threading.Lock()
        self.worker_gone = False

    def send(self, message) -> bool:
        if self.worker_gone:
            return False
        try:
            with self.send_lock:
                self.conn.send(message)
            return True
        except (OSError, EOFError, ValueError):
            self.worker_gone = True
            return False

    def ask(self, question):
        if not self.send(question):
            return None  # the worker is gone: commit nothing, seek nowhere
        answer = self.answers.get()
        return None if answer is self._EOF else answer[1]

    def read(self) -> None:
        while True:
            try:
                item = self.conn.recv()
            except (OSError, EOFError):
                self.worker_gone = True
                self.answers.put(self._EOF)
                self.commands.put(self._EOF)
                return
            (self.answers if item[0] == "answer" else self.commands).put(item)

    def run(self, options: dict, prefetch: int) -> None:
        import queue

        from kafka.errors import KafkaError

        from stream_learner.io.retry import Backoff, auth_failure

        try:
            source = KafkaSource(handler=_ForwardingHandler(self), **options)
        except Exception as error:  # what lies behind a bootstrap timeout, e.g. a refused SASL mechanism
            self.send(("error", _picklable(auth_failure(error))))
            return
        self.send(("ready", None))
        threading.Thread(target=self.read, name="stream-learner-worker-pipe", daemon=True).start()
        consumer = source.consumer
        in_flight = 0  # batches sent that the worker has not taken yet
        backoff, retry_at = Backoff(0.5, 15.0, jitter="decorrelated"), 0.0
        last_state = time.monotonic()
        while True:
            now = time.monotonic()
            full = in_flight >= prefetch
            wait = 0.5 if full else max(0.0, retry_at - now)
            try:  # the worker's messages first; block only while there is nothing to fetch
                command = self.commands.get(timeout=wait) if wait > 0 else self.commands.get_nowait()
            except queue.Empty:
                command = None
            if command is not None:
                if command[0] == "ack":
                    in_flight -= 1
                elif command[0] == "commit":
                    try:
                        source.handler.commit_metadata = command[2]
                        source.commit(command[1])
                    except Exception as error:  # the checkpoint holds them: commit next time
                        log.warning("offset commit failed (will retry at the next checkpoint): %s", error)
                elif command[0] in ("close", "eof"):
                    try:  # the revoke goes to the worker (if alive), which commits
                        source.close(command[1] if len(command) > 1 else None)
                    except Exception as error:  # the broker is away: nothing more to do
                        log.warning("consumer closed uncleanly: %s", error)
                    finally:
                        self.send(("closed", None))
                    return
                continue
            if full or time.monotonic() < retry_at:
                continue
            try:
                batches = consumer.poll(timeout_ms=100)
            except KafkaError as error:  # broker trouble: tell the worker, back off, try again
                self.send(("error", _picklable(error)))
                retry_at = time.monotonic() + backoff.next()
                continue
            backoff.reset()
            now = time.monotonic()
            if batches:
                self.send(("batch", _as_tuples(batches), self._highwaters(consumer)))
                in_flight += 1
                last_state = now
            elif now - last_state >= 1.0:  # idle: keep the worker's lag figures current
                self.send(("state", self._highwaters(consumer), source.broker_contact()))
                last_state = now

    @staticmethod
    def _highwaters(consumer) -> dict[Partition, int]:
        marks = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                marks[(tp.topic, tp.partition)] = highwater
        return marks


def _as_tuples(batches) -> list:
    """kafka-python's records as ``[(topic, partition, [(offset, key, value, ts, headers)])]``."""
    groups = []
    for tp in sorted(batches, key=lambda tp: (tp.topic, tp.partition)):
        records = [
            (
                r.offset,
                r.key,
                r.value,
                r.timestamp / 1000.0 if r.timestamp is not None and r.timestamp >= 0 else None,
                tuple((k, v) for k, v in (r.headers or ())),
            )
            for r in batches[tp]
        ]
        groups.append((tp.topic, tp.partition, records))
    return groups


def _picklable(error: BaseException) -> BaseException:
    """The error itself if it survives the pipe, else a KafkaError saying what it was."""
    import pickle

    from kafka.errors import KafkaError

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return KafkaError(f"{type(error).__name__}: {error}")


def _consumer_process(fd: int) -> None:
    started = start_child(fd)
    if started is None:
        return
    conn, (options, prefetch, _) = started
    _ConsumerProcess(conn).run(options, prefetch)


if __name__ == "__main__":  # the consumer process of ProcessSource
    import sys

    # From the module by its own name, so log lines say stream_learner.io.sources, not __main__.
    from stream_learner.io.sources import _consumer_process as run_consumer_process

    run_consumer_process(int(sys.argv[1]))
