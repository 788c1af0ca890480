"""The file format of :class:`~stream_learner.learners.neural.model.NeuralClassifier`: versioned, no pickle.

A file is an uncompressed ``.npz`` (a zip of ``.npy`` arrays, read with
``allow_pickle=False``) holding the parameter and optimizer arrays plus one JSON header, stored
as the byte array ``header.json``. The header records the format name and version, the
learner's parameters, its class list (typed: str, int, float or bool), its counters and
random-generator state, the hashing configuration of the featurizer that made its bucket ids
(and the featurizer's parameters when a pipeline was saved), and a SHA-256 over the header and
every array. Loading checks all of that before it builds anything, so a truncated, damaged,
foreign or mismatched file raises :class:`NeuralFormatError` and changes nothing.

The SHA-256 catches damage, not tampering: anyone can compute it again. Saved with a ``key``
(the group secret), a file also holds a MAC: HMAC-SHA256 under
``derive_key(key, MODEL_FILE)`` (:mod:`stream_learner.state.keys`) of that SHA-256, so of the header
and every array. Loaded with a ``key``, a file without a valid MAC (unsigned, altered, or
signed with another key) is refused; loaded without one, only the SHA-256 is checked, so files
saved before the MAC existed still load.

>>> import tempfile, pathlib
>>> from stream_learner.learners.neural.model import NeuralClassifier
>>> model = NeuralClassifier(n_buckets=64, dim=4)
>>> model.learn_one({1: 1, 2: 1}, "a")
>>> path = pathlib.Path(tempfile.mkdtemp()) / "model.npz"
>>> save(model, path)
>>> restored = load(path)
>>> restored.predict_proba_one({1: 1}) == model.predict_proba_one({1: 1})
True

"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from pathlib import Path

import numpy as np
from river import compose

from stream_learner.core.features import TextFeaturizer
from stream_learner.state.schema import StateError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NeuralFormatError",
    "decode_label",
    "encode_label",
    "save",
    "load",
    "read_header",
]

FORMAT_NAME = "stream-learner-neural"
FORMAT_VERSION = 2
# Version 1 files (no wide term) load as they are: their learners have ``wide=False``.
READABLE_VERSIONS = (1, 2)
_HEADER = "header.json"
_MAX_HEADER_BYTES = 64 * 1024 * 1024


class NeuralFormatError(ValueError):
    """A model file that cannot be loaded: the message says why."""


# --- labels in JSON ----------------------------------------------------------------------------


def encode_label(label) -> list:
    """A class label as JSON that keeps its type: ``["int", 3]``, ``["str", "spam"]``, ...

    >>> encode_label(3), encode_label(True), decode_label(encode_label(0.5))
    (['int', 3], ['bool', True], 0.5)
    """
    if isinstance(label, np.generic):
        label = label.item()
    if isinstance(label, bool):
        return ["bool", label]
    if isinstance(label, int):
        return ["int", label]
    if isinstance(label, float):
        return ["float", repr(label)]
    if isinstance(label, str):
        return ["str", label]
    raise NeuralFormatError(f"cannot save class label {label!r} of type {type(label).__name__}")


def decode_label(item):
    """The label :func:`encode_label` wrote (raises :class:`NeuralFormatError` on others)."""
    kind, value = item
    decoders = {"bool": bool, "int": int, "float": float, "str": str}
    if kind not in decoders:
        raise NeuralFormatError(f"unknown class label type {kind!r} in header")
    return decoders[kind](value)


# --- checksum ----------------------------------------------------------------------------------


def _digest(header: dict, arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    body = {k: v for k, v in header.items() if k not in ("checksum", "mac")}
    sha.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        sha.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        sha.update(array.data)
    return sha.hexdigest()


# --- keyed MAC ---------------------------------------------------------------------------------


def _file_mac(key: bytes, checksum: str) -> str:
    """HMAC-SHA256 of a file's checksum (which covers the header and every array)."""
    from stream_learner.state.keys import MODEL_FILE, derive_key

    message = b"stream-learner-neural\x00" + checksum.encode("ascii")
    return hmac.new(derive_key(key, MODEL_FILE), message, hashlib.sha256).hexdigest()


