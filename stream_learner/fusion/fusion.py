"""Model fusion through Kafka: the workers of one group share what each of them learned.

Every worker learns from its own partitions. At a checkpoint, every ``fusion_every_seconds``,
it publishes a snapshot of each learner to the group's compacted models topic (default
``<group>.models``, key ``<learner>/<worker>/<part>``) and folds in the latest snapshots of
its peers, by one of three rules:

``average``
    Federated averaging (the numpy learner): the parameters become the mean of its own and its
    peers', weighted by the records each worker learned itself.
``counts``
    Exact merging (naive Bayes): a worker publishes the counts of its *own* records; its model
    holds its own counts plus the sum of its peers'. That is, count for count, one naive Bayes
    that learned every record of every worker.
``ensemble``
    Anything else: predictions are the records-weighted mean of the probabilities of its own
    learner and of its peers' snapshots (frozen until their next one).

A snapshot is the state of a checkpoint, so it covers exactly the offsets that checkpoint
commits: when a worker dies, whoever takes over its partitions starts where its last
snapshot ends. Snapshots are split into parts that fit a Kafka message; ``average`` snapshots
use the neural learner's file format and ``counts`` plain arrays, neither of which can run code;
``ensemble`` snapshots are pickles, read through an allow-list of classes. Fusion never blocks
consuming: a background thread reads and decodes the models topic; folding happens between two
batches.

Every part is authenticated: its ``mac`` header is an HMAC-SHA256, under the group's fusion key
(:func:`stream_learner.state.keys.derive_key` of the shared secret with the ``FUSION`` label), over the
message key, every other header (worker, rule, version, ``records``, part numbering, the
snapshot's SHA-256, ...) and the value. A part that is unsigned, signed with another key (the
checkpoint key, say) or altered, or a snapshot not newer than the last one accepted from that
worker (a replay), is dropped and counted by reason (:data:`REJECT_REASONS`), never folded. A
worker that stops cleanly publishes signed tombstones (null values) for its keys; a peer that
reads one, or hears nothing from a worker for ``peer_ttl`` seconds, forgets that worker.

>>> from stream_learner.learners.naive_bayes import MultinomialNB
>>> left, right = MultinomialNB(), MultinomialNB()
>>> left.learn_one({1: 2}, "spam"); right.learn_one({2: 1}, "ham")
>>> CountTable.of(right).apply_to(left)  # fold right's counts into left
>>> dict(left.class_counts), dict(left.feature_counts[2])
({'spam': 1, 'ham': 1}, {'ham': 1})
>>> (CountTable() - CountTable.of(right)).apply_to(left)  # and take them out again
>>> dict(left.class_counts), 2 in left.feature_counts
({'spam': 1}, False)

"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import pickle
import threading
import time
from collections.abc import Iterable, Mapping

import numpy as np

from stream_learner.fusion.rules import RULES, FusionError, parse_rules
from stream_learner.learners.neural.format import decode_label, encode_label

__all__ = [
    "REJECT_REASONS",
    "RULES",
    "CountTable",
    "Fusion",
    "FusionError",
    "ModelFeed",
    "PeerSnapshot",
    "SnapshotAssembler",
    "SnapshotRejected",
    "Tombstone",
    "encode_snapshot",
    "encode_tombstone",
    "parse_rules",
    "rule_for",
]

log = logging.getLogger(__name__)

WIRE_FORMAT = b"2"  # 2: every part carries a ``mac`` header
# Why a snapshot was dropped: the ``reason`` of stream_learner_fusion_rejected_total.
REJECT_REASONS = ("unsigned", "bad_signature", "replayed", "malformed", "unsafe")
PART_BYTES = 512 * 1024  # under the 1 MB default message.max.bytes of Kafka, with room for headers
_COUNT_TABLES = ("class_counts", "class_totals", "feature_totals")


class SnapshotRejected(FusionError):
    """A message of the models topic dropped for ``reason`` (one of :data:`REJECT_REASONS`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def rule_for(head) -> str:
    """The default rule of a learner's classifier."""
    from stream_learner.learners.neural.model import NeuralClassifier

    if isinstance(head, NeuralClassifier):
        return "average"
    if _is_count_model(head):
        return "counts"
    return "ensemble"


def _is_count_model(head) -> bool:
    from river import naive_bayes

    return isinstance(head, naive_bayes.MultinomialNB | naive_bayes.ComplementNB | naive_bayes.BernoulliNB)


# --- counts -------------------------------------------------------------------------------------


@dataclasses.dataclass
class CountTable:
    """The counts of a naive Bayes model as plain dicts: they add and subtract exactly."""

    tables: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> {key: count}
    features: dict = dataclasses.field(default_factory=dict)  # feature -> {label: count}

    @classmethod
    def of(cls, model) -> CountTable:
        tables = {name: dict(getattr(model, name)) for name in _COUNT_TABLES if hasattr(model, name)}
        tables["class_counts"] = dict(model.class_counts)
        features = {f: dict(counts) for f, counts in model.feature_counts.items()}
        return cls(tables, features)

    def copy(self) -> CountTable:
        return CountTable(
            {name: dict(table) for name, table in self.tables.items()},
            {f: dict(counts) for f, counts in self.features.items()},
        )

    def __add__(self, other: CountTable) -> CountTable:
        return self.copy().add(other)

    def __sub__(self, other: CountTable) -> CountTable:
        return self.copy().add(other, -1.0)

    def add(self, other: CountTable, sign: float = 1.0) -> CountTable:
        """Add ``other`` (times ``sign``) to this table in place; returns it."""
        _add_counts(other, sign, lambda name: self.tables.setdefault(name, {}), self.features, dict)
        return self

    @classmethod
    def learned(cls, model, journal: Iterable[tuple[dict, object]]) -> CountTable:
        """The counts that learning ``journal``'s ``(x, y)`` pairs added to ``model`` (a naive
        Bayes of River's: every record adds 1 to its class and x's frequencies to the rest)."""
        class_counts: dict = {}
        by_class: dict = {}  # label -> {feature: frequency}: one dict update per feature
        for x, y in journal:
            class_counts[y] = class_counts.get(y, 0) + 1
            counts = by_class.get(y)
            if counts is None:
                counts = by_class[y] = {}
            get = counts.get
            for f, frequency in x.items():
                counts[f] = get(f, 0) + frequency
        features: dict = {}
        feature_totals: dict = {}
        for y, counts in by_class.items():
            for f, frequency in counts.items():
                row = features.get(f)
                if row is None:
                    features[f] = {y: frequency}
                else:
                    row[y] = frequency
                feature_totals[f] = feature_totals.get(f, 0) + frequency
        tables = {"class_counts": class_counts}
        if hasattr(model, "class_totals"):
            tables["class_totals"] = {y: sum(counts.values()) for y, counts in by_class.items()}
        if hasattr(model, "feature_totals"):
            tables["feature_totals"] = feature_totals
        return cls(tables, features)

    def apply_to(self, model) -> None:
        """Add these counts to ``model`` in place (negative counts remove what was added)."""
        # Rows left empty are deleted: the vocabulary size enters the likelihoods.
        _add_counts(self, 1.0, lambda name: getattr(model, name), model.feature_counts, collections.Counter)

    def to_bytes(self) -> bytes:
        """A compact, code-free encoding: sparse (feature, label, count) arrays in an ``.npz``."""
        labels: dict = {}
        features: dict = {}
        rows, cols, values = [], [], []
        for f, counts in self.features.items():
            row = features.setdefault(f, len(features))
            for label, count in counts.items():
                rows.append(row)
                cols.append(labels.setdefault(label, len(labels)))
                values.append(count)
        tables = {}
        for name, table in self.tables.items():
            keyed_by = "feature" if name == "feature_totals" else "label"
            index = features if keyed_by == "feature" else labels
            keys = [index.setdefault(k, len(index)) for k in table]
            tables[name] = (keyed_by, np.array(keys, dtype=np.int64), np.array(list(table.values()), dtype=np.float64))
        integer_features = all(type(f) is int for f in features)
        header = {
            "labels": [_encode_key(k) for k in labels],
            "features": None if integer_features else [_encode_key(f) for f in features],
            "tables": {name: keyed_by for name, (keyed_by, _, _) in tables.items()},
        }
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
            "rows": np.array(rows, dtype=np.int64),
            "cols": np.array(cols, dtype=np.int64),
            "values": np.array(values, dtype=np.float64),
        }
        if integer_features:
            arrays["feature_ids"] = np.array(list(features), dtype=np.int64)
        for name, (_, keys, vals) in tables.items():
            arrays[f"{name}.keys"], arrays[f"{name}.values"] = keys, vals
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CountTable:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                header = json.loads(npz["header"].tobytes().decode("utf-8"))
                labels = [_decode_key(k) for k in header["labels"]]
                if header["features"] is None:
                    features = npz["feature_ids"].tolist()
                else:
                    features = [_decode_key(f) for f in header["features"]]
                table = {}
                for row, col, value in zip(
                    npz["rows"].tolist(), npz["cols"].tolist(), npz["values"].tolist(), strict=True
                ):
                    table.setdefault(features[row], {})[labels[col]] = _number(value)
                tables = {}
                for name, keyed_by in header["tables"].items():
                    index = features if keyed_by == "feature" else labels
                    keys, vals = npz[f"{name}.keys"].tolist(), npz[f"{name}.values"].tolist()
                    tables[name] = {index[k]: _number(v) for k, v in zip(keys, vals, strict=True)}
        except FusionError:
            raise
        except Exception as error:  # zipfile, zlib, json and the .npy reader raise many kinds
            if isinstance(error, MemoryError | KeyboardInterrupt):
                raise
            raise FusionError(f"damaged count snapshot: {type(error).__name__}: {error}") from None
        if set(tables) - {*_COUNT_TABLES, "class_counts"}:
            raise FusionError(f"count snapshot has unknown tables {sorted(tables)}")
        return cls(tables, table)


