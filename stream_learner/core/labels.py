"""The delayed-label buffer: what was predicted for an unlabelled record, until its label comes.

Bounded in bytes and in entries (oldest evicted first) and in age (entries older than ``ttl``
seconds expire). Evictions, expiries and labels that match nothing are counted, never raised.

A record still waiting after :attr:`LabelBuffer.RECENT` newer ones (most labels come sooner),
or a large one at once, is kept compact: each learner input ``{bucket id: weight}`` (what
:meth:`TextFeaturizer.transform_one <stream_learner.core.features.TextFeaturizer.transform_one>`
gives) as two arrays, a probability dict of many classes as a tuple of labels and an array:
a 60 KB text costs about 12 bytes per distinct feature instead of a dict's ~100. Bytes are
counted either way. :meth:`pop` gives back the dicts the learners took, equal key for key, in
the same order.

>>> buffer = LabelBuffer(max_entries=2, ttl=60.0)
>>> buffer.put("a", features={0: {1: 1}}, predictions={}, now=0.0)
>>> buffer.put("b", features={0: {2: 1}}, predictions={}, now=1.0)
>>> buffer.put("c", features={0: {3: 1}}, predictions={}, now=2.0)  # evicts "a"
>>> buffer.pop("a", now=3.0) is None, buffer.pop("b", now=3.0).features
(True, {0: {2: 1}})
>>> buffer.pop("c", now=100.0) is None  # expired
True
>>> buffer.stats()
{'size': 0, 'evicted': 1, 'expired': 1, 'unmatched': 2, 'joined': 1, 'bytes': 0}

"""

from __future__ import annotations

import array
import collections
import dataclasses
import sys

__all__ = ["LabelBuffer", "PendingRecord", "DEFAULT_MAX_BYTES"]

#: 256 MiB: ~120,000 tweets waiting with two learners (more than the default entry cap), or
#: ~1,150 texts of 60 KB, in a worker whose numpy model alone takes ~70 MB.
DEFAULT_MAX_BYTES = 256 * 2**20

# What one entry costs beyond its arrays and containers (CPython 3.11): its OrderedDict slot
# and link, its place in the queue of recent records.
_ENTRY_OVERHEAD = 200
_SMALL_PROBA = 8  # probability dicts up to this many classes are kept as dicts
_COMPACT_AT_ONCE = 512  # features in a record made compact as soon as it is put


@dataclasses.dataclass(slots=True)
class PendingRecord:
    features: dict  # featurizer key -> x (the learner's input, computed once)
    predictions: dict  # learner name -> (label, proba) made back then
    served: object | None  # the runner's Prediction (label, proba, learner) that was served
    inserted: float


class SparseFeatures:
    """A ``{bucket id: weight}`` dict as two arrays (``array.array``: cheaper than numpy at a
    tweet's few dozen entries), ids in the dict's order and weights."""

    __slots__ = ("ids", "weights")

    def __init__(self, ids: array.array, weights: array.array):
        self.ids = ids
        self.weights = weights

    @classmethod
    def from_dict(cls, x: dict) -> SparseFeatures | None:
        """None unless ``x`` has integer keys and integer weights, or float weights (the
        featurizer's: counts, binary or normalized; in a dict that mixes them, as a dense
        normalized one would, an integer 0 comes back as 0.0)."""
        try:
            ids = _ints(list(x))
            weights = list(x.values())
            if type(weights[0]) is float:
                weights = array.array("d", weights)
            elif type(weights[0]) is int:
                weights = _ints(weights)  # raises on a float
            else:
                return None
        except (TypeError, OverflowError, IndexError):
            return None
        return cls(ids, weights)

    def to_dict(self) -> dict:
        return dict(zip(self.ids, self.weights, strict=True))

    # Pickled as type codes and bytes: a checkpoint's unpickler builds no array.array itself.
    def __getstate__(self):
        return self.ids.typecode, self.ids.tobytes(), self.weights.typecode, self.weights.tobytes()

    def __setstate__(self, state) -> None:
        ids_code, ids, weights_code, weights = state
        self.ids, self.weights = _array(ids_code, ids), _array(weights_code, weights)
        if len(self.ids) != len(self.weights):
            raise ValueError("bucket ids and weights differ in length")

    @property
    def nbytes(self) -> int:
        return sys.getsizeof(self) + sys.getsizeof(self.ids) + sys.getsizeof(self.weights)


def _ints(values: list) -> array.array:
    """Integers as 32-bit ones, or 64-bit when they do not fit; raises TypeError on others."""
    try:
        return array.array("i", values)
    except OverflowError:
        return array.array("q", values)


