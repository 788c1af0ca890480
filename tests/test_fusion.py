"""Fusion rules on known snapshots, and the snapshot wire format (no broker)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka_helpers import synthetic_records

from stream_learner.core.processor import StreamProcessor
from stream_learner.fusion.fusion import (
    CountTable,
    Fusion,
    FusionError,
    ModelFeed,
    SnapshotAssembler,
    SnapshotRejected,
    encode_snapshot,
    parse_rules,
    snapshot_mac,
)
from stream_learner.state.keys import CHECKPOINT, FUSION, derive_key

SECRET = b"fusion-test-key-0123456789abcdef"
KEY = derive_key(SECRET, FUSION)


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self):
        return self.now


_FEEDS: dict = {}


def _worker(name: str, learners, clock, rules=None):
    processor = StreamProcessor(list(learners), drift_detector="none")
    fusion = Fusion(name, rules, key=KEY, every_seconds=10, clock=clock)
    fusion.attach(processor)
    _FEEDS[id(fusion)] = ModelFeed("models", bootstrap_servers="unused", worker_id=name, key=KEY)
    return processor, fusion


def _exchange(workers, clock, full=None):
    """Every worker publishes; every worker folds in the others' snapshots (via the feed code)."""
    clock.now += 1
    per_worker = [fusion.snapshots(processor, full=full) for processor, fusion in workers]
    # Workers' messages interleave in any order; each worker's own stay in order.
    rng = random.Random(clock.now)
    messages = []
    while any(per_worker):
        queue = rng.choice([q for q in per_worker if q])
        messages.append(queue.pop(0))
    for processor, fusion in workers:
        feed = _FEEDS[id(fusion)]
        for key, value, headers in messages:
            feed.feed(key, value, headers)
        fusion.fold(processor, feed.latest())


def _unsigned(messages):
    return [
        (key, value, [(n, raw) for n, raw in headers if n != "mac"])
        for key, value, headers in messages
    ]


def _resigned(message, key, **changes):
    """``message`` with headers changed (``name=bytes``) and signed again with ``key``."""
    message_key, value, headers = message
    meta = {n: raw for n, raw in headers if n != "mac"}
    meta.update(changes)
    return message_key, value, [*meta.items(), ("mac", snapshot_mac(key, message_key, value, meta))]


def _nb_probabilities(processor, texts):
    featurizer, head = processor.heads()["nb"]
    return [head.predict_proba_one(featurizer.transform_one(t)) for t in texts]


def test_naive_bayes_counts_merge_exactly_into_one_learner_of_all_records():
    records = synthetic_records(900, seed=3)
    clock = Clock()
    a, b, c = (_worker(name, ["nb"], clock) for name in "abc")
    single = StreamProcessor(["nb"], drift_detector="none")
    for round_start in range(0, 900, 300):  # three rounds: learn apart, exchange
        for i, record in enumerate(records[round_start : round_start + 300]):
            (a, b, c)[i % 3][0].process(record)
            single.process(record)
        _exchange([a, b, c], clock)
        expected = CountTable.of(single.heads()["nb"][1])
        for processor, _ in (a, b, c):
            got = CountTable.of(processor.heads()["nb"][1])
            assert got.tables == expected.tables
            assert got.features == expected.features
    texts = [r.text for r in synthetic_records(20, seed=99)]
    for processor, _ in (a, b, c):
        for got, want in zip(
            _nb_probabilities(processor, texts), _nb_probabilities(single, texts), strict=True
        ):
            assert got.keys() == want.keys()
            assert all(abs(got[k] - want[k]) < 1e-12 for k in want)


def test_counts_published_are_the_workers_own_records_only():
    clock = Clock()
    a, b = _worker("a", ["nb"], clock), _worker("b", ["nb"], clock)
    records = synthetic_records(200, seed=5)
    for record in records[:100]:
        a[0].process(record)
    for record in records[100:]:
        b[0].process(record)
    _exchange([a, b], clock)
    _exchange([a, b], clock)  # a second exchange must not count the peers' records twice
    total = sum(
        sum(CountTable.of(p.heads()["nb"][1]).tables["class_counts"].values()) for p, _ in (a, b)
    )
    assert total == 400  # each of the two holds all 200 records, once
    own = [m for m in a[1].snapshots(a[0], full=True) if m[0].startswith(b"nb/a/")]
    snapshot = SnapshotAssembler(KEY)
    for key, value, headers in own:
        result = snapshot.add(key, value, headers)
    assert sum(CountTable.from_bytes(result.payload).tables["class_counts"].values()) == 100
    assert result.records == 100


