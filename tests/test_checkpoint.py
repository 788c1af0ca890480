"""Signed checkpoints: round trip, rotation, corrupt files skipped, tampered files refused."""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.state.checkpoint import (
    KEY_ENV,
    MAGIC,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointRefused,
    CheckpointStore,
    DirectoryLock,
    default_key_path,
    resolve_key,
)

KEY = b"k" * 32


class _Exploit:
    """A pickle that runs code when loaded: it must never be loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_keeps_state_and_offsets(tmp_path):
    store = CheckpointStore(tmp_path, KEY)
    store.save({"model": [1.5, 2.5]}, {("t", 0): 10, ("t", 1): 7}, info={"reason": "test"})
    checkpoint = store.load_latest()
    assert checkpoint.state == {"model": [1.5, 2.5]}
    assert checkpoint.offsets == {("t", 0): 10, ("t", 1): 7}
    assert checkpoint.info == {"reason": "test"}


def test_only_the_last_k_are_kept_and_the_newest_wins(tmp_path):
    store = CheckpointStore(tmp_path, KEY, keep=3)
    for i in range(7):
        store.save({"i": i}, {("t", 0): i})
    assert [p.name for p in store.paths()] == [f"ckpt-{n:012d}.slck" for n in (5, 6, 7)]
    assert store.load_latest().state == {"i": 6}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, caplog):
    store = CheckpointStore(tmp_path, KEY)
    store.save({"i": 1}, {("t", 0): 100})
    newest = store.save({"i": 2}, {("t", 0): 200})
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the payload
    newest.write_bytes(bytes(data))
    checkpoint = store.load_latest()
    assert checkpoint.state == {"i": 1} and checkpoint.offsets == {("t", 0): 100}
    assert "corrupt checkpoint" in caplog.text and newest.name in caplog.text


def test_a_truncated_newest_checkpoint_falls_back_too(tmp_path):
    store = CheckpointStore(tmp_path, KEY)
    store.save({"i": 1}, {})
    newest = store.save({"i": 2}, {})
    newest.write_bytes(newest.read_bytes()[:50])
    assert store.load_latest().state == {"i": 1}
    newest.write_bytes(b"")
    assert store.load_latest().state == {"i": 1}


def test_a_tampered_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    store = CheckpointStore(tmp_path, KEY)
    store.save({"i": 1}, {})
    newest = store.save({"i": 2}, {})
    # The attacker replaces the payload and fixes the plain checksum, but has no key.
    data = newest.read_bytes()
    header_length = struct.unpack_from(">I", data, len(MAGIC) + 64)[0]
    body_start = len(MAGIC) + 64
    header = data[body_start : body_start + 4 + header_length]
    body = header + pickle.dumps(_Exploit(marker))
    forged = MAGIC + hashlib.sha256(MAGIC + body).digest() + data[len(MAGIC) + 32 : len(MAGIC) + 64] + body
    newest.write_bytes(forged)
    with pytest.raises(CheckpointRefused, match="signature does not match"):
        store.load_latest()
    assert not marker.exists()


def test_an_unsigned_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    store = CheckpointStore(tmp_path, KEY)
    (tmp_path / "ckpt-000000000009.slck").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointRefused, match="not a signed"):
        store.load_latest()
    assert not marker.exists()


def test_a_checkpoint_signed_with_another_key_is_refused(tmp_path):
    CheckpointStore(tmp_path, b"another key, 32 bytes long......").save({"i": 1}, {})
    with pytest.raises(CheckpointRefused):
        CheckpointStore(tmp_path, KEY).load_latest()


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_damaged_byte_is_detected(tmp_path_factory, position, flip):
    directory = tmp_path_factory.mktemp("flip")
    store = CheckpointStore(directory, KEY)
    path = store.save({"weights": list(range(20))}, {("t", 3): 99})
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= flip
    path.write_bytes(bytes(data))
    with pytest.raises((CheckpointCorrupt, CheckpointRefused)):
        store.read(path)


def test_key_from_env_file_or_generated_with_mode_0600(tmp_path, caplog):
    assert resolve_key(tmp_path, environ={KEY_ENV: "x" * 20}) == b"x" * 20
    key_file = tmp_path / "my.key"
    key_file.write_text("y" * 40 + "\n")
    key_file.chmod(0o600)
    assert resolve_key(tmp_path, key_file, environ={KEY_ENV: "x" * 20}) == b"y" * 40

    home = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    checkpoints = tmp_path / "ckpt"
    generated = resolve_key(checkpoints, environ=home, generate=True)
    path = tmp_path / "config" / "stream-learner" / "checkpoint.key"
    assert path == default_key_path(home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(generated) >= 32 and "generated a checkpoint key" in caplog.text
    assert resolve_key(checkpoints, environ=home) == generated  # found again, no flag needed
    assert generated.decode() not in caplog.text
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # nothing in the checkpoint dir

    named = resolve_key(checkpoints, tmp_path / "keys" / "group.key", environ={}, generate=True)
    assert (tmp_path / "keys" / "group.key").read_bytes().strip() == named
    assert stat.S_IMODE((tmp_path / "keys" / "group.key").stat().st_mode) == 0o600


def test_without_a_key_nothing_is_generated_unless_asked(tmp_path):
    home = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    with pytest.raises(CheckpointError, match="--generate-key"):
        resolve_key(tmp_path / "ckpt", environ=home)
    assert not (tmp_path / "config").exists() and not (tmp_path / "ckpt").exists()


def test_a_key_generated_by_an_older_release_in_the_checkpoint_dir_still_works(tmp_path, caplog):
    (tmp_path / "checkpoint.key").write_text("z" * 64)
    assert resolve_key(tmp_path, environ={"XDG_CONFIG_HOME": str(tmp_path / "c")}) == b"z" * 64
    assert "move it elsewhere" in caplog.text


def test_short_or_missing_keys_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="shorter than 16 bytes"):
        resolve_key(tmp_path, environ={KEY_ENV: "short"})
    with pytest.raises(CheckpointError, match="cannot read checkpoint key file"):
        resolve_key(tmp_path, tmp_path / "missing.key", environ={})


def test_repr_of_the_store_does_not_show_the_key(tmp_path):
    assert KEY.decode() not in repr(CheckpointStore(tmp_path, KEY))


def test_only_the_owner_removes_unfinished_saves(tmp_path):
    store = CheckpointStore(tmp_path, KEY)
    store.save({"n": 1}, {})
    in_flight = [tmp_path / ".ckpt-000000000002.slck.4242.tmp", tmp_path / ".manifest.json.4242.tmp"]
    for path in in_flight:
        path.write_bytes(b"half a save")
    reader = CheckpointStore(tmp_path, KEY)  # a reader of a live directory: its writer is mid-save
    assert reader.load_latest().state == {"n": 1}
    assert all(path.exists() for path in in_flight)
    assert store.remove_unfinished_saves() == 2
    assert not any(path.exists() for path in in_flight)
    assert store.load_latest().state == {"n": 1}


def test_one_checkpoint_directory_per_worker(tmp_path):
    with DirectoryLock(tmp_path), pytest.raises(CheckpointError, match="in use by another worker"):
        DirectoryLock(tmp_path).acquire()
    with DirectoryLock(tmp_path) as lock:  # released: usable again
        assert lock.path.read_text() == str(os.getpid())
