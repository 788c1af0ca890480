"""Signed, atomic checkpoints: the learner state and the offsets it is consistent with.

A checkpoint file holds a pickled payload (the worker's state: plain data from the processor's
``state_dict()``, see ``docs/checkpoints.md``; older releases pickled the processor itself) and the offsets of the *next* record to read on every
partition. A file is unpickled only after its HMAC-SHA256 has been checked, and then only
through a restricted unpickler (:mod:`stream_learner.state.unpickle`) that loads learner state and
refuses anything else, so even a signed file cannot run code:

``MAGIC (8) | SHA-256 (32) | HMAC-SHA256 (32) | header length (4) | header JSON | pickle``

Both digests cover the magic and everything after the digests. The plain SHA-256 tells a
damaged file (a torn write, a flipped bit: *corrupt*, moved aside as ``*.corrupt`` and the
previous checkpoint used) from a file whose content is intact but not signed with our key
(*tampered*, or another key: refused with :class:`CheckpointRefused`, never unpickled).
Format 2 (``MAGIC``) is signed with ``derive_key(secret, CHECKPOINT)`` (:mod:`stream_learner.state.keys`),
a key that signs checkpoints only; format 1 files, signed with the secret itself, still load.

A signed manifest (``manifest.json``) remembers which partitions every checkpoint covered and
where this worker began reading each: when the newest checkpoints are corrupt, the worker falls
back to an older one and re-reads what the lost ones had learned (:meth:`CheckpointStore.rewind`).

The secret comes from ``$STREAM_LEARNER_CHECKPOINT_KEY``, or a key file (``--checkpoint-key-file``),
or the default key file :func:`default_key_path` (``$XDG_CONFIG_HOME/stream-learner/checkpoint.key``),
outside every checkpoint directory. With none of them the worker refuses to start, unless
``--generate-key`` asks it to create a random one (mode 0600, in a 0700 directory).

>>> import tempfile
>>> store = CheckpointStore(tempfile.mkdtemp(), key=b"0123456789abcdef0123", keep=2)
>>> _ = store.save({"weights": [1, 2]}, {("reviews", 0): 42})
>>> checkpoint = store.load_latest()
>>> checkpoint.state, checkpoint.offsets, checkpoint.sequence
({'weights': [1, 2]}, {('reviews', 0): 42}, 1)
>>> oct(checkpoint.path.stat().st_mode & 0o777)
'0o600'

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stream_learner.state.files import atomic_write, fsync_directory, private_directory
from stream_learner.state.keys import CHECKPOINT, derive_key
from stream_learner.state.unpickle import UnpicklingRefused, restricted_loads

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointCorrupt",
    "CheckpointRefused",
    "CheckpointStore",
    "DirectoryLock",
    "KEY_ENV",
    "default_key_path",
    "resolve_key",
]

log = logging.getLogger(__name__)

KEY_ENV = "STREAM_LEARNER_CHECKPOINT_KEY"
KEY_FILE_NAME = "checkpoint.key"
MIN_KEY_BYTES = 16
MAGIC = b"SLCKPT\x00\x02"  # format 2: signed with the derived checkpoint key
MAGIC_V1 = b"SLCKPT\x00\x01"  # format 1: signed with the secret itself (still read)
MANIFEST_NAME = "manifest.json"
IDENTITY_NAME = "store-id"
_HEADER = struct.Struct(">32s32sI")
_NAME = re.compile(r"^ckpt-(\d{12})\.slck$")
_CORRUPT = re.compile(r"^ckpt-(\d{12})\.slck(\.\d+)?\.corrupt$")
# Exactly-once: a checkpoint written before its transaction commits; renamed to ckpt-N.slck
# (final) once it has, deleted if it did not (docs/exactly-once.md). Never loaded as final.
_PENDING = re.compile(r"^ckpt-(\d{12})\.pending$")


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


def default_key_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``--generate-key`` puts the key: ``$XDG_CONFIG_HOME/stream-learner/checkpoint.key``
    (``~/.config/...`` without it), outside every checkpoint directory.

    >>> str(default_key_path({"XDG_CONFIG_HOME": "/etc/xdg"}))
    '/etc/xdg/stream-learner/checkpoint.key'
    """
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "stream-learner" / KEY_FILE_NAME