@pytest.mark.slow
def test_average_weights_by_the_records_each_worker_learned():
    clock = Clock()
    a, b = _worker("a", ["neural"], clock), _worker("b", ["neural"], clock)
    records = synthetic_records(400, seed=7)
    for record in records[:300]:
        a[0].process(record)
    for record in records[300:]:
        b[0].process(record)
    emb_a = np.array(a[0].heads()["neural"][1].embeddings, dtype=np.float64)
    emb_b = np.array(b[0].heads()["neural"][1].embeddings, dtype=np.float64)
    n_seen_a = a[0].heads()["neural"][1].n_seen
    _exchange([a, b], clock)
    fused_a = a[0].heads()["neural"][1]
    fused_b = b[0].heads()["neural"][1]
    expected = (300 * emb_a + 100 * emb_b) / 400
    np.testing.assert_allclose(fused_a.embeddings, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_b.embeddings, expected, rtol=1e-5, atol=1e-6)
    assert fused_a.n_seen == n_seen_a  # its own count: the learning-rate schedule goes on
    assert a[0].learner_stats()["neural"]["learned"] == 300


def test_ensemble_mixes_the_peers_probabilities_weighted_by_records():
    clock = Clock()
    a, b = _worker("a", ["softmax"], clock), _worker("b", ["softmax"], clock)
    records = synthetic_records(300, seed=11)
    for record in records[:200]:
        a[0].process(record)
    for record in records[200:]:
        b[0].process(record)
    x_text = records[0].text
    featurizer, head_a = a[0].heads()["softmax"]
    own = head_a.predict_proba_one(featurizer.transform_one(x_text))
    peer = b[0].heads()["softmax"][1].predict_proba_one(featurizer.transform_one(x_text))
    _exchange([a, b], clock)
    served = a[0].process(type(records[0])(id="q", text=x_text)).prediction.proba
    for label in own:
        assert served[label] == pytest.approx((200 * own[label] + 100 * peer.get(label, 0.0)) / 300)


def test_a_late_joiner_starts_from_its_peers():
    clock = Clock()
    a, late = _worker("a", ["nb", "neural"], clock), _worker("late", ["nb", "neural"], clock)
    for record in synthetic_records(300, seed=2):
        a[0].process(record)
    _exchange([a, late], clock)
    probe = synthetic_records(30, seed=8)
    for name in ("nb", "neural"):
        featurizer_a, head_a = a[0].heads()[name]
        featurizer_l, head_l = late[0].heads()[name]
        for record in probe:
            want = head_a.predict_proba_one(featurizer_a.transform_one(record.text))
            got = head_l.predict_proba_one(featurizer_l.transform_one(record.text))
            assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-6 for k in want)


def test_ensemble_snapshots_need_the_shared_key():
    clock = Clock()
    processor, fusion = _worker("a", ["softmax"], clock)
    for record in synthetic_records(50):
        processor.process(record)
    messages = fusion.snapshots(processor)
    stranger = ModelFeed(
        "models", bootstrap_servers="unused", worker_id="b", key=b"another-key-0123456789abcdef"
    )
    for key, value, headers in messages:
        stranger.feed(key, value, headers)
    assert stranger.latest() == {} and stranger.rejected == {"bad_signature": 1}
    # A pickle that was not signed at all is refused the same way, before it is unpickled.
    forged = encode_snapshot(
        "softmax",
        "x",
        "ensemble",
        pickle.dumps(object()),
        key=KEY,
        records=1,
        hashing="",
        created=5.0,
    )
    for key, value, headers in _unsigned(forged):
        stranger.feed(key, value, headers)
    assert stranger.latest() == {} and stranger.rejected == {"bad_signature": 1, "unsigned": 1}


