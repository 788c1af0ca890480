"""Retrying what the broker refused: one backoff policy for every retry loop, and which errors
are worth retrying at all.

:class:`Backoff` gives the delays (exponential, capped, with jitter so that a group of workers
that lost the same broker do not come back in step); :func:`retry` calls a function until it
works, waiting on a stop event, logging each retry, and lets an error the classifier calls
fatal through at once. :func:`is_fatal` is that classifier for Kafka: authentication and
authorization failures, which no retry can cure, are fatal; the rest (broker unreachable,
leader moved, timeouts) are retried.

>>> import random
>>> backoff = Backoff(initial=0.5, cap=15.0, rng=random.Random(0))
>>> delays = [backoff.next() for _ in range(8)]
>>> all(0.0 <= d <= 15.0 for d in delays)
True
>>> backoff.reset(); backoff.attempts
0

"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "Backoff",
    "CallTimedOut",
    "FatalBrokerError",
    "RateLimitedLog",
    "auth_failure",
    "call_within",
    "is_fatal",
    "retry",
    "transaction_error_kind",
    "watch_kafka_python_auth",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class FatalBrokerError(RuntimeError):
    """The broker refused us in a way no retry can change (credentials, permissions)."""


class Backoff:
    """Capped exponential delays with jitter.

    ``jitter="full"`` draws each delay uniformly from ``[0, min(cap, initial * 2**n)]``;
    ``"decorrelated"`` from ``[initial, 3 * previous]`` capped (AWS architecture blog,
    "Exponential Backoff And Jitter"); ``"none"`` gives the plain doubling. :meth:`reset`
    after a success starts again from ``initial``.
    """

    def __init__(
        self,
        initial: float = 0.5,
        cap: float = 15.0,
        *,
        jitter: str = "full",
        rng: random.Random | None = None,
    ):
        if initial <= 0 or cap < initial:
            raise ValueError(f"need 0 < initial <= cap, got initial={initial}, cap={cap}")
        if jitter not in ("full", "decorrelated", "none"):
            raise ValueError(f"jitter must be full, decorrelated or none, not {jitter!r}")
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempts = 0
        self._previous = initial

    def next(self) -> float:
        """The delay before the next attempt."""
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.attempts, 64))
        self.attempts += 1
        if self.jitter == "full":
            return self._rng.uniform(0.0, ceiling)
        if self.jitter == "decorrelated":
            self._previous = min(self.cap, self._rng.uniform(self.initial, self._previous * 3.0))
            return self._previous
        return ceiling

    def reset(self) -> None:
        self.attempts = 0
        self._previous = self.initial


def retry(
    what: str,
    call: Callable[[], T],
    stop: threading.Event,
    *,
    retriable: tuple[type[BaseException], ...] = (Exception,),
    fatal: Callable[[BaseException], bool] = lambda error: False,
    backoff: Backoff | None = None,
    logger: logging.Logger = log,
    describe: Callable[[BaseException], str] = str,
    on_retry: Callable[[BaseException], object] | None = None,
) -> T | None:
    """``call()`` until it returns; None if ``stop`` was set first.

    An error of ``retriable`` type is logged (``what``, the error, the delay) and retried
    after the next backoff delay; one that ``fatal`` accepts is raised as
    :class:`FatalBrokerError` (its message names the setting to check); anything else
    propagates unchanged. ``on_retry(error)`` hears of each retry (a broker-health tracker);
    after the stop request nothing is retried or logged.
    """
    backoff = backoff or Backoff()
    while not stop.is_set():
        try:
            return call()
        except retriable as error:
            if isinstance(error, FatalBrokerError):
                raise
            error = auth_failure(error)
            if fatal(error):
                raise FatalBrokerError(f"{what}: {fatal_message(error)}") from error
            if stop.is_set():
                break
            if on_retry is not None:
                on_retry(error)
            delay = backoff.next()
            logger.warning(
                "%s: broker unreachable (%s); retrying in %.1f s", what, describe(error), delay
            )
            stop.wait(delay)
    return None


# -- which errors are fatal ---------------------------------------------------------------

# kafka-python's error classes (by name, so that this module imports without it) that mean
# the broker will not let us in, with the setting to look at.
_KAFKA_PYTHON_FATAL = {
    "UnsupportedSaslMechanismError": "--sasl-mechanism (the broker does not offer it)",
    "SaslAuthenticationFailedError": "--sasl-plain-username / --sasl-plain-password",
    "IllegalSaslStateError": "--security-protocol / --sasl-mechanism",
    "AuthenticationFailedError": "--sasl-plain-username / --sasl-plain-password",
    "AuthenticationMethodNotSupported": "--sasl-mechanism",
    "TopicAuthorizationFailedError": "the topic ACLs of this principal (--sasl-plain-username)",
    "GroupAuthorizationFailedError": "the group ACLs of this principal (--group-id, --sasl-plain-username)",
    "ClusterAuthorizationFailedError": "the cluster ACLs of this principal (idempotent writes need IdempotentWrite)",
    "TransactionalIdAuthorizationFailedError": "the transactional-id ACLs of this principal",
    "DelegationTokenAuthorizationFailedError": "the delegation-token ACLs of this principal",
}

# librdkafka's error names (KafkaError.name()) that mean the same.
_LIBRDKAFKA_FATAL = {
    "_AUTHENTICATION": "--sasl-mechanism / --sasl-plain-username / --sasl-plain-password",
    "SASL_AUTHENTICATION_FAILED": "--sasl-plain-username / --sasl-plain-password",
    "UNSUPPORTED_SASL_MECHANISM": "--sasl-mechanism (the broker does not offer it)",
    "ILLEGAL_SASL_STATE": "--security-protocol / --sasl-mechanism",
    "TOPIC_AUTHORIZATION_FAILED": "the topic ACLs of this principal (--sasl-plain-username)",
    "GROUP_AUTHORIZATION_FAILED": "the group ACLs of this principal (--group-id, --sasl-plain-username)",
    "CLUSTER_AUTHORIZATION_FAILED": "the cluster ACLs of this principal (idempotent writes need IdempotentWrite)",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED": "the transactional-id ACLs of this principal",
}


def _librdkafka_error(error: BaseException):
    """The ``confluent_kafka.KafkaError`` inside a ``KafkaException`` (or itself), else None."""
    inner = error.args[0] if getattr(error, "args", None) else None
    for candidate in (inner, error):
        if hasattr(candidate, "code") and hasattr(candidate, "name") and callable(candidate.name):
            return candidate
    return None


def _setting(error: BaseException) -> str | None:
    for cls in type(error).__mro__:
        if cls.__name__ in _KAFKA_PYTHON_FATAL:
            return _KAFKA_PYTHON_FATAL[cls.__name__]
    inner = _librdkafka_error(error)
    if inner is not None:
        try:
            name, text = inner.name(), inner.str()
        except Exception:
            return None
        if name == "_AUTHENTICATION" and "Unsupported SASL mechanism" in text:
            return _LIBRDKAFKA_FATAL["UNSUPPORTED_SASL_MECHANISM"]
        return _LIBRDKAFKA_FATAL.get(name)
    return None


def is_fatal(error: BaseException) -> bool:
    """True for authentication and authorization failures, of either client."""
    return isinstance(error, FatalBrokerError) or _setting(error) is not None


def fatal_message(error: BaseException) -> str:
    """One line: what the broker said and which setting to check."""
    if isinstance(error, FatalBrokerError):
        return str(error)
    inner = _librdkafka_error(error)
    text = inner.str() if inner is not None and hasattr(inner, "str") else str(error)
    name = type(error).__name__
    said = text if name in text or inner is not None else f"{name}: {text}" if text else name
    return f"the broker refused us ({said}); check {_setting(error)}"


# -- kafka-python's hidden bootstrap errors --------------------------------------------------


class _AuthWatch(logging.Filter):
    """kafka-python 3 retries a refused SASL handshake until its bootstrap times out, then
    raises ``KafkaTimeoutError('Unable to bootstrap ...')``: the refusal itself is only in the
    log record of ``kafka.net.manager`` ("Bootstrap connection to %s failed: %s"). This filter
    keeps the last fatal error of such a record, and lets the record through only as far as
    the ``kafka.net`` level allows (the worker silences connection churn there)."""

    def __init__(self):
        super().__init__()
        self.last: BaseException | None = None
        self.when = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, BaseException) and is_fatal(arg):
                self.last, self.when = arg, time.monotonic()
        return record.levelno >= logging.getLogger("kafka.net").getEffectiveLevel()


_WATCH = _AuthWatch()


def watch_kafka_python_auth() -> None:
    """Install the watch (idempotent): call before building kafka-python clients."""
    manager = logging.getLogger("kafka.net.manager")
    if _WATCH not in manager.filters:
        manager.addFilter(_WATCH)
    # Records must be made for the filter to see them, whatever "kafka.net" is set to.
    if manager.getEffectiveLevel() > logging.WARNING:
        manager.setLevel(logging.WARNING)


def auth_failure(error: BaseException, within: float = 120.0) -> BaseException:
    """``error``, or the authentication failure that lies behind it: a kafka-python bootstrap
    timeout preceded (within ``within`` seconds) by a refused handshake."""
    if is_fatal(error):
        return error
    timed_out = type(error).__name__ == "KafkaTimeoutError" and "bootstrap" in str(error)
    if timed_out and _WATCH.last is not None and time.monotonic() - _WATCH.when <= within:
        return _WATCH.last
    return error


# -- bounded logging ------------------------------------------------------------------------


class RateLimitedLog:
    """Logs at most ``limit`` lines per key per ``period`` seconds; says how many it held back.

    >>> import logging
    >>> limited = RateLimitedLog(logging.getLogger("doctest"), limit=2, period=60.0, clock=lambda: 0.0)
    >>> [limited.warning("too_large", "dropped %s", i) for i in range(4)]
    [True, True, False, False]
    >>> limited.suppressed["too_large"]
    2
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        limit: int = 5,
        period: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.limit = limit
        self.period = period
        self.clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self.suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args) -> bool:
        now = self.clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.period:
            held = self.suppressed.pop(key, 0)
            if held:
                self.logger.log(
                    level, "%d more like this (%s) in the last %.0f s", held, key, now - start
                )
            start, count = now, 0
        if count >= self.limit:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            self._windows[key] = (start, count)
            return False
        self._windows[key] = (start, count + 1)
        self.logger.log(level, message, *args)
        return True

    def warning(self, key: str, message: str, *args) -> bool:
        return self.log(logging.WARNING, key, message, *args)


