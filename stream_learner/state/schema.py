"""Versioned state: what every ``state_dict()`` carries and every ``from_state()`` checks.

A state dict is plain data (dicts, lists, numbers, strings, bytes, numpy arrays) with a
``schema`` name and a ``version``. A reader accepts the versions it knows and refuses a newer
one by name, rather than guess at fields it has never seen.

>>> check_schema({"schema": "stream-learner/score", "version": 1}, "stream-learner/score", (1,))
1
>>> check_schema({"schema": "stream-learner/score", "version": 7}, "stream-learner/score", (1,))
Traceback (most recent call last):
...
stream_learner.state.schema.StateError: stream-learner/score state has version 7; this stream-learner reads version 1 (written by a newer release?)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["StateError", "check_schema"]


class StateError(ValueError):
    """A state dict that cannot be read: another schema, a newer version, missing fields."""


def check_schema(state, schema: str, readable: Sequence[int]) -> int:
    """The version of ``state``, if it is a ``schema`` state of a version in ``readable``."""
    if not isinstance(state, Mapping):
        raise StateError(f"expected a {schema} state dict, not {type(state).__name__}")
    if state.get("schema") != schema:
        raise StateError(f"expected a {schema} state, not {state.get('schema')!r}")
    version = state.get("version")
    if version not in readable:
        known = ", ".join(map(str, readable))
        raise StateError(
            f"{schema} state has version {version!r}; this stream-learner reads version {known}"
            + (
                " (written by a newer release?)"
                if isinstance(version, int) and version > max(readable)
                else ""
            )
        )
    return version
