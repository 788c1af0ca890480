"""Where results go: predictions, dead letters and drift events, behind a tiny :class:`Sink`.

A sink sends ``(topic, key, value, headers)`` and, on :meth:`Sink.flush`, confirms that every
message sent so far has been delivered (raising :class:`SinkError` otherwise). The worker
commits offsets only after a successful flush, so outputs are at-least-once; they are keyed by
record id so readers can de-duplicate. A sink built with a transactional id (exactly-once) also
begins, commits and aborts transactions that hold the outputs and the consumed offsets.

:class:`Outputs` turns processing results into those messages.

>>> sink = MemorySink()
>>> outputs = Outputs(sink, predictions_topic="reviews.predictions", dead_letter_topic="reviews.dlq")
>>> from stream_learner.io.sources import Message, Partition
>>> outputs.dead_letter(Message("reviews", 0, 7, b"k", b"\\xff"), "invalid_utf8", "bad byte")
>>> topic, key, value, headers = sink.sent[0]
>>> topic, key, value, dict(headers)["reason"]
('reviews.dlq', b'k', b'\\xff', b'invalid_utf8')

"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

from stream_learner.io.child import spawn, start_child
from stream_learner.io.retry import Backoff, RateLimitedLog
from stream_learner.io.sources import Message, Partition

__all__ = [
    "Sink", "SinkError", "TransactionAbortable", "TransactionFatal", "MemorySink", "KafkaSink", "ProcessSink", "Outputs", "output_refusal", "truncated_copy",
]

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]

# What a truncated dead-letter copy keeps of a value the broker refused as too large: enough
# to see what the producer sent; headers give its size and SHA-256.
TRUNCATED_BYTES = 4096

# Reasons the broker (or the client) refuses one message for good: sending it again cannot
# help. kafka-python error class names and librdkafka error names → our reason code.
_REFUSALS = {
    "MessageSizeTooLargeError": "message_too_large",
    "RecordListTooLargeError": "message_too_large",
    "MSG_SIZE_TOO_LARGE": "message_too_large",
    "RECORD_LIST_TOO_LARGE": "message_too_large",
    "InvalidTopicError": "invalid_topic",
    "TOPIC_EXCEPTION": "invalid_topic",
    "TopicAuthorizationFailedError": "topic_authorization_failed",
    "TOPIC_AUTHORIZATION_FAILED": "topic_authorization_failed",
    "InvalidRecordError": "invalid_record",
    "INVALID_RECORD": "invalid_record",
    "UnsupportedForMessageFormatError": "invalid_record",
    "UNSUPPORTED_FOR_MESSAGE_FORMAT": "invalid_record",
    "PolicyViolationError": "policy_violation",
    "POLICY_VIOLATION": "policy_violation",
}


def output_refusal(error: BaseException | Any) -> str | None:
    """The reason code when ``error`` refuses a message for good, None when a retry may work.

    Takes kafka-python errors, and librdkafka's ``KafkaError`` or a ``KafkaException`` holding one.

    >>> from kafka.errors import MessageSizeTooLargeError, KafkaTimeoutError
    >>> output_refusal(MessageSizeTooLargeError()), output_refusal(KafkaTimeoutError())
    ('message_too_large', None)
    """
    for cls in type(error).__mro__:
        if cls.__name__ in _REFUSALS:
            return _REFUSALS[cls.__name__]
    inner = error.args[0] if isinstance(error, BaseException) and error.args else error
    name = getattr(inner, "name", None)
    if callable(name):
        try:
            return _REFUSALS.get(name())
        except Exception:
            return None
    return None


def truncated_copy(message: tuple) -> tuple | None:
    """``(topic, key, value, headers, hint)`` with its value cut to :data:`TRUNCATED_BYTES`
    and headers saying so; None if ``message`` is already such a copy."""
    topic, key, value, headers, hint = message
    if any(name == "truncated" for name, _ in headers):
        return None
    value = value or b""
    headers = [
        *headers,
        ("truncated", b"true"),
        ("original_size", str(len(value)).encode("ascii")),
        ("original_sha256", hashlib.sha256(value).hexdigest().encode("ascii")),
    ]
    return (topic, key, value[:TRUNCATED_BYTES], headers, hint)


class _Refusals:
    """What a sink does with messages refused for good: a truncated copy for the topics that
    take one (dead letters), else counted and dropped, logged a bounded number of times.

    A transactional sink also remembers the outputs the broker refused inside a transaction
    (which then had to abort), by topic and SHA-256 of the value: re-processing makes them
    again, and they are replaced or dropped before sending next time, so that they cannot
    abort every transaction."""

    REMEMBERED = 10_000  # refused outputs remembered at most; then forgotten all at once

    def __init__(self, truncate_topics: Collection[str]):
        self.truncate_topics = frozenset(t for t in truncate_topics if t)
        self.counts: dict[tuple[str, str], int] = {}
        self._log = RateLimitedLog(log, limit=5, period=60.0)
        self._refused_before: dict[tuple[str, bytes], Any] = {}

    def remember(self, message: tuple, error) -> None:
        """The broker refused ``message`` for good inside a transaction."""
        if len(self._refused_before) >= self.REMEMBERED:
            self._refused_before.clear()
        self._refused_before[_refusal_key(message)] = error

    def instead_of(self, message: tuple) -> tuple | None:
        """``message``, or what to send in its place when the broker refused it before (a
        truncated copy; None: dropped and counted)."""
        if not self._refused_before:
            return message
        error = self._refused_before.get(_refusal_key(message))
        return message if error is None else self.handle(message, error)

    def handle(self, message: tuple, error) -> tuple | None:
        """The message to send instead (a truncated copy), or None: dropped and counted."""
        topic, value = message[0], message[2] or b""
        reason = output_refusal(error) or "other"
        if reason == "message_too_large" and topic in self.truncate_topics:
            copy = truncated_copy(message)
            if copy is not None:
                self._count(topic, "truncated")
                self._log.warning(
                    f"{topic}:truncated", "%s: a %d-byte message was refused (%s); sending its first %d bytes instead",
                    topic, len(value), reason, TRUNCATED_BYTES,
                )
                return copy
        self._count(topic, reason)
        self._log.warning(
            f"{topic}:{reason}", "%s: dropped a %d-byte output the broker refused for good (%s: %s)",
            topic, len(value), reason, _error_text(error),
        )
        return None

    def _count(self, topic: str, reason: str) -> None:
        self.counts[(topic, reason)] = self.counts.get((topic, reason), 0) + 1

    def take(self) -> dict[tuple[str, str], int]:
        counts, self.counts = self.counts, {}
        return counts


def _refusal_key(message: tuple) -> tuple[str, bytes]:
    return message[0], hashlib.sha256(message[2] or b"").digest()


def _raise_if_fatal(error) -> None:
    """Credentials or cluster ACLs the producer lacks: no output can ever be confirmed."""
    from stream_learner.io.retry import FatalBrokerError, fatal_message, is_fatal

    if error is not None and output_refusal(error) is None and is_fatal(error):
        raise FatalBrokerError(f"producer: {fatal_message(error)}")


def _error_text(error) -> str:
    inner = error.args[0] if isinstance(error, BaseException) and error.args else error
    if hasattr(inner, "str") and callable(inner.str):
        return inner.str()
    return str(error) or type(error).__name__


class SinkError(ConnectionError):
    """Outputs could not be confirmed as delivered (they are kept and sent again)."""


class TransactionAbortable(SinkError):
    """The open transaction cannot commit (a stale group generation, a refused output): abort
    it; the producer can begin another."""


class TransactionFatal(RuntimeError):
    """The transactional producer is fenced (another instance took its transactional id) or a
    commit or abort did not end within ``--transaction-timeout``: the worker exits, and its
    restart recovers from the checkpoints (docs/exactly-once.md)."""


class Sink(Protocol):
    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers = (), partition_hint: int | None = None
    ) -> None: ...

    def dispatch(self) -> None:
        """End of a batch: hand what was sent so far to the transport."""

    def flush(self, timeout: float) -> None: ...

    def close(self) -> None: ...

    def take_output_errors(self) -> dict[tuple[str, str], int]:
        """Outputs refused for good since the last call, by ``(topic, reason)``."""

    # Exactly-once (a sink built with a transactional id; docs/exactly-once.md). Errors:
    # TransactionAbortable (abort and redo the cycle) or TransactionFatal (exit).

    def begin_transaction(self) -> None:
        """Every output sent from now on belongs to one transaction."""

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata) -> None:
        """Send ``offsets`` (the next offsets of the consumed partitions) to the transaction
        with the consumer's ``group_metadata``, then commit outputs and offsets atomically."""

    def abort_transaction(self) -> None:
        """Abort the open transaction; its outputs, sent or not, are never read_committed."""