def _number(value: float):
    return int(value) if value.is_integer() else value


def _add_counts(other: CountTable, sign: float, table_of, features: dict, new_row) -> None:
    """Add ``other``'s counts (times ``sign``) into named tables and feature rows, dropping
    rows that become empty; shared by tables and naive Bayes models."""
    for name, table in other.tables.items():
        _add_into(table_of(name), table, sign)
    for f, counts in other.features.items():
        row = features.get(f)
        if row is None:
            row = features[f] = new_row()
        _add_into(row, counts, sign)
        if not row:
            del features[f]


def _add_into(target: dict, source: Mapping, sign: float) -> None:
    get = target.get
    for key, value in source.items():
        total = get(key, 0) + (value if sign > 0 else -value)
        if -1e-9 < total < 1e-9:  # removed entirely: drop the key, as if never counted
            target.pop(key, None)
        else:
            target[key] = total


def _encode_key(key):
    # Labels and features may be str, int, bool or float: keep the type through JSON.
    return encode_label(key)


def _decode_key(item):
    return decode_label(item)


# --- snapshots on the wire ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerSnapshot:
    """The latest complete snapshot of one learner of one worker."""

    learner: str
    worker: str
    rule: str
    records: int  # records that worker learned itself
    created: float
    hashing: str
    payload: bytes
    kind: str = "full"  # or "increment": counts learned since the previous snapshot
    epoch: int = 0  # one per run of the worker: increments follow the full snapshot of theirs
    seq: int = 0
    model: object = None  # decoded: a NeuralClassifier, a CountTable or a classifier

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.seq)


