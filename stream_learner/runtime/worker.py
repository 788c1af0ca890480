"""``stream-learner run``: the long-running Kafka worker.

The data flow, top to bottom:

    source (Kafka) → decode → StreamProcessor (tokenize, predict, learn, drift)
        → outputs (predictions, dead letters, drift events) → checkpoint → commit

Exactly-once learning: the worker stores, for every partition, the offset of the *next*
message to read, and advances it only after a message is fully handled (learned, predicted
or dead-lettered). Every N records or T seconds, on a rebalance and on shutdown, it

1. flushes the outputs (delivery confirmed),
2. writes a signed checkpoint: processor state + those offsets, atomically,
3. commits the same offsets to Kafka.

On start the newest valid checkpoint is loaded and the consumer seeks to its offsets, so after
a crash the learners continue exactly where the checkpoint left them. Outputs are
at-least-once (keyed by record id), or exactly-once with ``--processing-guarantee exactly-once``:
each cycle is then one Kafka transaction holding the outputs and the offsets, with a pending
checkpoint made final once it commits (docs/exactly-once.md). Bad input is data: every message ends up either handled or
in the dead-letter topic with its reason, and its offset is committed like any other.

Rebalances: on revoke the worker checkpoints and commits; on assign it seeks to its
checkpointed offset, except for a partition it handed over earlier in this run, where it takes
the later of its checkpoint and the committed offset (another worker moved it on).

Fallbacks: when the newest checkpoints are corrupt and an older one is loaded, every partition
a lost checkpoint covered is re-read from the loaded checkpoint's offset, or, if it lacks the
partition, from where this worker began reading it (the checkpoint manifest), whatever was
committed since: nothing learned after the fallback point is lost. Every commit carries
``{"worker": id, "store": checkpoint directory's identity, "checkpoint": sequence}`` as its
metadata, so that without the manifest a worker still tells its own later commits (re-read
from the beginning) from another worker's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from stream_learner.core.processor import LearnerFailure, Outcome, RecordRejected, StreamProcessor
from stream_learner.core.records import DecodeError, Decoder, Reason, Record
from stream_learner.io.logs import quiet_kafka_client_logs
from stream_learner.io.retry import Backoff, FatalBrokerError, fatal_message, is_fatal, retry
from stream_learner.io.retry import describe as _describe
from stream_learner.io.sinks import Outputs, Sink, SinkError, TransactionAbortable, TransactionFatal
from stream_learner.io.sources import Message, Partition, Source, SourceError, SourceUnavailable
from stream_learner.learners.registry import LearnerError, check_learner
from stream_learner.runtime.alignment import PartitionAlignment
from stream_learner.runtime.config import (
    ConfigError,
    WorkerConfig,
    add_config_arguments,
    config_from_args,
    worker_id,
)
from stream_learner.state.checkpoint import (
    CheckpointError,
    CheckpointRefused,
    CheckpointStore,
    DirectoryLock,
    resolve_key,
)
from stream_learner.state.schema import StateError
from stream_learner.state.unpickle import UnpicklingRefused, module_of_factory

if TYPE_CHECKING:
    from stream_learner.fusion.rounds import FusionRounds

__all__ = ["Worker", "build_processor", "read_state", "run_worker", "add_run_parser"]

log = logging.getLogger(__name__)

# What a checkpoint's payload is. 2: plain data from the objects' state_dict() (the
# processor's, the fusion's), no pickled class of ours; 1: the pickled StreamProcessor (read
# through the restricted unpickler, which maps moved modules). See docs/checkpoints.md.
STATE_FORMAT = 2
READABLE_STATE_FORMATS = (1, 2)
_FUSION_STRIDE = 50  # records between two looks at the fusion clock inside a batch


class _NoMetrics:
    """Stands in for :class:`~stream_learner.runtime.metrics.StreamMetrics` when metrics are off."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Worker:
    """Joins a source, the processor, the outputs and the checkpoint store.

    It is also the source's rebalance handler. Offsets are ``{(topic, partition): next}``.

    Parameters
    ----------
    processor
        The learners (a :class:`~stream_learner.core.processor.StreamProcessor`).
    outputs
        Where predictions and dead letters go.
    store
        Checkpoint store, or None for no checkpoints (tests of the loop alone).
    offsets, counts
        Restored from a checkpoint.
    fusion
        Fusion rounds with the group's other workers
        (:class:`~stream_learner.fusion.rounds.FusionRounds`; None: off).
    mini_batch
        Above 1: records go through the processor this many at a time
        (:meth:`~stream_learner.core.processor.StreamProcessor.process_many`), for throughput.
    alignment
        Event-time alignment of the partitions
        (:class:`~stream_learner.runtime.alignment.PartitionAlignment`; None: off).

    """

    def __init__(
        self,
        processor: StreamProcessor,
        outputs: Outputs,
        store: CheckpointStore | None = None,
        *,
        decoder: Decoder | None = None,
        offsets: Mapping[Partition, int] | None = None,
        counts: Mapping[str, int] | None = None,
        checkpoint_every_records: int = 100_000,
        checkpoint_every_seconds: float = 30.0,
        flush_timeout: float = 10.0,
        metrics=None,
        readiness=None,
        broker=None,
        fusion: FusionRounds | None = None,
        mini_batch: int = 0,
        alignment: PartitionAlignment | None = None,
        name: str = "",
        rewind: Mapping[Partition, int] | None = None,
        loaded_sequence: int = 0,
        exactly_once: bool = False,
        reload: Callable[[], tuple] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.processor = processor
        self.outputs = outputs
        self.store = store
        self.decoder = decoder or Decoder()
        self.offsets: dict[Partition, int] = dict(offsets or {})
        self.counts: collections.Counter[str] = collections.Counter(counts or {})
        self.checkpoint_every_records = checkpoint_every_records
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self.flush_timeout = flush_timeout
        self.metrics = metrics or _NoMetrics()
        self.readiness = readiness
        self.broker = broker  # a metrics.BrokerHealth: when the broker last answered
        self._deadline: float | None = None  # time.monotonic() by which the shutdown must end
        self._stopping = False
        self._flush_abandoned = False  # the shutdown's checkpoint failed: do not wait again
        self.fusion = fusion
        self.mini_batch = mini_batch
        self.alignment = alignment
        self.clock = clock
        self.source: Source | None = None
        self.metrics_url: str | None = None
        self.fatal_error: BaseException | None = None  # the producer was refused for good
        self.lag = 0
        self.owned: set[Partition] = set()
        self._handed_over: set[Partition] = set()
        self._since_checkpoint = 0
        self._folded = False
        self._last_checkpoint = clock()
        self._checkpointed_offsets: dict[Partition, int] = dict(self.offsets)
        # This batch's per-record times, for the latency histogram (not kept without metrics).
        self._record_seconds: list[float] | None = None if metrics is None else []
        self.name = name
        # Partitions lost checkpoints covered and the loaded one lacks: where to re-read them.
        self.rewind: dict[Partition, int] = dict(rewind or {})
        self.loaded_sequence = loaded_sequence
        self.saved_sequence = loaded_sequence
        self.started: dict[Partition, int] = {}  # where this worker began reading a partition
        # Exactly-once (docs/exactly-once.md): each cycle is one transaction of the sink.
        self.exactly_once = exactly_once
        self.reload = reload  # () -> (processor, offsets, counts) of the last final checkpoint
        self._transaction_open = False
        self._group_offsets: dict[Partition, int] = {}  # what the group holds for owned partitions
        self._replay_until: dict[Partition, int] = {}  # below it, outputs were committed already

    # -- one message ---------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Decode, process and emit one message, then advance its partition's offset."""
        started = time.perf_counter()
        try:
            record = self._record(message)
            result = self.processor.process(record, now=self._event_time(record, message))
        except DecodeError as error:
            self._dead_letter(message, error.reason, error.detail)
        except LearnerFailure as failure:
            self._learner_failed(message, failure)
        except Exception as error:  # a bug or an odd record: keep the stream going, keep it
            self._unexpected(message, error)
        else:
            self._emit(message, record, result, started)
        self._done(message)
        if self._record_seconds is not None:
            self._record_seconds.append(time.perf_counter() - started)

    def handle_many(self, messages: list[Message]) -> None:
        """Decode, process and emit messages as one mini-batch (``StreamProcessor.process_many``:
        all predicted, then the labelled ones learned), then advance their offsets."""
        started = time.perf_counter()
        decoded: list[tuple[Message, Record]] = []
        for message in messages:
            try:
                decoded.append((message, self._record(message)))
            except DecodeError as error:
                self._dead_letter(message, error.reason, error.detail)
        try:
            results = self.processor.process_many(
                [record for _, record in decoded],
                [self._event_time(record, message) for message, record in decoded],
            )
        except Exception as error:  # a bug: keep the stream going, keep the records
            results = [error] * len(decoded)
        for (message, record), result in zip(decoded, results, strict=True):
            if isinstance(result, LearnerFailure):
                self._learner_failed(message, result)
            elif isinstance(result, Exception):
                self._unexpected(message, result)
            else:
                self._emit(message, record, result, started)
        for message in messages:
            self._done(message)
        # Records of a mini-batch are learned in one step: each is charged an equal share.
        if self._record_seconds is not None:
            share = (time.perf_counter() - started) / max(len(messages), 1)
            self._record_seconds.extend([share] * len(messages))

    def _event_time(self, record: Record, message: Message) -> float | None:
        when = _event_time(record, message)
        if self.alignment is not None:
            self.alignment.saw(message.tp, when)
        return when

    def _replayed(self, message: Message) -> bool:
        """Exactly-once: a record whose outputs a committed transaction already holds (re-read
        after falling back to an older checkpoint): learned again, not written again."""
        until = self._replay_until.get(message.tp)
        return until is not None and message.offset < until

    def _emit(self, message: Message, record: Record, result, started: float) -> None:
        self.counts[str(result.outcome)] += 1
        if self._replay_until and self._replayed(message):
            for event in result.drift_events:
                self.metrics.drift_detected(event.learner, event.detector, event.time)
            return
        if result.prediction is not None and result.outcome in (Outcome.LEARNED, Outcome.PREDICTED):
            self.outputs.prediction(
                record.id,
                result.prediction,
                model_version=self.processor.model_version,
                latency_seconds=time.perf_counter() - started,
                message=message,
            )
        for event in result.drift_events:
            log.info("drift: learner %s at record %d (%s)", event.learner, event.position, event.detector)
            self.outputs.drift_event(event, message=message)
            self.metrics.drift_detected(event.learner, event.detector, event.time)

    def _learner_failed(self, message: Message, failure: LearnerFailure) -> None:
        if isinstance(failure, RecordRejected):  # bad input, not a fault: the dead letter says it
            self._dead_letter(message, failure.reason, failure.detail)
            return
        log.warning("learner error at %s[%d]@%d: %s", message.topic, message.partition, message.offset, failure.detail)
        self._dead_letter(message, failure.reason, failure.detail)

    def _unexpected(self, message: Message, error: BaseException) -> None:
        log.error(
            "unexpected error at %s[%d]@%d", message.topic, message.partition, message.offset,
            exc_info=(type(error), error, error.__traceback__),
        )
        self._dead_letter(message, Reason.LEARNER_ERROR, f"{type(error).__name__}: {error}")

    def _done(self, message: Message) -> None:
        self.counts["messages"] += 1
        self.offsets[message.tp] = message.offset + 1  # the NEXT message to read
        self._since_checkpoint += 1

    def _record(self, message: Message) -> Record:
        record = self.decoder.decode(message.value)
        if record.truncated_from is not None:  # --on-oversize truncate
            self.counts["text_truncated"] += 1
            self.metrics.text_truncated()
        if record.ts_error is not None:
            # An unreadable timestamp costs the record its event time, not its place.
            self.counts["timestamp_dropped"] += 1
            log.debug("timestamp dropped at %s[%d]@%d: %s", message.topic, message.partition, message.offset, record.ts_error)
        if record.id is None:
            # Plain text or JSON without an id: the message key, else its coordinates.
            if message.key:
                try:
                    record_id = message.key.decode("utf-8")
                except UnicodeDecodeError:
                    record_id = message.key.hex()
            else:
                record_id = f"{message.topic}/{message.partition}/{message.offset}"
            record = dataclasses.replace(record, id=record_id)
        return record

    def _dead_letter(self, message: Message, reason, detail: str) -> None:
        if not (self._replay_until and self._replayed(message)):
            self.outputs.dead_letter(message, str(reason), detail)
        self.counts["dead_lettered"] += 1
        self.counts[f"dead_lettered:{reason}"] += 1
        self.metrics.dead_lettered(str(reason))

    # -- batches and checkpoints ---------------------------------------------------------

    def process_batch(self, messages: list[Message]) -> None:
        started = time.perf_counter()
        before = collections.Counter(self.counts)
        predictions_before = self.outputs.predictions
        if self.exactly_once and messages and not self._transaction_open:
            self.outputs.sink.begin_transaction()  # TransactionFatal: the worker exits
            self._transaction_open = True
        size = self.mini_batch if self.mini_batch > 1 else None
        if self.fusion is None and size is None:
            for message in messages:
                self.handle(message)
        else:
            # Fusion rounds may fall inside a batch: how far peers lag behind is bounded by
            # the cadence, not by the batch size.
            stride = size or _FUSION_STRIDE
            for start in range(0, len(messages), stride):
                part = messages[start : start + stride]
                if size is None:
                    for message in part:
                        self.handle(message)
                else:
                    self.handle_many(part)
                if self.fusion is not None:
                    self.fusion.processed(len(part))
                    if self.fusion.due():
                        self.fusion_round()
        if self.alignment is not None:
            self.alignment.gave(message.tp for message in messages)
        self.outputs.sink.dispatch()
        seconds = time.perf_counter() - started
        try:
            self._observe(messages, before, predictions_before, seconds)
        finally:
            if self._record_seconds is not None:
                self._record_seconds.clear()

    def _observe(self, messages, before, predictions_before, seconds) -> None:
        if messages:
            delta = self.counts - before
            self.metrics.record_outcomes({o.value: delta.get(o.value, 0) for o in Outcome})
            self.metrics.observe_batch(len(messages), seconds, self._record_seconds)
            self.metrics.predictions_produced(self.outputs.predictions - predictions_before)
            now = time.time()
            self.metrics.observe_end_to_end_delay(
                [now - m.timestamp for m in messages if m.timestamp is not None]
            )

    def checkpoint_due(self) -> bool:
        if self._since_checkpoint == 0:
            return False
        return (
            self._since_checkpoint >= self.checkpoint_every_records
            or self.clock() - self._last_checkpoint >= self.checkpoint_every_seconds
        )

    def checkpoint(self, reason: str = "periodic") -> bool:
        """Flush outputs, save a checkpoint, commit. False (state kept) if any step failed."""
        if self.fatal_error is not None:  # the producer was refused for good: the worker is stopping
            return False
        if self.exactly_once:
            return self._end_transaction(reason)
        started = time.perf_counter()
        if self._flush_abandoned:
            return False  # the broker is away and the shutdown is bounded: do not wait again
        if self._deadline is not None and self._time_for(self.flush_timeout) <= 0:
            log.warning("checkpoint (%s) skipped: no time left within --shutdown-timeout", reason)
            return False
        try:
            self.outputs.sink.flush(self._time_for(self.flush_timeout))
        except SinkError as error:
            if self.broker is not None:
                self.broker.failed("output flush", error)
            if reason == "shutdown":
                log.warning("checkpoint at shutdown not written: %s; a restart resumes from the last one", error)
            else:
                log.warning("checkpoint (%s) postponed: %s", reason, error)
            self.metrics.checkpoint_failed()
            return False
        except FatalBrokerError as error:  # credentials or ACLs: no output can be confirmed, ever
            self.metrics.checkpoint_failed()
            self.fatal_error = error
            raise
        finally:
            self._count_output_errors()
        if self.store is not None and (self._since_checkpoint or self._folded or not self.store.paths()):
            try:
                path = self.store.save(
                    self.state(),
                    self.offsets,
                    info={"reason": reason, "messages": self.counts["messages"], "worker": self.name},
                    started=self.started,
                )
                self.saved_sequence = self.store.last_sequence
            except Exception as error:  # disk full, a learner that cannot be pickled, ...
                log.error("checkpoint (%s) failed, state kept, will retry: %s", reason, _describe(error))
                self.metrics.checkpoint_failed()
                return False
            log.debug("checkpoint %s (%s) after %d messages", path.name, reason, self.counts["messages"])
            self.metrics.checkpoint_succeeded(time.perf_counter() - started, time.time())
        self._checkpointed_offsets = dict(self.offsets)
        self._since_checkpoint = 0
        self._folded = False
        self._last_checkpoint = self.clock()
        if self.fusion is not None and reason == "shutdown":
            # The last snapshot is the checkpoint's state: it covers exactly the offsets committed.
            self.publish_snapshots(full=True)
            self.publish_tombstones()
        return True

    # -- exactly-once: one transaction per cycle (docs/exactly-once.md) ----------------------

    def _end_transaction(self, reason: str) -> bool:
        """Flush the transaction's outputs, check that the group still has us, save the
        checkpoint as pending, commit outputs and offsets in the transaction, mark the
        checkpoint final. False when postponed (the transaction stays open) or aborted."""
        if not self._transaction_open:  # nothing read since the last cycle
            self._since_checkpoint = 0
            self._last_checkpoint = self.clock()
            return True
        if self._flush_abandoned:
            return False
        if self._deadline is not None and self._time_for(self.flush_timeout) <= 0:
            log.warning("transaction (%s) not committed: no time left within --shutdown-timeout", reason)
            return False
        started = time.perf_counter()
        sink = self.outputs.sink
        offsets = {tp: o for tp, o in self.offsets.items() if tp in self.owned}
        try:
            try:
                sink.flush(self._time_for(self.flush_timeout))
            finally:
                self._count_output_errors()
            self._probe_membership()
        except TransactionAbortable as error:
            return self._abort_transaction(reason, error)
        except SinkError as error:  # the broker is slow or away: the transaction stays open
            return self._postpone(reason, error)
        path = None
        if self.store is not None:
            try:
                path = self.store.save(
                    self.state(),
                    self.offsets,
                    info={
                        "reason": reason,
                        "messages": self.counts["messages"],
                        "worker": self.name,
                        "transaction": getattr(sink, "transactional_id", None),
                        "transaction_offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())],
                    },
                    started=self.started,
                    pending=True,
                )
            except Exception as error:  # disk full, ...: keep the transaction open, retry
                log.error("checkpoint (%s) failed, transaction kept open, will retry: %s", reason, _describe(error))
                self.metrics.transaction_ended("postponed")
                self.metrics.checkpoint_failed()
                return False
        try:
            sink.commit_transaction(offsets, self.source.group_metadata() if self.source is not None else None)
        except TransactionAbortable as error:
            if path is not None:
                self.store.discard(path)
            return self._abort_transaction(reason, error)
        except SinkError as error:
            if path is not None:
                self.store.discard(path)
            return self._postpone(reason, error)
        except TransactionFatal as error:
            # The pending checkpoint stays: the restart compares its offsets with the group's.
            self.fatal_error = error
            self.metrics.checkpoint_failed()
            raise
        self._transaction_open = False
        self.metrics.transaction_ended("committed")
        if path is not None:
            try:
                final = self.store.finalize(path)
            except OSError as error:  # committed, yet not final on disk: the restart settles it
                self.fatal_error = TransactionFatal(f"cannot mark checkpoint {path.name} final: {error}")
                raise self.fatal_error from error
            self.saved_sequence = self.store.last_sequence
            log.debug("transaction committed with checkpoint %s (%s)", final.name, reason)
            self.metrics.checkpoint_succeeded(time.perf_counter() - started, time.time())
        self._group_offsets.update(offsets)
        self._checkpointed_offsets = dict(self.offsets)
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock()
        return True

    def _postpone(self, reason: str, error: BaseException) -> bool:
        if self.broker is not None:
            self.broker.failed("output flush", error)
        log.warning("transaction (%s) not committed yet, kept open: %s", reason, error)
        self.metrics.transaction_ended("postponed")
        self.metrics.checkpoint_failed()
        return False

    def _probe_membership(self) -> None:
        """The embedded broker does not fence a stale group member's transactional offsets
        (no KIP-447): ask the group whether we are still a member before committing (a source
        that can: ``probe_membership``). Raises TransactionAbortable if not."""
        probe = getattr(self.source, "probe_membership", None)
        if probe is None:
            return
        try:
            probe(self._time_for(self.flush_timeout))
        except Exception as error:
            if isinstance(error, TransactionAbortable) or type(error).__name__ in (
                "UnknownMemberIdError", "IllegalGenerationError", "FencedInstanceIdError"
            ):
                raise TransactionAbortable(f"the group no longer counts us as a member: {_describe(error)}") from error
            raise SinkError(f"cannot reach the group coordinator: {_describe(error)}") from error

    def _abort_transaction(self, reason: str, error, *, restore: bool = True) -> bool:
        """Abort the open transaction; the learners go back to the last final checkpoint and
        its records are read again (their outputs were just aborted)."""
        log.warning("transaction aborted (%s): %s; re-processing from the last checkpoint", reason, error)
        try:
            self.outputs.sink.abort_transaction()
        except TransactionFatal as fatal:
            self.fatal_error = fatal
            raise
        finally:
            self._transaction_open = False
        # Not a checkpoint failure: the learners go back to the last checkpoint and nothing is lost.
        self.metrics.transaction_ended("aborted")
        if restore:
            self._restore_last_checkpoint()
        return False

    def _restore_last_checkpoint(self) -> None:
        if self.reload is None:
            self.fatal_error = TransactionFatal("transaction aborted and no checkpoint to restore the learners from")
            raise self.fatal_error
        processor, offsets, counts = self.reload()
        self.processor = processor
        self.counts = collections.Counter(counts)
        self.offsets = dict(offsets)
        restart = {}
        for tp in self.owned:
            mine, group = offsets.get(tp), self._group_offsets.get(tp)
            if mine is None or (tp in self._handed_over and group is not None and group > mine):
                mine = group if group is not None else self.started.get(tp, 0)
            restart[tp] = self.offsets[tp] = mine
            if group is not None and mine < group:
                self._replay_until[tp] = group
        self._checkpointed_offsets = dict(self.offsets)
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock()
        if self.source is not None and restart:
            self.source.seek(restart)
        log.info("learners restored to the last checkpoint; reading again from %s", restart)

    def _end_or_abort(self, reason: str, *, at_shutdown: bool = False) -> bool:
        """Commit the open transaction, or abort it: never leave one open when partitions go,
        nor at shutdown (an open one would hold read_committed readers until our restart).
        Runs inside the consumer's rebalance callbacks too, where an exception would be lost:
        a fatal one is kept in ``fatal_error`` for the loop to raise, and left to the restart."""
        try:
            if self.checkpoint(reason):
                return True
            if self._transaction_open and self.fatal_error is None:
                # At shutdown nothing is read again: the learners need not go back.
                self._abort_transaction(reason, "the transaction could not commit", restore=not at_shutdown)
        except TransactionFatal as error:
            self.fatal_error = error
            if at_shutdown:
                log.error("%s", error)  # no loop is left to raise it
        return False

    def _forget_group_offsets(self, partitions: set[Partition]) -> None:
        """Exactly-once: partitions gone to another worker, whose transactions now hold them."""
        for tp in partitions:
            self._group_offsets.pop(tp, None)
            self._replay_until.pop(tp, None)

    def _count_output_errors(self) -> None:
        """Outputs the broker refused for good (dropped, or truncated dead letters)."""
        take = getattr(self.outputs.sink, "take_output_errors", None)
        if take is None:
            return
        names = {
            self.outputs.predictions_topic: "predictions",
            self.outputs.dead_letter_topic: "dead_letters",
            self.outputs.drift_topic: "drift_events",
        }
        for (topic, reason), n in take().items():
            self.metrics.output_failed(names.get(topic, "other"), reason, n)

    # -- fusion (see stream_learner.fusion.fusion) ----------------------------------------------

    def fusion_round(self) -> None:
        """Publish what we learned since the last round, fold in what the peers published."""
        if self.fusion.round(self.processor, self.outputs.sink):
            self._folded = True  # state changed: the next checkpoint saves it

    def publish_snapshots(self, full: bool | None = None) -> None:
        self.fusion.publish_snapshots(self.processor, self.outputs.sink, full=full)

    def publish_tombstones(self) -> None:
        self.fusion.publish_tombstones(self.outputs.sink)

    def commit(self) -> None:
        """Commit the checkpointed offsets of the partitions we own (never more)."""
        if self.source is None or self.exactly_once:  # exactly-once: the transaction commits them
            return
        offsets = {tp: o for tp, o in self._checkpointed_offsets.items() if tp in self.owned}
        try:
            self.source.commit(offsets)
        except Exception as error:  # broker away: the checkpoint holds them; commit next time
            if self.broker is not None:
                self.broker.failed("offset commit", _describe(error))
            if self._stopping:
                log.warning("offset commit at shutdown failed (the checkpoint holds the offsets): %s", _describe(error))
            else:
                log.warning("offset commit failed (will retry at the next checkpoint): %s", _describe(error))
        else:
            if self.broker is not None and offsets:
                self.broker.contact()

    @property
    def commit_metadata(self) -> str:
        """Who committed: the metadata string of every offset commit (sources read it)."""
        store = self.store.identity if self.store is not None else ""
        return json.dumps(
            {"worker": self.name, "store": store, "checkpoint": self.saved_sequence}, separators=(",", ":")
        )

    def state(self) -> dict:
        state = {"format": STATE_FORMAT, "processor": self.processor.state_dict(), "counts": dict(self.counts)}
        if self.fusion is not None:
            state["fusion"] = self.fusion.state()
        return state

    # -- rebalance handler (runs while the main loop waits inside poll) ------------------

    def _time_for(self, seconds: float) -> float:
        """``seconds``, or less if the shutdown's bound comes first."""
        if self._deadline is None:
            return seconds
        return max(0.0, min(seconds, self._deadline - time.monotonic()))

    def partitions_revoked(self, partitions: set[Partition]) -> dict[Partition, int]:
        if self.broker is not None:
            self.broker.contact()  # a rebalance is the broker talking
        saved = self._end_or_abort("revoke") if self.exactly_once else self.checkpoint("revoke")
        self.owned -= partitions
        self._handed_over |= partitions
        for topic, partition in partitions:
            self.metrics.forget_partition(topic, partition)
        self._owned_changed()
        if self.exactly_once:
            self._forget_group_offsets(partitions)
            return {}  # their offsets went with the transaction
        if not saved:
            return {}  # outputs unconfirmed: let the next owner re-read rather than skip
        return {tp: self._checkpointed_offsets[tp] for tp in partitions if tp in self._checkpointed_offsets}

    def partitions_assigned(
        self,
        partitions: set[Partition],
        committed: Mapping[Partition, int | None],
        metadata: Mapping[Partition, str] | None = None,
    ) -> dict[Partition, int]:
        self.owned |= partitions
        self._owned_changed()
        if self.broker is not None:
            self.broker.contact()
        seeks = {}
        for tp in partitions:
            mine, theirs = self.offsets.get(tp), committed.get(tp)
            if mine is None:
                rewind = self._rewind_to(tp, (metadata or {}).get(tp))
                if rewind is not None:
                    seeks[tp] = self.offsets[tp] = rewind
                    self.started.setdefault(tp, rewind)
                    log.warning(
                        "%s[%d]: re-reading from offset %d what lost checkpoints had learned "
                        "(committed: %s)", tp[0], tp[1], rewind, theirs,
                    )
                else:  # never read it: start at the committed offset (or the reset policy)
                    self.started.setdefault(tp, theirs if theirs is not None else 0)
                continue
            if tp in self._handed_over and theirs is not None:
                seeks[tp] = max(mine, theirs)  # another worker may have moved it on meanwhile
            else:
                seeks[tp] = mine  # the checkpoint is the source of truth
            self.offsets[tp] = seeks[tp]
        if self.exactly_once:
            self._note_group_offsets(partitions, committed, seeks)
        return seeks

    def _note_group_offsets(self, partitions, committed, seeks) -> None:
        """Exactly-once: what the group holds for new partitions, and which records below it
        are re-read (an older checkpoint than the last committed transaction was loaded)."""
        for tp in partitions:
            theirs = committed.get(tp)
            start = seeks.get(tp, self.offsets.get(tp, self.started.get(tp)))
            self._group_offsets[tp] = theirs if theirs is not None else (start or 0)
            if theirs is not None and start is not None and start < theirs:
                self._replay_until[tp] = theirs
                log.warning(
                    "%s[%d]: re-learning offsets %d to %d without writing their outputs again "
                    "(committed transactions hold them)", tp[0], tp[1], start, theirs,
                )

    def _rewind_to(self, tp: Partition, metadata: str | None) -> int | None:
        """Where to re-read a partition the loaded checkpoint lacks, or None (not needed)."""
        if tp in self.rewind:
            return self.rewind.pop(tp)
        committer = _committer(metadata)
        mine = self.store.identity if self.store is not None else None
        if committer is not None and committer[0] == mine and committer[1] > self.loaded_sequence:
            # Our own later checkpoint committed it, and the manifest does not say where we
            # began: re-read it all rather than lose what that checkpoint had learned.
            return 0
        return None

    def partitions_lost(self, partitions: set[Partition]) -> None:
        log.warning("partitions lost without a commit (session expired?): %s", sorted(partitions))
        self.owned -= partitions
        self._handed_over |= partitions
        self._owned_changed()
        if self.exactly_once:
            if self._transaction_open and self.fatal_error is None:
                # Another worker owns them now: nothing of ours may commit.
                try:
                    self._abort_transaction("lost", "the group took our partitions")
                except TransactionFatal as error:
                    self.fatal_error = error
            self._forget_group_offsets(partitions)

    def _owned_changed(self) -> None:
        self.metrics.set_assigned_partitions(len(self.owned))
        if self.readiness is not None:
            self.readiness.assigned_partitions = len(self.owned)

    # -- the loop ------------------------------------------------------------------------

    def run(
        self,
        source: Source,
        *,
        stop: threading.Event,
        poll_timeout: float = 1.0,
        stop_when_idle: float | None = None,
        progress: Callable[[Worker], None] | None = None,
        progress_every: float = 10.0,
        heartbeat=None,
    ) -> None:
        """Poll, process, checkpoint until ``stop`` is set (or the source stays idle).

        Idle means no records while the broker answers: an outage is not idleness."""
        self.source = source
        broker_contact = getattr(source, "broker_contact", None)  # None: a poll that works is contact
        last_message = self.clock()
        last_progress = self.clock()
        from kafka.errors import KafkaError

        if self.fusion is not None and self.fusion.start(self.processor):
            self._folded = True
        backoff = Backoff(0.5, 15.0, jitter="decorrelated")  # never under 0.5 s: no spinning on a refusing broker
        while not stop.is_set():
            try:
                messages = source.poll(poll_timeout)
            except (KafkaError, SourceUnavailable) as error:  # broker trouble: keep state, back off, retry
                if is_fatal(error):  # credentials or permissions: no retry can help
                    raise FatalBrokerError(f"consumer: {fatal_message(error)}") from error
                if stop.is_set():
                    break  # no retry after the stop request
                if self.readiness is not None:
                    self.readiness.broker_reachable = False
                if self.broker is not None:
                    self.broker.retrying("poll", _describe(error))
                    self.broker.observe()
                delay = backoff.next()
                log.warning("poll failed (%s); retrying in %.1f s", _describe(error), delay)
                stop.wait(delay)
                continue
            backoff.reset()
            if self.fatal_error is not None:  # set inside a rebalance callback
                raise self.fatal_error
            if self.readiness is not None:
                self.readiness.broker_reachable = True
            if heartbeat is not None:
                heartbeat.beat()
            answered = self._broker_answered(broker_contact, messages)
            self.process_batch(messages)
            if self.alignment is not None:
                self.align(source, polled=bool(messages))
            now = self.clock()
            if messages or not self.owned:  # idle counts only once we have partitions
                last_message = now
            # Once stopped, the shutdown's checkpoint comes next, within --shutdown-timeout.
            if self.checkpoint_due() and not stop.is_set() and self.checkpoint():
                self.commit()
            if self.fusion is not None and self.fusion.due():
                self.fusion_round()
            if now - last_progress >= progress_every:
                last_progress = now
                self._report(source)
                if progress is not None:
                    progress(self)
            # Idle up to the broker's last answer only: an outage is not a quiet stream.
            if stop_when_idle is not None and not messages and min(now, answered) - last_message >= stop_when_idle:
                log.info("no records for %.0f s: stopping", stop_when_idle)
                break
        self._report(source)
        if progress is not None:
            progress(self)

    def _broker_answered(self, broker_contact, messages) -> float:
        """Feed the broker health from the source; the ``clock()`` time of the broker's last
        answer (now for a source that cannot tell)."""
        now = self.clock()
        if broker_contact is None:
            if self.broker is not None:
                self.broker.contact()
            return now
        contact = broker_contact()
        if messages:
            contact = time.monotonic()
        if self.broker is None:
            return now if contact is None else now - (time.monotonic() - contact)
        if contact is not None:
            self.broker.contact(contact)
        self.broker.observe()
        last = self.broker.last_contact
        return float("-inf") if last is None else now - (time.monotonic() - last)

    def align(self, source: Source, *, polled: bool = True) -> None:
        """Pause the partitions that run ahead in event time, resume those that no longer do."""
        self.alignment.align(source, self.owned, self.offsets, polled=polled)

    def shutdown(self, source: Source, sink: Sink, deadline: float | None = None) -> bool:
        """Final checkpoint and commit, then close the source (its revoke commits again) and
        sink; every step within ``deadline`` (a ``time.monotonic()`` time; None: unbounded)."""
        self._stopping = True
        self._deadline = deadline
        if self.exactly_once:
            ok = self._end_or_abort("shutdown", at_shutdown=True)
        else:
            ok = self.checkpoint("shutdown")
        if ok:
            self.commit()
        else:
            self._flush_abandoned = True  # the revoke on close would wait for the broker again
        try:
            # The consumer first (LeaveGroup, the revoke's commit); the producer has nothing
            # left to send when the checkpoint worked.
            _close_within(source, None if deadline is None else 0.6 * (deadline - time.monotonic()))
        finally:
            _close_within(sink, None if deadline is None else deadline - time.monotonic())
        return ok

    def _report(self, source: Source) -> None:
        try:
            lags = source.lag(self.offsets)
        except Exception:  # lag is informative only
            lags = {}
        for (topic, partition), lag in lags.items():
            self.metrics.set_lag(topic, partition, lag)
        self.metrics.set_learner_stats(self.processor.learner_stats())
        self.metrics.set_label_buffer(self.processor.label_buffer_stats())
        self.lag = sum(lags.values())

    def summary(self) -> dict:
        return {
            "messages": self.counts["messages"],
            "learned": self.counts[Outcome.LEARNED.value],
            "predicted": self.counts[Outcome.PREDICTED.value],
            "label_joined": self.counts[Outcome.LABEL_JOINED.value],
            "label_unmatched": self.counts[Outcome.LABEL_UNMATCHED.value],
            "dead_lettered": self.counts["dead_lettered"],
        }


def _close_within(client, seconds: float | None) -> None:
    """``client.close()``, passing ``timeout`` if the client takes one and a bound is given."""
    if seconds is None:
        client.close()
        return
    import inspect

    try:
        takes_timeout = "timeout" in inspect.signature(client.close).parameters
    except (TypeError, ValueError):
        takes_timeout = False
    if takes_timeout:
        client.close(timeout=max(0.1, seconds))
    else:
        client.close()


def _committer(metadata: str | None) -> tuple[str, int] | None:
    """``(checkpoint store identity, sequence)`` of a commit's metadata, None if not a worker's.

    >>> _committer('{"worker":"node-1","store":"9f2c","checkpoint":7}')
    ('9f2c', 7)
    >>> _committer("") is None and _committer("{not json") is None
    True
    """
    try:
        document = json.loads(metadata or "")
        return str(document["store"]), int(document["checkpoint"])
    except (ValueError, TypeError, KeyError):
        return None


def _event_time(record: Record, message: Message) -> float | None:
    # Deterministic across re-reads (unlike the wall clock), so a replay after a crash
    # expires delayed labels exactly as the first run did.
    return record.ts if record.ts is not None else message.timestamp


def make_sink(config: WorkerConfig) -> Sink:
    """The output producer of ``config.client``."""
    # A dead letter too large for its topic is replaced by a truncated copy, never retried.
    truncate_topics = (config.dead_letter_topic,) if config.dead_letter_topic else ()
    options = config.client_options()
    if config.exactly_once:
        options["transaction_timeout_ms"] = broker_transaction_timeout_ms(config)
    if config.client == "confluent":  # librdkafka produces on its own threads: in-process
        return _confluent().ConfluentSink(
            bootstrap_servers=config.bootstrap_servers,
            client_options=options,
            truncate_topics=truncate_topics,
            **_transactional(config),
        )
    from stream_learner.io.sinks import KafkaSink, ProcessSink

    sink_class = ProcessSink if config.producer_process else KafkaSink
    return sink_class(
        bootstrap_servers=config.bootstrap_servers,
        client_options=options,
        truncate_topics=truncate_topics,
        **_transactional(config),
    )


def transactional_id(config: WorkerConfig) -> str:
    """The worker's transactional id: stable across its restarts, so that its producer fences
    (and aborts the open transaction of) its previous incarnation."""
    return f"{config.group_id}-{worker_id(config)}"


def broker_transaction_timeout_ms(config: WorkerConfig) -> int:
    """How long the broker lets a transaction stay open before it aborts it and fences the
    producer: three cycles, at least a minute, at most Kafka's default cap (15 minutes).

    >>> from stream_learner.runtime.config import load_config
    >>> eos = ["--processing-guarantee", "exactly-once", "--transaction-every-seconds", "120"]
    >>> broker_transaction_timeout_ms(load_config(["--topic", "t", *eos], environ={}))
    360000
    """
    return int(min(900.0, max(60.0, 3 * config.cycle_seconds)) * 1000)


def _transactional(config: WorkerConfig) -> dict:
    if not config.exactly_once:
        return {}
    return {"transactional_id": transactional_id(config), "transaction_timeout": config.transaction_timeout}


def make_source(config: WorkerConfig, handler) -> Source:
    """The group consumer of ``config.client``; ``handler`` gets the rebalance callbacks."""
    if config.client == "confluent":
        source_class = _confluent().ConfluentSource
    else:
        from stream_learner.io.sources import KafkaSource, ProcessSource

        # In a child process the consumer parses records on the second core, not the learners'.
        source_class = ProcessSource if config.consumer_process else KafkaSource
    return source_class(
        config.input_topics,
        bootstrap_servers=config.bootstrap_servers,
        group_id=config.group_id,
        handler=handler,
        max_poll_records=config.max_poll_records,
        session_timeout_ms=config.session_timeout_ms,
        auto_offset_reset=config.auto_offset_reset,
        client_options=config.client_options(),
        **({"read_committed": True} if config.exactly_once else {}),
    )


def _confluent():
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--client confluent needs confluent-kafka: pip install 'stream-learner[confluent]'"
        ) from None
    from stream_learner.io import confluent

    return confluent