def _check_mac(header: dict, key: bytes | None, path) -> None:
    """With a key, refuse a file whose MAC is missing or wrong; without one, check nothing more."""
    if key is None:
        return
    mac = header.get("mac")
    if not isinstance(mac, str):
        raise NeuralFormatError(
            f"{path} carries no MAC (saved without a key), and a key was given to load it"
        )
    if not hmac.compare_digest(mac, _file_mac(key, str(header.get("checksum")))):
        raise NeuralFormatError(
            f"{path}: MAC mismatch (the file was modified, or saved with another key)"
        )


# --- save ----------------------------------------------------------------------------------------


def _parts(model):
    from stream_learner.learners.neural.model import NeuralClassifier, neural_step

    featurizer = None
    if isinstance(model, compose.Pipeline):
        steps = list(model.steps.values())
        if len(steps) != 2 or not isinstance(steps[0], TextFeaturizer):
            raise TypeError("can save a NeuralClassifier or a pipeline TextFeaturizer | NeuralClassifier")
        featurizer = steps[0]
    learner = neural_step(model)
    assert isinstance(learner, NeuralClassifier)
    return featurizer, learner


def save(model, path, *, hashing: dict | None = None, key: bytes | None = None) -> None:
    """Write ``model`` to ``path`` (an ``.npz`` file), atomically, readable by its owner only.

    ``model`` is a :class:`NeuralClassifier` or a ``TextFeaturizer | NeuralClassifier``
    pipeline; the pipeline's hashing configuration goes into the header. For a bare learner,
    pass the ``hashing`` configuration of the featurizer that feeds it, if known. With a
    ``key`` (the group secret) the file carries a MAC that :func:`load` checks when given it.
    """
    from stream_learner.state.files import atomic_write

    atomic_write(path, [dumps(model, hashing=hashing, key=key)])  # mode 0600, directory created 0700


def dumps(model, *, hashing: dict | None = None, key: bytes | None = None) -> bytes:
    """The bytes :func:`save` writes (for sending a model over Kafka, say)."""
    featurizer, learner = _parts(model)
    if featurizer is not None:
        hashing = featurizer.hashing_config()
    state = learner.state_dict()
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "params": state["params"],
        "hashing": hashing,
        "featurizer": _featurizer_params(featurizer) if featurizer is not None else None,
    }
    arrays: dict[str, np.ndarray] = {}
    if "arrays" in state:
        header["state"] = {
            "classes": [encode_label(c) for c in state["classes"]],
            "n_seen": state["n_seen"],
            "t": state["t"],
            "rng": state["rng"],
            "slots": {name: len(slots) for name, slots in state["slots"].items()},
        }
        for name, array in state["arrays"].items():
            arrays[f"param.{name}"] = array
            for i, slot in enumerate(state["slots"][name]):
                arrays[f"slot.{name}.{i}"] = slot
    else:
        header["state"] = None
    header["arrays"] = sorted(arrays)
    header["checksum"] = _digest(header, arrays)
    if key is not None:
        header["mac"] = _file_mac(key, header["checksum"])
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **{_HEADER: blob}, **arrays)
    return buffer.getvalue()


def _featurizer_params(featurizer: TextFeaturizer) -> dict:
    params = featurizer._get_params()
    if params.get("char_ngrams") is not None:
        params["char_ngrams"] = list(params["char_ngrams"])
    return params


# --- load ----------------------------------------------------------------------------------------


def read_header(path, *, key: bytes | None = None) -> dict:
    """The verified JSON header of a model file (raises :class:`NeuralFormatError`)."""
    header, _ = _read(path, key)
    return header


