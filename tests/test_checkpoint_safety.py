"""What a checkpoint may hold and where it may come from: the restricted unpickler, the golden
checkpoint of format 1, a round trip of every registered learner, file modes, the manifest
that lets a fallback re-read what lost checkpoints had learned."""

from __future__ import annotations

import ast
import builtins
import hashlib
import hmac
import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stream_learner
from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import Record
from stream_learner.fusion.fusion import Fusion
from stream_learner.learners.registry import LearnerError, available_learners, make_learner
from stream_learner.runtime.worker import STATE_FORMAT, read_state
from stream_learner.state.checkpoint import MAGIC, CheckpointRefused, CheckpointStore
from stream_learner.state.files import atomic_write
from stream_learner.state.keys import CHECKPOINT, derive_key
from stream_learner.state.unpickle import RENAMED, UnpicklingRefused, restricted_loads

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_KEY = b"golden-checkpoint-key-0123456789abcdef"
KEY = b"k" * 32


def signed_file(directory: Path, payload: bytes, key: bytes = KEY, sequence: int = 1) -> Path:
    """A format-2 checkpoint holding ``payload`` as its pickle, correctly signed with ``key``:
    what an attacker who has the key could write."""
    header = json.dumps({"sequence": sequence, "created": 0.0, "offsets": [], "info": {}}).encode()
    body = struct.pack(">I", len(header)) + header + payload
    digest = hashlib.sha256(MAGIC + body).digest()
    signature = hmac.new(derive_key(key, CHECKPOINT), MAGIC + body, hashlib.sha256).digest()
    path = directory / f"ckpt-{sequence:012d}.slck"
    path.write_bytes(MAGIC + digest + signature + body)
    return path


class _Reduce:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def _payloads(marker: Path):
    """Pickles that would create ``marker`` if they were run."""
    command = f"touch {marker}"
    yield "os.system", pickle.dumps(_Reduce(os.system, command))
    yield "builtins.eval", pickle.dumps(_Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"))
    yield "builtins.exec", pickle.dumps(_Reduce(builtins.exec, f"open({str(marker)!r}, 'w')"))
    yield "subprocess.Popen", pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]))
    yield "builtins.open", pickle.dumps(_Reduce(open, str(marker), "w"))
    # Dotted names and re-exports: a module or a function reached through an allowed module.
    yield "river re-export", b"\x80\x04\x95" + _global_call("river.utils.math", "math", "fsum")
    yield "getattr of a class", pickle.dumps(_Reduce(getattr, StreamProcessor, "__init__"))
    yield "ndarray.tofile", pickle.dumps(_Reduce(getattr, np.zeros(2), "tofile"))
    yield "numpy.memmap", pickle.dumps(_Reduce(np.memmap, str(marker), np.uint8, "w+", 0, (4,)))
    yield "numpy.load", b"\x80\x04\x95" + _global_call("numpy", "load", str(marker))
    yield "a fusion feed", b"\x80\x04\x95" + _global_call("stream_learner.fusion.fusion", "ModelFeed", str(marker))


def _global_call(module: str, name: str, argument: str) -> bytes:
    # STACK_GLOBAL of (module, name), called with one string: protocol 4 by hand.
    def text(s: str) -> bytes:
        data = s.encode()
        return b"\x8c" + bytes([len(data)]) + data

    body = text(module) + text(name) + b"\x93" + text(argument) + b"\x85R."
    return struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize("name", [name for name, _ in _payloads(Path("/x"))])
def test_a_signed_malicious_pickle_is_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = dict(_payloads(marker))[name]
    signed_file(tmp_path, payload)
    with pytest.raises(CheckpointRefused, match="refusing|nothing of it was run"):
        CheckpointStore(tmp_path, KEY).load_latest()
    assert not marker.exists()
    assert list(CheckpointStore(tmp_path, KEY).paths())  # refused, not moved aside as corrupt