def build_processor(config: WorkerConfig) -> StreamProcessor:
    return StreamProcessor(
        list(config.learners),
        serving=config.serving,
        drift_detector=config.drift_detector,
        drift_reaction=config.drift_reaction,
        window=config.window,
        label_buffer_size=config.label_buffer_size,
        label_buffer_bytes=config.label_buffer_bytes,
        label_ttl=config.label_ttl,
        max_classes=config.max_classes,
        seed=config.seed,
    )


def _with_retries(what: str, connect: Callable[[], object], stop: threading.Event, broker=None):
    """Call ``connect`` until it works, backing off (with jitter) from 0.5 s to 15 s; None if
    stopped. Raises :class:`FatalBrokerError` when the broker refused our credentials.
    ``broker`` (a BrokerHealth) hears of each wait: waiting for the broker is alive."""
    from kafka.errors import KafkaError

    return retry(
        what, connect, stop, retriable=(KafkaError, OSError), fatal=is_fatal,
        backoff=Backoff(0.5, 15.0), logger=log, describe=_describe,
        on_retry=None if broker is None else lambda error: broker.retrying(what, _describe(error)),
    )


class _Refused(Exception):
    """A reason not to start, said in one line: the worker exits 2 (restarting cannot help)."""


def run_worker(
    config: WorkerConfig,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[Worker], None] | None = None,
    progress_every: float = 10.0,
    on_ready: Callable[[Worker], None] | None = None,
) -> int:
    """Run the worker until ``stop`` is set (or idle); returns the exit code.

    Every resource it opens is closed by one :class:`contextlib.ExitStack`, in reverse order,
    whichever way it ends; a refusal to start is one log line and exit code 2.
    """
    stop = stop or threading.Event()
    from stream_learner.runtime.metrics import BrokerHealth

    broker = BrokerHealth(timeout=config.broker_timeout, liveness_timeout=config.broker_liveness_timeout)
    with contextlib.ExitStack() as opened:
        try:
            started = _start(config, stop, broker, opened)
        except (_Refused, FatalBrokerError) as refusal:
            log.error("%s", refusal)
            return 2
        if started is None:  # stopped while waiting for the broker
            return 0
        worker, source, sink, heartbeat = started
        if on_ready is not None:
            on_ready(worker)
        # Bounds the whole shutdown from the moment the stop is asked for, so a checkpoint in
        # progress then counts too.
        watchdog = _Watchdog(config.shutdown_timeout, stop, children=(source, sink))
        opened.callback(watchdog.cancel)
        source_failed = fatal = False
        try:
            worker.run(
                source,
                stop=stop,
                poll_timeout=config.poll_timeout,
                stop_when_idle=config.stop_when_idle,
                progress=progress,
                progress_every=progress_every,
                heartbeat=heartbeat,
            )
        except SourceError as error:  # the consumer process died: nothing more to commit
            log.error("%s", error)
            source_failed = True
        except FatalBrokerError as error:  # credentials or permissions: restarting cannot help
            log.error("%s", error)
            fatal = True
        except TransactionFatal as error:  # fenced, or a commit that never ended: restart recovers
            log.error("exactly-once: %s; exiting (a restart recovers from the checkpoints)", error)
            source_failed = True
        finally:
            watchdog.arm()  # also when the loop ended by itself (idle, a dead consumer process)
            clean = worker.shutdown(source, sink, deadline=watchdog.deadline)
        summary = worker.summary()
        log.info("stopped: %s", ", ".join(f"{k} {v:,}" for k, v in summary.items()))
        if fatal:
            return 2
        return 0 if clean and not source_failed else 1