class MemorySink:
    """Keeps what was sent, in order: ``sent`` is a list of ``(topic, key, value, headers)``."""

    def __init__(self):
        self.sent: list[tuple[str, bytes | None, bytes, tuple[tuple[str, bytes], ...]]] = []
        self.flushes = 0
        self.transaction: list | None = None  # the open transaction's outputs
        self.committed_offsets: dict[Partition, int] = {}
        self.commits = self.aborts = 0
        self.fail_commit: BaseException | None = None  # raised by the next commit (tests)

    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers = (), partition_hint: int | None = None
    ) -> None:
        (self.sent if self.transaction is None else self.transaction).append((topic, key, value, tuple(headers)))

    def dispatch(self) -> None:
        pass

    def flush(self, timeout: float) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass

    def take_output_errors(self) -> dict[tuple[str, str], int]:
        return {}

    # A transaction in memory: ``sent`` holds only committed outputs, ``committed_offsets``
    # the offsets committed with them.

    def begin_transaction(self) -> None:
        if self.transaction is not None:
            raise RuntimeError("a transaction is already open")
        self.transaction = []

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata) -> None:
        if self.transaction is None:
            raise RuntimeError("no transaction to commit")
        if self.fail_commit is not None:
            error, self.fail_commit = self.fail_commit, None
            raise error
        self.sent.extend(self.transaction)
        self.committed_offsets.update(offsets)
        self.transaction = None
        self.commits += 1

    def abort_transaction(self) -> None:
        self.transaction = None
        self.aborts += 1

    def on(self, topic: str) -> list[tuple[bytes | None, bytes, tuple]]:
        return [(key, value, headers) for t, key, value, headers in self.sent if t == topic]