def test_fusion_state_and_peers_survive_a_checkpoint():
    clock = Clock()
    a, b = _worker("a", ["nb", "softmax"], clock), _worker("b", ["nb", "softmax"], clock)
    for i, record in enumerate(synthetic_records(200, seed=4)):
        (a, b)[i % 2][0].process(record)
    _exchange([a, b], clock)
    restored = pickle.loads(pickle.dumps({"processor": a[0], "fusion": a[1].state()}))
    fusion = Fusion("a", key=KEY, clock=clock)
    fusion.restore(restored["fusion"])
    assert fusion.peer_counts["nb"]["b"].tables == a[1].peer_counts["nb"]["b"].tables
    probe = synthetic_records(10, seed=6)
    for record in probe:
        assert restored["processor"].process(record).prediction == a[0].process(record).prediction


def test_rules_are_configuration():
    assert parse_rules("nb=ensemble") == {"nb": "ensemble"}
    clock = Clock()
    processor, fusion = _worker("a", ["nb", "softmax"], clock, rules={"softmax": "none"})
    for record in synthetic_records(20):
        processor.process(record)
    learners = {key.split(b"/")[0] for key, _, _ in fusion.snapshots(processor)}
    assert learners == {b"nb"}
    with pytest.raises(FusionError, match="naive Bayes"):
        Fusion("a", {"softmax": "counts"}, key=KEY).snapshots(processor)
    with pytest.raises(FusionError, match="LEARNER=RULE"):
        parse_rules("nb")


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    drop_old_parts=st.booleans(),
)
def test_assembler_returns_each_complete_snapshot_and_never_an_older_one(
    sizes, seed, drop_old_parts
):
    rng = random.Random(seed)
    snapshots = [
        (bytes(rng.getrandbits(8) for _ in range(size)), 100.0 + i) for i, size in enumerate(sizes)
    ]
    stream = []
    for seq, (payload, created) in enumerate(snapshots, start=1):
        stream.extend(
            encode_snapshot(
                "nb",
                "w1",
                "counts",
                payload,
                key=KEY,
                records=len(payload),
                hashing="",
                created=created,
                epoch=7,
                seq=seq,
                part_bytes=16,
            )
        )
    if drop_old_parts:  # compaction: only the newest message of each key survives, in offset order
        newest = {key: index for index, (key, _, _) in enumerate(stream)}
        stream = [m for index, m in enumerate(stream) if newest[m[0]] == index]
    assembler = SnapshotAssembler(KEY)
    complete = [s for m in stream if (s := assembler.add(*m)) is not None]
    created = [s.created for s in complete]
    assert created == sorted(set(created))  # only ever newer
    assert complete and complete[-1].created == snapshots[-1][1]  # the newest always arrives whole
    payloads = dict((c, p) for p, c in snapshots)
    assert all(s.payload == payloads[s.created] for s in complete)


def test_assembler_refuses_damaged_and_foreign_parts():
    assembler = SnapshotAssembler(KEY)
    ((key, value, headers),) = encode_snapshot(
        "nb", "w", "counts", b"payload", key=KEY, records=1, hashing="", created=1.0
    )
    with pytest.raises(SnapshotRejected, match="not signed") as refused:
        assembler.add(key, value + b"!", headers)
    assert refused.value.reason == "bad_signature"
    with pytest.raises(SnapshotRejected, match="no signature"):
        assembler.add(key, value, [])
    # Signed by a key holder, yet damaged: refused by what is wrong with it.
    with pytest.raises(SnapshotRejected, match="checksum"):
        assembler.add(*_resigned((key, value + b"!", headers), KEY))
    with pytest.raises(SnapshotRejected, match="wire format"):
        assembler.add(*_resigned((key, value, headers), KEY, fusion_format=b"1"))
    with pytest.raises(SnapshotRejected, match="bad headers"):
        assembler.add(*_resigned((key, value, headers), KEY, parts=b"x"))
    with pytest.raises(FusionError, match="damaged count snapshot"):
        CountTable.from_bytes(b"not zlib")


def _kinds(messages):
    return {dict(headers)["kind"] for _, _, headers in messages}