def _start(config: WorkerConfig, stop: threading.Event, broker, opened: contextlib.ExitStack):
    """Everything before the first poll, in an order that writes nothing until the settings
    are known to be good: learners, metrics port, lock, key and checkpoint, fusion, producer,
    input topics, consumer. Each resource is handed to ``opened`` as it is made. Returns
    ``(worker, source, sink, heartbeat)``, or None if stopped while waiting for the broker."""
    for spec in config.learners:
        try:
            check_learner(spec)
        except LearnerError as error:
            raise _Refused(f"cannot build the learners: {error}") from None
    try:
        metrics, server, heartbeat, readiness = _start_metrics(config, broker)
    except OSError as error:
        raise _Refused(
            f"cannot serve metrics on {config.metrics_host} port {config.metrics_port}: "
            f"{error.strerror or error}; choose another with --metrics-port (0: a free port)"
        ) from None
    if server is not None:
        opened.callback(server.stop)
    if heartbeat is not None:
        opened.callback(heartbeat.stop, "worker stopped")
    try:
        opened.callback(DirectoryLock(config.checkpoint_dir).acquire().release)
        key = resolve_key(config.checkpoint_dir, config.checkpoint_key_file, generate=config.generate_key)
        store = CheckpointStore(
            config.checkpoint_dir,
            key,
            keep=config.checkpoint_keep,
            trusted_modules=[m for m in map(module_of_factory, config.learners) if m],
        )
        store.remove_unfinished_saves()  # ours: we hold the directory's lock
        checkpoint = store.load_latest()
    except CheckpointRefused as error:
        raise _Refused(f"refusing to start: {error}") from None
    except CheckpointError as error:
        raise _Refused(str(error)) from None
    if checkpoint is None and store.had_checkpoints() and not config.allow_fresh_start:
        raise _Refused(
            f"refusing to start: {config.checkpoint_dir} held checkpoints but none is valid (corrupt "
            "ones moved aside as *.corrupt); pass --allow-fresh-start to start with empty learners"
        )
    rewind = store.rewind(checkpoint)
    if rewind:
        log.warning(
            "falling back to %s: re-reading %d partition(s) that newer checkpoints covered: %s",
            checkpoint.path.name if checkpoint is not None else "empty learners",
            len(rewind),
            ", ".join(f"{t}[{p}] from {o}" for (t, p), o in sorted(rewind.items())),
        )
    processor, offsets, counts, fusion_state = _restore(config, checkpoint)
    if readiness is not None:
        readiness.checkpoint_loaded = True

    fusion = None
    if config.fusion_rules is not None:
        fusion = _start_fusion(config, key, fusion_state, stop, metrics, broker)
        if fusion is None:
            return None
        opened.callback(fusion.feed.stop)
    try:
        sink = _with_retries("producer", lambda: make_sink(config), stop, broker)
    except (ConfigError, ValueError) as error:  # a client that cannot be built as configured
        raise _Refused(str(error)) from None
    if sink is None:
        return None
    # The worker's shutdown closes the sink once it owns it; until then, closing is ours.
    owned = {"sink": True}
    opened.callback(lambda: owned["sink"] and sink.close())
    if config.exactly_once:
        # After init_transactions (the sink's): our previous incarnation's transaction has ended.
        settled = _settle_pending(config, store, stop, broker)
        if settled is False:  # stopped while waiting for the broker
            return None
        if settled is not None:
            checkpoint = settled
            rewind = store.rewind(checkpoint)
            processor, offsets, counts, _ = _restore(config, checkpoint)
    worker = Worker(
        processor,
        Outputs(
            sink,
            predictions_topic=config.predictions_topic,
            dead_letter_topic=config.dead_letter_topic,
            drift_topic=config.drift_topic,
        ),
        store,
        decoder=config.decoder(),
        offsets=offsets,
        counts=counts,
        checkpoint_every_records=config.cycle_records,
        checkpoint_every_seconds=config.cycle_seconds,
        metrics=metrics,
        readiness=readiness,
        broker=broker,
        fusion=fusion,
        mini_batch=config.mini_batch,
        alignment=None if config.max_event_time_skew is None else PartitionAlignment(config.max_event_time_skew),
        name=worker_id(config),
        rewind=rewind,
        loaded_sequence=checkpoint.sequence if checkpoint is not None else 0,
        exactly_once=config.exactly_once,
        reload=lambda: _restore(config, store.load_latest())[:3],
    )
    try:
        if _with_retries("topics", lambda: _ensure_input_topics(config), stop, broker) is None:
            return None
    except ConfigError as error:
        raise _Refused(str(error)) from None
    source = _with_retries("consumer", lambda: make_source(config, worker), stop, broker)
    if source is None:
        return None
    owned["sink"] = False
    if readiness is not None:
        readiness.broker_reachable = True
    worker.metrics_url = server.url if server is not None else None
    log.info(
        "worker up: topics %s, group %s, learners %s, checkpoints in %s",
        ",".join(config.input_topics), config.group_id, ",".join(config.learners), config.checkpoint_dir,
    )
    return worker, source, sink, heartbeat