class KafkaSink:
    """An idempotent kafka-python producer that re-sends what failed until it is confirmed.

    Messages stay in ``_unconfirmed`` until a flush sees them acknowledged, so a broker outage
    longer than the producer's own delivery timeout loses nothing: the next flush sends them
    again (possibly a duplicate, never a gap), after a backoff with jitter. A message refused
    for good (too large, invalid or unauthorized topic) is not retried: on a topic of
    ``truncate_topics`` (the dead letters) a truncated copy replaces it, otherwise it is
    counted (:meth:`take_output_errors`) and dropped.

    Messages are handed to the producer at the end of each batch (:meth:`dispatch`), in one
    tight loop: the producer's sender thread then competes for the GIL once per batch rather
    than between every two records. A ``partition_hint`` (the input partition) picks the
    output partition directly, so output partition p holds the results of input partition p
    (modulo the partition count) without hashing every key in Python.
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
        from kafka import KafkaProducer

        from stream_learner.io.retry import watch_kafka_python_auth

        watch_kafka_python_auth()
        self._refusals = _Refusals(truncate_topics)
        self._backoff = Backoff(0.1, 2.0, jitter="decorrelated")  # at least 0.1 s between re-sends
        self.transactional_id = transactional_id
        self.transaction_timeout = transaction_timeout
        self._in_transaction = False
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            enable_idempotence=True,
            acks="all",
            linger_ms=linger_ms,
            batch_size=batch_size,
            **({} if transactional_id is None else {"transactional_id": transactional_id}),
            **dict(client_options or {}),
        )
        self._pending: list[tuple] = []
        self._unconfirmed: list[tuple[tuple, Any]] = []
        self._partitions: dict[str, int] = {}
        if transactional_id is not None:
            try:
                # Fences our previous incarnation and aborts the transaction it left open
                # (bounded by the producer's max_block_ms: KafkaTimeoutError, retried).
                self._producer.init_transactions()
            except Exception:
                self._producer.close(timeout=1.0)
                raise

    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers = (), partition_hint: int | None = None
    ) -> None:
        self._pending.append((topic, key, value, list(headers), partition_hint))

    def dispatch(self) -> None:
        pending, self._pending = self._pending, []
        for message in pending:
            self._unconfirmed.append((message, self._send(message)))

    def _partition(self, topic: str, hint: int | None) -> int | None:
        if hint is None:
            return None
        count = self._partitions.get(topic)
        if count is None:
            try:
                count = len(self._producer.partitions_for(topic) or ())
            except Exception:  # no metadata yet: let the producer's partitioner decide
                return None
            if count:
                self._partitions[topic] = count
        return hint % count if count else None

    def _send(self, message):
        if self._in_transaction:
            message = self._refusals.instead_of(message)
            if message is None:
                return None  # refused for good in an aborted transaction: dropped, counted
        topic, key, value, headers, hint = message
        try:
            return self._producer.send(
                topic, key=key, value=value, headers=headers, partition=self._partition(topic, hint)
            )
        except Exception as error:  # buffer full, broker gone: retried at the next flush
            return error

    def flush(self, timeout: float) -> None:
        if self._in_transaction:
            self._flush_transaction(timeout)
            return
        self.dispatch()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as error:
                raise SinkError(f"outputs not confirmed within {timeout:.0f} s: {error}") from None
            failed, kept, replaced = [], [], []
            for message, future in self._unconfirmed:
                error = future if isinstance(future, Exception) else future.exception if future.failed() else None
                _raise_if_fatal(error)
                if error is not None and output_refusal(error) is not None:
                    copy = self._refusals.handle(message, error)
                    if copy is not None:
                        replaced.append(copy)
                elif error is not None or not future.is_done:
                    failed.append(message)
                    kept.append((message, future))
            if replaced:  # sent now, confirmed (or refused) by the next round of this loop
                self._unconfirmed = kept + [(copy, self._send(copy)) for copy in replaced]
                continue
            if not failed:
                self._unconfirmed.clear()
                self._backoff.reset()
                return
            if time.monotonic() > deadline:
                self._unconfirmed = [(message, RuntimeError("not sent")) for message in failed]
                raise SinkError(f"{len(failed)} outputs not delivered yet; they will be sent again")
            delay = min(self._backoff.next(), max(0.0, deadline - time.monotonic()))
            log.warning("re-sending %d outputs that were not delivered, in %.1f s", len(failed), delay)
            time.sleep(delay)
            self._unconfirmed = [(message, self._send(message)) for message in failed]

    def take_output_errors(self) -> dict[tuple[str, str], int]:
        return self._refusals.take()

    # -- transactions (a transactional_id was given) ------------------------------------------

    def begin_transaction(self) -> None:
        try:
            self._producer.begin_transaction()
        except Exception as error:
            _raise_transaction_error("begin", error)
        self._in_transaction = True

    def _flush_transaction(self, timeout: float) -> None:
        """Confirm delivery inside the transaction. Nothing is re-sent: a failed output fails
        the transaction (TransactionAbortable, or TransactionFatal when fenced); a broker that
        does not answer in time raises SinkError and leaves the transaction open. An output
        the client itself refused (over ``max_request_size``) never entered the transaction:
        it is truncated or dropped as outside transactions, within the same transaction."""
        self.dispatch()
        while True:
            try:
                self._producer.flush(timeout=max(0.1, timeout))
            except Exception as error:
                raise SinkError(f"outputs not confirmed within {timeout:.0f} s: {error}") from None
            replaced = []
            for i, (message, future) in enumerate(self._unconfirmed):
                if future is None:
                    continue
                error = future if isinstance(future, Exception) else future.exception if future.failed() else None
                if error is None:
                    if not future.is_done:
                        raise SinkError("outputs not confirmed yet")
                    continue
                _raise_if_fatal(error)
                if output_refusal(error) is not None:
                    if isinstance(future, Exception):  # refused before it was sent
                        copy = self._refusals.handle(message, error)
                        if copy is not None:
                            replaced.append(copy)
                        self._unconfirmed[i] = (message, None)
                        continue
                    self._refusals.remember(message, error)
                _raise_transaction_error(f"output to {message[0]}", error)
            if not replaced:
                break
            self._unconfirmed.extend((copy, self._send(copy)) for copy in replaced)
        self._unconfirmed.clear()

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        from stream_learner.io.retry import CallTimedOut, call_within

        self._flush_transaction(self.transaction_timeout)
        wanted = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            if wanted:
                call_within(
                    lambda: self._producer.send_offsets_to_transaction(wanted, group_metadata),
                    self.transaction_timeout, "send_offsets_to_transaction",
                )
            # kafka-python's commit has no timeout, and a fenced producer's EndTxn gets no
            # answer from the embedded broker (tests/test_broker_transactions.py).
            call_within(self._producer.commit_transaction, self.transaction_timeout, "commit_transaction")
        except CallTimedOut as error:
            raise TransactionFatal(f"{error} (--transaction-timeout)") from None
        except Exception as error:
            _raise_transaction_error("commit", error)
        self._in_transaction = False

    def abort_transaction(self) -> None:
        from stream_learner.io.retry import CallTimedOut, call_within

        self._pending.clear()
        self._unconfirmed.clear()
        if not self._in_transaction:
            return
        try:
            call_within(self._producer.abort_transaction, self.transaction_timeout, "abort_transaction")
        except CallTimedOut as error:
            raise TransactionFatal(f"{error} (--transaction-timeout)") from None
        except Exception as error:  # an abort that fails leaves nothing to retry with
            raise TransactionFatal(f"abort: {_error_text(error)}") from error
        self._in_transaction = False

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)


def _raise_transaction_error(step: str, error: BaseException):
    """Raise ``error`` as TransactionAbortable or TransactionFatal (io/retry.py decides)."""
    from stream_learner.io.retry import transaction_error_kind

    kind = transaction_error_kind(error)
    if kind == "fatal":
        raise TransactionFatal(f"{step}: {_error_text(error)}") from error
    raise TransactionAbortable(f"{step}: {_error_text(error)}") from error


class ProcessSink:
    """A :class:`KafkaSink` running in a child process, so producing uses the second core.

    kafka-python spends tens of microseconds of Python per message it sends; in the worker's
    process that time is taken from the learners (one GIL). Here the worker only pickles each
    batch's messages down a pipe; the child owns the producer. :meth:`flush` asks the child to
    confirm delivery of everything sent so far, as :meth:`KafkaSink.flush` does. If the child
    dies, its unconfirmed outputs die with it: the next :meth:`dispatch` or :meth:`flush`
    raises :class:`SinkError`, the worker stops without a checkpoint or a commit, and a restart
    re-produces from the last checkpoint whatever was lost.
    """

    def __init__(self, *, bootstrap_servers: str, client_options: Mapping | None = None, **options):
        self._process, self._conn = spawn("stream_learner.io.sinks")
        self._pending: list[tuple] = []
        self._output_errors: dict[tuple[str, str], int] = {}
        self.transactional_id = options.get("transactional_id")
        self.transaction_timeout = float(options.get("transaction_timeout", 60.0))
        self._conn.send((bootstrap_servers, dict(client_options or {}), options, logging.getLogger().level))
        reply = self._receive(timeout=60.0)
        if reply[0] != "ready":
            self.close(timeout=1.0)
            raise reply[1] if isinstance(reply[1], BaseException) else SinkError(str(reply[1]))

    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers = (), partition_hint: int | None = None
    ) -> None:
        self._pending.append((topic, key, value, list(headers), partition_hint))

    def dispatch(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            try:
                self._conn.send(("send", pending))
            except (OSError, EOFError):
                # Its unconfirmed outputs died with it: stop, and restart from the checkpoint.
                raise SinkError(
                    f"the producer process has stopped (exit code {self._process.poll()})"
                ) from None

    def flush(self, timeout: float) -> None:
        self.dispatch()
        try:
            self._conn.send(("flush", timeout))
        except (OSError, EOFError):
            raise SinkError("the producer process has stopped") from None
        reply = self._receive(timeout=timeout + 30.0)
        if len(reply) > 2:  # the child's refused outputs since the last flush
            for key, n in reply[2].items():
                self._output_errors[key] = self._output_errors.get(key, 0) + n
        self._raise_for(reply, "flushed")

    def _raise_for(self, reply, ok: str) -> None:
        """Raise what the child's reply says went wrong (nothing if it is ``ok``)."""
        if reply[0] == "fatal":
            from stream_learner.io.retry import FatalBrokerError

            raise FatalBrokerError(str(reply[1]))
        if reply[0] == "abortable":
            raise TransactionAbortable(str(reply[1]))
        if reply[0] == "transaction_fatal":
            raise TransactionFatal(str(reply[1]))
        if reply[0] != ok:
            raise SinkError(str(reply[1]))

    # Transactions: commands down the pipe; the child's KafkaSink owns the transaction.

    def begin_transaction(self) -> None:
        self._command("begin", None)  # its failure (fenced) comes back with the next answer

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata) -> None:
        self.dispatch()
        self._command("commit", (dict(offsets), group_metadata))
        # The child bounds each step by the transaction timeout; a silent child is stuck.
        reply = self._receive(timeout=2 * self.transaction_timeout + 30.0)
        if reply[0] == "error" and "did not answer" in str(reply[1]):
            raise TransactionFatal(f"commit: {reply[1]}")
        self._raise_for(reply, "committed")

    def abort_transaction(self) -> None:
        self._pending.clear()
        self._command("abort", None)
        reply = self._receive(timeout=self.transaction_timeout + 30.0)
        if reply[0] != "aborted":
            raise TransactionFatal(f"abort: {reply[1]}")

    def _command(self, command: str, argument) -> None:
        try:
            self._conn.send((command, argument))
        except (OSError, EOFError):
            raise TransactionFatal(f"the producer process has stopped (exit code {self._process.poll()})") from None

    def take_output_errors(self) -> dict[tuple[str, str], int]:
        errors, self._output_errors = self._output_errors, {}
        return errors

    def _receive(self, timeout: float):
        try:
            if not self._conn.poll(timeout):
                return ("error", SinkError(f"the producer process did not answer within {timeout:.0f} s"))
            return self._conn.recv()
        except (OSError, EOFError):
            return ("error", SinkError("the producer process has stopped"))

    def close(self, timeout: float = 10.0) -> None:
        """Close the child's producer; bounded by ``timeout`` in all (then the child is killed)."""
        import subprocess

        deadline = time.monotonic() + timeout
        try:
            self._conn.send(("close", max(0.1, timeout * 0.8)))  # time left to answer and exit
            self._receive(timeout=timeout)
        except (OSError, EOFError):
            pass
        self._conn.close()
        try:
            self._process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _producer_process(fd: int) -> None:
    """The child of :class:`ProcessSink`: a KafkaSink driven by messages on a socket."""
    started = start_child(fd)
    if started is None:
        return
    conn, (bootstrap_servers, client_options, options, log_level) = started
    try:
        sink = KafkaSink(bootstrap_servers=bootstrap_servers, client_options=client_options, **options)
    except Exception as error:
        from stream_learner.io.retry import auth_failure

        conn.send(("error", auth_failure(error)))  # what lies behind a bootstrap timeout
        return
    conn.send(("ready", None))
    failed: list[BaseException] = []  # a begin_transaction that failed: told with the next answer

    def answer(message) -> bool:
        try:
            conn.send(message)
            return True
        except (OSError, EOFError):  # the worker stopped waiting (its shutdown is bounded)
            return False

    while True:
        try:
            command, argument = conn.recv()
        except (EOFError, OSError):  # the worker is gone (kill -9): nothing to confirm to
            return
        if command == "send":
            sink._pending.extend(argument)
            sink.dispatch()
        elif command == "flush":
            if not answer(_outcome(sink, "flushed", failed, sink.flush, argument)):
                return
        elif command == "begin":
            try:
                sink.begin_transaction()
            except Exception as error:  # told with the next answer
                failed.append(error)
        elif command == "commit":
            if not answer(_outcome(sink, "committed", failed, sink.commit_transaction, *argument)):
                return
        elif command == "abort":
            failed.clear()
            if not answer(_outcome(sink, "aborted", failed, sink.abort_transaction)):
                return
        elif command == "close":
            try:
                sink.close(argument)
            except Exception as error:  # the broker is away: what is unsent is re-sent on restart
                log.warning("producer closed uncleanly: %s", error)
            answer(("closed", None))
            return