def _read(path, key: bytes | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise NeuralFormatError(f"cannot read model file {path}: {error}") from error
    return _parse(data, path, key)


def _parse(data: bytes, path, key: bytes | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            names = set(npz.files)
            if _HEADER not in names:
                raise NeuralFormatError(f"{path} is not a stream-learner neural model (no header)")
            raw = npz[_HEADER]
            if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_HEADER_BYTES:
                raise NeuralFormatError(f"{path}: malformed header")
            header = json.loads(raw.tobytes().decode("utf-8"))
            if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
                raise NeuralFormatError(f"{path} is not a stream-learner neural model")
            if header.get("version") not in READABLE_VERSIONS:
                raise NeuralFormatError(
                    f"{path} has format version {header.get('version')!r}; this stream-learner "
                    f"reads versions {', '.join(map(str, READABLE_VERSIONS))}"
                )
            expected = header.get("arrays")
            if not isinstance(expected, list) or set(expected) != names - {_HEADER}:
                raise NeuralFormatError(f"{path}: the arrays do not match the header")
            arrays = {name: npz[name] for name in expected}
    except NeuralFormatError:
        raise
    except Exception as error:  # zipfile, zlib and the .npy reader raise many kinds on damage
        if isinstance(error, MemoryError | KeyboardInterrupt):
            raise
        raise NeuralFormatError(
            f"{path} is truncated or corrupt: {type(error).__name__}: {error}"
        ) from error
    if _digest(header, arrays) != header.get("checksum"):
        raise NeuralFormatError(f"{path}: checksum mismatch (the file was modified or damaged)")
    _check_mac(header, key, path)
    return header, arrays


def load(path, expected_hashing: dict | None = None, *, key: bytes | None = None):
    """Rebuild the learner (or pipeline) saved at ``path``, exactly as it was.

    ``expected_hashing``: the hashing configuration of the featurizer that will feed the
    learner; a file made under another one (other bucket ids) is refused. ``key``: the group
    secret; a file without a valid MAC under it is refused (without a key, only the checksum
    is checked).
    """
    return _build(*_read(path, key), path, expected_hashing)


def loads(
    data: bytes,
    expected_hashing: dict | None = None,
    *,
    source: str = "model bytes",
    key: bytes | None = None,
):
    """:func:`load` from the bytes of :func:`dumps`; ``source`` names them in errors."""
    return _build(*_parse(data, source, key), source, expected_hashing)


def _build(header: dict, arrays: dict[str, np.ndarray], path, expected_hashing: dict | None):
    from stream_learner.learners.neural.model import NeuralClassifier

    hashing = header.get("hashing")
    if expected_hashing is not None:
        if hashing is None:
            raise NeuralFormatError(f"{path} records no hashing configuration to check against")
        if hashing != expected_hashing:
            diff = sorted(k for k in set(hashing) | set(expected_hashing)
                          if hashing.get(k) != expected_hashing.get(k))
            raise NeuralFormatError(
                f"{path} was made under another hashing configuration (differs in: {', '.join(diff)})"
            )
    try:
        learner = NeuralClassifier.from_state(_state_of(header, arrays))
        if header.get("featurizer") is None:
            return learner
        params = dict(header["featurizer"])
        # Files from before the featurizer segmented scripts without spaces: keep them mapping
        # text as they did.
        params.setdefault("segment_unspaced", False)
        if params.get("char_ngrams") is not None:
            params["char_ngrams"] = tuple(params["char_ngrams"])
        featurizer = TextFeaturizer(**params)
        if hashing is not None and featurizer.hashing_config() != hashing:
            raise NeuralFormatError(f"{path}: featurizer parameters contradict its hashing config")
        return compose.Pipeline(featurizer, learner)
    except NeuralFormatError:
        raise
    except StateError as error:
        raise NeuralFormatError(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise NeuralFormatError(f"{path}: inconsistent header: {error}") from error


def _state_of(header: dict, arrays: dict[str, np.ndarray]) -> dict:
    """The learner's state dict from a file's header and arrays."""
    from stream_learner.learners.neural.model import NeuralClassifier

    state = {"schema": NeuralClassifier.STATE_SCHEMA, "version": 1, "params": header["params"]}
    saved = header["state"]
    if saved is None:
        return state
    slots = saved["slots"]
    if not isinstance(slots, dict) or not all(isinstance(n, int) and 0 <= n <= 2 for n in slots.values()):
        raise NeuralFormatError("malformed optimizer state in header")
    state.update(
        classes=[decode_label(item) for item in saved["classes"]],
        n_seen=saved["n_seen"],
        t=saved["t"],
        rng=saved["rng"],
        arrays={name: arrays[f"param.{name}"] for name in slots},
        slots={name: [arrays[f"slot.{name}.{i}"] for i in range(n)] for name, n in slots.items()},
    )
    return state