def _restore(config: WorkerConfig, checkpoint):
    """``(processor, offsets, counts, fusion state)`` from the checkpoint, or fresh ones."""
    if checkpoint is None:
        try:
            return build_processor(config), {}, {}, None
        except (ValueError, ImportError) as error:
            raise _Refused(f"cannot build the learners: {error}") from None
    try:
        state = read_state(checkpoint.state, trusted_modules=[m for m in map(module_of_factory, config.learners) if m])
    except (StateError, UnpicklingRefused) as error:
        raise _Refused(
            f"checkpoint {checkpoint.path} cannot be read: {error}; move it away or use another "
            "--checkpoint-dir"
        ) from None
    processor: StreamProcessor = state["processor"]
    if list(processor.learners) != list(config.learners):
        raise _Refused(
            f"checkpoint {checkpoint.path} holds learners {','.join(processor.learners)} but "
            f"--learners is {','.join(config.learners)}; use another --checkpoint-dir"
        )
    processor.set_limits(
        label_buffer_size=config.label_buffer_size,
        label_buffer_bytes=config.label_buffer_bytes,
        max_classes=config.max_classes,
    )
    counts = state.get("counts", {})
    log.info("resuming after %d messages", counts.get("messages", 0))
    return processor, checkpoint.offsets, counts, state.get("fusion")