def test_rounds_publish_increments_between_full_snapshots():
    clock = Clock()
    processor, fusion = _worker("a", ["nb"], clock)
    records = synthetic_records(300, seed=12)
    for record in records[:200]:
        processor.process(record)
    assert _kinds(fusion.snapshots(processor)) == {b"full"}  # the first round of a run
    for record in records[200:]:
        processor.process(record)
    clock.now += 1
    increment = fusion.snapshots(processor)
    assert _kinds(increment) == {b"increment"}
    assembler = SnapshotAssembler(KEY)
    (snapshot,) = [s for m in increment if (s := assembler.add(*m)) is not None]
    assert sum(CountTable.from_bytes(snapshot.payload).tables["class_counts"].values()) == 100
    clock.now += 61  # full_every_seconds later
    assert _kinds(fusion.snapshots(processor)) == {b"full"}


def test_a_restarted_peer_is_replaced_by_its_full_snapshot_not_counted_twice():
    clock = Clock()
    a, b = _worker("a", ["nb"], clock), _worker("b", ["nb"], clock)
    records = synthetic_records(600, seed=13)
    for record in records[:200]:
        b[0].process(record)
    _exchange([a, b], clock)
    checkpoint = pickle.dumps((b[0], b[1].state()))  # b checkpoints after 200 records
    for record in records[200:300]:
        b[0].process(record)
    _exchange([a, b], clock)  # a folds in the increment of records 200..300
    # b crashes; it restarts from its checkpoint (a new run: a new epoch) and re-learns 200..300.
    processor, state = pickle.loads(checkpoint)
    clock.now += 1
    restarted = Fusion("b", key=KEY, every_seconds=10, clock=clock)
    restarted.restore(state)
    restarted.attach(processor)
    _FEEDS[id(restarted)] = _FEEDS[id(b[1])]
    for record in records[200:300]:
        processor.process(record)
    _exchange([a, (processor, restarted)], clock)
    total = sum(CountTable.of(a[0].heads()["nb"][1]).tables["class_counts"].values())
    assert total == 300  # b's 300 records, once: its full snapshot replaced the old series


def test_rounds_come_every_n_records_as_well_as_every_t_seconds():
    from worker_helpers import drain, make_worker, partitioned, records

    from stream_learner.fusion.rounds import FusionRounds
    from stream_learner.io.sources import MemorySource

    clock = Clock()
    fusion = Fusion("a", every_seconds=10, every_records=100, clock=clock)
    assert fusion.due(records=0)  # nothing published yet
    fusion.last_published = clock.now
    assert not fusion.due(records=99) and fusion.due(records=100)
    clock.now += 10
    assert fusion.due(records=0)

    clock.now = fusion.last_published = 1e9  # a clock that stands still: rounds by records only
    worker = make_worker(fusion=FusionRounds(fusion, topic="models"))
    rounds = []
    worker.fusion_round = lambda: (
        rounds.append(worker.fusion.since_round),
        setattr(worker.fusion, "since_round", 0),
    )
    source = MemorySource(partitioned(records(1000), 1), handler=worker, max_poll_records=500)
    worker.owned = source.assignment()
    drain(worker, source)
    assert rounds == [100] * 10


# --- authentication: forged, altered, replayed and foreign-key snapshots --------------------------


def _state(processor, name):
    """Everything a learner's predictions depend on, to compare before and after."""
    return pickle.dumps(processor.heads()[name][1])


def _feed_all(feed, messages):
    for message in messages:
        feed.feed(*message)


def _metrics():
    from stream_learner.runtime.metrics import StreamMetrics

    return StreamMetrics(process_metrics=False)


def _rejected(metrics, reason):
    return metrics.registry.get_sample_value(
        "stream_learner_fusion_rejected_total", {"reason": reason}
    )


