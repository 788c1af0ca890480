"""The core loop: record → features → predict (all learners) → serve → score → learn → drift.

:class:`StreamProcessor` does no I/O. The ``evaluate`` command feeds it records from a file;
the Kafka worker feeds it records from a consumer and checkpoints it (it is picklable).

>>> from stream_learner.core.records import Record
>>> processor = StreamProcessor(["nb", "softmax"], serving="leader")
>>> for i, (text, label) in enumerate([("cheap pills", "spam"), ("lunch at noon", "ham")] * 20):
...     result = processor.process(Record(id=str(i), text=text, label=label))
>>> result.outcome, result.prediction.label
(<Outcome.LEARNED: 'learned'>, 'ham')
>>> processor.process(Record(id="x", text="cheap pills now")).prediction.label
'spam'
>>> processor.process(Record(id="x", text=None, label="spam")).outcome
<Outcome.LABEL_JOINED: 'label_joined'>
>>> processor.learner_stats()["nb"]["n"]
40

"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import time
from collections.abc import Sequence

from river import base, compose

from stream_learner.core.drift import REACTIONS, DriftEvent, DriftMonitor, Signal
from stream_learner.core.evaluation import PrequentialScore
from stream_learner.core.features import TextFeaturizer
from stream_learner.core.labels import DEFAULT_MAX_BYTES, LabelBuffer
from stream_learner.core.records import Reason, Record
from stream_learner.learners.registry import make_learner

__all__ = [
    "StreamProcessor",
    "Outcome",
    "Prediction",
    "ProcessResult",
    "LearnerFailure",
    "RecordRejected",
    "SERVING_POLICIES",
    "DEFAULT_MAX_CLASSES",
]

SERVING_POLICIES = ("leader", "ensemble", "fixed:<learner>")

#: Every learner's tables grow with each class (scoring a record costs time per class too):
#: a stream of fresh labels would grow them without end.
DEFAULT_MAX_CLASSES = 500

#: Drift events kept in :attr:`StreamProcessor.drift_events` (and so in checkpoints).
DEFAULT_DRIFT_EVENTS_KEPT = 1000


class Outcome(enum.StrEnum):
    LEARNED = "learned"
    PREDICTED = "predicted"
    LABEL_JOINED = "label_joined"
    LABEL_UNMATCHED = "label_unmatched"


@dataclasses.dataclass(slots=True)
class Prediction:
    label: object
    proba: dict
    learner: str


@dataclasses.dataclass(slots=True)
class ProcessResult:
    outcome: Outcome
    prediction: Prediction | None = None
    drift_events: list[DriftEvent] = dataclasses.field(default_factory=list)


class LearnerFailure(Exception):
    """A learner raised on a record; the caller dead-letters the record and goes on."""

    reason = Reason.LEARNER_ERROR

    def __init__(self, learner: str, error: BaseException):
        super().__init__(f"learner {learner!r} failed: {type(error).__name__}: {error}")
        self.learner = learner
        self.detail = f"{learner}: {type(error).__name__}: {error}"[:500]


class RecordRejected(LearnerFailure):
    """A record refused before any learner saw it: neither predicted nor learned. The caller
    dead-letters it with :attr:`reason` (as any :class:`LearnerFailure`) and goes on."""

    def __init__(self, reason: Reason, detail: str):
        Exception.__init__(self, f"{reason.value}: {detail}")
        self.learner = None
        self.reason = reason
        self.detail = detail[:500]


def _split_featurizer(model: base.Classifier):
    """(featurizer, rest) for ``TextFeaturizer | ...`` pipelines, so that learners sharing a
    featurizer configuration tokenize each record once; (None, model) for anything else."""
    if isinstance(model, compose.Pipeline):
        steps = list(model.steps.values())
        if len(steps) > 1 and isinstance(steps[0], TextFeaturizer):
            rest = steps[1] if len(steps) == 2 else compose.Pipeline(*steps[1:])
            return steps[0], rest
    return None, model


def _argmax(proba: dict):
    # Same tie-breaking as river.base.Classifier.predict_one.
    return max(proba, key=proba.get) if proba else None


_SLOT_COUNTERS = ("drifts", "learned", "background_learned", "background_hits", "main_hits", "warning_at")


class _Slot:
    """One learner on the stream, with its scores, drift monitor and background learner."""

    peers: list = ()  # for slots pickled before fusion existed
    journal: list | None = None  # (x, y) learned, while fusion collects increments

    def __init__(self, name: str, model: base.Classifier, window: int, detector: str | None, seed):
        self.name = name
        self.score = PrequentialScore(window=window)
        self.monitor = DriftMonitor(detector, seed=seed) if detector else None
        self.drifts = 0
        self.learned = 0
        self.background: base.Classifier | None = None
        self.background_head = None
        self.background_learned = 0
        self.background_hits = 0  # records the background learner got right since it started
        self.main_hits = 0  # ... and the main learner, on the same records
        self.warning_at = 0
        self.peers: list[tuple[float, base.Classifier]] = []  # fused peers' snapshots
        self.install(model)

    def install(self, model: base.Classifier):
        self.model = model
        self.featurizer, self.head = _split_featurizer(model)
        self.key = repr(self.featurizer) if self.featurizer is not None else None

    def features(self, text: str):
        return self.featurizer.transform_one(text) if self.featurizer is not None else text

    def with_peers(self, x, proba: dict) -> dict:
        """Ensemble fusion: ``proba`` mixed with the peers', each model weighted by the
        records it learned."""
        combined: dict = {}
        total = 0.0
        for weight, head in [(self.learned, None), *self.peers]:
            p = proba if head is None else head.predict_proba_one(x)
            if not p or weight <= 0:
                continue
            total += weight
            for label, value in p.items():
                combined[label] = combined.get(label, 0.0) + weight * value
        return {label: value / total for label, value in combined.items()} if total else proba

    def start_background(self):
        self.background = self.model.clone()
        self.background_head = _split_featurizer(self.background)[1]
        self.background_learned = self.background_hits = self.main_hits = 0
        self.warning_at = self.score.n

    def drop_background(self):
        self.background = self.background_head = None
        self.background_learned = self.background_hits = self.main_hits = 0

    # -- state: plain data with a schema version (checkpoints) --

    def state_dict(self) -> dict:
        """The slot as data: its learners (see :func:`~stream_learner.learners.learner_state.learner_state`),
        score, drift monitor, counters and fused peers. The fusion journal is not kept: fusion
        starts a new one when it attaches."""
        from stream_learner.learners.learner_state import learner_state

        return {
            "name": self.name,
            "model": learner_state(self.model),
            "score": self.score.state_dict(),
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "background": None if self.background is None else learner_state(self.background),
            "counters": {name: getattr(self, name) for name in _SLOT_COUNTERS},
            "peers": [[weight, learner_state(head)] for weight, head in self.peers],
        }

    def restore(self, state: dict, trusted_modules) -> None:
        """Take the score, monitor, background learner, counters and peers of
        :meth:`state_dict` (the slot was made with its model)."""
        from stream_learner.learners.learner_state import learner_from_state

        self.score = PrequentialScore.from_state(state["score"])
        self.monitor = None if state["monitor"] is None else DriftMonitor.from_state(state["monitor"])
        self.drop_background()
        if state["background"] is not None:
            self.background = learner_from_state(state["background"], trusted_modules=trusted_modules)
            self.background_head = _split_featurizer(self.background)[1]
        for name in _SLOT_COUNTERS:
            setattr(self, name, int(state["counters"][name]))
        self.peers = [
            (float(weight), learner_from_state(head, trusted_modules=trusted_modules))
            for weight, head in state["peers"]
        ]

    @property
    def background_wins(self) -> bool:
        # Swap only for a challenger that did better on the very records both have seen:
        # a drift signal alone does not prove that a fresh learner will do better.
        return self.background_learned >= 30 and self.background_hits > self.main_hits


class StreamProcessor:
    """Several learners on one stream, scored prequentially, served by a policy.

    Parameters
    ----------
    learners
        Registry names (``["nb", "neural"]``), ``module:factory`` specs, or a dict of
        name → River classifier taking the text as ``x``.
    serving
        ``"leader"`` (highest rolling accuracy), ``"ensemble"`` (probabilities weighted by
        recent accuracy) or ``"fixed:<name>"``.
    drift_detector
        A detector name (see :data:`stream_learner.core.drift.DETECTORS`) or ``"none"``.
    drift_reaction
        ``"alert"`` (record only), ``"reset"`` (fresh clone) or ``"background"`` (train a
        background learner from the warning, or from a drift that came without one; it
        replaces the learner at a drift, or after a whole window, if it predicted better on
        the records both have seen).
    window
        Rolling-accuracy window, also the delay after which a drift event's
        ``accuracy_after`` is taken.
    label_buffer_size, label_buffer_bytes, label_ttl
        Bounds of the delayed-label buffer: records, bytes, seconds.
    max_classes
        Most classes learned: a record whose label would be one more is rejected
        (:class:`RecordRejected`, reason ``too_many_classes``); known classes stay learnable.
    drift_events_kept
        Newest drift events kept in :attr:`drift_events`.
    series_every
        Append a row per learner to :attr:`series` every this many labelled records.
    ensemble_temperature
        For ``serving="ensemble"``: weight of a learner ∝ exp(rolling accuracy / temperature).
    seed
        Passed to registry learners and detectors.

    """

    def __init__(
        self,
        learners: dict[str, base.Classifier] | list[str] | tuple[str, ...],
        serving: str = "leader",
        drift_detector: str = "adwin",
        drift_reaction: str = "alert",
        window: int = 1000,
        label_buffer_size: int = 100_000,
        label_ttl: float | None = 3600.0,
        label_buffer_bytes: int = DEFAULT_MAX_BYTES,
        max_classes: int = DEFAULT_MAX_CLASSES,
        drift_events_kept: int = DEFAULT_DRIFT_EVENTS_KEPT,
        series_every: int = 200,
        series_max_rows: int = 200_000,
        ensemble_temperature: float = 0.05,
        background_patience: int | None = None,
        seed: int = 0,
    ):
        if not isinstance(learners, dict):
            names = list(learners)
            if len(set(names)) != len(names):
                raise ValueError(f"learner names must be unique; given: {', '.join(names)}")
            learners = {name: make_learner(name, seed=seed) for name in names}
        if not learners:
            raise ValueError("at least one learner is needed")
        if drift_reaction not in REACTIONS:
            raise ValueError(
                f"unknown drift reaction {drift_reaction!r}; choose one of {', '.join(REACTIONS)}"
            )
        self.serving = serving
        if serving.startswith("fixed:"):
            if serving[6:] not in learners:
                raise ValueError(
                    f"serving {serving!r} names no learner of this run ({', '.join(learners)})"
                )
        elif serving not in ("leader", "ensemble"):
            raise ValueError(
                f"unknown serving policy {serving!r}; choose leader, ensemble or fixed:LEARNER"
            )
        detector = None if drift_detector in (None, "none") else drift_detector
        self.drift_detector = drift_detector or "none"
        self.drift_reaction = drift_reaction
        self.window = window
        self.series_every = series_every
        self.ensemble_temperature = ensemble_temperature
        self.background_patience = background_patience or 5 * window
        self._slots = [
            _Slot(name, model, window, detector, seed) for name, model in learners.items()
        ]
        self._served = PrequentialScore(window=window)
        if max_classes < 1 or drift_events_kept < 1:
            raise ValueError("max_classes and drift_events_kept must be at least 1")
        self.labels = LabelBuffer(label_buffer_size, label_ttl, max_bytes=label_buffer_bytes)
        self.max_classes = max_classes
        self.classes: dict = {}  # every label learned, in order of arrival
        self.series: collections.deque[dict] = collections.deque(maxlen=series_max_rows)
        self.drift_events: collections.deque[DriftEvent] = collections.deque(maxlen=drift_events_kept)
        self._awaiting_after: list[tuple[DriftEvent, _Slot, int]] = []
        self.records_seen = 0
        self.model_version = 0
        self.labelled = 0  # records learned from (with their own label or a joined one)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # Processors pickled before classes, drift events and the label buffer were bounded.
        if "classes" not in state:
            self.max_classes = DEFAULT_MAX_CLASSES
            self.classes = {}
            for slot in self._slots:
                self.classes.update(dict.fromkeys(slot.score.per_class()))
        if not isinstance(self.drift_events, collections.deque):
            self.drift_events = collections.deque(self.drift_events, maxlen=DEFAULT_DRIFT_EVENTS_KEPT)

    def set_limits(
        self,
        *,
        label_buffer_size: int | None = None,
        label_buffer_bytes: int | None = None,
        label_ttl: float | None = None,
        max_classes: int | None = None,
    ) -> None:
        """Apply new bounds to a processor (one restored from a checkpoint takes the worker's
        configuration). Classes already learned stay learnable even past a lower cap."""
        self.labels.set_limits(max_entries=label_buffer_size, max_bytes=label_buffer_bytes)
        if label_ttl is not None:
            self.labels.ttl = label_ttl
        if max_classes is not None:
            if max_classes < 1:
                raise ValueError("max_classes must be at least 1")
            self.max_classes = max_classes

    # -- state: plain data with a schema version (checkpoints) ---------------------------

    STATE_SCHEMA = "stream-learner/processor"
    STATE_VERSION = 1

    def state_dict(self) -> dict:
        """Everything the processor holds, as plain data (dicts, lists, numbers, strings,
        bytes, numpy arrays) with a schema version: its configuration, each learner's slot
        (models, score, drift monitor), the served score, the label buffer, the classes,
        series and drift events. No class path of ours appears in it, so moving or renaming
        a class never breaks a checkpoint; River's learners and detectors, which have no
        public state schema, are pickles inside it. :meth:`from_state` rebuilds a processor
        that predicts and learns exactly as this one. The numpy learners' arrays in it are
        their own, not copies: serialize the state before the processor goes on.

        >>> from stream_learner.core.records import Record
        >>> processor = StreamProcessor(["nb", "neural"], seed=1)
        >>> for i in range(30):
        ...     _ = processor.process(Record(str(i), ["free pills", "lunch at noon"][i % 2], ["spam", "ham"][i % 2]))
        >>> copy = StreamProcessor.from_state(processor.state_dict())
        >>> copy.learner_stats() == processor.learner_stats()
        True
        >>> copy.process(Record("x", "pills")).prediction == processor.process(Record("x", "pills")).prediction
        True
        """
        events = list(self.drift_events)
        index = {id(event): i for i, event in enumerate(events)}
        slots = {id(slot): i for i, slot in enumerate(self._slots)}
        return {
            "schema": self.STATE_SCHEMA,
            "version": self.STATE_VERSION,
            "config": {
                "serving": self.serving,
                "drift_detector": self.drift_detector,
                "drift_reaction": self.drift_reaction,
                "window": self.window,
                "max_classes": self.max_classes,
                "drift_events_kept": self.drift_events.maxlen,
                "series_every": self.series_every,
                "series_max_rows": self.series.maxlen,
                "ensemble_temperature": self.ensemble_temperature,
                "background_patience": self.background_patience,
            },
            "slots": [slot.state_dict() for slot in self._slots],
            "served": self._served.state_dict(),
            "labels": self.labels.state_dict(),
            "classes": list(self.classes),
            "series": [dict(row) for row in self.series],
            "drift_events": [event.as_dict() for event in events],
            # Events whose accuracy_after is still to come: [event, slot, due]; the event is its
            # index in drift_events, or the event itself when it has left them.
            "awaiting_after": [
                [index.get(id(event), event.as_dict()), slots[id(slot)], due]
                for event, slot, due in self._awaiting_after
            ],
            "records_seen": self.records_seen,
            "model_version": self.model_version,
            "labelled": self.labelled,
        }

    @classmethod
    def from_state(cls, state: dict, *, trusted_modules=()) -> StreamProcessor:
        """The processor :meth:`state_dict` described. ``trusted_modules``: modules of
        ``module:factory`` learners whose classes the pickled learners may hold. Raises
        :class:`~stream_learner.state.schema.StateError` (a ValueError) on a state of another
        schema or a newer version, :class:`~stream_learner.state.unpickle.UnpicklingRefused`
        on a pickled learner holding what a checkpoint may not."""
        from stream_learner.learners.learner_state import learner_from_state
        from stream_learner.state.schema import StateError, check_schema

        check_schema(state, cls.STATE_SCHEMA, (cls.STATE_VERSION,))
        try:
            config = dict(state["config"])
            labels = LabelBuffer.from_state(state["labels"], Prediction)
            slot_states = state["slots"]
            learners = {
                slot["name"]: learner_from_state(slot["model"], trusted_modules=trusted_modules)
                for slot in slot_states
            }
            if len(learners) != len(slot_states):
                raise ValueError("two learners have one name")
            processor = cls(
                learners,
                label_buffer_size=labels.max_entries,
                label_ttl=labels.ttl,
                label_buffer_bytes=labels.max_bytes,
                **config,
            )
            for slot, slot_state in zip(processor._slots, slot_states, strict=True):
                slot.restore(slot_state, trusted_modules)
            processor._served = PrequentialScore.from_state(state["served"])
            processor.labels = labels
            processor.classes = dict.fromkeys(state["classes"])
            processor.series.extend(dict(row) for row in state["series"])
            processor.drift_events.extend(DriftEvent(**event) for event in state["drift_events"])
            events = list(processor.drift_events)
            processor._awaiting_after = [
                (
                    events[event] if isinstance(event, int) else DriftEvent(**event),
                    processor._slots[slot],
                    int(due),
                )
                for event, slot, due in state["awaiting_after"]
            ]
            processor.records_seen = int(state["records_seen"])
            processor.model_version = int(state["model_version"])
            processor.labelled = int(state["labelled"])
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise StateError(f"processor state does not fit: {type(error).__name__}: {error}") from None
        return processor

    # -- public views -------------------------------------------------------------------

    @property
    def learners(self) -> dict[str, base.Classifier]:
        """The current model of each learner (after any drift reaction)."""
        return {slot.name: slot.model for slot in self._slots}

    def learner_stats(self) -> dict[str, dict]:
        stats = {}
        for slot in self._slots:
            row = slot.score.snapshot()
            row["drifts"] = slot.drifts
            row["warning"] = bool(slot.monitor and slot.monitor.in_warning)
            row["background"] = slot.background is not None
            row["learned"] = slot.learned
            stats[slot.name] = row
        return stats

    @property
    def served_name(self) -> str:
        """How the served predictions are named in tables and plots: ``served (leader)``."""
        return f"served ({self.serving})"

    def served_stats(self) -> dict:
        return self._served.snapshot()

    def per_class(self) -> dict[str, dict]:
        return {slot.name: slot.score.per_class() for slot in self._slots}

    def label_buffer_stats(self) -> dict[str, int]:
        return self.labels.stats()

    # -- fusion hooks (see stream_learner.fusion.fusion) ------------------------------------------

    def heads(self) -> dict[str, tuple]:
        """``{name: (featurizer or None, classifier)}``: what each learner learns with."""
        return {slot.name: (slot.featurizer, slot.head) for slot in self._slots}

    def replace_head(self, name: str, head: base.Classifier) -> None:
        """Put ``head`` in place of learner ``name``'s classifier (same featurizer)."""
        slot = self._slot(name)
        slot.install(compose.Pipeline(slot.featurizer, head) if slot.featurizer is not None else head)

    def set_peers(self, name: str, peers: list[tuple[float, base.Classifier]]) -> None:
        """Learner ``name`` predicts with these ``(records, classifier)`` too, weighted."""
        self._slot(name).peers = list(peers)

    def journal(self, name: str) -> list:
        """From now on, learner ``name`` appends each ``(x, y)`` it learns to the returned list."""
        slot = self._slot(name)
        slot.journal = []
        return slot.journal

    def _slot(self, name: str) -> _Slot:
        for slot in self._slots:
            if slot.name == name:
                return slot
        raise KeyError(f"no learner named {name!r}")

    # -- the loop -----------------------------------------------------------------------

    def process(self, record: Record, now: float | None = None) -> ProcessResult:
        """Predict ``record`` with every learner, serve it, and score and learn it if it is
        labelled (a label-only record joins its waiting prediction). :meth:`process_many`
        takes the same steps after predicting, and learns its labelled records in one step."""
        if now is None:
            now = time.time()
        self.records_seen += 1
        self._check_label(record)
        if record.is_label_only:
            return self._join(record, now)
        features, probas = self._predict_one(record.text)
        result = self._settle(record, now, probas, lambda: features)
        if result.outcome is Outcome.LEARNED:
            self._learn_each(features, record.label)
        return result

    def _predict_one(self, text: str) -> tuple[dict, dict]:
        """(features per featurizer key, probabilities per learner) of one text."""
        features: dict = {}
        probas: dict = {}
        for slot in self._slots:
            try:
                if slot.key not in features:
                    features[slot.key] = slot.features(text)
                proba = slot.head.predict_proba_one(features[slot.key])
                probas[slot.name] = slot.with_peers(features[slot.key], proba) if slot.peers else proba
            except Exception as error:
                raise LearnerFailure(slot.name, error) from error
        return features, probas

    def _settle(self, record: Record, now: float, probas: dict, features_of) -> ProcessResult:
        """A predicted record with text: serve it; keep an unlabelled one for its label, or
        score a labelled one (the caller then learns it). ``features_of()`` gives the record's
        features per featurizer key, asked for only when needed."""
        served = self._serve(probas)
        if record.label is None:
            # Without an id no label can find it later: it is predicted only.
            if record.id is not None:
                self.labels.put(
                    record.id, features=features_of(), predictions=probas, served=served, now=now
                )
            return ProcessResult(Outcome.PREDICTED, served)
        events = self._score_each(probas, features_of, record.label, record.ts or now)
        self._scored(served, record.label)
        return ProcessResult(Outcome.LEARNED, served, events)

    def _check_label(self, record: Record) -> None:
        """Raise :class:`RecordRejected` for a label that would be one class too many; admit
        the fresh label of a record with text (a label-only record's, once it joins)."""
        label = record.label
        if label is None or label in self.classes:
            return
        if len(self.classes) >= self.max_classes:
            if record.is_label_only:
                self.labels.discard(record.id)  # its prediction will never be learned
            raise RecordRejected(
                Reason.TOO_MANY_CLASSES,
                f"label {str(label)[:100]!r} would be class {len(self.classes) + 1}; "
                f"at most {self.max_classes} (--max-classes)",
            )
        if not record.is_label_only:
            self.classes[label] = None

    def process_many(
        self, records: Sequence[Record], times: Sequence[float | None] | None = None
    ) -> list[ProcessResult | LearnerFailure]:
        """Process ``records`` as one mini-batch: each is predicted before any of them is
        learned, then the labelled ones are learned, in one ``learn_many`` step for learners
        that have it (the numpy learner: featurized by ``buckets_many``, one forward pass, one
        update) and record by record for the others. Scores, drift detection and serving go
        record by record in order, as in :meth:`process`.

        What differs from calling :meth:`process` on each record: a record is predicted
        without the records just before it in its batch, and a mini-batch update is close to,
        not equal to, per-record updates. A drift reaction inside a batch replaces the learner
        before that batch is learned. Label-only records are joined one by one, between the
        runs of records around them. ``times`` are the records' times (``now`` of
        :meth:`process`). One result per record, in order: a :class:`ProcessResult`, or the
        :class:`LearnerFailure` that :meth:`process` would have raised for it.
        """
        results: list = [None] * len(records)
        times = list(times) if times is not None else [None] * len(records)
        run: list[int] = []
        for i, record in enumerate(records):
            if record.is_label_only:
                self._process_run(records, times, run, results)
                run = []
                results[i] = self._process_or_failure(record, times[i])
            elif record.label is not None and record.label not in self.classes:
                # Whether a fresh label fits depends on the labels before it, in order.
                try:
                    self._check_label(record)
                except RecordRejected as rejected:
                    self.records_seen += 1
                    results[i] = rejected
                    continue
                run.append(i)
            else:
                run.append(i)
        self._process_run(records, times, run, results)
        return results

    def _process_or_failure(self, record: Record, now) -> ProcessResult | LearnerFailure:
        try:
            return self.process(record, now=now)
        except LearnerFailure as failure:
            return failure

    def _batchable(self, slot: _Slot) -> bool:
        return (
            isinstance(slot.featurizer, TextFeaturizer)
            and not slot.featurizer.dense
            and hasattr(slot.head, "predict_proba_rows")
            and hasattr(slot.head, "learn_many")
        )

    def _process_run(self, records, times, run: list[int], results: list) -> None:
        """Records ``run`` (indices, all with text) as one mini-batch."""
        if not run:
            return
        if len(run) == 1:
            results[run[0]] = self._process_or_failure(records[run[0]], times[run[0]])
            return
        texts = [records[i].text for i in run]
        try:
            batches, features, probas = self._predict_run(texts)
        except Exception:
            # Predicting changes no learner: redo the run record by record, which singles out
            # the records a learner fails on.
            for i in run:
                results[i] = self._process_or_failure(records[i], times[i])
            return
        learn: list[int] = []  # positions in the run of the labelled records
        for j, i in enumerate(run):
            now = times[i] if times[i] is not None else time.time()
            self.records_seen += 1
            probas_j = {name: rows[j] for name, rows in probas.items()}
            result = self._settle(
                records[i], now, probas_j, lambda j=j: self._record_features(batches, features, j)
            )
            results[i] = result
            if result.outcome is Outcome.LEARNED:
                learn.append(j)
        if not learn:
            return
        labels = [records[run[j]].label for j in learn]
        for slot in self._slots:
            if slot.key in batches:
                failed = self._learn_batch(slot, batches[slot.key], learn, labels)
            else:
                xs = features[slot.key]
                failed = self._learn_records(slot, [xs[j] for j in learn], learn, labels)
            for j, failure in failed.items():
                if not isinstance(results[run[j]], LearnerFailure):  # the first learner's, as process()
                    results[run[j]] = failure

    def _predict_run(self, texts: list[str]):
        """Every learner's predictions for ``texts``: (BucketBatch per featurizer key of the
        batch learners, features per key of the others, probability dicts per learner)."""
        batches: dict = {}
        features: dict = {}
        probas: dict = {}
        for slot in self._slots:
            key = slot.key
            if self._batchable(slot):
                if key not in batches:
                    batches[key] = slot.featurizer.buckets_many(texts)
                rows = slot.head.predict_proba_rows(batches[key])
                if slot.peers:
                    batch = batches[key]
                    rows = [slot.with_peers(batch.record(j), p) for j, p in enumerate(rows)]
            else:
                if key not in features:
                    features[key] = [slot.features(text) for text in texts]
                rows = [slot.head.predict_proba_one(x) for x in features[key]]
                if slot.peers:
                    rows = [slot.with_peers(x, p) for x, p in zip(features[key], rows, strict=True)]
            probas[slot.name] = rows
        return batches, features, probas

    @staticmethod
    def _record_features(batches: dict, features: dict, j: int) -> dict:
        """Record ``j``'s features per featurizer key, as :meth:`process` keeps them."""
        own = {key: xs[j] for key, xs in features.items()}
        own.update((key, batch.record(j)) for key, batch in batches.items())
        return own

    def _learn_batch(self, slot: _Slot, batch, learn: list[int], labels: list) -> dict:
        """``slot`` learns records ``learn`` of ``batch`` in one step, or, if the step fails,
        one record at a time. → {position: LearnerFailure} of the records it could not learn."""
        part = batch if len(learn) == len(batch) else batch.take(learn)
        try:
            slot.head.learn_many(part, labels)  # checks the whole batch before changing anything
        except Exception:
            return self._learn_records(slot, [batch.record(j) for j in learn], learn, labels)
        slot.learned += len(learn)
        if slot.journal is not None:
            slot.journal.extend((batch.record(j), y) for j, y in zip(learn, labels, strict=True))
        if slot.background_head is not None:
            try:
                slot.background_head.learn_many(part, labels)
                slot.background_learned += len(learn)
            except Exception:  # a challenger that cannot learn is no challenger
                slot.drop_background()
        return {}

    def _join(self, record: Record, now: float) -> ProcessResult:
        pending = self.labels.pop(record.id, now=now)
        if pending is None:
            return ProcessResult(Outcome.LABEL_UNMATCHED)
        self.classes[record.label] = None
        events = self._score_each(
            pending.predictions, lambda: pending.features, record.label, record.ts or now
        )
        self._scored(pending.served, record.label)
        self._learn_each(pending.features, record.label)
        return ProcessResult(Outcome.LABEL_JOINED, pending.served, events)

    def _serve(self, probas: dict) -> Prediction:
        slots = self._slots
        if len(slots) == 1:
            slot = slots[0]
        elif self.serving == "ensemble":
            return self._ensemble(probas)
        elif self.serving == "leader":
            slot = max(slots, key=lambda s: s.score.rolling_accuracy)
        else:
            name = self.serving[6:]
            slot = next(s for s in slots if s.name == name)
        proba = probas[slot.name]
        return Prediction(_argmax(proba), proba, slot.name)

    def _ensemble(self, probas: dict) -> Prediction:
        accuracies = [s.score.rolling_accuracy for s in self._slots]
        best = max(accuracies)
        weights = [math.exp((a - best) / self.ensemble_temperature) for a in accuracies]
        combined: dict = {}
        total = 0.0
        for slot, weight in zip(self._slots, weights, strict=True):
            proba = probas[slot.name]
            if not proba:
                continue
            total += weight
            for label, p in proba.items():
                combined[label] = combined.get(label, 0.0) + weight * p
        if total:
            combined = {label: p / total for label, p in combined.items()}
        return Prediction(_argmax(combined), combined, "ensemble")

    def _score_each(self, probas: dict, features_of, y, when) -> list[DriftEvent]:
        """Score every learner's prediction of a record labelled ``y``; its drift events."""
        events: list[DriftEvent] = []
        features = None
        for slot in self._slots:
            x = None
            if slot.background_head is not None:  # scoring the challenger needs the features
                if features is None:
                    features = features_of()
                x = features.get(slot.key)
            event = self._score(slot, probas.get(slot.name), x, y, when)
            if event is not None:
                events.append(event)
        return events

    def _learn_each(self, features: dict, y) -> None:
        """Every learner learns one record (those whose features it lacks skip it); raises
        the first learner's :class:`LearnerFailure` once all have had their turn."""
        failure = None
        for slot in self._slots:
            x = features.get(slot.key)
            if x is None:
                continue
            try:
                self._learn_one(slot, x, y)
            except Exception as error:
                failure = failure or LearnerFailure(slot.name, error)
        if failure is not None:
            raise failure

    def _learn_records(self, slot: _Slot, xs: list, positions: list[int], labels: list) -> dict:
        """``slot`` learns ``xs`` one at a time. → {position: LearnerFailure} of the failed."""
        failed = {}
        for x, j, y in zip(xs, positions, labels, strict=True):
            try:
                self._learn_one(slot, x, y)
            except Exception as error:
                failed[j] = LearnerFailure(slot.name, error)
        return failed

    def _score(self, slot: _Slot, proba, x, y, when) -> DriftEvent | None:
        """Score one prediction of ``slot`` and watch its error stream (which may replace
        the learner)."""
        if not proba:
            return None
        hit = slot.score.update(y, _argmax(proba), proba)
        if slot.background_head is not None and x is not None:
            slot.main_hits += hit
            slot.background_hits += _argmax(slot.background_head.predict_proba_one(x)) == y
        if slot.monitor is not None:
            return self._watch(slot, not hit, when)
        return None

    @staticmethod
    def _learn_one(slot: _Slot, x, y) -> None:
        slot.head.learn_one(x, y)
        if slot.journal is not None:
            slot.journal.append((x, y))
        if slot.background_head is not None:
            slot.background_head.learn_one(x, y)
            slot.background_learned += 1
        slot.learned += 1

    def _scored(self, served, y) -> None:
        if served is not None and served.proba:
            self._served.update(y, served.label, served.proba)
        self.model_version += 1
        self._after_learning()

    def _watch(self, slot: _Slot, error: bool, when: float) -> DriftEvent | None:
        signal = slot.monitor.update(error)
        reaction = self.drift_reaction
        if signal == Signal.DRIFT:
            slot.drifts += 1
            event = DriftEvent(
                learner=slot.name,
                detector=self.drift_detector,
                position=slot.score.n,
                time=when,
                accuracy_before=slot.score.rolling_accuracy,
                reaction=reaction,
            )
            if reaction == "reset":
                slot.install(slot.model.clone())
            elif reaction == "background":
                if slot.background is not None and slot.background_wins:
                    slot.install(slot.background)
                    slot.drop_background()
                else:
                    # No warning came first, or its challenger learned the old concept too:
                    # a fresh one competes from the drift on.
                    slot.start_background()
            self.drift_events.append(event)
            self._awaiting_after.append((event, slot, slot.score.n + self.window))
            return event
        if reaction == "background":
            if signal == Signal.WARNING and slot.background is None:
                slot.start_background()
            elif slot.background_learned == self.window and slot.background_wins:
                # A challenger that beat the learner over a whole window takes over.
                slot.install(slot.background)
                slot.drop_background()
                slot.monitor.clear_warning()
            elif (
                slot.background is not None
                and slot.score.n - slot.warning_at > self.background_patience
            ):
                # A warning that never became drift: stop paying for the background learner.
                slot.drop_background()
                slot.monitor.clear_warning()
        return None

    def _after_learning(self):
        if self._awaiting_after:
            still = []
            for event, slot, due in self._awaiting_after:
                if slot.score.n >= due:
                    event.accuracy_after = slot.score.rolling_accuracy
                else:
                    still.append((event, slot, due))
            self._awaiting_after = still
        self.labelled += 1
        scored = self.labelled
        if self.series_every and scored % self.series_every == 0:
            for slot in self._slots:
                row = slot.score.snapshot()
                row["learner"] = slot.name
                row["position"] = scored
                self.series.append(row)
            if len(self._slots) > 1:
                row = self._served.snapshot()
                row["learner"] = self.served_name
                row["position"] = scored
                self.series.append(row)