def read_state(state, *, trusted_modules=()) -> dict:
    """A checkpoint's payload with its processor rebuilt: ``{"format", "processor" (a
    StreamProcessor), "counts", "fusion" (Fusion.restore's input, or absent)}``.

    Reads format 2 (plain data: :meth:`StreamProcessor.from_state`) and format 1 (the pickled
    processor, already loaded by the checkpoint's restricted unpickler). Raises
    :class:`~stream_learner.state.schema.StateError` on any other payload, or
    :class:`~stream_learner.state.unpickle.UnpicklingRefused` on a learner holding what a
    checkpoint may not.
    """
    version = state.get("format") if isinstance(state, dict) else None
    if version not in READABLE_STATE_FORMATS:
        newer = isinstance(version, int) and version > STATE_FORMAT
        raise StateError(
            f"checkpoint payload format {version!r} is not one this stream-learner reads "
            f"({', '.join(map(str, READABLE_STATE_FORMATS))})" + ("; written by a newer release?" if newer else "")
        )
    decoded = dict(state)
    if version == 2:
        decoded["processor"] = StreamProcessor.from_state(state["processor"], trusted_modules=trusted_modules)
    elif not isinstance(state.get("processor"), StreamProcessor):
        raise StateError("checkpoint payload of format 1 holds no processor")
    return decoded
