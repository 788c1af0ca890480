"""The delayed-label buffer: what was predicted for an unlabelled record, until its label comes.

Bounded in entries (oldest evicted first) and in age (entries older than ``ttl`` seconds
expire). Evictions, expiries and labels that match nothing are counted, never raised.

>>> buffer = LabelBuffer(max_entries=2, ttl=60.0)
>>> buffer.put("a", features={0: {1: 1}}, predictions={}, now=0.0)
>>> buffer.put("b", features={0: {2: 1}}, predictions={}, now=1.0)
>>> buffer.put("c", features={0: {3: 1}}, predictions={}, now=2.0)  # evicts "a"
>>> buffer.pop("a", now=3.0) is None, buffer.pop("b", now=3.0) is not None
(True, True)
>>> buffer.pop("c", now=100.0) is None  # expired
True
>>> buffer.stats()
{'size': 0, 'evicted': 1, 'expired': 1, 'unmatched': 2, 'joined': 1}

"""

from __future__ import annotations

import collections
import dataclasses

__all__ = ["LabelBuffer", "PendingRecord"]


@dataclasses.dataclass(slots=True)
class PendingRecord:
    features: dict  # featurizer key -> x (the learner's input, computed once)
    predictions: dict  # learner name -> (label, proba) made back then
    served: tuple | None  # (label, proba, learner) that was served
    inserted: float


class LabelBuffer:
    """Pending unlabelled records keyed by id.

    Parameters
    ----------
    max_entries
        Most records held; the oldest is evicted to make room.
    ttl
        Seconds a record waits for its label; None waits forever (still bounded by count).

    """

    def __init__(self, max_entries: int = 100_000, ttl: float | None = 3600.0):
        self.max_entries = max_entries
        self.ttl = ttl
        self._pending: collections.OrderedDict[str, PendingRecord] = collections.OrderedDict()
        self.evicted = 0
        self.expired = 0
        self.unmatched = 0
        self.joined = 0

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, record_id: str, *, features: dict, predictions: dict, now: float, served=None):
        pending = self._pending
        self.expire(now)
        if record_id in pending:
            del pending[record_id]  # a repeated id: the newer prediction wins
        while len(pending) >= self.max_entries:
            pending.popitem(last=False)
            self.evicted += 1
        pending[record_id] = PendingRecord(features, predictions, served, now)

    def pop(self, record_id: str, *, now: float) -> PendingRecord | None:
        self.expire(now)
        entry = self._pending.pop(record_id, None)
        if entry is None:
            self.unmatched += 1
        else:
            self.joined += 1
        return entry

    def expire(self, now: float) -> int:
        """Drop records older than ``ttl``; returns how many."""
        if self.ttl is None:
            return 0
        pending = self._pending
        deadline = now - self.ttl
        dropped = 0
        # Insertion order is time order (a re-put moves to the end), so only the head can be old.
        while pending:
            oldest = next(iter(pending.values()))
            if oldest.inserted >= deadline:
                break
            pending.popitem(last=False)
            dropped += 1
        self.expired += dropped
        return dropped

    def stats(self) -> dict[str, int]:
        return {
            "size": len(self._pending),
            "evicted": self.evicted,
            "expired": self.expired,
            "unmatched": self.unmatched,
            "joined": self.joined,
        }