_DANGEROUS_MODULES = [
    "os", "posix", "subprocess", "builtins", "sys", "importlib", "shutil", "socket", "pickle",
    "io", "codecs", "ctypes", "runpy", "code", "pty", "numpy", "numpy.lib.npyio", "river.datasets.base",
    "river.stream", "stream_learner.runtime.worker", "stream_learner.io.sinks", "stream_learner.data.datasets",
]
_DANGEROUS_NAMES = [
    "system", "popen", "Popen", "eval", "exec", "open", "getattr", "__import__", "rmtree", "load",
    "loads", "fromfile", "memmap", "DataSource", "run_path", "spawn", "iter_csv", "KafkaSink", "fetch",
    "InteractiveInterpreter", "compile", "setattr", "delattr", "globals", "vars", "breakpoint", "input",
]


@settings(max_examples=200, deadline=None)
@given(module=st.sampled_from(_DANGEROUS_MODULES), name=st.sampled_from(_DANGEROUS_NAMES))
def test_no_dangerous_global_is_ever_resolved(module, name):
    # getattr is resolved, to a restricted stand-in that refuses what pickled bound methods never need.
    if (module, name) == ("builtins", "getattr"):
        with pytest.raises(UnpicklingRefused):
            restricted_loads(pickle.dumps(_Reduce(getattr, np.zeros(1), "tofile")))
        return
    # Refused, or (a name an allowed module does not have) not found: never resolved, never run.
    with pytest.raises((UnpicklingRefused, AttributeError)):
        restricted_loads(b"\x80\x04\x95" + _global_call(module, name, "x"))


def test_the_unpickler_maps_renamed_classes(monkeypatch):
    # protocol 2 names classes as text lines, so a module may be renamed to any length
    data = pickle.dumps(Record("a", "text", "spam"), protocol=2).replace(
        b"stream_learner.core.records", b"stream_learner.oldrecs"
    )
    with pytest.raises(UnpicklingRefused):
        restricted_loads(data)
    monkeypatch.setitem(
        RENAMED, ("stream_learner.oldrecs", "Record"), ("stream_learner.core.records", "Record")
    )
    assert restricted_loads(data) == Record("a", "text", "spam")


def test_classes_of_modules_that_moved_load_from_their_old_path():
    data = pickle.dumps(Record("a", "text", "spam"), protocol=2)
    assert b"stream_learner.core.records" in data
    before_the_move = data.replace(b"stream_learner.core.records", b"stream_learner.records")
    assert restricted_loads(before_the_move) == Record("a", "text", "spam")


def test_classes_of_a_users_factory_module_load_only_when_trusted():
    data = pickle.dumps(_Reduce(_Reduce, 1))  # a class defined in this test module
    with pytest.raises(UnpicklingRefused):
        restricted_loads(data)
    assert isinstance(restricted_loads(data, trusted_modules=[__name__]), _Reduce)


def _trained(learners: dict) -> StreamProcessor:
    processor = StreamProcessor(
        learners, drift_detector="adwin", drift_reaction="background", window=20, seed=1
    )
    words = {
        "spam": "cheap pills win money",
        "ham": "meeting team agenda notes",
        "news": "vote court storm",
    }
    for i in range(150):
        label = sorted(words)[i % 3]
        processor.process(
            Record(f"r{i}", words[label], None if i % 7 == 0 else label, ts=float(i)), now=float(i)
        )
    return processor


def _registered():
    names = []
    for name in sorted(available_learners()):
        try:
            make_learner(name, n_buckets=2**8)
        except LearnerError:  # a pretrained initialization not fetched on this machine
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("name", _registered())
def test_every_registered_learner_survives_a_checkpoint_round_trip(tmp_path, name):
    processor = _trained({name: make_learner(name, seed=2, n_buckets=2**8)})
    store = CheckpointStore(tmp_path, KEY)
    store.save(
        {"format": STATE_FORMAT, "processor": processor.state_dict(), "counts": {"messages": 150}},
        {("t", 0): 150},
    )
    loaded = read_state(CheckpointStore(tmp_path, KEY).load_latest().state)["processor"]
    for text in ("cheap pills", "team agenda", "court vote storm"):
        assert loaded.learners[name].predict_proba_one(text) == pytest.approx(
            processor.learners[name].predict_proba_one(text)
        )
    assert loaded.label_buffer_stats() == processor.label_buffer_stats()
    assert loaded.learner_stats() == processor.learner_stats()
    # It goes on learning from where it was.
    result = loaded.process(Record("next", "cheap pills win", "spam", ts=151.0), now=151.0)
    assert result.prediction is not None


