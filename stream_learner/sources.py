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

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

__all__ = [
    "Message",
    "Partition",
    "RebalanceHandler",
    "Source",
    "MemorySource",
    "KafkaSource",
    "SourceUnavailable",
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


class Source(Protocol):
    def poll(self, timeout: float) -> list[Message]: ...

    def commit(self, offsets: Mapping[Partition, int]) -> None: ...

    def assignment(self) -> set[Partition]: ...

    def lag(self, positions: Mapping[Partition, int]) -> dict[Partition, int]: ...

    def close(self) -> None: ...


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
    ):
        from kafka import KafkaConsumer
        from kafka.coordinator.assignors.range import RangePartitionAssignor

        self.topics = list(topics)
        self.handler = handler
        self.commit_timeout_ms = 5000  # a broker that does not answer must not stall the loop
        self._lock = threading.Lock()
        options = dict(client_options or {})
        # Range assignment gives the same partition numbers of co-partitioned topics (records
        # and their late labels, both keyed by id) to the same worker.
        options.setdefault("partition_assignment_strategy", [RangePartitionAssignor])
        # The broker may hold an empty fetch this long: it bounds the latency of a quiet stream.
        options.setdefault("fetch_max_wait_ms", 100)
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
        return messages

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        owned = self.assignment()
        # Never commit for a partition another worker owns now: that would move its offset.
        wanted = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in offsets.items()
            if (topic, partition) in owned
        }
        if wanted:
            self._consumer.commit(wanted, timeout_ms=self.commit_timeout_ms)

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

    def close(self) -> None:
        # close() revokes our partitions through the listener, which checkpoints and commits.
        self._consumer.close(autocommit=False)


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
        offsets = self.source.handler.partitions_revoked(partitions)
        by_tp = {tp: offsets[(tp.topic, tp.partition)] for tp in revoked if (tp.topic, tp.partition) in offsets}
        if not by_tp:
            return
        try:
            # The public commit() blocks on the IO thread we are running on; await the
            # coroutine it wraps instead.
            await self._coordinator._commit_offsets_sync_async(
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in by_tp.items()}
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
        seeks = self.source.handler.partitions_assigned(set(by_name), known)
        for name, offset in seeks.items():
            if name in by_name:
                self.source._consumer.seek(by_name[name], offset)
        log.info("assigned %s; starting at %s", sorted(by_name), _fmt(seeks))

    async def on_partitions_lost(self, lost):
        self.source.handler.partitions_lost({(tp.topic, tp.partition) for tp in lost})


def _fmt(offsets) -> str:
    items = []
    for tp, offset in sorted(offsets.items(), key=lambda item: (str(item[0]),)):
        topic, partition = (tp.topic, tp.partition) if hasattr(tp, "topic") else tp
        items.append(f"{topic}[{partition}]={offset}")
    return ", ".join(items) or "-"