def resolve_key(
    checkpoint_dir: str | os.PathLike,
    key_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    generate: bool = False,
) -> bytes:
    """The group secret: key file, else ``$STREAM_LEARNER_CHECKPOINT_KEY``, else the default key file.

    A key file that does not exist is created (random, mode 0600) only when ``generate`` is
    true; otherwise a missing key is a :class:`CheckpointError` naming the ways to give one.
    A key generated by older releases in ``<checkpoint dir>/checkpoint.key`` is still used,
    with a warning to move it out.

    >>> import tempfile
    >>> home = {"XDG_CONFIG_HOME": tempfile.mkdtemp()}
    >>> key = resolve_key(tempfile.mkdtemp(), environ=home, generate=True)
    >>> key == resolve_key(tempfile.mkdtemp(), environ=home)  # generated once, then reused
    True
    >>> resolve_key(tempfile.mkdtemp(), environ={KEY_ENV: "too short"})
    Traceback (most recent call last):
    ...
    stream_learner.state.checkpoint.CheckpointError: $STREAM_LEARNER_CHECKPOINT_KEY is shorter than 16 bytes; use a long random secret

    """
    environ = os.environ if environ is None else environ
    if key_file:
        path = Path(key_file)
        if generate and not path.exists():
            return _generate(path)
        try:
            key = path.read_bytes().strip()
        except OSError as error:
            raise CheckpointError(
                f"cannot read checkpoint key file {path}: {error} (--generate-key creates it)"
            ) from None
        _warn_if_readable_by_others(path)
        return _checked(key, f"checkpoint key file {path}")
    if environ.get(KEY_ENV):
        return _checked(environ[KEY_ENV].encode("utf-8"), f"${KEY_ENV}")

    legacy = Path(checkpoint_dir) / KEY_FILE_NAME
    if legacy.exists():
        log.warning(
            "using the checkpoint key %s generated by an older release: anyone who can write the "
            "checkpoint directory can read it; move it elsewhere and give --checkpoint-key-file "
            "(or set $%s)",
            legacy,
            KEY_ENV,
        )
        return _checked(legacy.read_bytes().strip(), f"generated key file {legacy}")
    path = default_key_path(environ)
    if path.exists():
        _warn_if_readable_by_others(path)
        return _checked(path.read_bytes().strip(), f"generated key file {path}")
    if not generate:
        raise CheckpointError(
            f"no checkpoint key: set ${KEY_ENV} or --checkpoint-key-file (the same secret for "
            f"every worker of the group), or pass --generate-key to create one in {path}"
        )
    return _generate(path)