@dataclasses.dataclass(frozen=True)
class Tombstone:
    """A worker's signed notice that it left: its peers forget its snapshots of ``learner``."""

    learner: str
    worker: str
    epoch: int
    seq: int

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.seq)


def encode_snapshot(
    learner: str,
    worker: str,
    rule: str,
    payload: bytes,
    *,
    key: bytes,
    records: int,
    hashing: str,
    created: float,
    kind: str = "full",
    epoch: int = 0,
    seq: int = 0,
    part_bytes: int = PART_BYTES,
) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers) of each part of a snapshot, in order, each signed with ``key``
    (the fusion key).

    Full snapshots are keyed ``<learner>/<worker>/<part>``, so compaction keeps the newest;
    increments ``<learner>/<worker>/i<seq>/<part>``.
    """
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    parts = max(1, math.ceil(len(payload) / part_bytes))
    snapshot_id = str(epoch * 10**9 + seq).encode("ascii")
    common = [
        ("kind", kind.encode("ascii")),
        ("epoch", str(epoch).encode("ascii")),
        ("seq", str(seq).encode("ascii")),
        ("fusion_format", WIRE_FORMAT),
        ("learner", learner.encode("utf-8")),
        ("worker", worker.encode("utf-8")),
        ("rule", rule.encode("ascii")),
        ("records", str(int(records)).encode("ascii")),
        ("created", repr(float(created)).encode("ascii")),
        ("hashing", hashing.encode("utf-8")),
        ("snapshot", snapshot_id),
        ("parts", str(parts).encode("ascii")),
        ("sha256", digest),
    ]
    messages = []
    for index in range(parts):
        prefix = f"{learner}/{worker}" if kind == "full" else f"{learner}/{worker}/i{seq}"
        message_key = f"{prefix}/{index}".encode()
        value = payload[index * part_bytes : (index + 1) * part_bytes]
        headers = [*common, ("part", str(index).encode("ascii"))]
        messages.append((message_key, value, _signed(key, message_key, value, headers)))
    return messages


def encode_tombstone(
    message_key: bytes, learner: str, worker: str, *, key: bytes, epoch: int, seq: int
) -> tuple[bytes, None, list[tuple[str, bytes]]]:
    """A signed tombstone (null value) for one of ``worker``'s keys of ``learner``: compaction
    deletes the key, and peers that read it forget that worker's snapshots of that learner."""
    headers = [
        ("fusion_format", WIRE_FORMAT),
        ("tombstone", b"1"),
        ("learner", learner.encode("utf-8")),
        ("worker", worker.encode("utf-8")),
        ("epoch", str(epoch).encode("ascii")),
        ("seq", str(seq).encode("ascii")),
    ]
    return message_key, None, _signed(key, message_key, None, headers)


