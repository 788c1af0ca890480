"""Signed, atomic checkpoints: the learner state and the offsets it is consistent with.

A checkpoint file holds a pickled payload (the whole :class:`~stream_learner.runner.StreamProcessor`
and whatever else the worker needs) and the offsets of the *next* record to read on every
partition. Because unpickling can run code, a file is unpickled only after its HMAC-SHA256
has been checked against a secret key:

``MAGIC (8) | SHA-256 (32) | HMAC-SHA256 (32) | header length (4) | header JSON | pickle``

Both digests cover the magic and everything after the digests. The plain SHA-256 tells a
damaged file (a torn write, a flipped bit: *corrupt*, the previous checkpoint is used) from a
file whose content is intact but not signed with our key (*tampered*, or another key:
refused with :class:`CheckpointRefused`, never unpickled).

The key comes from ``$STREAM_LEARNER_CHECKPOINT_KEY``, or a key file (``--checkpoint-key-file``).
With neither, a random key is generated once into ``<checkpoint dir>/checkpoint.key`` (mode
0600) and a warning says so: this protects against corrupt and foreign files, but anyone who can
write the checkpoint directory can read that key; keep the key elsewhere in production.

>>> import tempfile
>>> store = CheckpointStore(tempfile.mkdtemp(), key=b"0123456789abcdef0123", keep=2)
>>> _ = store.save({"weights": [1, 2]}, {("reviews", 0): 42})
>>> checkpoint = store.load_latest()
>>> checkpoint.state, checkpoint.offsets, checkpoint.sequence
({'weights': [1, 2]}, {('reviews', 0): 42}, 1)

"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import pickle
import re
import secrets
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointCorrupt",
    "CheckpointRefused",
    "CheckpointStore",
    "DirectoryLock",
    "KEY_ENV",
    "resolve_key",
]

log = logging.getLogger(__name__)

KEY_ENV = "STREAM_LEARNER_CHECKPOINT_KEY"
KEY_FILE_NAME = "checkpoint.key"
MIN_KEY_BYTES = 16
MAGIC = b"SLCKPT\x00\x01"
_HEADER = struct.Struct(">32s32sI")
_NAME = re.compile(r"^ckpt-(\d{12})\.slck$")


class CheckpointError(Exception):
    """A checkpoint could not be written or read."""


class CheckpointCorrupt(CheckpointError):
    """The file is damaged (truncated, bits changed): skip it and use an older one."""


class CheckpointRefused(CheckpointError):
    """The file is intact but not signed with our key (tampered, unsigned, another key).

    It is never unpickled. The worker stops rather than silently start from scratch.
    """


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    sequence: int
    created: float
    offsets: dict[tuple[str, int], int]
    state: Any
    path: Path
    info: dict = dataclasses.field(default_factory=dict)


def resolve_key(
    checkpoint_dir: str | os.PathLike,
    key_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> bytes:
    """The signing key: key file, else ``$STREAM_LEARNER_CHECKPOINT_KEY``, else a generated one.

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> key = resolve_key(directory, environ={})
    >>> key == resolve_key(directory, environ={})  # generated once, then reused
    True
    >>> resolve_key(directory, environ={KEY_ENV: "too short"})
    Traceback (most recent call last):
    ...
    stream_learner.checkpoint.CheckpointError: $STREAM_LEARNER_CHECKPOINT_KEY is shorter than 16 bytes; use a long random secret

    """
    environ = os.environ if environ is None else environ
    if key_file:
        path = Path(key_file)
        try:
            key = path.read_bytes().strip()
        except OSError as error:
            raise CheckpointError(f"cannot read checkpoint key file {path}: {error}") from None
        _warn_if_readable_by_others(path)
        return _checked(key, f"checkpoint key file {path}")
    if environ.get(KEY_ENV):
        return _checked(environ[KEY_ENV].encode("utf-8"), f"${KEY_ENV}")

    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / KEY_FILE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _warn_if_readable_by_others(path)
        return _checked(path.read_bytes().strip(), f"generated key file {path}")
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode("ascii"))
        handle.flush()
        os.fsync(handle.fileno())
    log.warning(
        "no checkpoint key given: generated one in %s (mode 0600). Anyone who can write the "
        "checkpoint directory can read it; set $%s or --checkpoint-key-file to keep the key "
        "elsewhere.",
        path,
        KEY_ENV,
    )
    return path.read_bytes().strip()


def _checked(key: bytes, where: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise CheckpointError(
            f"{where} is shorter than {MIN_KEY_BYTES} bytes; use a long random secret"
        )
    return key


def _warn_if_readable_by_others(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            log.warning("checkpoint key file %s is readable by other users; chmod 600 it", path)


class CheckpointStore:
    """Numbered checkpoint files in one directory; the newest ``keep`` are kept.

    Parameters
    ----------
    directory
        Where checkpoints live (created if missing).
    key
        HMAC key (see :func:`resolve_key`).
    keep
        How many checkpoints to keep; older ones are deleted after each save.

    """

    def __init__(self, directory: str | os.PathLike, key: bytes, keep: int = 3):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.key = key
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(".ckpt-*.tmp"):
            leftover.unlink(missing_ok=True)  # a save that died before its rename

    def __repr__(self) -> str:  # never show the key
        return f"CheckpointStore({str(self.directory)!r}, keep={self.keep})"

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def save(
        self,
        state: Any,
        offsets: Mapping[tuple[str, int], int],
        info: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a new checkpoint atomically (temp file, fsync, rename, fsync dir)."""
        existing = self.paths()
        sequence = (int(_NAME.match(existing[-1].name).group(1)) + 1) if existing else 1
        header = {
            "sequence": sequence,
            "created": time.time(),
            "offsets": [[topic, partition, offset] for (topic, partition), offset in sorted(offsets.items())],
            "info": dict(info or {}),
        }
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
        # No concatenation of the (possibly large) pickle: hash and write the parts.
        parts = (
            MAGIC,
            struct.pack(">I", len(header_bytes)) + header_bytes,
            pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),
        )
        digest, signature = hashlib.sha256(), hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            digest.update(part)
            signature.update(part)

        path = self.directory / f"ckpt-{sequence:012d}.slck"
        temp = self.directory / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(temp, "wb") as handle:
                handle.write(MAGIC + digest.digest() + signature.digest())
                handle.write(parts[1])
                handle.write(parts[2])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def read(self, path: str | os.PathLike) -> Checkpoint:
        """Verify and load one file; raises :class:`CheckpointCorrupt` or :class:`CheckpointRefused`."""
        path = Path(path)
        data = path.read_bytes()
        if not data.startswith(MAGIC):
            if len(data) < len(MAGIC) and MAGIC.startswith(data):
                raise CheckpointCorrupt(f"{path}: truncated ({len(data)} bytes)")
            raise CheckpointRefused(
                f"{path}: not a signed stream-learner checkpoint (no signature header); "
                "refusing to unpickle it"
            )
        start = len(MAGIC) + _HEADER.size
        if len(data) < start:
            raise CheckpointCorrupt(f"{path}: truncated ({len(data)} bytes)")
        digest, signature, header_length = _HEADER.unpack_from(data, len(MAGIC))
        body = memoryview(data)[len(MAGIC) + 64 :]
        actual = hashlib.sha256(MAGIC)
        actual.update(body)
        if not hmac.compare_digest(actual.digest(), digest):
            raise CheckpointCorrupt(f"{path}: content does not match its checksum (damaged)")
        expected = hmac.new(self.key, MAGIC, hashlib.sha256)
        expected.update(body)
        expected = expected.digest()
        if not hmac.compare_digest(expected, signature):
            raise CheckpointRefused(
                f"{path}: signature does not match the checkpoint key (tampered, or written "
                f"with another key); refusing to unpickle it. Check ${KEY_ENV} / "
                "--checkpoint-key-file, or move the file away."
            )
        try:
            header = json.loads(data[start : start + header_length])
            state = pickle.loads(data[start + header_length :])
        except Exception as error:  # signed by us, yet unreadable: e.g. a class that moved
            raise CheckpointCorrupt(f"{path}: signed but unreadable: {error!r}") from error
        offsets = {(topic, int(partition)): int(offset) for topic, partition, offset in header["offsets"]}
        return Checkpoint(
            sequence=int(header["sequence"]),
            created=float(header["created"]),
            offsets=offsets,
            state=state,
            path=path,
            info=header.get("info", {}),
        )

    def load_latest(self) -> Checkpoint | None:
        """The newest valid checkpoint, skipping (and reporting) corrupt ones; None if there is none.

        A refused file (tampered or unsigned) stops the search with :class:`CheckpointRefused`.
        """
        for path in reversed(self.paths()):
            try:
                checkpoint = self.read(path)
            except CheckpointCorrupt as error:
                log.error("corrupt checkpoint skipped, trying the previous one: %s", error)
                continue
            log.info(
                "loaded checkpoint %s (sequence %d, %d partition offsets)",
                path.name,
                checkpoint.sequence,
                len(checkpoint.offsets),
            )
            return checkpoint
        return None


def _fsync_directory(directory: Path) -> None:
    # Make the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DirectoryLock:
    """An exclusive lock on a checkpoint directory: two workers must not share one.

    The lock is released by the kernel when the process dies, even on ``kill -9``.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / "lock"
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(
                f"checkpoint directory {self.path.parent} is in use by another worker; "
                "give each worker its own --checkpoint-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