def _settle_pending(config: WorkerConfig, store: CheckpointStore, stop: threading.Event, broker=None):
    """Exactly-once start: a pending checkpoint whose transaction offsets equal the group's
    committed ones was committed (mark it final and return it); any other is deleted and the
    newest final checkpoint stands (None: use what was loaded). False if stopped meanwhile."""
    from stream_learner.io.broker import committed_offsets

    pending = store.latest_pending()
    if pending is None:
        return None
    wanted = {(t, int(p)): int(o) for t, p, o in pending.info.get("transaction_offsets", [])}
    committed = _with_retries(
        "committed offsets",
        lambda: committed_offsets(config.bootstrap_servers, config.group_id, set(wanted), config.client_options()),
        stop,
        broker,
    )
    if committed is None:
        return False
    if wanted and committed == wanted:
        final = store.finalize(pending.path)
        log.info("pending checkpoint %s: its transaction committed; it is final", final.name)
        return dataclasses.replace(pending, path=final)
    store.discard(pending.path)
    log.warning(
        "pending checkpoint %s discarded: its transaction did not commit (group offsets %s, "
        "transaction's %s); its records are processed again",
        pending.path.name, committed, wanted,
    )
    return None


def _ensure_input_topics(config: WorkerConfig) -> bool:
    """Refuse input topics the cluster does not have (a typo would otherwise be assigned
    auto-created empty partitions and look healthy), or create them with --create-topics."""
    from stream_learner.io.broker import create_topics, existing_topics

    missing = sorted(set(config.input_topics) - existing_topics(config.bootstrap_servers, config.client_options()))
    if not missing:
        return True
    if not config.create_topics:
        raise ConfigError(
            f"input topic {', '.join(missing)} does not exist on {config.bootstrap_servers}; "
            "check --topic / --labels-topic, or give --create-topics to create it"
        )
    create_topics(config.bootstrap_servers, dict.fromkeys(missing, 1), client_options=config.client_options())
    log.info("created input topic %s (one partition)", ", ".join(missing))
    return True


