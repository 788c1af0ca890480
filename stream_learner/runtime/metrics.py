"""Prometheus metrics and the HTTP endpoints ``/metrics``, ``/healthz`` and ``/readyz``.

Every metric of stream-learner is declared here, in :class:`StreamMetrics`, on a registry
the caller may inject (tests use a fresh ``CollectorRegistry()`` and read values back with
``registry.get_sample_value``). Names follow Prometheus conventions: namespace
``stream_learner``, base units (seconds, ratios 0–1), ``_total`` for counters. Label values
are few and bounded — topic, partition, learner, detector, outcome, reason — never a message
id or text; a value outside the known set becomes ``other``. Every labelled series is touched
at start-up so dashboards see zeros rather than gaps.

Updates are cheap and batch-friendly: the worker counts a batch's outcomes in a dict and
calls :meth:`StreamMetrics.record_outcomes` once, and histograms take many observations in
one call.

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> metrics = StreamMetrics(registry, learners=["nb"], process_metrics=False)
>>> metrics.record_outcomes({"learned": 3, "predicted": 1})
>>> registry.get_sample_value("stream_learner_records_total", {"outcome": "learned"})
3.0
>>> metrics.dead_lettered("invalid_json")
>>> registry.get_sample_value("stream_learner_dead_letters_total", {"reason": "invalid_json"})
1.0
>>> registry.get_sample_value("stream_learner_records_total", {"outcome": "dead_lettered"})
1.0

"""

from __future__ import annotations

import bisect
import contextlib
import http.server
import logging
import math
import platform
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import make_wsgi_app

from stream_learner.core.records import Reason

__all__ = [
    "NAMESPACE",
    "OUTCOMES",
    "DEAD_LETTER_REASONS",
    "OUTPUTS",
    "OUTPUT_ERROR_REASONS",
    "TRANSACTION_OUTCOMES",
    "StreamMetrics",
    "HealthServer",
    "BrokerHealth",
    "Heartbeat",
    "Readiness",
]

log = logging.getLogger(__name__)

NAMESPACE = "stream_learner"

#: What can happen to a consumed message (``outcome`` label of ``stream_learner_records_total``).
OUTCOMES = ("learned", "predicted", "label_joined", "label_unmatched", "dead_lettered")
OUTPUTS = ("predictions", "dead_letters", "drift_events")
# Why the broker refused an output for good (sinks.output_refusal); "truncated": a dead
# letter too large, replaced by a truncated copy.
OUTPUT_ERROR_REASONS = (
    "message_too_large", "invalid_topic", "topic_authorization_failed", "invalid_record", "policy_violation",
    "truncated", "other",
)

#: How an exactly-once cycle's transaction ended (``outcome`` of ``stream_learner_transactions_total``):
#: ``postponed`` keeps it open (broker slow or away), ``aborted`` re-reads its records.
TRANSACTION_OUTCOMES = ("committed", "postponed", "aborted")

#: Why a message went to the dead-letter topic: the decoder's reasons plus the worker's own.
DEAD_LETTER_REASONS = (
    *(reason.value for reason in Reason),
    "produce_error",
    "other",
)

OTHER = "other"

# Seconds. Per-record work is tens of microseconds to milliseconds; batches up to seconds.
RECORD_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# End-to-end delay from the record's own timestamp: from milliseconds to a day behind.
DELAY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
)  # fmt: skip
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Most distinct values one open-ended label (learner, detector, topic) may take; beyond it,
# values become "other" so a bug or a hostile config cannot blow up the series count.
MAX_LABEL_VALUES = 64

_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for every value, with one lock round per bucket, not per value."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total_sum = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total_sum is None:  # another client version
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    total = 0.0
    for value in values:
        index = bisect.bisect_left(bounds, value)
        counts[index] = counts.get(index, 0) + 1
        total += value
    if not counts:
        return
    total_sum.inc(total)
    for index, count in counts.items():
        buckets[index].inc(count)