class CompactProba:
    """A probability dict as a tuple of labels (shared with the learner) and an array."""

    __slots__ = ("labels", "values")

    def __init__(self, proba: dict):
        self.labels = tuple(proba)
        self.values = array.array("d", proba.values())

    def to_dict(self) -> dict:
        return dict(zip(self.labels, self.values, strict=True))

    def __getstate__(self):
        return self.labels, self.values.tobytes()

    def __setstate__(self, state) -> None:
        labels, values = state
        self.labels, self.values = tuple(labels), _array("d", values)
        if len(self.labels) != len(self.values):
            raise ValueError("labels and probabilities differ in length")

    @property
    def nbytes(self) -> int:
        return sys.getsizeof(self) + sys.getsizeof(self.labels) + sys.getsizeof(self.values)


def _array(typecode: str, data: bytes) -> array.array:
    if typecode not in ("i", "q", "d") or not isinstance(data, bytes):
        raise ValueError(f"not a label-buffer array: {typecode!r}")
    values = array.array(typecode)
    values.frombytes(data)
    return values


def _compact_features(x):
    """A learner input as it is kept: SparseFeatures for bucket dicts, the text as is."""
    if isinstance(x, dict) and x:
        return SparseFeatures.from_dict(x) or x
    return x


def _compact_proba(proba):
    # A few classes cost no less as arrays (two objects and their headers) and take longer.
    if isinstance(proba, dict) and len(proba) > _SMALL_PROBA:
        try:
            return CompactProba(proba)
        except (TypeError, ValueError):
            return proba
    return proba


def _feature_state(x):
    if type(x) is SparseFeatures:
        return ["sparse", *x.__getstate__()]
    return x


def _feature_from_state(x):
    if isinstance(x, list) and x[:1] == ["sparse"]:
        features = SparseFeatures.__new__(SparseFeatures)
        features.__setstate__(tuple(x[1:]))
        return features
    return _checked_input(x)


def _checked_input(x):
    if isinstance(x, dict | str):
        return x
    raise ValueError(f"a learner input of type {type(x).__name__} in a label buffer state")


def _expand(value):
    return value.to_dict() if isinstance(value, (SparseFeatures, CompactProba)) else value


def _size(value) -> int:
    """Bytes ``value`` holds (arrays and containers; labels and keys shared with the learners
    are not counted again, each dict entry is)."""
    if isinstance(value, (SparseFeatures, CompactProba)):
        return value.nbytes
    if isinstance(value, str):
        return sys.getsizeof(value)
    if isinstance(value, dict):
        # A dict kept as is: its table plus boxed values (a float: 24 bytes), and keys when
        # they are the record's own (bucket ids: 28 bytes; labels are the learners').
        per_entry = 64 if value and type(next(iter(value))) is int else 32
        return sys.getsizeof(value) + per_entry * len(value)
    return sys.getsizeof(value)


class _Entry:
    """A pending record as kept: its features, predictions and served prediction, as the
    caller gave them (``raw``) or compact."""

    __slots__ = ("features", "predictions", "served", "served_proba", "inserted", "nbytes", "raw")

    def __init__(self, record_id: str, features: dict, predictions: dict, served, inserted: float):
        self.features = features
        self.predictions = predictions
        self.inserted = inserted
        self.served = served  # while raw: the caller's object, its dict counted below
        self.served_proba = None
        if served is not None and predictions.get(served.learner) is not served.proba:
            self.served_proba = served.proba  # usually one learner's own dict: counted once
        self.raw = True
        self.nbytes = self._size(record_id)

    def _size(self, record_id: str) -> int:
        size = _ENTRY_OVERHEAD + sys.getsizeof(self) + sys.getsizeof(record_id)
        size += sys.getsizeof(self.features) + sys.getsizeof(self.predictions)
        for value in self.features.values():
            size += value.nbytes if type(value) is SparseFeatures else _size(value)
        for value in self.predictions.values():
            size += _size(value)
        if self.served is not None:
            size += sys.getsizeof(self.served) + _size(self.served_proba)
        return size

    def compact(self, record_id: str) -> int:
        """Make the features and probabilities compact; → bytes saved."""
        before = self.nbytes
        self.features = {key: _compact_features(x) for key, x in self.features.items()}
        self.predictions = {name: _compact_proba(p) for name, p in self.predictions.items()}
        self.served_proba = _compact_proba(self.served_proba)
        served = self.served
        if served is not None:
            self.served = (type(served), served.label, served.learner)  # without its dict
        self.raw = False
        self.nbytes = self._size(record_id)
        return before - self.nbytes

    def drop(self) -> None:
        """Let go of the payload (the entry may still be queued for compaction)."""
        self.features = self.predictions = self.served_proba = None

    def expand(self) -> PendingRecord:
        if self.raw:
            return PendingRecord(self.features, self.predictions, self.served, self.inserted)
        predictions = {name: _expand(p) for name, p in self.predictions.items()}
        served = None
        if self.served is not None:
            kind, label, learner = self.served
            proba = (
                predictions.get(learner)
                if self.served_proba is None
                else _expand(self.served_proba)
            )
            served = kind(label=label, proba=proba, learner=learner)
        features = {key: _expand(x) for key, x in self.features.items()}
        return PendingRecord(features, predictions, served, self.inserted)