def _start_fusion(
    config: WorkerConfig, secret: bytes, state, stop: threading.Event, metrics=None, broker=None
):
    """The fusion rounds: the rules, and the thread reading the models topic (created,
    compacted, if new). None if stopped while waiting for the broker."""
    from stream_learner.fusion.fusion import Fusion, ModelFeed
    from stream_learner.fusion.rounds import FusionRounds
    from stream_learner.io.broker import create_topics
    from stream_learner.state.keys import FUSION, derive_key

    key = derive_key(secret, FUSION)  # never the checkpoint key: a snapshot cannot pass for one

    created = _with_retries(
        "models topic",
        lambda: create_topics(
            config.bootstrap_servers,
            {config.models_topic: 1},
            configs={"cleanup.policy": "compact"},
            client_options=config.client_options(),
        ),
        stop,
        broker,
    )
    if created is None:
        return None
    name = worker_id(config)
    fusion = Fusion(
        name,
        config.fusion_rules,
        key=key,
        every_seconds=config.fusion_every_seconds,
        every_records=config.fusion_every_records,
        full_every_seconds=config.fusion_full_every_seconds,
        max_age=config.fusion_max_age,
    )
    fusion.restore(state)
    feed = ModelFeed(
        config.models_topic,
        bootstrap_servers=config.bootstrap_servers,
        worker_id=name,
        key=key,
        client_options=config.client_options(),
        client=config.client,
        peer_ttl=config.fusion_peer_ttl,
        metrics=metrics,
    ).start()
    log.info("fusion on as worker %s: snapshots every %.0f s on %s", name, config.fusion_every_seconds, config.models_topic)
    return FusionRounds(fusion, feed, topic=config.models_topic)


