"""Waiting on a condition, for every test: tests wait for what they need, never a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def poll(condition: Callable[[], T], timeout: float, every: float = 0.05, process=None) -> T | None:
    """The first truthy value of ``condition()`` within ``timeout`` seconds, else None (also as
    soon as ``process``, a Popen, has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline or (process is not None and process.poll() is not None):
            return None
        time.sleep(every)


def wait_for(
    what: str,
    condition: Callable[[], T],
    timeout: float = 60.0,
    log: Path | None = None,
    process=None,
    every: float = 0.05,
) -> T:
    """The first truthy value of ``condition()``; fails after ``timeout`` seconds (or when
    ``process`` exits) with ``what`` and the tail of ``log``."""
    value = poll(condition, timeout, every, process)
    if value:
        return value
    ended = (
        f" (process exited with {process.poll()})"
        if process is not None and process.poll() is not None
        else ""
    )
    tail = (
        Path(log).read_text(errors="replace")[-3000:]
        if log is not None and Path(log).exists()
        else ""
    )
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{ended}\n{tail}")
