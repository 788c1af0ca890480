"""State dicts: plain data with a schema version, from which a learner or a whole processor is
rebuilt to predict and learn exactly as the original; newer versions refused by name."""

from __future__ import annotations

import contextlib
import io
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.core.drift import DriftMonitor
from stream_learner.core.evaluation import PrequentialScore
from stream_learner.core.labels import LabelBuffer
from stream_learner.core.processor import LearnerFailure, Prediction, StreamProcessor
from stream_learner.core.records import Record
from stream_learner.learners.learner_state import learner_from_state, learner_state
from stream_learner.learners.neural.model import NeuralClassifier
from stream_learner.learners.registry import make_learner
from stream_learner.runtime.worker import STATE_FORMAT, read_state
from stream_learner.state.schema import StateError
from stream_learner.state.unpickle import restricted_loads

WORDS = {
    "spam": ["cheap", "pills", "free", "money", "win", "prize"],
    "ham": ["meeting", "lunch", "report", "project", "team", "agenda"],
    "news": ["election", "market", "storm", "league", "court", "vote"],
}


def through_a_checkpoint(state):
    """What a checkpoint does to a state dict: pickled, read back by the restricted unpickler."""
    return restricted_loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def class_paths(state) -> set[str]:
    """Every class or function a pickle of ``state`` names (the nested pickles of River's
    learners are bytes: they name nothing here)."""
    names = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    Recorder(io.BytesIO(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))).load()
    return names


# -- the numpy learner ----------------------------------------------------------------------------

neural_params = st.fixed_dictionaries(
    {
        "dim": st.sampled_from([2, 4]),
        "hidden": st.sampled_from([0, 3]),
        "optimizer": st.sampled_from(["sgd", "adagrad", "adam"]),
        "dtype": st.sampled_from(["float32", "float64"]),
        "wide": st.booleans(),
        "bag": st.sampled_from(["mean", "sum"]),
        "dropout": st.sampled_from([0.0, 0.3]),
    }
).map(lambda p: {**p, "dropout": p["dropout"] if p["hidden"] else 0.0})
examples = st.lists(
    st.tuples(
        st.dictionaries(st.integers(0, 63), st.integers(1, 3), min_size=1, max_size=5),
        st.sampled_from(["a", "b", 3, True]),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(params=neural_params, before=examples, after=examples, seed=st.integers(0, 5))
def test_a_neural_learner_rebuilt_from_its_state_predicts_and_learns_identically(
    params, before, after, seed
):
    model = NeuralClassifier(n_buckets=64, seed=seed, **params)
    for x, y in before:
        model.learn_one(x, y)
    copy = NeuralClassifier.from_state(through_a_checkpoint(model.state_dict()))
    assert copy.classes == model.classes and copy.n_seen == model.n_seen
    for x, y in after:
        assert copy.predict_proba_one(x) == model.predict_proba_one(x)
        model.learn_one(x, y)
        copy.learn_one(x, y)
    if after:  # one mini-batch step too
        xs, ys = [x for x, _ in after], [y for _, y in after]
        model.learn_many(xs, ys)
        copy.learn_many(xs, ys)
    assert copy.n_updates == model.n_updates
    mine, theirs = model.parameters(), copy.parameters()
    assert mine.keys() == theirs.keys()
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name])


def test_a_neural_state_is_plain_data():
    model = make_learner("neural", n_buckets=2**8)
    model.learn_one("cheap pills", "spam")
    state = learner_state(model)
    assert all(path.startswith(("numpy.", "builtins.")) for path in class_paths(state)), (
        class_paths(state)
    )
    assert state["featurizer"]["n_buckets"] == 2**8
    copy = learner_from_state(through_a_checkpoint(state))
    assert copy.predict_proba_one("pills") == model.predict_proba_one("pills")


def test_a_state_that_does_not_fit_is_refused_clearly():
    model = NeuralClassifier(n_buckets=16, dim=2)
    model.learn_one({1: 1}, "a")
    state = model.state_dict()
    state["arrays"] = {**state["arrays"], "emb": np.zeros((8, 2))}
    with pytest.raises(StateError, match="parameter emb has shape"):
        NeuralClassifier.from_state(state)
    state = model.state_dict()
    state["params"] = {**state["params"], "optimizer": "adam"}  # adagrad's one slot, adam has two
    with pytest.raises(StateError, match="optimizer state of"):
        NeuralClassifier.from_state(state)


# -- a processor with several learners ----------------------------------------------------------


def _records(draw_spec, start: int) -> list[Record]:
    """Records from ``(label, words, kind)``: kind 0 labelled, 1 unlabelled (its label comes
    later as a label-only record), 2 unlabelled for good. Labels of the second half are swapped
    (a concept drift) when ``swap``."""
    out, late = [], []
    for i, (label, picks, kind) in enumerate(draw_spec):
        rid = f"r{start + i}"
        text = " ".join(WORDS[label][p] for p in picks)
        out.append(Record(rid, text, label if kind == 0 else None, ts=float(start + i)))
        if kind == 1:
            late.append(Record(rid, None, label, ts=float(start + i)))
        if late and i % 4 == 3:
            out.append(late.pop(0))
    return out + late


record_specs = st.lists(
    st.tuples(
        st.sampled_from(sorted(WORDS)),
        st.lists(st.integers(0, 5), min_size=1, max_size=4),
        st.sampled_from([0, 0, 0, 1, 2]),
    ),
    min_size=1,
    max_size=60,
)