def _observe_repeated(histogram: Histogram, value: float, times: int) -> None:
    """``times`` observations of the same ``value`` in O(1)."""
    buckets = getattr(histogram, "_buckets", None)
    total_sum = getattr(histogram, "_sum", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if bounds is None or buckets is None or total_sum is None:
        for _ in range(times):
            histogram.observe(value)
        return
    buckets[bisect.bisect_left(bounds, value)].inc(times)
    total_sum.inc(value * times)


class _BoundedLabel:
    """Admits at most ``limit`` distinct values of one label; the rest become ``other``."""

    def __init__(self, name: str, known: Iterable[str] = (), limit: int = MAX_LABEL_VALUES):
        self.name = name
        self.limit = limit
        self._values: set[str] = set(known)
        self._warned = False

    def __call__(self, value) -> str:
        value = str(value)
        if value in self._values:
            return value
        if len(self._values) < self.limit:
            self._values.add(value)
            return value
        if not self._warned:
            self._warned = True
            log.warning(
                "more than %d values of label %r; further ones count as %r",
                self.limit,
                self.name,
                OTHER,
            )
        return OTHER


def _finite_or_nan(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


class StreamMetrics:
    """All metrics of a stream-learner process, on one registry.

    Parameters
    ----------
    registry
        Where to register. None makes a fresh :class:`CollectorRegistry` (see ``.registry``);
        pass ``prometheus_client.REGISTRY`` to share the global one.
    learners
        Names of the learners; their series exist (as NaN / 0) from the start.
    detector
        Drift detector name (``detector`` label of the drift counter).
    config_info
        Configuration to publish as ``stream_learner_config_info`` labels (keys are made
        valid label names, values cut to 200 characters). Keep it small and free of secrets.
    process_metrics
        Also register the client library's process, platform and GC collectors.

    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        learners: Sequence[str] = (),
        detector: str = "adwin",
        config_info: Mapping[str, str] | None = None,
        process_metrics: bool = True,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.learners = tuple(learners)
        self.detector = detector
        self._learner_label = _BoundedLabel("learner", self.learners)
        self._detector_label = _BoundedLabel("detector", [detector])
        self._topic_label = _BoundedLabel("topic")
        self._reason_label = set(DEAD_LETTER_REASONS)
        self._label_buffer_previous: dict[str, float] | None = None
        self._lock = threading.Lock()
        if process_metrics:
            self._register_process_collectors()
        self._declare()
        self._touch(config_info or {})

    # -- declaration ---------------------------------------------------------------------

    def _register_process_collectors(self) -> None:
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            # Already there when sharing the global registry, which registers them itself.
            with contextlib.suppress(ValueError):
                collector(registry=self.registry)

    def _declare(self) -> None:
        ns, reg = NAMESPACE, self.registry
        self.records = Counter(
            "records", "Consumed messages by what became of them.",
            ["outcome"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.dead_letters = Counter(
            "dead_letters", "Messages sent to the dead-letter topic, by reason.",
            ["reason"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.predictions = Counter(
            "predictions", "Predictions produced to the output topic.", namespace=ns, registry=reg
        )
        self.record_seconds = Histogram(
            "record_processing_seconds",
            "Time to decode, predict, learn and emit one record (in mini-batch mode: the "
            "mini-batch's time over its size).",
            namespace=ns, registry=reg, buckets=RECORD_BUCKETS,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "batch_processing_seconds", "Time to process one polled batch.",
            namespace=ns, registry=reg, buckets=BATCH_BUCKETS,
        )  # fmt: skip
        self.batch_records = Histogram(
            "batch_records", "Records in one polled batch.",
            namespace=ns, registry=reg, buckets=BATCH_SIZE_BUCKETS,
        )  # fmt: skip
        self.end_to_end_delay = Histogram(
            "end_to_end_delay_seconds",
            "Delay from the record's own timestamp to the end of its processing.",
            namespace=ns, registry=reg, buckets=DELAY_BUCKETS,
        )  # fmt: skip
        self.accuracy = Gauge(
            "accuracy_ratio",
            "Prequential accuracy (0-1) per learner, over the rolling window or since the start.",
            ["learner", "window"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.macro_f1 = Gauge(
            "macro_f1_ratio", "Prequential macro-averaged F1 (0-1) per learner.",
            ["learner"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.log_loss = Gauge(
            "log_loss", "Prequential mean log loss (nats) per learner.",
            ["learner"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.learner_records = Gauge(
            "learner_records",
            "Labelled records the learner has learned from (model state: carried over "
            "from checkpoints, so a gauge).",
            ["learner"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.drift_events = Counter(
            "drift_events", "Concept drifts detected, by learner and detector.",
            ["learner", "detector"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.drift_warning = Gauge(
            "drift_warning", "1 while the learner's drift detector is in its warning zone.",
            ["learner"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.last_drift = Gauge(
            "last_drift_timestamp_seconds",
            "Unix time of the learner's last detected drift (0: none yet).",
            ["learner"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.consumer_lag = Gauge(
            "consumer_lag_records",
            "Records behind the partition's high watermark (from the consumer's highwater).",
            ["topic", "partition"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.assigned_partitions = Gauge(
            "assigned_partitions", "Partitions assigned to this consumer.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.checkpoint_seconds = Histogram(
            "checkpoint_duration_seconds", "Time to write a checkpoint.",
            namespace=ns, registry=reg, buckets=CHECKPOINT_BUCKETS,
        )  # fmt: skip
        self.checkpoint_last_success = Gauge(
            "checkpoint_last_success_timestamp_seconds",
            "Unix time of the last successful checkpoint (0: none yet).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.checkpoint_failures = Counter(
            "checkpoint_failures", "Checkpoints that could not be written.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.truncated_texts = Counter(
            "truncated_texts",
            "Texts over --max-text-bytes cut to it and processed (--on-oversize truncate).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.transactions = Counter(
            "transactions",
            "Attempts to end an exactly-once cycle's transaction, by outcome: committed, "
            "postponed (kept open, retried), aborted (records re-read). Zero in at-least-once mode.",
            ["outcome"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.output_errors = Counter(
            "output_errors",
            "Outputs the broker refused for good, by output and reason: dropped, or for "
            "reason=\"truncated\" replaced by a truncated copy.",
            ["output", "reason"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.label_buffer_size = Gauge(
            "label_buffer_records", "Predictions waiting for their delayed label.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.label_buffer_bytes = Gauge(
            "label_buffer_bytes",
            "Bytes the predictions waiting for their delayed label take (bounded by --label-buffer-bytes).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.label_buffer_expired = Counter(
            "label_buffer_expired", "Waiting predictions dropped because their label TTL passed.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.label_buffer_evicted = Counter(
            "label_buffer_evicted", "Waiting predictions dropped because the buffer was full.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.label_buffer_unmatched = Counter(
            "label_buffer_unmatched",
            "Delayed labels that found no waiting prediction (unknown, expired or evicted id).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.fusion_rejected_messages = Counter(
            "fusion_rejected",
            "Messages of the models topic dropped unfolded, by reason (unsigned, bad_signature, replayed, malformed, unsafe).",
            ["reason"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.build_info = Info(
            "build", "Version of stream-learner and its main libraries.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.config_info = Info(
            "config", "Configuration of this worker.", namespace=ns, registry=reg
        )

    def _touch(self, config_info: Mapping[str, str]) -> None:
        for outcome in OUTCOMES:
            self.records.labels(outcome=outcome)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for output in OUTPUTS:
            for reason in OUTPUT_ERROR_REASONS:
                self.output_errors.labels(output=output, reason=reason)
        for outcome in TRANSACTION_OUTCOMES:
            self.transactions.labels(outcome=outcome)
        for learner in self.learners:
            self._touch_learner(learner)
        from stream_learner.fusion.fusion import REJECT_REASONS

        for reason in REJECT_REASONS:
            self.fusion_rejected_messages.labels(reason=reason)
        self.build_info.info(_build_labels())
        self.config_info.info(
            {_label_name(key): str(value)[:200] for key, value in config_info.items()}
        )

    def _touch_learner(self, learner: str) -> None:
        for window in ("rolling", "cumulative"):
            self.accuracy.labels(learner=learner, window=window).set(math.nan)
        self.macro_f1.labels(learner=learner).set(math.nan)
        self.log_loss.labels(learner=learner).set(math.nan)
        self.learner_records.labels(learner=learner)
        self.drift_events.labels(learner=learner, detector=self.detector)
        self.drift_warning.labels(learner=learner)
        self.last_drift.labels(learner=learner)

    # -- updates the worker makes ------------------------------------------------------------

    def record_outcomes(self, counts: Mapping[str, int]) -> None:
        """Count a batch's records by outcome (``{"learned": 480, "predicted": 20}``).

        Dead letters are counted by :meth:`dead_lettered`, which knows the reason: a
        ``dead_lettered`` entry here is ignored so that nothing is counted twice.
        """
        for outcome, n in counts.items():
            outcome = str(outcome)
            if not n or outcome == "dead_lettered":
                continue
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
            self.records.labels(outcome=outcome).inc(n)

    def dead_lettered(self, reason: str, n: int = 1) -> None:
        """``n`` messages went to the dead-letter topic for ``reason`` (a :class:`Reason`).

        Also counts them as ``outcome="dead_lettered"``.
        """
        reason = str(reason)
        if reason not in self._reason_label:
            reason = OTHER
        self.dead_letters.labels(reason=reason).inc(n)
        self.records.labels(outcome="dead_lettered").inc(n)

    def observe_batch(
        self, n_records: int, seconds: float, record_seconds: Iterable[float] | None = None
    ) -> None:
        """A batch of ``n_records`` took ``seconds``; ``record_seconds`` are its records' own
        times (without them, each record is observed as ``seconds / n_records``)."""
        self.batch_seconds.observe(seconds)
        self.batch_records.observe(n_records)
        if record_seconds:
            _observe_many(self.record_seconds, record_seconds)
        elif n_records > 0:
            _observe_repeated(self.record_seconds, seconds / n_records, n_records)

    def observe_end_to_end_delay(self, seconds_list: Iterable[float]) -> None:
        """Delays of a batch's records from their own timestamps (negative ones count as 0)."""
        _observe_many(self.end_to_end_delay, (max(0.0, s) for s in seconds_list))

    def set_learner_stats(self, stats: Mapping[str, Mapping]) -> None:
        """Publish ``StreamProcessor.learner_stats()``: accuracy, macro-F1, log loss, count,
        warning state per learner. Missing or non-finite values show as NaN (no data)."""
        for name, learner_stats in stats.items():
            learner = self._learner_label(name)
            if learner not in self.learners and learner != OTHER:
                self.learners = (*self.learners, learner)
                self._touch_learner(learner)
            accuracy = self.accuracy
            accuracy.labels(learner=learner, window="rolling").set(
                _finite_or_nan(learner_stats.get("rolling_accuracy"))
            )
            accuracy.labels(learner=learner, window="cumulative").set(
                _finite_or_nan(learner_stats.get("accuracy"))
            )
            self.macro_f1.labels(learner=learner).set(_finite_or_nan(learner_stats.get("macro_f1")))
            self.log_loss.labels(learner=learner).set(_finite_or_nan(learner_stats.get("log_loss")))
            n = learner_stats.get("learned", learner_stats.get("n"))
            if n is not None:
                self.learner_records.labels(learner=learner).set(n)
            self.drift_warning.labels(learner=learner).set(
                1.0 if learner_stats.get("warning") else 0.0
            )

    def drift_detected(
        self, learner: str, detector: str | None = None, when: float | None = None
    ) -> None:
        """Count a drift of ``learner`` found by ``detector`` at Unix time ``when``."""
        learner = self._learner_label(learner)
        detector = self._detector_label(detector or self.detector)
        self.drift_events.labels(learner=learner, detector=detector).inc()
        self.last_drift.labels(learner=learner).set(time.time() if when is None else when)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """Records between the consumer's position and the partition's high watermark."""
        self.consumer_lag.labels(topic=self._topic_label(topic), partition=str(int(partition))).set(
            max(0, lag)
        )

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's lag series (another worker reports it now)."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(self._topic_label(topic), str(int(partition)))

    def set_assigned_partitions(self, n: int) -> None:
        self.assigned_partitions.set(n)

    def checkpoint_succeeded(self, seconds: float, when: float | None = None) -> None:
        """A checkpoint took ``seconds`` and completed at Unix time ``when``."""
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_last_success.set(time.time() if when is None else when)

    def checkpoint_failed(self) -> None:
        self.checkpoint_failures.inc()

    def text_truncated(self) -> None:
        self.truncated_texts.inc()

    def transaction_ended(self, outcome: str) -> None:
        """An attempt to end an exactly-once cycle's transaction: committed, postponed (kept
        open) or aborted."""
        if outcome not in TRANSACTION_OUTCOMES:
            raise ValueError(f"unknown transaction outcome {outcome!r}; known: {TRANSACTION_OUTCOMES}")
        self.transactions.labels(outcome=outcome).inc()

    def output_failed(self, output: str, reason: str, n: int = 1) -> None:
        """``n`` outputs (``predictions``, ``dead_letters``, ``drift_events``) the broker
        refused for good, by reason (see :data:`OUTPUT_ERROR_REASONS`)."""
        output = output if output in OUTPUTS else "other"
        reason = reason if reason in OUTPUT_ERROR_REASONS else "other"
        self.output_errors.labels(output=output, reason=reason).inc(n)

    def set_label_buffer(self, stats: Mapping) -> None:
        """Publish ``StreamProcessor.label_buffer_stats()`` (``size``, ``bytes`` and cumulative
        ``expired``, ``evicted``, ``unmatched``).

        The cumulative counts are turned into counter increments. The first call sets the
        baseline: call it once at start-up, after restoring a checkpoint, so the counts
        carried over from before a restart are not counted again.
        """
        size = stats.get("size")
        if size is not None:
            self.label_buffer_size.set(size)
        if stats.get("bytes") is not None:
            self.label_buffer_bytes.set(stats["bytes"])
        current = {key: float(stats.get(key) or 0) for key in ("expired", "evicted", "unmatched")}
        with self._lock:
            previous = self._label_buffer_previous
            self._label_buffer_previous = current
        if previous is None:
            return
        for key, counter in (
            ("expired", self.label_buffer_expired),
            ("evicted", self.label_buffer_evicted),
            ("unmatched", self.label_buffer_unmatched),
        ):
            delta = current[key] - previous[key]
            if delta > 0:  # a smaller count means the processor was replaced: new baseline
                counter.inc(delta)

    def fusion_rejected(self, reason: str) -> None:
        """A message of the models topic was dropped for ``reason`` (see ``fusion.REJECT_REASONS``)."""
        from stream_learner.fusion.fusion import REJECT_REASONS

        known = reason if reason in REJECT_REASONS else "malformed"
        self.fusion_rejected_messages.labels(reason=known).inc()

    def predictions_produced(self, n: int) -> None:
        if n:
            self.predictions.inc(n)


def _label_name(key: str) -> str:
    name = _LABEL_NAME.sub("_", str(key)) or "_"
    if name[0].isdigit():
        name = "_" + name
    if name.startswith("__"):
        name = "x" + name  # names starting with __ are reserved by Prometheus
    return name


def _build_labels() -> dict[str, str]:
    from importlib import metadata

    try:
        version = metadata.version("stream-learner")
    except metadata.PackageNotFoundError:  # running from a source tree
        from stream_learner import __version__ as version
    labels = {"version": version, "python_version": platform.python_version()}

    for distribution in ("river", "kafka-python", "numpy", "prometheus-client"):
        try:
            labels[_label_name(distribution) + "_version"] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            labels[_label_name(distribution) + "_version"] = "none"
    return labels


class BrokerHealth:
    """Whether the worker hears from its broker, for readiness, liveness and the logs.

    The source reports when the broker last answered (:meth:`contact`: a fetch, a group
    heartbeat, a commit, a rebalance); failures say why it did not (:meth:`failed`), and a
    loop that waits for the broker says so (:meth:`retrying`). After ``timeout`` seconds
    without an answer the broker counts as lost: the worker is not ready, and it logs that
    (then again every ``timeout`` seconds while it lasts, and when the broker is back). A
    worker waiting for its broker is alive, unless ``liveness_timeout`` is set and it has
    waited longer than that (so that an orchestrator restarts it; None: never).

    >>> now = [0.0]
    >>> health = BrokerHealth(timeout=30.0, clock=lambda: now[0])
    >>> health.readiness_problem()
    'broker not reached yet'
    >>> health.contact()
    >>> health.readiness_problem() is None
    True
    >>> now[0] = 45.0
    >>> health.failed("offset commit", "KafkaTimeoutError")
    >>> health.readiness_problem()
    'broker unreachable for 45 s (limit 30 s; last error: offset commit: KafkaTimeoutError)'
    """

    def __init__(
        self,
        timeout: float = 30.0,
        liveness_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.timeout = timeout
        self.liveness_timeout = liveness_timeout
        self.clock = clock
        self._started = clock()
        self._contact: float | None = None
        self._waiting: float | None = None  # a retry loop last said it waits for the broker
        self._error: str | None = None
        self._lost_logged: float | None = None  # when the loss was last logged
        self._lock = threading.Lock()

    @property
    def last_contact(self) -> float | None:
        """``clock()`` time of the broker's last answer (None: never)."""
        return self._contact

    def contact(self, when: float | None = None) -> None:
        """The broker answered (at ``when``, a ``clock()`` time; default now)."""
        when = self.clock() if when is None else when
        with self._lock:
            if self._contact is not None and when <= self._contact:
                return
            self._contact = when
            if self._lost_logged is not None and self.clock() - when <= self.timeout:
                self._lost_logged = None
                log.info("broker reachable again")
            self._error = None

    def failed(self, what: str, error) -> None:
        """A request to the broker failed; kept as the reason readiness gives."""
        with self._lock:
            self._error = f"{what}: {error}"

    def retrying(self, what: str, error) -> None:
        """A loop waits for the broker (and will try again): alive, not ready."""
        with self._lock:
            self._error = f"{what}: {error}"
            self._waiting = self.clock()

    def silence(self) -> float:
        """Seconds since the broker last answered (since start if it never did)."""
        return self.clock() - (self._started if self._contact is None else self._contact)

    def lost(self) -> bool:
        return self._contact is not None and self.silence() > self.timeout

    def observe(self) -> None:
        """Log a lost broker once per ``timeout`` seconds while it lasts; call it often."""
        if not self.lost() and not (self._contact is None and self.silence() > self.timeout):
            return
        now = self.clock()
        if self._lost_logged is None or now - self._lost_logged >= self.timeout:
            self._lost_logged = now
            log.warning("%s; /readyz reports not ready", self.readiness_problem())

    def waited_recently(self, seconds: float) -> bool:
        return self._waiting is not None and self.clock() - self._waiting <= seconds

    def readiness_problem(self) -> str | None:
        silence = self.silence()
        error = f"; last error: {self._error}" if self._error else ""
        if self._contact is None:
            if silence > self.timeout:
                return f"broker not reached in {silence:.0f} s (limit {self.timeout:.0f} s{error})"
            return "broker not reached yet"
        if silence > self.timeout:
            return f"broker unreachable for {silence:.0f} s (limit {self.timeout:.0f} s{error})"
        return None

    def liveness_problem(self) -> str | None:
        if self.liveness_timeout is None:
            return None
        silence = self.silence()
        if silence > self.liveness_timeout:
            return (
                f"broker unreachable for {silence:.0f} s, longer than the liveness limit "
                f"({self.liveness_timeout:.0f} s): restart wanted"
            )
        return None


class Heartbeat:
    """Liveness of a loop: the loop calls :meth:`beat`; :meth:`check` fails when it has not
    beaten for ``max_silence`` seconds (a hung poll, a deadlock, a learner stuck in a loop).

    With ``broker`` (a :class:`BrokerHealth`), a loop that is silent because it waits for the
    broker (its retries say so) is alive, until the broker's own ``liveness_timeout``.

    >>> heartbeat = Heartbeat(max_silence=60.0)
    >>> heartbeat.check()[0]
    True
    """

    def __init__(
        self,
        max_silence: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        broker: BrokerHealth | None = None,
    ):
        self.max_silence = max_silence
        self.clock = clock
        self.broker = broker
        self._last = clock()
        self._stopped: str | None = None

    def beat(self) -> None:
        self._last = self.clock()

    def stop(self, reason: str = "loop stopped") -> None:
        """The loop has ended (for good): liveness fails from now on."""
        self._stopped = reason

    def check(self) -> tuple[bool, str]:
        if self._stopped is not None:
            return False, self._stopped
        broker = self.broker
        if broker is not None:
            problem = broker.liveness_problem()
            if problem is not None:
                return False, problem
        silence = self.clock() - self._last
        if silence > self.max_silence and broker is not None and broker.waited_recently(self.max_silence):
            return True, f"waiting for the broker ({broker.readiness_problem() or 'reconnecting'})"
        if silence > self.max_silence:
            return (
                False,
                f"processing loop silent for {silence:.0f}s (limit {self.max_silence:.0f}s)",
            )
        return True, f"processing loop alive ({silence:.1f}s since last iteration)"


class Readiness:
    """Readiness of a worker: partitions assigned, broker reachable, checkpoint loaded.

    >>> readiness = Readiness()
    >>> readiness.check()
    (False, 'not ready: no partitions assigned; broker not reached yet; checkpoint not loaded')
    >>> readiness.assigned_partitions = 2
    >>> readiness.broker_reachable = True
    >>> readiness.checkpoint_loaded = True
    >>> readiness.check()
    (True, 'ready: 2 partitions assigned, broker reachable, checkpoint loaded')
    """

    def __init__(self, broker: BrokerHealth | None = None):
        self.assigned_partitions = 0
        self.broker_reachable = False  # without ``broker``: set by the worker
        self.broker = broker
        self.checkpoint_loaded = False

    def check(self) -> tuple[bool, str]:
        problems = []
        if self.assigned_partitions <= 0:
            problems.append("no partitions assigned")
        if self.broker is not None:
            problem = self.broker.readiness_problem()
            if problem is not None:
                problems.append(problem)
        elif not self.broker_reachable:
            problems.append("broker not reached yet")
        if not self.checkpoint_loaded:
            problems.append("checkpoint not loaded")
        if problems:
            return False, "not ready: " + "; ".join(problems)
        return True, (
            f"ready: {self.assigned_partitions} partitions assigned, broker reachable, "
            "checkpoint loaded"
        )


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "stream-learner"
    # Set per server class in HealthServer.start.
    health: HealthServer

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._respond(send_body=True)

    def do_HEAD(self):  # noqa: N802
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        health = self.server.health  # type: ignore[attr-defined]
        if path == "/metrics":
            try:
                status, headers, body = self._exposition(health.metrics_app)
            except Exception as error:  # a broken custom collector must not kill the server
                log.exception("collecting metrics failed")
                self._send(500, f"collecting metrics failed: {error}\n".encode(), send_body)
                return
            self._send(status, body, send_body, headers)
        elif path in ("/healthz", "/readyz"):
            check = health.liveness if path == "/healthz" else health.readiness
            try:
                ok, message = check()
            except Exception as error:
                ok, message = False, f"check raised {type(error).__name__}: {error}"
            self._send(200 if ok else 503, (message + "\n").encode(), send_body)
        elif path == "/":
            body = b"stream-learner: /metrics /healthz /readyz\n"
            self._send(200, body, send_body)
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", send_body)

    def setup(self) -> None:
        # A socket timeout ends a connection whose client sends nothing or reads nothing, so
        # a stalled scraper cannot keep a thread and its socket forever.
        self.timeout = self.server.health.request_timeout  # type: ignore[attr-defined]
        super().setup()

    def _exposition(self, app) -> tuple[int, list[tuple[str, str]], bytes]:
        """Run prometheus_client's WSGI app on this request: it negotiates the format
        (OpenMetrics or text, from Accept), filters by ``name[]`` and gzips when accepted.
        HEAD is asked as GET; the caller leaves the body out."""
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/metrics",
            "QUERY_STRING": urllib.parse.urlsplit(self.path).query,
            "HTTP_ACCEPT": self.headers.get("Accept", ""),
            "HTTP_ACCEPT_ENCODING": self.headers.get("Accept-Encoding", ""),
        }
        answer: list = []
        body = b"".join(app(environ, lambda status, headers: answer.extend((status, headers))))
        status, headers = answer
        return int(status.split()[0]), headers, body

    def _send(self, status: int, body: bytes, send_body: bool, headers=None) -> None:
        self.send_response(status)
        for name, value in headers or [("Content-Type", "text/plain; charset=utf-8")]:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug("%s " + format, self.address_string(), *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` from a background thread.

    ``liveness`` and ``readiness`` return ``(ok, message)``; the endpoint answers 200 or 503
    with the message. ``port=0`` picks a free port (see ``.port`` after :meth:`start`).
    ``/metrics`` is prometheus_client's own exposition: the text format, or OpenMetrics when
    the scraper asks for it, gzip when accepted, only the families named by ``name[]``
    query parameters when given. Each connection is served by its own thread and closed
    after ``request_timeout`` seconds without progress.

    >>> import urllib.request
    >>> server = HealthServer(CollectorRegistry(), port=0)
    >>> server.start()
    >>> urllib.request.urlopen(server.url + "/healthz").status
    200
    >>> server.stop()
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 9108,
        *,
        liveness: Callable[[], tuple[bool, str]] = _always_ok,
        readiness: Callable[[], tuple[bool, str]] = _always_ok,
        request_timeout: float = 10.0,
    ):
        self.registry = registry
        self.metrics_app = make_wsgi_app(registry)
        self.request_timeout = request_timeout
        self.host = host
        self.requested_port = port
        self.liveness = liveness
        self.readiness = readiness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        server_class = _Server6 if ":" in self.host else _Server
        server = server_class((self.host, self.requested_port), _Handler)
        server.health = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="stream-learner-http", daemon=True
        )
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on %s", self.url)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.requested_port
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