def _generate(path: Path) -> bytes:
    try:
        atomic_write(path, [secrets.token_hex(32).encode("ascii")], replace=False)
    except FileExistsError:  # another worker generated it meanwhile
        return _checked(path.read_bytes().strip(), f"generated key file {path}")
    log.warning(
        "generated a checkpoint key in %s (mode 0600). Every worker of the group needs the same "
        "key: copy it to their --checkpoint-key-file, or set $%s.",
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
        Where checkpoints live (created mode 0700 if missing).
    key
        The group secret (see :func:`resolve_key`); checkpoints are signed with a key
        derived from it for this purpose only.
    keep
        How many checkpoints to keep; older ones are deleted after each save. Corrupt files
        moved aside do not count.
    trusted_modules
        Modules whose classes a checkpoint may hold besides River's, numpy's and
        stream-learner's (those of ``module:factory`` learners).

    """

    def __init__(
        self,
        directory: str | os.PathLike,
        key: bytes,
        keep: int = 3,
        *,
        trusted_modules: Iterable[str] = (),
    ):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = private_directory(directory)
        with contextlib.suppress(OSError):
            if self.directory.stat().st_mode & 0o077:  # made by an older release, or by hand
                log.warning(
                    "checkpoint directory %s is open to other users (checkpoints hold users' "
                    "texts); chmod 700 it",
                    self.directory,
                )
        self.key = key
        self._signing_key = derive_key(key, CHECKPOINT)
        self.keep = keep
        self.trusted_modules = tuple(trusted_modules)
        self.last_sequence = 0  # of the checkpoint saved or loaded last
        self._identity: str | None = None

    def remove_unfinished_saves(self) -> int:
        """Delete the temporary files of saves that died before their rename; returns how many.

        Only the directory's owner may call this (a worker holding its :class:`DirectoryLock`):
        a store opened to read a live directory must not delete its writer's files mid-save.
        """
        removed = 0
        for pattern in (".ckpt-*.tmp", f".{MANIFEST_NAME}.*.tmp"):
            for leftover in self.directory.glob(pattern):
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

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

    def corrupt_paths(self) -> list[Path]:
        """Corrupt checkpoints moved aside (kept for inspection; never loaded)."""
        return sorted(path for path in self.directory.iterdir() if _CORRUPT.match(path.name))

    def pending_paths(self) -> list[Path]:
        """Pending checkpoints (exactly-once: written, their transaction not known committed), oldest first."""
        found = []
        for path in self.directory.iterdir():
            match = _PENDING.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest_pending(self) -> Checkpoint | None:
        """The newest pending checkpoint newer than every final one, or None. Older or damaged
        pending files are deleted (they can never become final)."""
        newest_final = max((int(_NAME.match(p.name).group(1)) for p in self.paths()), default=0)
        found = None
        for path in reversed(self.pending_paths()):
            if found is None and int(_PENDING.match(path.name).group(1)) > newest_final:
                try:
                    found = self.read(path)
                    continue
                except CheckpointCorrupt as error:
                    log.error("damaged pending checkpoint deleted: %s", error)
            self.discard(path)
        return found

    def finalize(self, path: str | os.PathLike) -> Path:
        """Mark a pending checkpoint final (its transaction committed): an atomic rename."""
        path = Path(path)
        match = _PENDING.match(path.name)
        if match is None:
            raise ValueError(f"{path} is not a pending checkpoint")
        final = path.with_name(f"ckpt-{match.group(1)}.slck")
        os.replace(path, final)
        fsync_directory(self.directory)
        self.last_sequence = int(match.group(1))
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def discard(self, path: str | os.PathLike) -> None:
        """Delete a pending checkpoint whose transaction did not commit."""
        Path(path).unlink(missing_ok=True)
        fsync_directory(self.directory)

    def _highest_sequence(self) -> int:
        numbers = [int(_NAME.match(p.name).group(1)) for p in self.paths()]
        numbers += [int(_PENDING.match(p.name).group(1)) for p in self.pending_paths()]
        numbers += [int(_CORRUPT.match(p.name).group(1)) for p in self.corrupt_paths()]
        manifest = self.manifest()
        if manifest is not None:
            numbers.append(manifest["sequence"])
        return max(numbers, default=0)

    def save(
        self,
        state: Any,
        offsets: Mapping[tuple[str, int], int],
        info: Mapping[str, Any] | None = None,
        *,
        started: Mapping[tuple[str, int], int] | None = None,
        pending: bool = False,
    ) -> Path:
        """Write a new checkpoint atomically (temp file, fsync, rename, fsync dir); with
        ``pending`` as ``ckpt-N.pending``, final only after :meth:`finalize`.

        ``started`` is, per partition, the offset where this worker began reading it (for
        :meth:`rewind`; a partition missing from it began at offset 0). The manifest is
        written first: a crash between the two leaves it saying more than the files, which
        can only make a fallback re-read more, never less.
        """
        sequence = self._highest_sequence() + 1
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
        digest, signature = hashlib.sha256(), hmac.new(self._signing_key, digestmod=hashlib.sha256)
        for part in parts:
            digest.update(part)
            signature.update(part)

        self._record_in_manifest(sequence, offsets, started or {})
        path = self.directory / f"ckpt-{sequence:012d}.{'pending' if pending else 'slck'}"
        atomic_write(path, [MAGIC + digest.digest() + signature.digest(), parts[1], parts[2]])
        if pending:
            return path
        self.last_sequence = sequence
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def read(self, path: str | os.PathLike) -> Checkpoint:
        """Verify and load one file; raises :class:`CheckpointCorrupt` or :class:`CheckpointRefused`."""
        path = Path(path)
        data = path.read_bytes()
        magic = data[: len(MAGIC)]
        if magic not in (MAGIC, MAGIC_V1):
            if len(data) < len(MAGIC) and (MAGIC.startswith(data) or MAGIC_V1.startswith(data)):
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
        actual = hashlib.sha256(magic)
        actual.update(body)
        if not hmac.compare_digest(actual.digest(), digest):
            raise CheckpointCorrupt(f"{path}: content does not match its checksum (damaged)")
        expected = hmac.new(self._signing_key if magic == MAGIC else self.key, magic, hashlib.sha256)
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
            state = restricted_loads(data[start + header_length :], trusted_modules=self.trusted_modules)
        except UnpicklingRefused as error:
            raise CheckpointRefused(
                f"{path}: {error}; nothing of it was run. Move the file away if it is not yours."
            ) from None
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
        """The newest valid checkpoint, moving corrupt ones aside (``*.corrupt``); None if none.

        A refused file (tampered, unsigned, or holding what a checkpoint may not) stops the
        search with :class:`CheckpointRefused`.
        """
        for path in reversed(self.paths()):
            try:
                checkpoint = self.read(path)
            except CheckpointCorrupt as error:
                aside = self._move_aside(path)
                log.error("corrupt checkpoint moved aside to %s, trying the previous one: %s", aside.name, error)
                continue
            log.info(
                "loaded checkpoint %s (sequence %d, %d partition offsets)",
                path.name,
                checkpoint.sequence,
                len(checkpoint.offsets),
            )
            self.last_sequence = checkpoint.sequence
            return checkpoint
        return None

    def _move_aside(self, path: Path) -> Path:
        aside = path.with_name(path.name + ".corrupt")
        n = 1
        while aside.exists():
            aside = path.with_name(f"{path.name}.{n}.corrupt")
            n += 1
        os.replace(path, aside)
        fsync_directory(self.directory)
        return aside

    @property
    def identity(self) -> str:
        """A random name of this directory's lineage of checkpoints (in every commit's metadata,
        so a worker knows its own commits even when another worker has the same id)."""
        if self._identity is None:
            path = self.directory / IDENTITY_NAME
            try:
                self._identity = path.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                self._identity = secrets.token_hex(8)
                atomic_write(path, [self._identity.encode("ascii")])
        return self._identity

    def had_checkpoints(self) -> bool:
        """Whether checkpoint files are here, valid or moved aside as corrupt. (Not the manifest
        alone: it is written first, so a worker that died during its first save has none.)"""
        return bool(self.paths() or self.corrupt_paths())

    # -- the manifest: which partitions the checkpoints covered --------------------------

    def manifest(self) -> dict | None:
        """``{"sequence": highest saved, "partitions": {(topic, partition): (last sequence,
        start offset)}}``, or None when there is none or it does not verify."""
        path = self.directory / MANIFEST_NAME
        try:
            document = json.loads(path.read_bytes())
            body = document["body"]
            mac = hmac.new(self._signing_key, b"manifest" + body.encode("utf-8"), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(mac, document["mac"]):
                raise ValueError("its signature does not match the checkpoint key")
            content = json.loads(body)
            return {
                "sequence": int(content["sequence"]),
                "partitions": {
                    (topic, int(partition)): (int(last), int(first))
                    for topic, partition, last, first in content["partitions"]
                },
            }
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.error("checkpoint manifest %s unreadable (%s); the commit metadata stands in for it", path, error)
            return None

    def _record_in_manifest(self, sequence: int, offsets, started) -> None:
        manifest = self.manifest() or {"sequence": 0, "partitions": {}}
        partitions = manifest["partitions"]
        for tp in offsets:
            first = partitions[tp][1] if tp in partitions else int(started.get(tp, 0))
            partitions[tp] = (sequence, first)
        body = json.dumps(
            {
                "sequence": max(sequence, manifest["sequence"]),
                "partitions": [[t, p, last, first] for (t, p), (last, first) in sorted(partitions.items())],
            },
            sort_keys=True,
        )
        mac = hmac.new(self._signing_key, b"manifest" + body.encode("utf-8"), hashlib.sha256).hexdigest()
        atomic_write(self.directory / MANIFEST_NAME, [json.dumps({"body": body, "mac": mac}).encode("utf-8")])

    def rewind(self, checkpoint: Checkpoint | None) -> dict[tuple[str, int], int]:
        """Partitions that newer checkpoints than ``checkpoint`` covered and it does not:
        where to re-read each from (where this worker began it), whatever was committed since.

        Partitions ``checkpoint`` covers need nothing: the worker seeks to its offsets anyway.
        """
        manifest = self.manifest()
        if manifest is None:
            return {}
        loaded = checkpoint.sequence if checkpoint is not None else 0
        covered = checkpoint.offsets if checkpoint is not None else {}
        return {
            tp: first
            for tp, (last, first) in manifest["partitions"].items()
            if last > loaded and tp not in covered
        }


class DirectoryLock:
    """An exclusive lock on a checkpoint directory: two workers must not share one.

    The lock is released by the kernel when the process dies, even on ``kill -9``.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / "lock"
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        import fcntl

        private_directory(self.path.parent)
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
