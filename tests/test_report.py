"""The accuracy plot and the series behind it: the served curve, drift markers per learner,
one resolution for evaluate and the worker."""

from __future__ import annotations

from pathlib import Path

from synthetic import topic_stream

from stream_learner.cli.report import plot_accuracy
from stream_learner.core.processor import StreamProcessor
from stream_learner.runtime.config import load_config
from stream_learner.runtime.worker import build_processor


def test_the_series_has_the_served_curve_beside_the_learners():
    processor = StreamProcessor(["nb", "pa"], serving="ensemble", series_every=100)
    for record in topic_stream(1000, seed=1):
        processor.process(record, now=0.0)
    learners = {row["learner"] for row in processor.series}
    assert learners == {"nb", "pa", "served (ensemble)"}
    served = [row for row in processor.series if row["learner"] == "served (ensemble)"]
    assert [row["position"] for row in served] == list(range(100, 1001, 100))
    assert served[-1]["accuracy"] == processor.served_stats()["accuracy"]


def test_one_learner_has_no_separate_served_curve():
    processor = StreamProcessor(["nb"], series_every=100)
    for record in topic_stream(300, seed=1):
        processor.process(record, now=0.0)
    assert {row["learner"] for row in processor.series} == {"nb"}


def test_the_worker_plots_at_evaluates_resolution():
    config = load_config(["--topic", "t", "--learners", "nb"], environ={})
    assert build_processor(config).series_every == 200  # evaluate's --series-every default


def test_each_learners_drift_events_get_their_own_legend_entry(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.legend

    def spy(self, *args, **kwargs):
        labels.extend(self.get_legend_handles_labels()[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", spy)
    processor = StreamProcessor(["nb", "pa"], serving="leader", drift_detector="adwin", series_every=100)
    for record in topic_stream(3000, seed=4, permute_at=1500, noise=0.0):
        processor.process(record, now=0.0)
    drifted = {event.learner for event in processor.drift_events}
    assert drifted  # the planted change is found
    path = plot_accuracy(processor.series, processor.drift_events, str(tmp_path / "plot.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "served (leader)" in labels
    assert sorted(label for label in labels if label.startswith("drift: ")) == sorted(f"drift: {name}" for name in drifted)
