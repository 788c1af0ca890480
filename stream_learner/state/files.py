"""Private, durable files: checkpoints, keys and saved models.

Checkpoints hold the label buffer (users' texts) and keys sign them: both are written mode
0600 in directories created 0700, and replaced atomically (a reader sees the old file or the
new one, never a torn one, even after a power cut).

>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "private" / "model.bin"
>>> _ = atomic_write(path, [b"weights"])
>>> path.read_bytes(), oct(path.stat().st_mode & 0o777), oct(path.parent.stat().st_mode & 0o777)
(b'weights', '0o600', '0o700')

"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write", "fsync_directory", "private_directory"]


def private_directory(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents) mode 0700; an existing directory is left as it is."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def atomic_write(
    path: str | os.PathLike, chunks: Iterable[bytes], *, mode: int = 0o600, replace: bool = True
) -> Path:
    """Write ``chunks`` to ``path`` through a temporary file: fsync, rename, fsync the directory.

    The parent directory is created 0700 if missing. A failure leaves no temporary file.
    ``replace=False`` publishes the file only if ``path`` does not exist yet (a hard link, which
    is atomic too), else raises :class:`FileExistsError`: the first of several writers wins.
    """
    path = Path(path)
    private_directory(path.parent)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
            temp.unlink()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (where the platform lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