def snapshot_mac(key: bytes, message_key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> bytes:
    """HMAC-SHA256 (hex) of one message of the models topic: over its key, every header but
    ``mac`` (sorted by name) and its value, each length-prefixed so no two messages encode
    alike."""
    mac = hmac.new(key, b"stream-learner fusion message\x00", hashlib.sha256)

    def field(data: bytes | None) -> None:
        if data is None:
            mac.update(b"\xff" * 8)  # a null key or value differs from an empty one
        else:
            mac.update(len(data).to_bytes(8, "big"))
            mac.update(data)

    field(message_key)
    names = sorted(name for name in headers if name != "mac")
    field(str(len(names)).encode("ascii"))
    for name in names:
        field(name.encode("utf-8"))
        field(bytes(headers[name]))
    field(value)
    return mac.hexdigest().encode("ascii")


def _signed(key: bytes, message_key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> list:
    if not key:
        raise FusionError("fusion needs the group's shared key (--checkpoint-key-file or $STREAM_LEARNER_CHECKPOINT_KEY)")
    return [*headers, ("mac", snapshot_mac(key, message_key, value, dict(headers)))]


def authenticate(key: bytes, message_key: bytes | None, value: bytes | None, headers: Iterable) -> dict[str, bytes]:
    """The headers of a message of the models topic, once its MAC checks out under ``key``;
    raises :class:`SnapshotRejected` (``unsigned`` or ``bad_signature``) otherwise."""
    try:
        meta = {str(name): bytes(raw) for name, raw in headers or ()}  # a repeated header: the last
    except (TypeError, ValueError) as error:
        raise SnapshotRejected("malformed", f"message {message_key!r} has unreadable headers: {error}") from None
    tag = meta.pop("mac", None)
    if tag is None:
        raise SnapshotRejected("unsigned", f"message {message_key!r} carries no signature (mac header)")
    if not hmac.compare_digest(tag, snapshot_mac(key, message_key, value, meta)):
        raise SnapshotRejected(
            "bad_signature",
            f"message {message_key!r} is not signed with the group's fusion key (altered, or "
            "another key: give every worker of the group the same $STREAM_LEARNER_CHECKPOINT_KEY "
            "or --checkpoint-key-file)",
        )
    return meta


class SnapshotAssembler:
    """Authenticates parts and puts them back together; yields a snapshot once all its parts
    are there and match, or a :class:`Tombstone`.

    Parts of one snapshot may be missing (compaction keeps only the newest message of a key)
    or interleaved with another snapshot's. A part or tombstone not newer than the last snapshot
    accepted from its worker (for that learner) is a replay: refused.
    """

    def __init__(self, key: bytes, *, own_worker: str | None = None):
        self._key = key
        self._own_worker = own_worker
        self._partial: dict[tuple[str, str], dict[int, dict]] = {}
        self._done: dict[tuple[str, str], tuple[int, int]] = {}
        self._tombstoned: dict[tuple[str, str], tuple[int, int]] = {}
        self.own_keys: dict[bytes, str] = {}  # own_worker's keys on the topic -> learner

    def forget(self, worker: str) -> None:
        """Drop ``worker``'s incomplete parts; its last version stays (a few bytes), so an old
        snapshot of it replayed later is still refused."""
        for name in [name for name in self._partial if name[1] == worker]:
            del self._partial[name]

    def add(self, key: bytes | None, value: bytes | None, headers: Iterable) -> PeerSnapshot | Tombstone | None:
        meta = authenticate(self._key, key, value, headers)
        if meta.get("fusion_format") != WIRE_FORMAT:
            raise SnapshotRejected("malformed", f"not a snapshot of wire format {WIRE_FORMAT.decode()} (key {key!r})")
        if meta.get("tombstone") == b"1":
            return self._tombstone(key, meta)
        try:
            learner = meta["learner"].decode("utf-8")
            worker = meta["worker"].decode("utf-8")
            snapshot_id = int(meta["snapshot"])
            part, parts = int(meta["part"]), int(meta["parts"])
            info = {
                "rule": meta["rule"].decode("ascii"),
                "records": int(meta["records"]),
                "created": float(meta["created"]),
                "hashing": meta["hashing"].decode("utf-8"),
                "sha256": meta["sha256"].decode("ascii"),
                "parts": parts,
                "kind": meta.get("kind", b"full").decode("ascii"),
                "epoch": int(meta.get("epoch", b"0")),
                "seq": int(meta.get("seq", b"0")),
            }
        except (KeyError, ValueError, UnicodeDecodeError, AttributeError) as error:
            raise SnapshotRejected("malformed", f"snapshot part {key!r} has bad headers: {error}") from None
        if not 0 <= part < parts or info["rule"] not in RULES or info["kind"] not in ("full", "increment"):
            raise SnapshotRejected("malformed", f"snapshot part {key!r}: part {part} of {parts}, rule {info['rule']!r}")
        if value is None:
            raise SnapshotRejected("malformed", f"snapshot part {key!r} has no value")
        name = (learner, worker)
        if worker == self._own_worker and key is not None:
            self.own_keys[key] = learner
        version = (info["epoch"], info["seq"])
        if version <= self._done.get(name, (-1, -1)):
            raise SnapshotRejected("replayed", f"snapshot {learner}/{worker}@{version} is not newer than the last accepted")
        pending = self._partial.setdefault(name, {})
        entry = pending.setdefault(snapshot_id, {"info": info, "parts": {}})
        entry["parts"][part] = value
        if len(entry["parts"]) < parts:
            if len(pending) > 3:  # keep the newest few incomplete ones
                del pending[min(pending)]
            return None
        payload = b"".join(entry["parts"][i] for i in range(parts))
        del pending[snapshot_id]
        if hashlib.sha256(payload).hexdigest() != info["sha256"]:
            raise SnapshotRejected("malformed", f"snapshot {learner}/{worker}@{snapshot_id}: checksum mismatch")
        self._done[name] = version
        for older in [i for i in pending if i < snapshot_id]:
            del pending[older]
        return PeerSnapshot(
            learner, worker, info["rule"], info["records"], info["created"], info["hashing"], payload,
            info["kind"], info["epoch"], info["seq"],
        )

    def _tombstone(self, key: bytes | None, meta: dict[str, bytes]) -> Tombstone | None:
        try:
            tombstone = Tombstone(
                meta["learner"].decode("utf-8"), meta["worker"].decode("utf-8"), int(meta["epoch"]), int(meta["seq"])
            )
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            raise SnapshotRejected("malformed", f"tombstone {key!r} has bad headers: {error}") from None
        name = (tombstone.learner, tombstone.worker)
        if tombstone.worker == self._own_worker:
            if key is not None:
                self.own_keys.pop(key, None)
            return None
        if self._tombstoned.get(name) == tombstone.version == self._done.get(name):
            return None  # one tombstone per key of that worker: the first one did it
        if tombstone.version <= self._done.get(name, (-1, -1)):
            raise SnapshotRejected("replayed", f"tombstone of {name[0]}/{name[1]}@{tombstone.version} is not newer than its last snapshot")
        self._done[name] = self._tombstoned[name] = tombstone.version
        self._partial.pop(name, None)
        return tombstone


def restricted_loads(data: bytes):
    """Unpickle an ensemble snapshot through the checkpoints' allow-list (River's estimators
    and their internals, the project's own classes, numpy values, plain containers): a signed
    pickle cannot run code, and a refused one is dropped as ``unsafe``."""
    from stream_learner.state.unpickle import UnpicklingRefused
    from stream_learner.state.unpickle import restricted_loads as load_allowed

    try:
        return load_allowed(data)
    except UnpicklingRefused as error:
        raise SnapshotRejected("unsafe", f"ensemble snapshot: {error}") from None


def decode_payload(snapshot: PeerSnapshot):
    """The (authenticated) snapshot's model: refuses damaged or foreign data with a FusionError."""
    if snapshot.rule == "counts":
        return CountTable.from_bytes(snapshot.payload)
    if snapshot.rule == "average":
        from stream_learner.learners.neural.format import NeuralFormatError, loads

        expected = json.loads(snapshot.hashing) if snapshot.hashing else None
        try:
            return loads(snapshot.payload, expected, source=f"snapshot {snapshot.learner}/{snapshot.worker}")
        except NeuralFormatError as error:
            raise FusionError(str(error)) from None
    try:
        return restricted_loads(snapshot.payload)
    except FusionError:
        raise
    except Exception as error:
        if isinstance(error, MemoryError | KeyboardInterrupt):
            raise
        raise FusionError(f"ensemble snapshot cannot be read: {type(error).__name__}: {error}") from None


# --- the rules, applied to a processor -----------------------------------------------------------


class Fusion:
    """Publishes a processor's learners and folds its peers' snapshots into them.

    Every ``every_seconds`` a worker publishes what it learned since the last time (for the
    ``counts`` rule: the counts of those records, an *increment*) and folds in what its peers
    published. Every ``full_every_seconds``, on its first round and at shutdown it publishes
    *full* snapshots: its own counts, and the whole model for ``average`` and ``ensemble``. A
    peer that reads the topic from the start rebuilds each worker's counts from its newest full
    snapshot and the increments after it.

    Parameters
    ----------
    worker_id
        This worker's stable name in the group (snapshots are keyed by it).
    rules
        ``{learner: rule}`` overrides (``none`` leaves a learner out); the others get
        :func:`rule_for`'s default.
    key
        The group's fusion key (:func:`stream_learner.state.keys.derive_key` of the shared secret,
        ``FUSION`` label): signs every message this worker publishes.
    every_seconds, full_every_seconds
        Publishing and folding cadence; full snapshots' cadence.
    every_records
        Also publish and fold once the worker has processed this many records since the last
        round (None: by time only).
    max_age
        Peers' ``average`` and ``ensemble`` snapshots older than this are ignored (a worker
        that left long ago); ``counts`` are data and never expire.

    """

    def __init__(
        self,
        worker_id: str,
        rules: Mapping[str, str] | None = None,
        *,
        key: bytes | None = None,
        every_seconds: float = 5.0,
        full_every_seconds: float = 60.0,
        max_age: float | None = 600.0,
        every_records: int | None = None,
        clock=time.time,
    ):
        self.worker_id = worker_id
        self.rules = dict(rules or {})
        self.key = key
        self.every_seconds = every_seconds
        self.full_every_seconds = full_every_seconds
        self.max_age = max_age
        self.every_records = every_records
        self.clock = clock
        # What has been folded in, per learner and peer (goes into the checkpoint).
        self.peer_counts: dict[str, dict[str, CountTable]] = {}
        self.folded: dict[str, dict[str, tuple[int, int]]] = {}
        self.last_published = 0.0
        self.last_full = None  # None: the next round publishes full snapshots
        self.epoch = int(clock() * 1e6)  # a new run starts a new series of increments
        self.seq = 0
        self.published: dict[bytes, str] = {}  # keys published in this run -> learner
        self._counts_kept: dict[str, set[bytes]] = {}  # keys of each counts learner's newest full snapshot
        self._journals: dict[str, list] = {}
        self._heads: dict[str, int] = {}

    # -- state that goes into the worker's checkpoint --

    def state(self) -> dict:
        """Plain data: the peers' counts as ``{"tables": ..., "features": ...}`` dicts."""
        peer_counts = {
            name: {peer: dataclasses.asdict(table) for peer, table in peers.items()}
            for name, peers in self.peer_counts.items()
        }
        return {"peer_counts": peer_counts, "folded": self.folded, "epoch": self.epoch}

    def restore(self, state: Mapping | None) -> None:
        """Take :meth:`state`'s data (or a checkpoint of format 1's, which held CountTables)."""
        if state:
            self.peer_counts = {
                name: {peer: t if isinstance(t, CountTable) else CountTable(**t) for peer, t in peers.items()}
                for name, peers in state.get("peer_counts", {}).items()
            }
            self.folded = {k: dict(v) for k, v in state.get("folded", {}).items()}
            # Peers refuse versions not newer than the last they took: never go back, even if
            # the clock did.
            self.epoch = max(self.epoch, int(state.get("epoch", -1)) + 1)

    def rule_of(self, name: str, head) -> str | None:
        rule = self.rules.get(name) or rule_for(head)
        if rule == "none":
            return None
        if rule == "counts" and not _is_count_model(head):
            raise FusionError(f"learner {name}: the counts rule needs a naive Bayes model, not {type(head).__name__}")
        if rule == "average":
            from stream_learner.learners.neural.model import NeuralClassifier

            if not isinstance(head, NeuralClassifier):
                raise FusionError(f"learner {name}: the average rule needs the numpy learner, not {type(head).__name__}")
        return rule

    def due(self, now: float | None = None, records: int = 0) -> bool:
        """Whether a round is due, ``records`` having been processed since the last one."""
        if self.every_records and records >= self.every_records:
            return True
        now = self.clock() if now is None else now
        return now - self.last_published >= self.every_seconds

    def attach(self, processor) -> None:
        """Start journaling what the ``counts`` learners learn (the increments)."""
        for name, (_, head) in processor.heads().items():
            if self.rule_of(name, head) == "counts":
                self._journals[name] = processor.journal(name)
                self._heads[name] = id(head)

    def _own_counts(self, name: str, head) -> CountTable:
        own = CountTable.of(head)
        for table in self.peer_counts.get(name, {}).values():
            own.add(table, -1.0)
        return own

    # -- publishing --

    def snapshots(self, processor, *, full: bool | None = None) -> list[tuple[bytes, bytes, list]]:
        """The messages of one round: increments, or full snapshots when due (or ``full``)."""
        from stream_learner.learners.neural.format import dumps

        now = self.clock()
        if full is None:
            full = self.last_full is None or now - self.last_full >= self.full_every_seconds
        messages = []
        records = {name: row["learned"] for name, row in processor.learner_stats().items()}
        self.seq += 1
        for name, (featurizer, head) in processor.heads().items():
            rule = self.rule_of(name, head)
            if rule is None:
                continue
            journal = self._journals.get(name)
            replaced = name in self._heads and self._heads[name] != id(head)
            if replaced:
                # A drift reaction installed a new model: the peers are folded in afresh.
                self._journals[name] = journal = processor.journal(name)
                self._heads[name] = id(head)
                self.peer_counts.pop(name, None)
                self.folded.pop(name, None)
            kind = "full"
            if rule == "counts":
                if full or replaced or journal is None:
                    payload = self._own_counts(name, head).to_bytes()
                else:
                    kind = "increment"
                    payload = CountTable.learned(head, journal).to_bytes()
                if journal is not None:
                    journal.clear()
            elif not full:
                continue
            elif rule == "average":
                hashing = featurizer.hashing_config() if featurizer is not None else None
                payload = dumps(head, hashing=hashing)
            else:
                payload = pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL)
            parts = encode_snapshot(
                name, self.worker_id, rule, payload, key=self.key, records=records[name],
                hashing=_hashing(featurizer), created=now, kind=kind, epoch=self.epoch, seq=self.seq,
            )  # fmt: skip
            self.published.update((key, name) for key, _, _ in parts)
            if rule == "counts" and kind == "full":
                self._counts_kept[name] = {key for key, _, _ in parts}
            messages.extend(parts)
        self.last_published = now
        if full:
            self.last_full = now
        return messages

    def tombstones(self, also: Mapping[bytes, str] | None = None) -> list[tuple[bytes, None, list]]:
        """Signed tombstones for the keys this worker published (in this run, and ``also``:
        ``{key: learner}`` of earlier runs, as the models topic showed them); for a clean exit.

        The newest full snapshot of each ``counts`` learner is kept: it is the only record of
        what this worker's records counted, and a worker that joins later folds it in (its
        peers forget it all the same, having folded it).
        """
        kept = set().union(*self._counts_kept.values())
        every = {**(also or {}), **self.published}
        keys = {key: learner for key, learner in every.items() if key not in kept}
        for learner in set(every.values()):  # a key of its own, so every learner has one
            keys[f"{learner}/{self.worker_id}/stopped".encode()] = learner
        if not keys:
            return []
        self.seq += 1
        self.published = {key: self.published[key] for key in kept if key in self.published}
        return [
            encode_tombstone(key, learner, self.worker_id, key=self.key, epoch=self.epoch, seq=self.seq)
            for key, learner in sorted(keys.items())
        ]

    # -- folding --

    def fold(self, processor, peers: Mapping[tuple[str, str], PeerHistory]) -> dict[str, list[str]]:
        """Fold what the peers published into ``processor``; returns the peers used per learner."""
        now = self.clock()
        used: dict[str, list[str]] = {}
        records = {name: row["learned"] for name, row in processor.learner_stats().items()}
        rules = {"counts": self._fold_counts, "average": self._fold_average, "ensemble": self._fold_ensemble}
        for name, (featurizer, head) in processor.heads().items():
            rule = self.rule_of(name, head)
            if rule is None:
                continue
            histories = self._histories(name, rule, _hashing(featurizer), peers, now)
            histories = rules[rule](processor, name, head, records[name], histories)
            used[name] = [h.full.worker for h in histories]
        return used

    def _histories(self, name: str, rule: str, hashing: str, peers, now: float) -> list[PeerHistory]:
        """The peers' snapshot histories learner ``name`` can fold: same rule, same hashing,
        not too old (counts never age)."""
        return [
            h for (learner, worker), h in sorted(peers.items())
            if learner == name and worker != self.worker_id
            and h.full.rule == rule and h.full.hashing == hashing
            and (rule == "counts" or self.max_age is None or now - h.full.created <= self.max_age)
        ]  # fmt: skip

    def _fold_counts(self, processor, name, head, own_records, histories) -> list[PeerHistory]:
        """``counts``: add what each peer counted since the last fold (a newer full snapshot
        replaces all that peer counted before)."""
        tables = {t for t in _COUNT_TABLES if hasattr(head, t)} | {"class_counts"}
        histories = [h for h in histories if set(h.full.model.tables) <= tables]
        delta = CountTable()
        folded = self.folded.setdefault(name, {})
        peer_counts = self.peer_counts.setdefault(name, {})
        for history in histories:
            worker = history.full.worker
            have = folded.get(worker)
            if have is None or have < history.full.version:
                table = CountTable().add(history.full.model)
                for increment in history.increments:
                    table.add(increment.model)
                delta.add(table).add(peer_counts.get(worker, CountTable()), -1.0)
                peer_counts[worker] = table
            else:
                for increment in _increments_after(history, have):
                    increment.model.apply_to(head)
                    peer_counts[worker].add(increment.model)
            folded[worker] = history.version
        delta.apply_to(head)
        return histories

    def _fold_average(self, processor, name, head, own_records, histories) -> list[PeerHistory]:
        """``average``: when any peer published a new model, the learner becomes the
        records-weighted mean of its own model and the peers'."""
        seen = self.folded.setdefault(name, {})
        if any(seen.get(h.full.worker) != h.full.version for h in histories):
            processor.replace_head(name, _average(head, own_records, [h.full for h in histories]))
            self._heads[name] = id(processor.heads()[name][1])
            for h in histories:
                seen[h.full.worker] = h.full.version
        return histories

    def _fold_ensemble(self, processor, name, head, own_records, histories) -> list[PeerHistory]:
        """``ensemble``: the learner predicts with the peers' newest models too."""
        processor.set_peers(name, [(h.full.records, h.full.model) for h in histories])
        return histories


def _increments_after(history: PeerHistory, version: tuple[int, int]) -> list[PeerSnapshot]:
    """``history``'s increments newer than ``version``, oldest first."""
    fresh = []
    for increment in reversed(history.increments):  # the new ones are last
        if increment.version <= version:
            break
        fresh.append(increment)
    return fresh[::-1]


def _hashing(featurizer) -> str:
    return json.dumps(featurizer.hashing_config(), sort_keys=True) if featurizer is not None else ""


def _average(head, own_records: int, peers: list[PeerSnapshot]):
    from stream_learner.learners.neural.model import fuse

    # Each model weighs the records its worker learned itself; the result keeps our own count.
    models = [head, *(s.model for s in peers)]
    weights = [own_records, *(s.records for s in peers)]
    return fuse(models, weights, n_seen=head.n_seen)


@dataclasses.dataclass
class PeerHistory:
    """A peer's newest full snapshot of one learner and the increments published after it."""

    full: PeerSnapshot
    increments: list[PeerSnapshot] = dataclasses.field(default_factory=list)

    @property
    def version(self) -> tuple[int, int]:
        return self.increments[-1].version if self.increments else self.full.version


# --- reading the models topic ---------------------------------------------------------------------


class ModelFeed:
    """A background thread that reads the models topic from the start and keeps, decoded, each
    peer's newest full snapshot of every learner and the increments after it.

    Only messages signed with ``key`` (the fusion key) are taken; the others are counted by
    reason in ``rejected`` (and ``metrics.fusion_rejected``). A peer is forgotten when it sends
    a tombstone (it stopped cleanly) or when nothing of it has arrived for ``peer_ttl`` seconds
    of ``clock`` (None: never); arrival time, so other machines' clocks do not matter. A
    forgotten peer's ``counts`` are in the next :meth:`latest` once more, so the records they
    count are folded before they go.
    """

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: str,
        worker_id: str,
        key: bytes,
        client_options: Mapping | None = None,
        client: str = "kafka-python",
        peer_ttl: float | None = 600.0,
        metrics=None,
        clock=time.time,
    ):
        self.topic = topic
        self.client = client
        self.bootstrap_servers = bootstrap_servers
        self.worker_id = worker_id
        self.key = key
        self.client_options = dict(client_options or {})
        self.peer_ttl = peer_ttl
        self.metrics = metrics
        self.clock = clock
        self.errors = 0
        self.rejected: collections.Counter = collections.Counter()
        self.forgotten: collections.Counter = collections.Counter()  # peers' learners, by why
        self._histories: dict[tuple[str, str], PeerHistory] = {}
        self._departing: dict[tuple[str, str], PeerHistory] = {}
        self._heard: dict[str, float] = {}  # worker -> when its last snapshot arrived
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._assembler = SnapshotAssembler(key, own_worker=worker_id)
        self._thread = threading.Thread(target=self._run, name="model-feed", daemon=True)

    def start(self) -> ModelFeed:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def wait_caught_up(self, timeout: float) -> bool:
        """True once everything published before we started has been read (or ``timeout``)."""
        return self._caught_up.wait(timeout)

    def latest(self) -> dict[tuple[str, str], PeerHistory]:
        """Each peer's history per learner, stale peers forgotten first; the ``counts`` of
        peers forgotten since the last call are in it one last time."""
        with self._lock:
            self._forget_stale()
            histories = {**self._departing, **self._histories}
            self._departing.clear()
            return {name: PeerHistory(h.full, list(h.increments)) for name, h in histories.items()}

    def own_keys(self) -> dict[bytes, str]:
        """``{key: learner}`` of this worker's messages seen on the topic (to tombstone them)."""
        with self._lock:
            return dict(self._assembler.own_keys)

    @property
    def peers(self) -> set[str]:
        with self._lock:
            return {worker for _, worker in self._histories}

    def _forget_stale(self) -> None:
        if self.peer_ttl is None:
            return
        now = self.clock()
        for worker, heard in list(self._heard.items()):
            if now - heard > self.peer_ttl:
                log.info("forgetting peer %s: nothing published for %.0f s (--fusion-peer-ttl)", worker, now - heard)
                self._forget(worker, why="ttl")
                self._assembler.forget(worker)

    def _forget(self, worker: str, learner: str | None = None, *, why: str) -> None:
        for name in [n for n in self._histories if n[1] == worker and learner in (None, n[0])]:
            history = self._histories.pop(name)
            self.forgotten[why] += 1
            if history.full.rule == "counts":  # data: folded once more, then dropped
                self._departing[name] = history
        if not any(w == worker for _, w in self._histories):
            self._heard.pop(worker, None)

    def _reject(self, error: FusionError) -> None:
        reason = error.reason if isinstance(error, SnapshotRejected) else "malformed"
        self.errors += 1
        self.rejected[reason] += 1
        if self.metrics is not None:
            self.metrics.fusion_rejected(reason)
        log.warning("model topic %s: message dropped (%s): %s", self.topic, reason, error)

    def feed(self, key, value, headers) -> PeerSnapshot | None:
        """Take one message of the models topic (the thread calls this; tests may too)."""
        try:
            with self._lock:  # the assembler's own-keys table is read by own_keys()
                snapshot = self._assembler.add(key, value, headers)
            if isinstance(snapshot, Tombstone):
                with self._lock:
                    self._forget(snapshot.worker, snapshot.learner, why="tombstone")
                log.info("peer %s stopped: forgetting its %s", snapshot.worker, snapshot.learner)
                return None
            if snapshot is None or snapshot.worker == self.worker_id:
                return None
            snapshot = dataclasses.replace(snapshot, model=decode_payload(snapshot))
        except FusionError as error:
            self._reject(error)
            return None
        name = (snapshot.learner, snapshot.worker)
        with self._lock:
            self._heard[snapshot.worker] = self.clock()
            history = self._histories.get(name)
            if snapshot.kind == "full":
                if history is None or history.full.version < snapshot.version:
                    self._histories[name] = PeerHistory(snapshot)
            elif history is not None and snapshot.epoch == history.full.epoch and snapshot.seq == history.version[1] + 1:
                history.increments.append(snapshot)
            else:  # not the next one of the series we hold: wait for the peer's next full snapshot
                log.debug("increment %s/%s@%s out of series; ignored", *name, snapshot.version)
                return None
        log.debug("snapshot of %s from %s (%d records)", snapshot.learner, snapshot.worker, snapshot.records)
        return snapshot

    def _run(self) -> None:
        from stream_learner.io.retry import Backoff

        open_reader = _ConfluentReader if self.client == "confluent" else _KafkaPythonReader
        reader = None
        backoff = Backoff(2.0, 30.0, jitter="decorrelated")  # peers that lost the broker do not return in step
        while not self._stop.is_set():
            try:
                if reader is None:
                    reader = open_reader(self)
                    if not reader.partitions:  # the topic is not there yet
                        reader.close()
                        reader = None
                        self._stop.wait(1.0)
                        continue
                for key, value, headers in reader.read():
                    self.feed(key, value, headers)
                if not self._caught_up.is_set() and reader.at_end():
                    self._caught_up.set()
                backoff.reset()
            except Exception as error:  # broker away: keep what we have, try again
                delay = backoff.next()
                log.warning("model topic %s: %s; retrying in %.1f s", self.topic, error, delay)
                if reader is not None:
                    with contextlib.suppress(Exception):
                        reader.close()
                    reader = None
                self._stop.wait(delay)
        if reader is not None:
            reader.close()