# -- transactions: which errors end the producer, which only the transaction -----------------

# kafka-python error classes after which the transactional producer is unusable: another
# instance with our transactional id took over (fenced), or the broker cannot do transactions.
_KAFKA_PYTHON_TRANSACTION_FATAL = frozenset({
    "ProducerFencedError",
    "InvalidProducerEpochError",
    "TransactionalIdAuthorizationFailedError",
    "UnsupportedVersionError",
    "UnsupportedForMessageFormatError",
    "InvalidTxnStateError",
    "IllegalStateError",
})
# Abortable: the transaction cannot commit, the producer can begin another one (KIP-447's stale
# consumer generation, a lost member, a refused record).
_KAFKA_PYTHON_TRANSACTION_ABORTABLE = frozenset({
    "CommitFailedError",
    "IllegalGenerationError",
    "UnknownMemberIdError",
    "FencedInstanceIdError",
    "RebalanceInProgressError",
    "MessageSizeTooLargeError",
    "RecordListTooLargeError",
    "InvalidRecordError",
    "OutOfOrderSequenceNumberError",
    "UnknownProducerIdError",
    "KafkaTimeoutError",
})


def transaction_error_kind(error: BaseException) -> str:
    """``"fatal"`` (the producer is fenced or unusable: exit, the restart recovers),
    ``"abortable"`` (abort the transaction and redo the cycle) or ``"retriable"`` (call the
    same step again), for either client.

    kafka-python wraps the error that put the producer in its error state into a plain
    ``KafkaError("Cannot execute transactional method because we are in an error state")``:
    its cause decides. librdkafka says it itself (``fatal()``, ``txn_requires_abort()``,
    ``retriable()``).

    >>> from kafka.errors import ProducerFencedError, CommitFailedError
    >>> transaction_error_kind(ProducerFencedError()), transaction_error_kind(CommitFailedError())
    ('fatal', 'abortable')
    """
    inner = _librdkafka_error(error)
    if inner is not None and hasattr(inner, "fatal"):
        try:
            if inner.fatal():
                return "fatal"
            if inner.txn_requires_abort():
                return "abortable"
            if inner.retriable():
                return "retriable"
        except Exception:
            return "fatal"
        return "abortable"
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & _KAFKA_PYTHON_TRANSACTION_FATAL or is_fatal(error):
            return "fatal"
        if names & _KAFKA_PYTHON_TRANSACTION_ABORTABLE:
            return "abortable"
        text = str(error)
        if "ProducerFenced" in text or "InvalidProducerEpoch" in text:
            return "fatal"
        error = error.__cause__ or error.__context__
    # "in an error state" without a known cause, or anything unexpected: start afresh.
    return "fatal"


class CallTimedOut(TimeoutError):
    """:func:`call_within` gave up waiting; the call may still be running in its thread."""


def call_within(call: Callable[[], T], seconds: float, what: str) -> T:
    """``call()`` in a daemon thread, waited for at most ``seconds``: for client calls that
    have no timeout of their own (kafka-python's ``commit_transaction`` blocks for ever on a
    broker that never answers). Raises :class:`CallTimedOut` past it, or what ``call`` raised."""
    outcome: dict[str, object] = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"stream-learner-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise CallTimedOut(f"{what} did not finish within {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")  # type: ignore[return-value]