def _processor(reaction: str, serving: str) -> StreamProcessor:
    learners = {
        name: make_learner(name, seed=1, n_buckets=2**8)
        for name in ("nb", "neural", "softmax", "neural-mlp")
    }
    return StreamProcessor(
        learners,
        serving=serving,
        drift_detector="adwin",
        drift_reaction=reaction,
        window=20,
        series_every=10,
        seed=1,
    )


def _drifting(n: int) -> list[Record]:
    """A stream whose labels change meaning half way: drift, warnings, background learners."""
    out = []
    for i in range(n):
        label = sorted(WORDS)[i % 3]
        shown = sorted(WORDS)[(i + 1) % 3] if i >= n // 2 else label
        out.append(
            Record(
                f"d{i}", " ".join(WORDS[label][(i * k) % 6] for k in (1, 2, 5)), shown, ts=float(i)
            )
        )
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=record_specs,
    after=record_specs,
    drifted=st.integers(0, 240),
    reaction=st.sampled_from(["alert", "reset", "background"]),
    serving=st.sampled_from(["leader", "ensemble", "fixed:neural"]),
    batch=st.sampled_from([1, 7]),
)
def test_a_processor_rebuilt_from_its_state_predicts_and_learns_identically(
    before, after, drifted, reaction, serving, batch
):
    processor = _processor(reaction, serving)
    for record in _drifting(drifted) + _records(before, 1000):
        with contextlib.suppress(LearnerFailure):  # dead-lettered by a worker; the state goes on
            processor.process(record, now=record.ts)
    state = processor.state_dict()
    copy = StreamProcessor.from_state(through_a_checkpoint(state))
    assert copy.learner_stats() == processor.learner_stats()
    assert copy.label_buffer_stats() == processor.label_buffer_stats()
    assert [e.as_dict() for e in copy.drift_events] == [e.as_dict() for e in processor.drift_events]
    assert list(copy.series) == list(processor.series)
    stream = _records(after, 5000) + _drifting(40)
    for i in range(0, len(stream), batch):
        part = stream[i : i + batch]
        ours = processor.process_many(part, [r.ts for r in part])
        theirs = copy.process_many(part, [r.ts for r in part])
        assert [repr(r) for r in theirs] == [repr(r) for r in ours]
    assert copy.learner_stats() == processor.learner_stats()
    assert copy.served_stats() == processor.served_stats()
    assert copy.label_buffer_stats() == processor.label_buffer_stats()
    assert (copy.records_seen, copy.model_version, copy.labelled) == (
        processor.records_seen,
        processor.model_version,
        processor.labelled,
    )
    for text in ("cheap pills", "team agenda", "court vote storm"):
        for name, model in processor.learners.items():
            assert copy.learners[name].predict_proba_one(text) == model.predict_proba_one(text)


def test_a_processor_state_names_none_of_our_classes():
    processor = _processor("background", "leader")
    for record in _drifting(200) + [Record("late", "cheap pills")]:
        processor.process(record, now=record.ts)
    state = processor.state_dict()
    paths = class_paths(state)
    assert not [p for p in paths if p.startswith(("stream_learner", "river"))], paths
    assert state["schema"] == "stream-learner/processor" and state["version"] == 1
    # River's learners are pickles inside it, without the featurizer (kept as parameters).
    nb = state["slots"][0]["model"]
    assert nb["kind"] == "pickle" and nb["featurizer"]["n_buckets"] == 2**8
    assert b"TextFeaturizer" not in nb["data"]


# -- versions ---------------------------------------------------------------------------------------


def _newer(state: dict) -> dict:
    return {**state, "version": state["version"] + 1}


def test_states_of_a_newer_version_are_refused_by_name():
    model = NeuralClassifier(n_buckets=16, dim=2)
    model.learn_one({1: 1}, "a")
    processor = _processor("alert", "leader")
    processor.process(Record("1", "cheap pills", "spam"))
    processor.process(Record("2", "lunch"))
    cases = [
        (NeuralClassifier.from_state, model.state_dict()),
        (learner_from_state, learner_state(model)),
        (PrequentialScore.from_state, processor._served.state_dict()),
        (DriftMonitor.from_state, DriftMonitor("adwin").state_dict()),
        (lambda s: LabelBuffer.from_state(s, Prediction), processor.labels.state_dict()),
        (StreamProcessor.from_state, processor.state_dict()),
    ]
    for read, state in cases:
        read(state)  # this version reads
        with pytest.raises(StateError, match=rf"version {state['version'] + 1}; .*newer release"):
            read(_newer(state))
    with pytest.raises(StateError, match="expected a stream-learner/score state"):
        PrequentialScore.from_state(DriftMonitor("adwin").state_dict())
    # A newer part inside a processor's state: refused too, naming the part.
    state = processor.state_dict()
    state["slots"][1]["score"] = _newer(state["slots"][1]["score"])
    with pytest.raises(StateError, match="stream-learner/score state has version 2"):
        StreamProcessor.from_state(state)


def test_a_checkpoint_payload_of_a_newer_format_is_refused_by_name():
    processor = _processor("alert", "leader")
    payload = {"format": STATE_FORMAT, "processor": processor.state_dict(), "counts": {}}
    assert (
        read_state(through_a_checkpoint(payload))["processor"].learners.keys()
        == processor.learners.keys()
    )
    with pytest.raises(StateError, match=r"format 3 .*newer release"):
        read_state({**payload, "format": STATE_FORMAT + 1})
    with pytest.raises(StateError, match="format None"):
        read_state({"processor": processor})