def test_forged_counts_snapshots_are_dropped_counted_and_never_folded():
    clock = Clock()
    a, b = _worker("a", ["nb"], clock), _worker("b", ["nb"], clock)
    records = synthetic_records(200, seed=31)
    for i, record in enumerate(records):
        (a, b)[i % 2][0].process(record)
    _exchange([a, b], clock)
    before = _state(a[0], "nb")
    feed = _FEEDS[id(a[1])]
    feed.metrics = metrics = _metrics()
    # One count table that would flip every prediction towards a made-up class.
    featurizer, head = a[0].heads()["nb"]
    flood = CountTable(
        {"class_counts": {"forged": 10**6}},
        {f: {"forged": 10**6} for f in featurizer.transform_one(records[0].text)},
    ).to_bytes()
    version = dict(epoch=b[1].epoch, seq=b[1].seq + 5)
    forged = encode_snapshot(
        "nb",
        "b",
        "counts",
        flood,
        key=KEY,
        records=10**6,
        hashing=json_hashing(a),
        created=clock.now,
        **version,
    )
    checkpoint_key = derive_key(SECRET, CHECKPOINT)
    attempts = {
        "unsigned": _unsigned(forged),
        "another key": encode_snapshot(
            "nb",
            "b",
            "counts",
            flood,
            key=b"k" * 32,
            records=1,
            hashing=json_hashing(a),
            created=clock.now,
            **version,
        ),
        "checkpoint key": encode_snapshot(
            "nb",
            "b",
            "counts",
            flood,
            key=checkpoint_key,
            records=1,
            hashing=json_hashing(a),
            created=clock.now,
            **version,
        ),
        "raw secret": encode_snapshot(
            "nb",
            "b",
            "counts",
            flood,
            key=SECRET,
            records=1,
            hashing=json_hashing(a),
            created=clock.now,
            **version,
        ),
    }
    for messages in attempts.values():
        _feed_all(feed, messages)
        a[1].fold(a[0], feed.latest())
        assert _state(a[0], "nb") == before
    assert head.predict_one(featurizer.transform_one(records[0].text)) != "forged"
    assert feed.rejected == {"unsigned": 1, "bad_signature": 3}
    assert _rejected(metrics, "unsigned") == 1 and _rejected(metrics, "bad_signature") == 3
    assert _rejected(metrics, "replayed") == 0


def json_hashing(worker):
    from stream_learner.fusion.fusion import _hashing

    return _hashing(worker[0].heads()["nb"][0])


@pytest.mark.slow
def test_forged_average_snapshot_and_altered_records_header_are_dropped():
    clock = Clock()
    a, b = _worker("a", ["neural"], clock), _worker("b", ["neural"], clock)
    for i, record in enumerate(synthetic_records(200, seed=32)):
        (a, b)[i % 2][0].process(record)
    _exchange([a, b], clock)
    before = _state(a[0], "neural")
    feed = _FEEDS[id(a[1])]
    for record in synthetic_records(50, seed=33):
        b[0].process(record)
    clock.now += 1
    genuine = b[1].snapshots(b[0], full=True)
    # The averaging weight is a header: claiming 10^9 records would make b's model the group's.
    heavier = [
        (k, v, [(n, b"1000000000" if n == "records" else raw) for n, raw in h])
        for k, v, h in genuine
    ]
    renamed = [(k, v, [(n, b"c" if n == "worker" else raw) for n, raw in h]) for k, v, h in genuine]
    rekeyed = [(k.replace(b"/b/", b"/c/"), v, h) for k, v, h in genuine]
    unsigned = _unsigned(genuine)
    for messages in (heavier, renamed, rekeyed, unsigned):
        _feed_all(feed, messages)
        a[1].fold(a[0], feed.latest())
        assert _state(a[0], "neural") == before
    assert feed.rejected == {"bad_signature": 3 * len(genuine), "unsigned": len(genuine)}
    _feed_all(feed, genuine)  # the genuine one still counts, with its true weight
    a[1].fold(a[0], feed.latest())
    assert _state(a[0], "neural") != before


