"""Drift detection on a learner's error stream, and the events it records.

River's detectors watch the 0/1 error of every prequential prediction. A detection counts as
drift only when the learner got *worse*: ADWIN and KSWIN also fire when the error falls (a
learner that is still improving), and reacting to that would throw away a good model.

Detectors that have no warning zone (ADWIN, Page-Hinkley, KSWIN) get a second, more
sensitive twin whose detections serve as warnings; the ``background`` reaction starts its
background learner on them.

>>> import random
>>> rng = random.Random(7)
>>> errors = [rng.random() < 0.1 for _ in range(1000)] + [rng.random() < 0.6 for _ in range(300)]
>>> monitor = DriftMonitor("adwin")
>>> signals = [monitor.update(error) for error in errors]
>>> 1000 < signals.index(Signal.DRIFT) < 1100
True

"""

from __future__ import annotations

import collections
import dataclasses
import enum

from river import base, drift

__all__ = ["DETECTORS", "REACTIONS", "DriftEvent", "DriftMonitor", "Signal", "make_detector"]

REACTIONS = ("alert", "reset", "background")


def _adwin(sensitive: bool, seed: int):
    return drift.ADWIN(delta=0.05 if sensitive else 0.002)


def _page_hinkley(sensitive: bool, seed: int):
    return drift.PageHinkley(threshold=12.0 if sensitive else 25.0, delta=0.005, mode="up")


def _kswin(sensitive: bool, seed: int):
    return drift.KSWIN(alpha=0.05 if sensitive else 0.005, window_size=200, stat_size=50, seed=seed)


DETECTORS = {
    "adwin": _adwin,
    "page-hinkley": _page_hinkley,
    "kswin": _kswin,
    "ddm": lambda sensitive, seed: drift.binary.DDM(),
    "eddm": lambda sensitive, seed: drift.binary.EDDM(alpha=0.9, beta=0.8),  # fewer false alarms
    "hddm-a": lambda sensitive, seed: drift.binary.HDDMA(),
    "hddm-w": lambda sensitive, seed: drift.binary.HDDMW(),
}


def make_detector(name: str, *, sensitive: bool = False, seed: int = 0):
    try:
        return DETECTORS[name](sensitive, seed)
    except KeyError:
        known = ", ".join([*DETECTORS, "none"])
        raise ValueError(f"unknown drift detector {name!r}; known: {known}") from None


class Signal(enum.IntEnum):
    NONE = 0
    WARNING = 1
    DRIFT = 2


@dataclasses.dataclass
class DriftEvent:
    """A detected drift: where, when, on which learner, and what it did to accuracy."""

    learner: str
    detector: str
    position: int  # records scored by this learner when it fired
    time: float  # epoch seconds (the record's time when it has one, else wall clock)
    accuracy_before: float  # rolling accuracy at detection
    accuracy_after: float | None = None  # rolling accuracy `window` records later
    reaction: str = "alert"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class DriftMonitor:
    """One detector (plus a sensitive twin for warnings) over one learner's errors.

    Parameters
    ----------
    detector
        A name from :data:`DETECTORS`.
    recent
        How many recent errors decide whether a detection means the learner got worse.

    """

    def __init__(self, detector: str = "adwin", *, recent: int = 50, seed: int = 0):
        self.detector = detector
        self.recent = recent
        self.seed = seed
        self._main = make_detector(detector, seed=seed)
        has_warning_zone = isinstance(self._main, base.BinaryDriftAndWarningDetector)
        self._warning_twin = (
            None if has_warning_zone else make_detector(detector, sensitive=True, seed=seed)
        )
        self._errors: collections.deque[int] = collections.deque(maxlen=max(recent * 20, 1000))
        self.in_warning = False

    def _got_worse(self) -> bool:
        errors = self._errors
        if len(errors) < 2 * self.recent:
            return True  # too little history to tell; trust the detector
        items = list(errors)
        recent = items[-self.recent :]
        before = items[: -self.recent]
        return sum(recent) / len(recent) > sum(before) / len(before)

    def update(self, error: int | bool) -> Signal:
        error = int(error)
        self._errors.append(error)
        main = self._main
        main.update(error)
        if main.drift_detected and self._got_worse():
            self.in_warning = False
            self._errors.clear()
            if self._warning_twin is not None:
                self._warning_twin = make_detector(self.detector, sensitive=True, seed=self.seed)
            return Signal.DRIFT
        if self._warning_twin is not None:
            self._warning_twin.update(error)
            if self._warning_twin.drift_detected and self._got_worse():
                self.in_warning = True
        else:
            self.in_warning = bool(main.warning_detected)
        return Signal.WARNING if self.in_warning else Signal.NONE

    def clear_warning(self) -> None:
        """Forget a warning that never turned into drift (the twin has no way back)."""
        self.in_warning = False

    # -- state: plain data with a schema version (checkpoints) --

    STATE_SCHEMA = "stream-learner/drift-monitor"
    STATE_VERSION = 1

    def state_dict(self) -> dict:
        """The monitor as data: its settings, recent errors and warning flag; River's
        detectors, which have no public state schema, as pickles (read back through the
        restricted unpickler)."""
        import pickle

        twin = self._warning_twin
        return {
            "schema": self.STATE_SCHEMA,
            "version": self.STATE_VERSION,
            "detector": self.detector,
            "recent": self.recent,
            "seed": self.seed,
            "errors": bytes(self._errors),
            "in_warning": self.in_warning,
            "main": pickle.dumps(self._main, protocol=pickle.HIGHEST_PROTOCOL),
            "warning_twin": None
            if twin is None
            else pickle.dumps(twin, protocol=pickle.HIGHEST_PROTOCOL),
        }

    @classmethod
    def from_state(cls, state: dict) -> DriftMonitor:
        from stream_learner.state.schema import StateError, check_schema
        from stream_learner.state.unpickle import restricted_loads

        check_schema(state, cls.STATE_SCHEMA, (cls.STATE_VERSION,))
        try:
            monitor = cls(state["detector"], recent=int(state["recent"]), seed=int(state["seed"]))
            main = restricted_loads(state["main"])
            twin = (
                None if state["warning_twin"] is None else restricted_loads(state["warning_twin"])
            )
            errors = bytes(state["errors"])
            in_warning = bool(state["in_warning"])
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(
                f"drift monitor state does not fit: {type(error).__name__}: {error}"
            ) from None
        for detector, fresh in ((main, monitor._main), (twin, monitor._warning_twin)):
            if type(detector) is not type(fresh):
                raise StateError(
                    f"drift monitor state holds a {type(detector).__name__} where {state['detector']} "
                    f"has a {type(fresh).__name__}"
                )
        monitor._main, monitor._warning_twin = main, twin
        monitor._errors.extend(errors)
        monitor.in_warning = in_warning
        return monitor
