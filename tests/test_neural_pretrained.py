"""Pretrained initialization of the neural learner, and its bucket-id fast path."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.core.features import TextFeaturizer
from stream_learner.learners.neural.model import NeuralClassifier, neural_step
from stream_learner.learners.neural.pretrained_init import (
    PretrainedVectorsError,
    bucket_vectors,
    init_embeddings,
    project,
    read_minilm,
    read_safetensors,
    read_word_vectors,
)
from stream_learner.learners.registry import make_learner

FEATURIZER = TextFeaturizer(n_buckets=2**10)


def test_reads_glove_and_word2vec_text_files(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("good 0.5 1.5\nbad -0.5 -1\n")
    word2vec = tmp_path / "w2v.txt"
    word2vec.write_text("2 2\ngood 0.5 1.5\nbad -0.5 -1\n")
    for path in (glove, word2vec):
        words, vectors = read_word_vectors(path)
        assert words == ["good", "bad"]
        np.testing.assert_array_equal(vectors, [[0.5, 1.5], [-0.5, -1.0]])
    assert read_word_vectors(glove, limit=1)[0] == ["good"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("good 1 2\nbad 1\n", r":2: 1 numbers where the file has 2"),
        ("good 1 x\n", r":1: could not convert"),
        ("good\n", "without a vector"),
        ("\n\n", "no vectors"),
    ],
)
def test_bad_vector_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "vectors.txt"
    path.write_text(content)
    with pytest.raises(PretrainedVectorsError, match=message):
        read_word_vectors(path)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z]{1,8}", fullmatch=True),
            st.lists(st.floats(-1e3, 1e3, width=32), min_size=3, max_size=3),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_word_vector_files_round_trip(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("vectors") / "v.txt"
    path.write_text("".join(f"{w} {' '.join(repr(v) for v in vec)}\n" for w, vec in entries))
    words, vectors = read_word_vectors(path)
    assert words == [w for w, _ in entries]
    np.testing.assert_array_equal(vectors, np.array([v for _, v in entries], dtype=np.float32))


def _write_safetensors(path, tensors: dict[str, np.ndarray], dtype="F32"):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        if dtype == "BF16":
            data = (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            data = array.astype({"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_reads_minilm_style_model_directories(tmp_path, dtype):
    vocab = ["[PAD]", "[CLS]", "good", "bad", "##ing", "movie"]
    matrix = np.arange(len(vocab) * 4, dtype=np.float32).reshape(len(vocab), 4) / 8
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    _write_safetensors(
        tmp_path / "model.safetensors",
        {"embeddings.position_ids": np.zeros((1, 3)), "embeddings.word_embeddings.weight": matrix},
        dtype,
    )
    words, vectors = read_minilm(tmp_path)
    assert words == vocab
    np.testing.assert_allclose(vectors, matrix, rtol=1e-2)


def test_damaged_safetensors_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, {"word_embeddings.weight": np.ones((3, 2))})
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(PretrainedVectorsError, match="truncated"):
        read_safetensors(path, "word_embeddings.weight")
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(PretrainedVectorsError):
        read_safetensors(path, "word_embeddings.weight")
    with pytest.raises(PretrainedVectorsError, match="No such file"):
        read_safetensors(tmp_path / "absent.safetensors", "word_embeddings.weight")


def test_without_the_safetensors_package_the_error_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, {"word_embeddings.weight": np.ones((3, 2))})
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(PretrainedVectorsError, match=r"stream-learner\[pretrained\]"):
        read_safetensors(path, "word_embeddings.weight")


def test_projection_keeps_the_leading_directions():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2, 10))
    vectors = rng.normal(size=(200, 2)) * [10, 3] @ basis + rng.normal(scale=0.01, size=(200, 10))
    pca = project(vectors, 2, method="pca")
    assert pca.shape == (200, 2)
    # two components keep nearly all the variance of data that lives in a plane
    centred = vectors - vectors.mean(axis=0)
    assert (pca**2).sum() / (centred**2).sum() > 0.999
    random = project(vectors, 4, method="random", seed=1)
    np.testing.assert_array_equal(random, project(vectors, 4, method="random", seed=1))
    with pytest.raises(ValueError, match="pca"):
        project(vectors, 2, method="svd")


def test_bucket_vectors_use_single_token_words_and_average_collisions():
    featurizer = TextFeaturizer(n_buckets=1)  # every word collides into bucket 0
    keys, rows = bucket_vectors(featurizer, ["good", "##ing", "[CLS]", "bad"], np.array([[1.0], [9.0], [9.0], [3.0]]))
    assert keys.tolist() == [0]
    np.testing.assert_allclose(rows, [[2.0]])
    with pytest.raises(PretrainedVectorsError):
        bucket_vectors(featurizer, ["two words"], np.ones((1, 1)))


def test_init_embeddings_writes_the_rows_of_the_words_buckets():
    model = make_learner("neural", n_buckets=2**10)
    words = ["good", "great", "bad", "awful"]
    vectors = np.array([[1.0, 0.1], [0.9, 0.2], [-1.0, 0.0], [-0.8, -0.1]])
    learner = neural_step(model)
    learner._ensure_init()
    untouched = learner.embeddings.copy()
    written = init_embeddings(model, words, vectors, rms=0.5)
    assert written == 4
    table = learner.embeddings
    rows = [FEATURIZER.buckets(w)[0] for w in words]
    assert np.sqrt(np.mean(table[rows] ** 2)) == pytest.approx(0.5, rel=1e-5)
    # similar words get similar rows, opposite words opposite ones
    cos = table[rows] @ table[rows].T / np.outer(*[np.linalg.norm(table[rows], axis=1)] * 2)
    assert cos[0, 1] > 0.9 and cos[0, 2] < -0.9
    others = np.setdiff1d(np.arange(2**10), rows)
    np.testing.assert_array_equal(table[others], untouched[others])


def test_init_embeddings_refuses_mismatched_inputs():
    learner = NeuralClassifier(n_buckets=2**10, dim=2)
    with pytest.raises(ValueError, match="featurizer"):
        init_embeddings(learner, ["good"], np.ones((1, 2)))
    with pytest.raises(PretrainedVectorsError, match="buckets"):
        init_embeddings(learner, ["good"], np.ones((1, 2)), featurizer=TextFeaturizer(n_buckets=8))
    with pytest.raises(PretrainedVectorsError, match="words"):
        init_embeddings(learner, ["good", "bad"], np.ones((1, 2)), featurizer=FEATURIZER)


def test_pretrained_rows_carry_knowledge_to_unseen_words():
    # Train on "good"/"bad" only; "great"/"awful" were never seen but share their vectors.
    words = ["good", "great", "bad", "awful", "the", "film"]
    vectors = np.array([[1, 0], [0.95, 0.05], [-1, 0], [-0.95, 0.05], [0, 1], [0.05, 1]])
    model = make_learner("neural", n_buckets=2**10, seed=0)
    init_embeddings(model, words, vectors)
    for _ in range(30):
        model.learn_one("good film", "pos")
        model.learn_one("bad film", "neg")
    assert model.predict_one("great") == "pos"
    assert model.predict_one("awful") == "neg"


# --- bucket-id sequences as x -------------------------------------------------------------------


def test_bucket_sequences_learn_like_count_dicts():
    texts = [("a good good film", "pos"), ("a bad film", "neg"), ("good", "pos")] * 20
    from_dicts, from_buckets = NeuralClassifier(n_buckets=2**10, dim=8), NeuralClassifier(n_buckets=2**10, dim=8)
    for text, label in texts:
        from_dicts.learn_one(FEATURIZER.transform_one(text), label)
        from_buckets.learn_one(FEATURIZER.buckets(text), label)
    np.testing.assert_allclose(from_dicts.embeddings, from_buckets.embeddings, atol=1e-6)
    proba = from_buckets.predict_proba_one(FEATURIZER.buckets("good film"))
    reference = from_dicts.predict_proba_one(FEATURIZER.transform_one("good film"))
    assert proba == pytest.approx(reference, rel=1e-5)
    batch = [FEATURIZER.buckets(t) for t, _ in texts[:6]]
    assert from_buckets.predict_many(batch) == [from_buckets.predict_one(b) for b in batch]


def test_bucket_sequences_out_of_range_wrap_and_bad_ones_are_refused():
    wrapped, plain = NeuralClassifier(n_buckets=16, dim=4), NeuralClassifier(n_buckets=16, dim=4)
    for label in "abab":
        wrapped.learn_one([3, 19, -13, 5], label)  # 19 % 16 == 3 == -13 % 16
        plain.learn_one([3, 3, 3, 5], label)
    np.testing.assert_array_equal(wrapped.embeddings, plain.embeddings)
    np.testing.assert_array_equal(wrapped.parameters()["out"], plain.parameters()["out"])
    model = wrapped
    with pytest.raises(ValueError, match="bucket ids"):
        model.learn_one(["not", "ids"], "a")