def test_a_replayed_snapshot_is_dropped_and_counted():
    clock = Clock()
    a, b = _worker("a", ["nb", "softmax"], clock), _worker("b", ["nb", "softmax"], clock)
    records = synthetic_records(300, seed=34)
    for record in records[:100]:
        b[0].process(record)
    clock.now += 1
    old = b[1].snapshots(b[0], full=True)
    feed = _FEEDS[id(a[1])]
    _feed_all(feed, old)
    a[1].fold(a[0], feed.latest())
    for record in records[100:200]:
        b[0].process(record)
    clock.now += 1
    _feed_all(feed, b[1].snapshots(b[0], full=True))
    a[1].fold(a[0], feed.latest())
    before = {name: _state(a[0], name) for name in ("nb", "softmax")}
    versions = {name: h.version for name, h in feed.latest().items()}
    _feed_all(feed, old)  # someone with write access to the topic sends the old ones again
    a[1].fold(a[0], feed.latest())
    assert {name: h.version for name, h in feed.latest().items()} == versions
    assert {name: _state(a[0], name) for name in ("nb", "softmax")} == before
    assert feed.rejected == {"replayed": len(old)}
    assert sum(CountTable.of(a[0].heads()["nb"][1]).tables["class_counts"].values()) == 200


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_altered_byte_of_a_signed_part_is_refused(data):
    """Key, value, header names and values: changing any byte of a signed message is caught."""
    (message,) = encode_snapshot(
        "nb",
        "w",
        "counts",
        b"counts payload",
        key=KEY,
        records=3,
        hashing="h",
        created=2.0,
        epoch=1,
        seq=2,
    )
    key, value, headers = message
    fields = (
        [("key", None), ("value", None)]
        + [("name", i) for i in range(len(headers))]
        + [("header", i) for i in range(len(headers))]
    )
    where, index = data.draw(st.sampled_from(fields))
    target = (
        {"key": key, "value": value}.get(where)
        if index is None
        else (headers[index][0].encode() if where == "name" else headers[index][1])
    )
    if not target:
        return
    position = data.draw(st.integers(0, len(target) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = bytearray(target)
    changed[position] ^= flip
    changed = bytes(changed)
    if where == "key":
        key = changed
    elif where == "value":
        value = changed
    elif where == "name":
        try:
            headers = [
                (changed.decode("utf-8") if i == index else n, raw)
                for i, (n, raw) in enumerate(headers)
            ]
        except UnicodeDecodeError:
            return
    else:
        headers = [(n, changed if i == index else raw) for i, (n, raw) in enumerate(headers)]
    with pytest.raises(SnapshotRejected) as refused:
        SnapshotAssembler(KEY).add(key, value, headers)
    assert refused.value.reason in ("bad_signature", "unsigned")


class _Payload:
    """A pickle that would run code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class _Reach:
    """A pickle that reaches for an attribute through ``getattr``."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


@pytest.mark.slow
def test_every_learner_round_trips_through_the_allow_list():
    from stream_learner.fusion.fusion import restricted_loads
    from stream_learner.learners.registry import available_learners

    names = [n for n in available_learners() if n != "neural-minilm"]  # needs a download
    processor = StreamProcessor(names, drift_detector="none")
    records = synthetic_records(300, seed=38)
    for record in records:
        processor.process(record)
    for name, (featurizer, head) in processor.heads().items():
        restored = restricted_loads(pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL))
        x = featurizer.transform_one(records[0].text) if featurizer is not None else records[0].text
        assert restored.predict_proba_one(x) == head.predict_proba_one(x), name


def test_a_signed_ensemble_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    feed = ModelFeed(
        "models",
        bootstrap_servers="unused",
        worker_id="a",
        key=KEY,
        metrics=(metrics := _metrics()),
    )
    from river.linear_model import SoftmaxRegression

    payloads = (
        pickle.dumps(_Payload(marker)),
        pickle.dumps(eval),
        b"cos\nsystem\n(S'true'\ntR.",
        pickle.dumps(_Reach(SoftmaxRegression, "__init__")),  # a way to __globals__
        pickle.dumps(_Reach({}, "get")),
    )
    for payload in payloads:
        # Signed with the group's key (a worker gone rogue): still never executed.
        _feed_all(
            feed,
            encode_snapshot(
                "softmax",
                "b",
                "ensemble",
                payload,
                key=KEY,
                records=1,
                hashing="",
                created=1.0,
                seq=len(feed.rejected) + feed.errors + 1,
            ),
        )
    assert not marker.exists()
    assert feed.latest() == {}
    assert feed.rejected == {"unsafe": 5} and _rejected(metrics, "unsafe") == 5


# --- forgetting peers: a TTL and tombstones ----------------------------------------------------------


def test_a_silent_peer_is_forgotten_after_the_ttl():
    clock = Clock()
    a, b = _worker("a", ["nb", "softmax"], clock), _worker("b", ["nb", "softmax"], clock)
    feed = _FEEDS[id(a[1])] = ModelFeed(
        "models", bootstrap_servers="unused", worker_id="a", key=KEY, peer_ttl=100, clock=clock
    )
    records = synthetic_records(100, seed=35)
    for record in records:
        b[0].process(record)
    _exchange([a, b], clock)
    assert feed.peers == {"b"}
    clock.now += 99  # b publishes nothing more
    assert set(feed.latest()) == {("nb", "b"), ("softmax", "b")}
    clock.now += 2
    last = feed.latest()
    assert set(last) == {("nb", "b")}  # its counts, one last time (they are records learned)
    assert feed.peers == set() and feed.latest() == {}
    a[1].fold(a[0], last)
    a[1].fold(a[0], feed.latest())
    assert a[0]._slot("softmax").peers == []  # the ensemble goes on without b
    assert (
        sum(CountTable.of(a[0].heads()["nb"][1]).tables["class_counts"].values()) == 100
    )  # counts stay
    # It comes back: taken in again.
    for record in synthetic_records(10, seed=36):
        b[0].process(record)
    _exchange([a, b], clock, full=True)
    assert feed.peers == {"b"}
    assert sum(CountTable.of(a[0].heads()["nb"][1]).tables["class_counts"].values()) == 110


def test_tombstones_on_a_clean_stop_make_peers_forget_at_once():
    clock = Clock()
    a, b = _worker("a", ["nb", "softmax"], clock), _worker("b", ["nb", "softmax"], clock)
    records = synthetic_records(200, seed=37)
    for record in records[:100]:
        b[0].process(record)
    _exchange([a, b], clock)
    for record in records[100:]:
        b[0].process(record)
    _exchange([a, b], clock)  # an increment of nb
    clock.now += 1
    final = b[1].snapshots(b[0], full=True)
    own = _FEEDS[id(b[1])]  # b's own feed saw its keys on the topic (an earlier run's, say)
    tombstones = b[1].tombstones(own.own_keys())
    assert all(value is None for _, value, _ in tombstones)
    deleted = {key for key, _, _ in tombstones}
    published = {key for key, _, _ in final} | set(own.own_keys())
    kept = {key for key, _, _ in final if key.startswith(b"nb/")}
    assert (
        deleted >= published - kept and not deleted & kept
    )  # nb's last full counts stay for late joiners
    feed = _FEEDS[id(a[1])]
    _feed_all(feed, final + tombstones)
    assert feed.peers == set()
    last = feed.latest()
    assert set(last) == {("nb", "b")}  # its final counts, folded once
    a[1].fold(a[0], last)
    assert feed.latest() == {}
    assert sum(CountTable.of(a[0].heads()["nb"][1]).tables["class_counts"].values()) == 200
    assert feed.rejected == {}
    # Tombstones are signed: forged or replayed ones change nothing.
    for record in records[:10]:
        b[0].process(record)
    _exchange([a, b], clock, full=True)
    assert feed.peers == {"b"}
    forged = _unsigned(b[1].tombstones())
    _feed_all(feed, forged)
    _feed_all(feed, tombstones)
    assert feed.peers == {"b"}
    assert feed.rejected == {"unsigned": len(forged), "replayed": len(tombstones)}


def test_the_peer_ttl_is_configuration_and_outlasts_the_full_snapshots():
    from stream_learner.runtime.config import ConfigError, load_config

    base = ["--topic", "t", "--learners", "nb", "--fusion", "on"]
    assert load_config(base, environ={}).fusion_peer_ttl == 600.0
    assert load_config([*base, "--fusion-peer-ttl", "none"], environ={}).fusion_peer_ttl is None
    assert (
        load_config(base, environ={"STREAM_LEARNER_FUSION_PEER_TTL": "900"}).fusion_peer_ttl
        == 900.0
    )
    with pytest.raises(ConfigError, match="fusion_peer_ttl must be longer"):
        load_config(
            [*base, "--fusion-peer-ttl", "30", "--fusion-full-every-seconds", "60"], environ={}
        )