class LabelBuffer:
    """Pending unlabelled records keyed by id.

    Parameters
    ----------
    max_entries
        Most records held; the oldest is evicted to make room.
    ttl
        Seconds a record waits for its label; None waits forever (still bounded by count).
    max_bytes
        Most bytes the waiting records take (their arrays and containers, as
        :attr:`nbytes` counts them); the oldest are evicted to make room. A record larger
        than the whole budget is not kept (counted as evicted).

    """

    max_bytes = DEFAULT_MAX_BYTES  # for buffers pickled before the byte budget existed
    #: Newest small records kept as given (their dicts, counted as such) before being made compact.
    RECENT = 1000
    nbytes = 0

    def __init__(
        self,
        max_entries: int = 100_000,
        ttl: float | None = 3600.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be at least 1")
        self.max_entries = max_entries
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._pending: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._recent: collections.deque[tuple[str, _Entry]] = collections.deque()  # still raw
        self.nbytes = 0
        self.evicted = 0
        self.expired = 0
        self.unmatched = 0
        self.joined = 0

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_recent" not in state:
            self._recent = collections.deque()
        if any(isinstance(entry, PendingRecord) for entry in self._pending.values()):
            # A buffer pickled before entries were compact.
            old, self._pending, self.nbytes = self._pending, collections.OrderedDict(), 0
            for record_id, entry in old.items():
                new = _Entry(
                    record_id, entry.features, entry.predictions, entry.served, entry.inserted
                )
                new.compact(record_id)
                self._add(record_id, new)

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, record_id: str, *, features: dict, predictions: dict, now: float, served=None):
        """Keep a record's features and predictions until its label comes.

        A small record is kept as given until ``RECENT`` newer ones have come (most labels
        come sooner, and then converting it is wasted work); a large one is made compact at once.
        """
        self.expire(now)
        self.discard(record_id)  # a repeated id: the newer prediction wins
        entry = _Entry(record_id, features, predictions, served, now)
        if sum(len(x) for x in features.values() if type(x) is dict) > _COMPACT_AT_ONCE:
            entry.compact(record_id)
        else:
            self._recent.append((record_id, entry))
        self._add(record_id, entry)
        recent = self._recent
        while len(recent) > self.RECENT:
            old_id, old = recent.popleft()
            if old.raw and old.features is not None:
                saved = old.compact(old_id)
                self.nbytes -= saved

    def _add(self, record_id: str, entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes:
            entry.drop()
            self.evicted += 1
            return
        pending = self._pending
        while pending and (
            len(pending) >= self.max_entries or self.nbytes + entry.nbytes > self.max_bytes
        ):
            self._drop_oldest()
            self.evicted += 1
        pending[record_id] = entry
        self.nbytes += entry.nbytes

    def _drop_oldest(self) -> None:
        _, oldest = self._pending.popitem(last=False)
        self.nbytes -= oldest.nbytes
        oldest.drop()

    def _remove(self, record_id: str) -> _Entry | None:
        entry = self._pending.pop(record_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def set_limits(self, *, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        """Change the bounds (a restored worker takes its configuration's); evicts the oldest
        records that no longer fit."""
        if max_entries is not None:
            self.max_entries = max_entries
        if max_bytes is not None:
            self.max_bytes = max_bytes
        pending = self._pending
        while pending and (len(pending) > self.max_entries or self.nbytes > self.max_bytes):
            self._drop_oldest()
            self.evicted += 1

    def pop(self, record_id: str, *, now: float) -> PendingRecord | None:
        self.expire(now)
        entry = self._remove(record_id)
        if entry is None:
            self.unmatched += 1
            return None
        self.joined += 1
        pending = entry.expand()
        entry.drop()
        return pending

    def discard(self, record_id: str) -> bool:
        """Forget a record without counting it as joined or unmatched."""
        entry = self._remove(record_id)
        if entry is None:
            return False
        entry.drop()
        return True

    def expire(self, now: float) -> int:
        """Drop records older than ``ttl``; returns how many."""
        if self.ttl is None:
            return 0
        pending = self._pending
        deadline = now - self.ttl
        dropped = 0
        # Insertion order is time order (a re-put moves to the end), so only the head can be old.
        while pending:
            oldest = next(iter(pending.values()))
            if oldest.inserted >= deadline:
                break
            self._drop_oldest()
            dropped += 1
        self.expired += dropped
        return dropped

    # -- state: plain data with a schema version (checkpoints) --

    STATE_SCHEMA = "stream-learner/label-buffer"
    STATE_VERSION = 1

    def state_dict(self) -> dict:
        """The buffer as plain data: its bounds, counters and waiting records, oldest first.

        A record is ``[id, inserted, features, predictions, served, raw, nbytes]``: ``features`` maps a
        featurizer key to the learner input (bucket ids as ``["sparse", ids typecode, ids
        bytes, weights typecode, weights bytes]``, else as given), ``predictions`` a learner
        to its probability dict, ``served`` is ``[label, learner, proba or None]`` (None: the
        proba is that learner's) or None; ``raw``: kept as given (the newest records), else
        compact; ``nbytes``: the bytes it is counted for (kept as counted: the sizes of dicts
        and arrays depend on how they were built).
        """
        entries = []
        position = {}
        for record_id, entry in self._pending.items():
            position[id(entry)] = len(entries)
            served = None
            if entry.served is not None:
                label, learner = (
                    (entry.served.label, entry.served.learner) if entry.raw else entry.served[1:]
                )
                proba = None if entry.served_proba is None else _expand(entry.served_proba)
                served = [label, learner, proba]
            features = (
                entry.features
                if entry.raw
                else {k: _feature_state(x) for k, x in entry.features.items()}
            )
            entries.append(
                [
                    record_id,
                    entry.inserted,
                    features,
                    {name: _expand(p) for name, p in entry.predictions.items()},
                    served,
                    entry.raw,
                    entry.nbytes,
                ]
            )
        return {
            "schema": self.STATE_SCHEMA,
            "version": self.STATE_VERSION,
            "max_entries": self.max_entries,
            "ttl": self.ttl,
            "max_bytes": self.max_bytes,
            "counters": {
                name: getattr(self, name) for name in ("evicted", "expired", "unmatched", "joined")
            },
            "entries": entries,
            # The queue of records still kept as given: positions in entries, -1 for a record
            # that has left the buffer (it still counts towards RECENT).
            "recent": [position.get(id(entry), -1) for _, entry in self._recent],
        }

    @classmethod
    def from_state(cls, state: dict, prediction) -> LabelBuffer:
        """The buffer :meth:`state_dict` described; ``prediction`` builds a served prediction
        from ``label=, proba=, learner=`` (the processor's ``Prediction``). The bounds
        apply from the next record on."""
        from stream_learner.state.schema import StateError, check_schema

        check_schema(state, cls.STATE_SCHEMA, (cls.STATE_VERSION,))
        try:
            buffer = cls(int(state["max_entries"]), state["ttl"], max_bytes=int(state["max_bytes"]))
            for name in ("evicted", "expired", "unmatched", "joined"):
                setattr(buffer, name, int(state["counters"][name]))
            entries = [
                buffer._entry_from_state(
                    record_id, inserted, features, predictions, served, raw, prediction
                )
                for record_id, inserted, features, predictions, served, raw, _ in state["entries"]
            ]
            for (*_, nbytes), entry in zip(state["entries"], entries, strict=True):
                entry.nbytes = int(nbytes)
            for (record_id, *_), entry in zip(state["entries"], entries, strict=True):
                buffer._pending[record_id] = entry
                buffer.nbytes += entry.nbytes
            for i in state["recent"]:
                if i >= 0:
                    buffer._recent.append((state["entries"][i][0], entries[i]))
                else:
                    gone = _Entry.__new__(_Entry)
                    gone.features = gone.predictions = gone.served_proba = None
                    gone.raw = True
                    buffer._recent.append(("", gone))
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(
                f"label buffer state does not fit: {type(error).__name__}: {error}"
            ) from None
        return buffer

    @staticmethod
    def _entry_from_state(
        record_id, inserted, features, predictions, served, raw, prediction
    ) -> _Entry:
        predictions = {name: dict(p) for name, p in predictions.items()}
        if raw:
            if served is not None:
                label, learner, proba = served
                served = prediction(
                    label=label,
                    proba=predictions[learner] if proba is None else dict(proba),
                    learner=learner,
                )
            features = {key: _checked_input(x) for key, x in features.items()}
            return _Entry(record_id, features, predictions, served, float(inserted))
        entry = _Entry.__new__(_Entry)
        entry.features = {key: _feature_from_state(x) for key, x in features.items()}
        entry.predictions = {name: _compact_proba(p) for name, p in predictions.items()}
        entry.served = entry.served_proba = None
        if served is not None:
            label, learner, proba = served
            entry.served = (prediction, label, learner)
            entry.served_proba = None if proba is None else _compact_proba(dict(proba))
        entry.inserted = float(inserted)
        entry.raw = False
        entry.nbytes = entry._size(record_id)
        return entry

    def stats(self) -> dict[str, int]:
        return {
            "size": len(self._pending),
            "evicted": self.evicted,
            "expired": self.expired,
            "unmatched": self.unmatched,
            "joined": self.joined,
            "bytes": self.nbytes,
        }