def test_the_golden_checkpoint_of_format_1_loads_and_predicts_as_before(tmp_path):
    expected = json.loads((FIXTURES / "golden-checkpoint-v1.json").read_text())
    shutil.copyfile(FIXTURES / "golden-checkpoint-v1.slck", tmp_path / "ckpt-000000000001.slck")
    checkpoint = CheckpointStore(tmp_path, GOLDEN_KEY).load_latest()
    state = read_state(checkpoint.state)  # payload format 1: the pickled processor
    assert state["format"] == 1 and state["counts"]["messages"] == 200
    assert checkpoint.offsets == {(t, p): o for t, p, o in expected["offsets"]}

    def assert_as_recorded(processor):
        assert sorted(processor.learners) == expected["learners"]
        stats = processor.label_buffer_stats()
        assert 0 < stats.pop("bytes") <= processor.labels.max_bytes  # counted on load (format 1 had no budget)
        assert stats == expected["label_buffer"]
        assert processor.records_seen == expected["records_seen"]
        for name, probas in expected["predictions"].items():
            for text, proba in zip(expected["probes"], probas, strict=True):
                assert processor.learners[name].predict_proba_one(text) == pytest.approx(proba)

    assert_as_recorded(state["processor"])
    # Signed with the secret itself (format 1): the next save uses format 2 and the derived key,
    # and a payload of plain data (format 2), fusion state included.
    fusion = Fusion("golden")
    fusion.restore(state["fusion"])
    resaved = {
        "format": STATE_FORMAT,
        "processor": state["processor"].state_dict(),
        "counts": state["counts"],
        "fusion": fusion.state(),
    }
    store = CheckpointStore(tmp_path, GOLDEN_KEY)
    path = store.save(resaved, checkpoint.offsets)
    assert path.read_bytes().startswith(MAGIC) and store.read(path).sequence == 2
    again = read_state(store.read(path).state)
    assert again["format"] == STATE_FORMAT == 2
    assert_as_recorded(again["processor"])
    restored = Fusion("golden")
    restored.restore(again["fusion"])
    assert restored.peer_counts == fusion.peer_counts and restored.folded == {"nb": {"peer-1": (7, 3)}}


def test_a_format_2_checkpoint_is_not_valid_under_the_raw_secret(tmp_path):
    store = CheckpointStore(tmp_path, KEY)
    path = store.save({"i": 1}, {})
    data = path.read_bytes()
    raw = hmac.new(KEY, data[:8] + data[72:], hashlib.sha256).digest()
    assert data[40:72] != raw  # the signature is made with the derived key, not the secret


