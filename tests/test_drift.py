"""Drift detection on a stream with a planted change, and the reactions to it."""

import pytest
from synthetic import topic_stream

from stream_learner.cli.evaluate import evaluate
from stream_learner.core.drift import DETECTORS, DriftMonitor, Signal
from stream_learner.core.processor import StreamProcessor

CHANGE_AT = 3000
N = 5000


@pytest.fixture(scope="module")
def planted():
    return list(topic_stream(N, seed=11, permute_at=CHANGE_AT, noise=0.05))


@pytest.mark.parametrize("detector", sorted(DETECTORS))
def test_detector_fires_after_the_change_and_not_before(planted, detector):
    processor = StreamProcessor(["nb"], drift_detector=detector, drift_reaction="alert")
    evaluate(planted, processor)
    positions = [event.position for event in processor.drift_events]
    assert positions, f"{detector} never fired"
    # Learner positions count scored records; the first record is unscored.
    assert min(positions) >= CHANGE_AT - 1, f"{detector} fired before the change: {positions}"
    assert min(positions) <= CHANGE_AT + 400, f"{detector} fired too late: {positions}"


def test_drift_event_records_accuracy_before_and_after(planted):
    processor = StreamProcessor(["nb"], drift_detector="adwin", drift_reaction="reset", window=500)
    evaluate(planted, processor)
    event = processor.drift_events[0]
    assert event.learner == "nb" and event.detector == "adwin" and event.reaction == "reset"
    assert event.time >= 1_700_000_000.0 + CHANGE_AT  # the record's own timestamp
    assert event.accuracy_after is not None
    assert event.accuracy_before < 0.95 and event.accuracy_after > event.accuracy_before


@pytest.mark.parametrize("reaction", ["reset", "background"])
def test_reactions_recover_faster_than_alert(planted, reaction):
    def after_change_accuracy(reaction):
        processor = StreamProcessor(["nb"], drift_detector="adwin", drift_reaction=reaction)
        evaluate(planted, processor)
        return processor.learner_stats()["nb"]["rolling_accuracy"]  # last 1000: all after change

    alert = after_change_accuracy("alert")
    assert after_change_accuracy(reaction) > alert + 0.05


def test_background_reaction_swaps_in_the_learner_trained_since_the_warning(planted):
    processor = StreamProcessor(["nb"], drift_detector="ddm", drift_reaction="background")
    slot = processor._slots[0]
    started = swapped = False
    for record in planted:
        before = slot.model
        had_background = slot.background
        processor.process(record)
        started |= slot.background is not None and had_background is None
        if slot.model is not before:
            swapped |= slot.model is had_background
    assert started and swapped


def test_improvements_are_not_drift():
    # A learner going from 50% to 90% accuracy changes its error rate too: not a drift.
    monitor = DriftMonitor("adwin")
    errors = [i % 2 for i in range(500)] + [int(i % 10 == 0) for i in range(2000)]
    assert Signal.DRIFT not in [monitor.update(e) for e in errors]
