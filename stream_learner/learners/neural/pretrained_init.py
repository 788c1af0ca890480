"""Pretrained vectors for the embedding table of :class:`~stream_learner.learners.neural.model.NeuralClassifier`.

Two sources: a word-vector text file (word2vec or GloVe text format) and the token embedding
matrix of all-MiniLM-L6-v2 (``model.safetensors`` + ``vocab.txt``, as fetched by
``stream-learner models fetch minilm``; read with the ``safetensors`` package into numpy, no
torch). Vectors are
projected to the learner's ``dim`` (PCA through an SVD, or a seeded random projection),
rescaled, and written to the rows of the buckets their words hash to (the rows of words
sharing a bucket are averaged). Only single-token whole words are used: WordPiece
continuations (``##ing``) and special tokens (``[CLS]``) have no bucket of their own.

>>> import tempfile, pathlib
>>> from stream_learner.learners.neural.model import NeuralClassifier
>>> from stream_learner.core.features import TextFeaturizer
>>> path = pathlib.Path(tempfile.mkdtemp()) / "vectors.txt"
>>> _ = path.write_text("good 1 0 0\\nbad -1 0 0\\ngreat 0.9 0.1 0\\n")
>>> words, vectors = read_word_vectors(path)
>>> words, vectors.shape
(['good', 'bad', 'great'], (3, 3))
>>> featurizer = TextFeaturizer(n_buckets=2**10)
>>> model = NeuralClassifier(n_buckets=2**10, dim=2)
>>> init_embeddings(model, words, vectors, featurizer=featurizer)
3

"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream_learner.core.features import TextFeaturizer

__all__ = [
    "PretrainedVectorsError",
    "read_word_vectors",
    "read_minilm",
    "project",
    "bucket_vectors",
    "init_embeddings",
]


class PretrainedVectorsError(ValueError):
    """A vector file that cannot be read, or vectors that do not fit."""


def read_word_vectors(path, *, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """Words and a float32 matrix from a word2vec / GloVe text file (first ``limit`` words).

    A first line of two integers (word2vec's ``count dim`` header) is skipped. Every line is a
    word followed by the same number of numbers; anything else is an error naming the line.
    """
    words: list[str] = []
    rows: list[np.ndarray] = []
    dim = None
    with open(path, encoding="utf-8", errors="strict") as fh:
        for number, line in enumerate(fh, start=1):
            fields = line.rstrip("\n").rstrip().split(" ")
            if number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                continue
            if not line.strip():
                continue
            if dim is None:
                dim = len(fields) - 1
                if dim < 1:
                    raise PretrainedVectorsError(f"{path}:{number}: a word without a vector")
            if len(fields) != dim + 1:
                raise PretrainedVectorsError(
                    f"{path}:{number}: {len(fields) - 1} numbers where the file has {dim}"
                )
            try:
                rows.append(np.array(fields[1:], dtype=np.float32))
            except ValueError as error:
                raise PretrainedVectorsError(f"{path}:{number}: {error}") from None
            words.append(fields[0])
            if limit is not None and len(words) >= limit:
                break
    if not words:
        raise PretrainedVectorsError(f"{path}: no vectors")
    return words, np.vstack(rows)


def read_safetensors(path, name_suffix: str) -> np.ndarray:
    """The tensor whose name ends with ``name_suffix`` from a ``.safetensors`` file, as float32.

    Read with the ``safetensors`` package (the ``pretrained`` extra), which checks the header
    and the data offsets and maps only the tensor asked for. BF16, which numpy has no type
    for, is widened here to float32.
    """
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise PretrainedVectorsError(
            f"reading {path} needs the safetensors package: pip install 'stream-learner[pretrained]'"
        ) from None
    try:
        with safe_open(str(path), framework="numpy") as model:
            names = [k for k in model.keys() if k.endswith(name_suffix)]  # noqa: SIM118 (not iterable)
            if len(names) != 1:
                raise PretrainedVectorsError(f"{path}: no single tensor named *{name_suffix}")
            if model.get_slice(names[0]).get_dtype() == "BF16":
                return _bf16_tensor(path, names[0])
            array = model.get_tensor(names[0])
    except (SafetensorError, OSError, TypeError) as error:
        raise PretrainedVectorsError(
            f"{path} is not a readable safetensors file (truncated or damaged?): {error}"
        ) from None
    if array.dtype.kind != "f":
        raise PretrainedVectorsError(f"{path}: tensor {names[0]} is {array.dtype}, not floats")
    return array.astype(np.float32)


def _bf16_tensor(path, name: str) -> np.ndarray:
    from safetensors import deserialize

    # deserialize hands the raw bytes of every tensor; BF16 is the top half of a float32.
    tensors = dict(deserialize(Path(path).read_bytes()))
    raw = np.frombuffer(tensors[name]["data"], dtype="<u2").astype(np.uint32) << 16
    return raw.view(np.float32).reshape(tensors[name]["shape"])


def read_minilm(model_dir=None) -> tuple[list[str], np.ndarray]:
    """The WordPiece vocabulary and token embedding matrix (30522 × 384) of all-MiniLM-L6-v2.

    ``model_dir`` defaults to :func:`stream_learner.learners.pretrained.model_dir` ("minilm"), which
    says how to fetch it when it is missing.
    """
    if model_dir is None:
        from stream_learner.learners.pretrained import model_dir as _model_dir

        model_dir = _model_dir("minilm")
    model_dir = Path(model_dir)
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    matrix = read_safetensors(model_dir / "model.safetensors", "word_embeddings.weight")
    if matrix.shape[0] != len(vocab):
        raise PretrainedVectorsError(
            f"{model_dir}: {len(vocab)} vocabulary entries but {matrix.shape[0]} embedding rows"
        )
    return vocab, matrix


def project(vectors: np.ndarray, dim: int, *, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``vectors`` (n × D) → n × ``dim``.

    ``"pca"``: centre and keep the ``dim`` leading principal directions (SVD); components with
    the most variance survive, so nearest neighbours are kept best. ``"random"``: a seeded
    Gaussian random projection (Johnson–Lindenstrauss), cheap and data-independent.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if method == "pca":
        centred = vectors - vectors.mean(axis=0)
        # Eigenvectors of the D × D covariance: the SVD's right singular vectors, cheaper.
        values, vectors_ = np.linalg.eigh(centred.T @ centred)
        basis = vectors_[:, np.argsort(values)[::-1][:dim]]
        if basis.shape[1] < dim:  # fewer input dimensions than dim: pad with zeros
            basis = np.hstack([basis, np.zeros((basis.shape[0], dim - basis.shape[1]))])
        return centred @ basis
    if method == "random":
        rng = np.random.default_rng(seed)
        return vectors @ rng.normal(0.0, 1.0 / np.sqrt(dim), (vectors.shape[1], dim))
    raise ValueError(f"method must be 'pca' or 'random', not {method!r}")


def bucket_vectors(
    featurizer: TextFeaturizer, words: list[str], vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Average the vectors of the words that hash to each bucket → (bucket ids, rows).

    A word counts when the featurizer sees it as exactly one token; its bucket is that
    token's unigram bucket.
    """
    keys, kept = [], []
    for i, word in enumerate(words):
        if word.startswith("##") or (word.startswith("[") and word.endswith("]")):
            continue
        if len(featurizer.tokens(word)) != 1:
            continue
        keys.append(featurizer.buckets(word)[0])
        kept.append(i)
    if not keys:
        raise PretrainedVectorsError("no word of the vectors maps to a single token")
    distinct, inverse = np.unique(np.asarray(keys), return_inverse=True)
    sums = np.zeros((distinct.size, vectors.shape[1]))
    np.add.at(sums, inverse, vectors[kept])
    counts = np.bincount(inverse, minlength=distinct.size)
    return distinct, sums / counts[:, None]


def init_embeddings(
    model,
    words: list[str],
    vectors: np.ndarray,
    *,
    featurizer: TextFeaturizer | None = None,
    projection: str = "pca",
    rms: float = 0.6,
    accumulator: float | None = None,
    seed: int = 0,
) -> int:
    """Write pretrained ``vectors`` of ``words`` into the embedding table; returns rows set.

    ``model``: a ``TextFeaturizer | NeuralClassifier`` pipeline (its featurizer decides the
    buckets) or a bare NeuralClassifier with ``featurizer`` given. Vectors wider than the
    learner's ``dim`` are projected (``projection``), then scaled to root-mean-square ``rms``
    per entry. The scale is what makes pretrained rows pay: at the RMS of the random
    initialization (0.03) AdaGrad's first steps wash them out; at 0.6 — about twenty times
    that — they survive (see benchmarks/results/neural.md). ``accumulator``: the AdaGrad
    state of the written rows (larger: the pretrained values move more slowly).
    """
    from stream_learner.learners.neural.model import neural_step

    learner = neural_step(model)
    if featurizer is None:
        if learner is model:
            raise ValueError("a bare NeuralClassifier needs the featurizer that feeds it")
        featurizer = list(model.steps.values())[0]
    if featurizer.n_buckets != learner.n_buckets:
        raise PretrainedVectorsError(
            f"featurizer has {featurizer.n_buckets} buckets, the learner {learner.n_buckets}"
        )
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise PretrainedVectorsError(f"{len(words)} words but vectors of shape {vectors.shape}")
    if vectors.shape[1] != learner.dim:
        vectors = project(vectors, learner.dim, method=projection, seed=seed)
    keys, rows = bucket_vectors(featurizer, words, vectors)
    current = np.sqrt(np.mean(rows * rows))
    if current > 0:
        rows = rows * (rms / current)
    learner.set_embedding_rows(keys, rows, accumulator=accumulator)
    return int(keys.size)