def test_checkpoints_manifest_and_models_are_private(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", KEY)
    path = store.save({"i": 1}, {("t", 0): 5})
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o700
    for written in (path, tmp_path / "ckpt" / "manifest.json"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    _ = store.identity
    assert stat.S_IMODE((tmp_path / "ckpt" / "store-id").stat().st_mode) == 0o600

    from stream_learner.learners.neural.format import save

    model = make_learner("neural", n_buckets=2**8)
    model.learn_one("cheap pills", "spam")
    save(model, tmp_path / "models" / "neural.npz")
    assert stat.S_IMODE((tmp_path / "models" / "neural.npz").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "models").stat().st_mode) == 0o700


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path):
    def chunks():
        yield b"part"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "file", chunks())
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_without_replace_lets_the_first_writer_win(tmp_path):
    path = tmp_path / "keys" / "group.key"
    atomic_write(path, [b"first"], replace=False)
    with pytest.raises(FileExistsError):
        atomic_write(path, [b"second"], replace=False)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["group.key"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_every_durable_write_of_the_package_goes_through_state_files():
    """Renames and exclusive creates live in state/files.py, which fsyncs the file and its
    directory; the exceptions are named here with the reason."""
    allowed = {
        "state/files.py": "the helper itself",
        "state/checkpoint.py": "moving a corrupt checkpoint aside (then fsyncs the directory)",
        "data/cache.py": "installing a fetched directory (its files fsynced first)",
    }
    package = Path(stream_learner.__file__).parent
    offenders = []
    for source in sorted(package.rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "link"):
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    name = f"os.{node.attr}"
            elif isinstance(node, ast.Attribute) and node.attr in ("O_EXCL", "O_CREAT"):
                name = f"os.{node.attr}"
            relative = source.relative_to(package).as_posix()
            if name and relative not in allowed:
                offenders.append(f"{relative}:{node.lineno}: {name}")
    assert offenders == []


# -- fallback: corrupt files moved aside, the manifest says what to re-read ----------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_fallback_re_reads_what_newer_checkpoints_covered(tmp_path):
    store = CheckpointStore(tmp_path, KEY, keep=3)
    store.save({"i": 1}, {("t", 0): 100}, started={("t", 0): 0})
    second = store.save(
        {"i": 2}, {("t", 0): 200, ("t", 1): 300}, started={("t", 0): 0, ("t", 1): 40}
    )
    _flip(second)
    store = CheckpointStore(tmp_path, KEY, keep=3)
    checkpoint = store.load_latest()
    assert checkpoint.state == {"i": 1}
    # Partition 0 resumes at checkpoint 1's offset anyway; partition 1 from where we began it.
    assert store.rewind(checkpoint) == {("t", 1): 40}
    assert [p.name for p in store.corrupt_paths()] == ["ckpt-000000000002.slck.corrupt"]
    # The corrupt file is not counted toward keep, and sequence numbers never repeat.
    for i in range(3):
        store.save({"i": 3 + i}, {("t", 0): 300 + i, ("t", 1): 300})
    assert [p.name for p in store.paths()] == [f"ckpt-{n:012d}.slck" for n in (3, 4, 5)]
    assert store.rewind(store.load_latest()) == {}


def test_all_corrupt_leaves_the_evidence_that_checkpoints_existed(tmp_path):
    store = CheckpointStore(tmp_path, KEY)
    for i in range(3):
        store.save({"i": i}, {("t", 0): i})
    for path in store.paths():
        _flip(path)
    assert store.load_latest() is None and store.had_checkpoints()
    assert len(store.corrupt_paths()) == 3 and not store.paths()
    assert store.rewind(None) == {("t", 0): 0}  # a fresh start re-reads everything it had learned
    assert not CheckpointStore(tmp_path / "new", KEY).had_checkpoints()


def test_a_tampered_manifest_is_ignored(tmp_path, caplog):
    store = CheckpointStore(tmp_path, KEY)
    store.save({"i": 1}, {("t", 0): 1})
    manifest = tmp_path / "manifest.json"
    document = json.loads(manifest.read_text())
    document["body"] = document["body"].replace('"t"', '"u"')
    manifest.write_text(json.dumps(document))
    assert store.manifest() is None and "manifest" in caplog.text


def test_without_the_manifest_a_worker_knows_its_own_later_commits(tmp_path):
    from stream_learner.io.sinks import MemorySink, Outputs
    from stream_learner.runtime.worker import Worker

    store = CheckpointStore(tmp_path, KEY)
    worker = Worker(
        StreamProcessor(["nb"]),
        Outputs(MemorySink(), predictions_topic=None, dead_letter_topic=None),
        store,
        name="node-a",
        loaded_sequence=1,
    )
    ours = worker.commit_metadata.replace('"checkpoint":1', '"checkpoint":2')
    theirs = ours.replace(store.identity, "0123456789abcdef")
    older = worker.commit_metadata  # committed by the checkpoint we loaded: nothing was lost
    seeks = worker.partitions_assigned(
        {("t", 0), ("t", 1), ("t", 2), ("t", 3)},
        {("t", 0): 300, ("t", 1): 300, ("t", 2): 300, ("t", 3): None},
        metadata={("t", 0): ours, ("t", 1): theirs, ("t", 2): older, ("t", 3): ""},
    )
    # Our own later checkpoint (lost) committed partition 0: re-read it all. Another worker's
    # commit, or the loaded checkpoint's own, is where to start.
    assert seeks == {("t", 0): 0}
    assert worker.started == {("t", 0): 0, ("t", 1): 300, ("t", 2): 300, ("t", 3): 0}


def test_a_worker_that_died_during_its_first_save_may_start_again(tmp_path):
    store = CheckpointStore(tmp_path, KEY)
    path = store.save({"i": 1}, {("t", 0): 10})
    path.unlink()  # the manifest was written, the checkpoint never renamed into place
    assert not store.had_checkpoints() and store.load_latest() is None
    assert store.save({"i": 1}, {("t", 0): 10}).name == "ckpt-000000000002.slck"