class _Watchdog:
    """Bounds the shutdown: ``timeout`` seconds from the stop request (or from :meth:`arm`) to
    the exit. The worker's steps aim at :attr:`deadline`, a little earlier; if they hang all
    the same (broker gone), the watchdog kills the client processes and exits."""

    def __init__(self, timeout: float, stop: threading.Event | None = None, children=()):
        self._timeout = timeout
        self._children = children
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._timer: threading.Timer | None = None
        self.deadline: float | None = None
        if stop is not None:
            threading.Thread(target=self._arm_on, args=(stop,), name="stream-learner-watchdog", daemon=True).start()

    def _arm_on(self, stop: threading.Event) -> None:
        while not self._cancelled.is_set():
            if stop.wait(0.1):
                self.arm()
                return

    def arm(self) -> None:
        with self._lock:
            if self._timer is not None or self._cancelled.is_set():
                return
            # Room for closing the client processes and logging after the last step.
            self.deadline = time.monotonic() + self._timeout - min(3.0, 0.1 * self._timeout)
            self._timer = threading.Timer(self._timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self):
        log.error("shutdown took longer than %.0f s; exiting without a clean close", self._timeout)
        for child in self._children:
            process = getattr(child, "_process", None)  # the producer or consumer process
            if process is not None and process.poll() is None:
                process.kill()
        logging.shutdown()
        os._exit(1)

    def cancel(self):
        with self._lock:
            self._cancelled.set()
            if self._timer is not None:
                self._timer.cancel()


def _start_metrics(config: WorkerConfig, broker=None):
    if config.metrics_port is None:
        return None, None, None, None
    from stream_learner.runtime.metrics import HealthServer, Heartbeat, Readiness, StreamMetrics

    metrics = StreamMetrics(
        learners=config.learners,
        detector=config.drift_detector,
        config_info={k: str(v) for k, v in config.describe().items() if k in ("group_id", "topics", "learners", "serving", "drift_detector", "drift_reaction")},
    )
    # Waiting for the broker is alive (not ready): the retries tell the heartbeat so.
    heartbeat = Heartbeat(max_silence=max(60.0, 10 * config.poll_timeout), broker=broker)
    readiness = Readiness(broker=broker)
    server = HealthServer(
        metrics.registry,
        host=config.metrics_host,
        port=config.metrics_port,
        liveness=heartbeat.check,
        readiness=readiness.check,
    )
    server.start()
    log.info("metrics on %s/metrics", server.url)
    return metrics, server, heartbeat, readiness


def add_run_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the Kafka worker: learn from a topic, publish predictions",
        description="Consume text messages from Kafka, predict and learn with every learner "
        "(prequentially), publish predictions and dead letters, checkpoint so that every "
        "record is learned exactly once across crashes and restarts.",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    quiet_kafka_client_logs()  # its INFO lines drown ours
    try:
        config = config_from_args(args)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    if config.processes > 1:
        from stream_learner.runtime.supervisor import run_processes

        os.environ.setdefault("STREAM_LEARNER_LOG_LEVEL", logging.getLevelName(logging.getLogger().getEffectiveLevel()))
        return run_processes(config)  # settings go through the children's environment, not argv
    stop = threading.Event()

    def request_stop(signum, _frame):
        name = signal.Signals(signum).name
        if stop.is_set():
            # A second signal: the user will not wait. The last checkpoint keeps it exact.
            log.warning("%s again: exiting now, from the last checkpoint on restart", name)
            logging.shutdown()
            os._exit(1)
        log.info("%s received: finishing the batch, checkpointing, closing", name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    return run_worker(config, stop=stop)