def _outcome(sink: KafkaSink, ok: str, failed: list, step, *args) -> tuple:
    """The producer process's answer to one command: ``(ok | error kind, detail, refused outputs)``."""
    from stream_learner.io.retry import FatalBrokerError

    try:
        if failed:
            raise failed.pop()
        step(*args)
    except FatalBrokerError as error:
        return ("fatal", str(error), sink.take_output_errors())
    except TransactionAbortable as error:
        return ("abortable", str(error), sink.take_output_errors())
    except TransactionFatal as error:
        return ("transaction_fatal", str(error), sink.take_output_errors())
    except SinkError as error:
        return ("error", str(error), sink.take_output_errors())
    return (ok, None, sink.take_output_errors())


class Outputs:
    """Encodes predictions, dead letters and drift events onto their topics."""

    def __init__(
        self,
        sink: Sink,
        *,
        predictions_topic: str | None,
        dead_letter_topic: str | None,
        drift_topic: str | None = None,
    ):
        self.sink = sink
        self.predictions_topic = predictions_topic
        self.dead_letter_topic = dead_letter_topic
        self.drift_topic = drift_topic
        self.predictions = 0
        self.dead_letters = 0
        self._proba_keys: dict[tuple, list[str] | tuple] = {}

    def prediction(
        self,
        record_id: str,
        prediction,
        *,
        model_version: int,
        latency_seconds: float,
        message: Message,
    ) -> None:
        if not self.predictions_topic:
            return
        # The bytes json.dumps gives for {"id", "label", "proba", "learner", "model_version",
        # "latency_ms", "source"}, written directly: a third of the cost, once per record.
        proba = self._proba_json(prediction.proba or {})
        value = (
            f'{{"id": {_scalar(record_id)}, "label": {_scalar(prediction.label)}, "proba": {{{proba}}}, '
            f'"learner": {_scalar(prediction.learner)}, "model_version": {_scalar(model_version)}, '
            f'"latency_ms": {_number(round(latency_seconds * 1000.0, 3))}, "source": {{"topic": '
            f'{_scalar(message.topic)}, "partition": {_scalar(message.partition)}, "offset": {_scalar(message.offset)}}}}}'
        )
        self.sink.send(
            self.predictions_topic, record_id.encode("utf-8"), value.encode("utf-8"), partition_hint=message.partition
        )
        self.predictions += 1

    def _proba_json(self, proba: Mapping) -> str:
        """The inside of the JSON object ``{str(label): float(p) to 6 decimals, ...}``.
        Learners give the same classes record after record: their keys' JSON is kept, per
        class list. Decimals come from ``:.6f`` (the digits of ``round(p, 6)``, a fifth of
        its cost: this runs once per class per record)."""
        names = tuple(map(str, proba))
        keys = self._proba_keys.get(names)
        if keys is None:
            if len(self._proba_keys) > 64:
                self._proba_keys.clear()
            # Labels that print alike ({1: .., "1": ..}) merge in a dict: the general path.
            keys = [f"{_string(name)}: " for name in names] if len(set(names)) == len(names) else ()
            self._proba_keys[names] = keys
        values = list(map(float, proba.values()))
        if keys and math.isfinite(sum(values)):
            decimals = [f"{value:.6f}".rstrip("0") for value in values]
            return ", ".join(map(str.__add__, keys, [d + "0" if d[-1] == "." else d for d in decimals]))
        rounded = dict(zip(names, (round(value, 6) for value in values), strict=False))
        return ", ".join(f"{_string(name)}: {_number(value)}" for name, value in rounded.items())

    def dead_letter(self, message: Message, reason: str, detail: str) -> None:
        if not self.dead_letter_topic:
            return
        headers = [
            ("reason", str(reason).encode("utf-8")),
            ("detail", detail.encode("utf-8", "replace")[:1000]),
            ("source_topic", message.topic.encode("utf-8")),
            ("source_partition", str(message.partition).encode("ascii")),
            ("source_offset", str(message.offset).encode("ascii")),
        ]
        # The original bytes, untouched; a tombstone (None) becomes an empty value.
        self.sink.send(
            self.dead_letter_topic, message.key, message.value or b"", headers, partition_hint=message.partition
        )
        self.dead_letters += 1

    def drift_event(self, event, *, message: Message) -> None:
        if not self.drift_topic:
            return
        value = {
            "learner": event.learner,
            "detector": event.detector,
            "position": event.position,
            "time": event.time,
            "accuracy_before": event.accuracy_before,
            "accuracy_after": event.accuracy_after,
            "source": {"topic": message.topic, "partition": message.partition, "offset": message.offset},
        }
        self.sink.send(self.drift_topic, str(event.learner).encode("utf-8"), _json(value))


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # one encoder, not one per message


def _json(value: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


_string = json.encoder.encode_basestring  # what _ENCODER writes for a str (ensure_ascii off)


def _scalar(value) -> str:
    """``_ENCODER.encode(value)``, quicker for the common str and int."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is int:
        return int.__repr__(value)
    return _ENCODER.encode(value)


def _number(value: float) -> str:
    return float.__repr__(value) if math.isfinite(value) else _ENCODER.encode(value)


if __name__ == "__main__":  # the producer process of ProcessSink
    import sys

    # From the module by its own name, so log lines say stream_learner.io.sinks, not __main__.
    from stream_learner.io.sinks import _producer_process as run_producer_process

    run_producer_process(int(sys.argv[1]))
