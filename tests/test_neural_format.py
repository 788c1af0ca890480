"""Saving and loading the neural learner: exact round trips, and every corrupt-file case."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.core.features import TextFeaturizer
from stream_learner.learners.neural.format import (
    FORMAT_VERSION,
    NeuralFormatError,
    load,
    read_header,
    save,
)
from stream_learner.learners.neural.model import NeuralClassifier, neural_step
from stream_learner.learners.registry import make_learner

TEXTS = [
    ("what a great match, the team played well", "pos"),
    ("terrible service, never again", "neg"),
    ("the flight was on time", "neu"),
    ("awful, boring movie", "neg"),
    ("loved it, wonderful cast", "pos"),
    ("it is a book about trains", "neu"),
]


def trained_pipeline(**params):
    model = make_learner("neural", n_buckets=2**10, seed=3)
    if params:
        model = TextFeaturizer(n_buckets=2**10) | NeuralClassifier(n_buckets=2**10, **params)
    for text, label in TEXTS * 5:
        model.learn_one(text, label)
    return model


def assert_same_future(a, b, stream):
    """Both models predict and learn identically from here on."""
    for text, label in stream:
        assert a.predict_proba_one(text) == b.predict_proba_one(text)
        a.learn_one(text, label)
        b.learn_one(text, label)
    pa, pb = neural_step(a).parameters(), neural_step(b).parameters()
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name])


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"hidden": 6, "dropout": 0.3, "optimizer": "adam", "lr": 0.01, "dim": 8},
        {"optimizer": "sgd", "lr": 1.0, "dtype": "float64", "dim": 4, "lr_decay": 0.01},
        {"wide": True},
        {"wide": True, "hidden": 4, "optimizer": "adam", "lr": 0.01, "wide_lr": 0.05, "dim": 8},
    ],
)
def test_round_trip_restores_the_learner_exactly(tmp_path, params):
    model = trained_pipeline(**params)
    path = tmp_path / "model.npz"
    save(model, path)
    restored = load(path)
    assert repr(restored) == repr(model)
    assert neural_step(restored).classes == neural_step(model).classes
    assert neural_step(restored).n_seen == neural_step(model).n_seen
    assert_same_future(model, restored, TEXTS[::-1] * 3 + [("a brand new label", "new")])


def test_bare_learner_round_trip_with_typed_labels(tmp_path):
    model = NeuralClassifier(n_buckets=64, dim=4)
    for i, label in enumerate([3, True, "1", 2.5, np.int64(7)]):
        model.learn_one({i: 1.0}, label)
    path = tmp_path / "bare.npz"
    save(model, path, hashing={"scheme": "test"})
    restored = load(path, expected_hashing={"scheme": "test"})
    assert restored.classes == [3, True, "1", 2.5, 7]
    assert [type(c) for c in restored.classes] == [int, bool, str, float, int]
    assert restored.predict_proba_one({1: 1.0}) == model.predict_proba_one({1: 1.0})


def test_untrained_learner_round_trips(tmp_path):
    path = tmp_path / "fresh.npz"
    save(NeuralClassifier(n_buckets=64, dim=4, seed=5), path)
    restored = load(path)
    assert restored.seed == 5 and restored.predict_one({1: 1}) is None


def test_warm_start_continues_training_from_the_file(tmp_path):
    model = trained_pipeline()
    path = tmp_path / "model.npz"
    save(model, path)
    tuned = load(path)
    for _ in range(5):
        tuned.learn_one("trains are neutral facts", "neu")
    assert tuned.predict_one("trains are neutral facts") == "neu"
    assert neural_step(tuned).n_seen == neural_step(model).n_seen + 5


def test_unsaveable_label_fails_cleanly_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.npz"
    model = NeuralClassifier(n_buckets=64, dim=4)
    model.learn_one({1: 1}, "a")
    save(model, path)
    before = path.read_bytes()
    model.learn_one({1: 1}, ("a", "tuple"))
    with pytest.raises(NeuralFormatError, match="label"):
        save(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


# --- corrupt files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model.npz"
    model = NeuralClassifier(n_buckets=32, dim=4, hidden=3)
    for i in range(20):
        model.learn_one({i % 7: 1.0, (i * 3) % 11: 2.0}, "ab"[i % 2])
    save(model, path)
    return model, path, path.read_bytes()


def _load_bytes(tmp_path, data, **kwargs):
    path = tmp_path / "candidate.npz"
    path.write_bytes(data)
    return load(path, **kwargs)


def _same_model(a, b):
    if a.classes != b.classes or a.n_seen != b.n_seen or a._get_params() != b._get_params():
        return False
    pa, pb = a.parameters(), b.parameters()
    return all(np.array_equal(pa[n], pb[n]) for n in pa)


def test_truncated_files_are_refused(saved, tmp_path):
    _, _, data = saved
    for size in [0, 1, 10, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1]:
        with pytest.raises(NeuralFormatError, match="truncated or corrupt|not a stream-learner"):
            _load_bytes(tmp_path, data[:size])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_a_damaged_byte_never_yields_a_different_model(saved, tmp_path, position, flip):
    model, _, data = saved
    index = int(position * len(data))
    damaged = bytearray(data)
    damaged[index] ^= flip
    try:
        restored = _load_bytes(tmp_path, bytes(damaged))
    except NeuralFormatError:
        return
    # Some bytes of a zip (timestamps, unused fields) carry no content.
    assert _same_model(restored, model)


def _rewrite(data: bytes, edit_header=None, edit_arrays=None, fix_checksum=False) -> bytes:
    from stream_learner.learners.neural.format import _digest

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    header = json.loads(arrays.pop("header.json").tobytes())
    if edit_header:
        edit_header(header)
    if edit_arrays:
        edit_arrays(arrays)
    if fix_checksum:
        header["checksum"] = _digest(header, arrays)
    out = io.BytesIO()
    blob = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(out, **{"header.json": blob}, **arrays)
    return out.getvalue()


def test_tampered_arrays_fail_the_checksum(saved, tmp_path):
    def nudge(arrays):
        arrays["param.emb"] = arrays["param.emb"].copy()
        arrays["param.emb"][0, 0] += 1e-3

    with pytest.raises(NeuralFormatError, match="checksum"):
        _load_bytes(tmp_path, _rewrite(saved[2], edit_arrays=nudge))


def test_tampered_header_fails_the_checksum(saved, tmp_path):
    def relabel(header):
        header["state"]["classes"][0] = ["str", "evil"]

    with pytest.raises(NeuralFormatError, match="checksum"):
        _load_bytes(tmp_path, _rewrite(saved[2], edit_header=relabel))


def test_other_format_version_is_refused_by_name(saved, tmp_path):
    def bump(header):
        header["version"] = FORMAT_VERSION + 1

    with pytest.raises(NeuralFormatError, match=f"format version {FORMAT_VERSION + 1}"):
        _load_bytes(tmp_path, _rewrite(saved[2], edit_header=bump, fix_checksum=True))


def test_version_1_files_load_as_learners_without_the_wide_term(saved, tmp_path):
    def downgrade(header):
        header["version"] = 1
        for name in ("wide", "wide_lr"):
            del header["params"][name]

    restored = _load_bytes(tmp_path, _rewrite(saved[2], edit_header=downgrade, fix_checksum=True))
    assert _same_model(restored, saved[0]) and restored.wide is False


def test_a_wide_file_without_its_wide_table_is_refused(tmp_path):
    model = NeuralClassifier(n_buckets=32, dim=4, wide=True)
    model.learn_one({1: 1.0}, "a")
    path = tmp_path / "wide.npz"
    save(model, path)

    def drop(arrays):
        for name in ("param.wide", "slot.wide.0"):
            del arrays[name]

    def unlist(header):
        header["arrays"] = [a for a in header["arrays"] if "wide" not in a]
        header["state"]["slots"].pop("wide")

    data = _rewrite(path.read_bytes(), edit_arrays=drop, edit_header=unlist, fix_checksum=True)
    with pytest.raises(NeuralFormatError, match="do not fit"):
        _load_bytes(tmp_path, data)


def test_inconsistent_but_checksummed_files_are_refused(saved, tmp_path):
    def shrink(arrays):
        arrays["param.out"] = arrays["param.out"][:1]

    with pytest.raises(NeuralFormatError, match="shape"):
        _load_bytes(tmp_path, _rewrite(saved[2], edit_arrays=shrink, fix_checksum=True))

    def drop(arrays):
        del arrays["slot.emb.0"]

    with pytest.raises(NeuralFormatError, match="arrays do not match"):
        _load_bytes(tmp_path, _rewrite(saved[2], edit_arrays=drop))


def test_foreign_files_are_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.ones(3))
    with pytest.raises(NeuralFormatError, match="not a stream-learner"):
        load(path)
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as zf:
        zf.writestr("header.json.npy", b"\x93NUMPY pickled")
    with pytest.raises(NeuralFormatError):
        load(tmp_path / "pickled.npz")
    with pytest.raises(NeuralFormatError, match="cannot read"):
        load(tmp_path / "missing.npz")


def test_other_hashing_configuration_is_refused(tmp_path):
    model = trained_pipeline()
    path = tmp_path / "model.npz"
    save(model, path)
    featurizer = list(model.steps.values())[0]
    assert read_header(path)["hashing"] == featurizer.hashing_config()
    assert load(path, expected_hashing=featurizer.hashing_config()) is not None
    other = TextFeaturizer(n_buckets=2**10, word_ngrams=1).hashing_config()
    with pytest.raises(NeuralFormatError, match="word_ngrams"):
        load(path, expected_hashing=other)
    bare = tmp_path / "bare.npz"
    save(neural_step(model), bare)
    with pytest.raises(NeuralFormatError, match="no hashing configuration"):
        load(bare, expected_hashing=other)


def test_a_failed_load_changes_nothing(saved, tmp_path):
    model, path, data = saved
    before = {n: a.copy() for n, a in model.parameters().items()}
    with pytest.raises(NeuralFormatError):
        _load_bytes(tmp_path, data[: len(data) // 2])
    assert path.read_bytes() == data
    for name, array in model.parameters().items():
        np.testing.assert_array_equal(array, before[name])


# --- keyed MAC -------------------------------------------------------------------------------------

SECRET = b"model-file-test-secret-0123456789"


@pytest.fixture(scope="module")
def signed(saved, tmp_path_factory):
    model, _, _ = saved
    path = tmp_path_factory.mktemp("signed") / "model.npz"
    save(model, path, key=SECRET)
    return model, path, path.read_bytes()


def test_a_signed_file_loads_with_its_key_and_without_one(signed, tmp_path):
    model, path, _ = signed
    assert _same_model(load(path, key=SECRET), model)
    assert _same_model(load(path), model)  # no key: the checksum alone
    assert "mac" in read_header(path, key=SECRET)


def test_with_a_key_a_tampered_file_is_refused_even_with_a_fixed_checksum(signed, tmp_path):
    """The SHA-256 anyone can recompute; the MAC only the key holder."""

    def relabel(header):
        header["state"]["classes"][0] = ["str", "evil"]

    def nudge(arrays):
        arrays["param.emb"] = arrays["param.emb"].copy()
        arrays["param.emb"][0, 0] += 1.0

    for edit in ({"edit_header": relabel}, {"edit_arrays": nudge}):
        forged = _rewrite(signed[2], fix_checksum=True, **edit)
        with pytest.raises(NeuralFormatError, match="MAC mismatch"):
            _load_bytes(tmp_path, forged, key=SECRET)
        assert _load_bytes(tmp_path, forged) is not None  # without a key, integrity only
    stripped = _rewrite(signed[2], edit_header=lambda header: header.pop("mac"))
    with pytest.raises(NeuralFormatError, match="no MAC"):
        _load_bytes(tmp_path, stripped, key=SECRET)


def test_another_key_or_another_purpose_is_refused(signed, tmp_path):
    from stream_learner.state.keys import CHECKPOINT, MODEL_FILE, derive_key

    for key in (b"another secret", derive_key(SECRET, MODEL_FILE), derive_key(SECRET, CHECKPOINT)):
        with pytest.raises(NeuralFormatError, match="MAC mismatch"):
            _load_bytes(tmp_path, signed[2], key=key)


def test_files_saved_without_a_key_still_load_and_are_refused_when_a_key_is_required(
    saved, tmp_path
):
    model, _, data = saved  # as every file written before the MAC existed
    assert _same_model(_load_bytes(tmp_path, data), model)
    with pytest.raises(NeuralFormatError, match="no MAC"):
        _load_bytes(tmp_path, data, key=SECRET)


def test_a_pipeline_saved_before_unspaced_segmentation_loads_as_it_was(tmp_path):
    model = make_learner("neural", n_buckets=2**10, seed=3)
    model.steps[list(model.steps)[0]].segment_unspaced = False
    for text, label in TEXTS * 2:
        model.learn_one(text, label)
    path = tmp_path / "model.npz"
    save(model, path)

    def as_written_before(header):  # no parameter, no key in the hashing configuration
        del header["featurizer"]["segment_unspaced"]
        assert "unspaced" not in header["hashing"]

    old_hashing = read_header(path)["hashing"]
    loaded = _load_bytes(
        tmp_path,
        _rewrite(path.read_bytes(), edit_header=as_written_before, fix_checksum=True),
        expected_hashing=old_hashing,
    )
    featurizer = list(loaded.steps.values())[0]
    assert featurizer.segment_unspaced is False
    assert featurizer.tokens("東京タワー") == ["東京タワー"]
    text = "東京 great match"
    assert loaded.predict_proba_one(text) == model.predict_proba_one(text)


# -- golden files: written by an earlier release, they must load and predict as recorded ----------

GOLDEN = Path(__file__).parent / "fixtures"
GOLDEN_KEY = b"golden-neural-key-0123456789abcdef"


@pytest.mark.parametrize("file_name", ["golden-neural-v2.npz", "golden-neural-mlp-v2.npz"])
def test_golden_model_files_load_and_predict_as_recorded(file_name):
    expected = json.loads((GOLDEN / "golden-neural-v2.json").read_text())
    recorded = expected["files"][file_name]
    path = GOLDEN / file_name
    model = load(path, key=GOLDEN_KEY if recorded["signed"] else None)
    learner = neural_step(model)
    assert (learner.n_seen, learner.n_updates) == (recorded["n_seen"], recorded["t"])
    assert sorted(learner.classes) == ["ham", "news", "spam"]
    for text, proba in zip(expected["probes"], recorded["predictions"], strict=True):
        assert model.predict_proba_one(text) == pytest.approx(proba, rel=1e-12, abs=1e-15)
    if recorded["signed"]:
        with pytest.raises(NeuralFormatError, match="MAC mismatch"):
            load(path, key=b"another-key-0123456789abcdef")
    # It goes on learning, exactly as a copy of itself does.
    assert_same_future(model, load(path), [("cheap pills now", "spam"), ("court vote", "news")] * 3)