class _KafkaPythonReader:
    """The models topic from its start, with kafka-python (no group, nothing committed)."""

    def __init__(self, feed: ModelFeed):
        from kafka import KafkaConsumer, TopicPartition

        self._consumer = KafkaConsumer(
            bootstrap_servers=feed.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_bytes=64 * 1024 * 1024,
            fetch_max_wait_ms=20,  # peers' increments are small and wanted soon
            max_partition_fetch_bytes=8 * 1024 * 1024,
            **feed.client_options,
        )
        self.partitions = sorted(self._consumer.partitions_for_topic(feed.topic) or ())
        if self.partitions:
            tps = [TopicPartition(feed.topic, p) for p in self.partitions]
            self._consumer.assign(tps)
            self._consumer.seek_to_beginning(*tps)

    def read(self):
        for records in self._consumer.poll(timeout_ms=200).values():
            for record in records:
                yield record.key, record.value, record.headers

    def at_end(self) -> bool:
        consumer = self._consumer
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None or consumer.position(tp) < highwater:
                return False
        return True

    def close(self) -> None:
        self._consumer.close()


class _ConfluentReader:
    """The same with librdkafka, which fetches on its own C threads: between messages this
    costs the worker's process nothing."""

    def __init__(self, feed: ModelFeed):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from stream_learner.io.confluent import librdkafka_options

        options = librdkafka_options(feed.client_options)
        options.update({
            "bootstrap.servers": feed.bootstrap_servers,
            "group.id": f"{feed.topic}.reader",  # required; never joined or committed
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 20,
            "logger": log,
        })
        self._consumer = Consumer(options)
        self._topic = feed.topic
        metadata = self._consumer.list_topics(feed.topic, timeout=5)
        self.partitions = sorted(metadata.topics[feed.topic].partitions)
        if self.partitions:
            self._consumer.assign([TopicPartition(feed.topic, p, OFFSET_BEGINNING) for p in self.partitions])

    def read(self):
        for message in self._consumer.consume(num_messages=100, timeout=0.2):
            if message.error() is None:
                yield message.key(), message.value(), message.headers() or ()

    def at_end(self) -> bool:
        from confluent_kafka import TopicPartition

        consumer = self._consumer
        for tp in consumer.position([TopicPartition(self._topic, p) for p in self.partitions]):
            low, high = consumer.get_watermark_offsets(tp, timeout=5)
            if high > low and (tp.offset < 0 or tp.offset < high):
                return False
        return True

    def close(self) -> None:
        self._consumer.close()
