"""Event-time alignment across partitions (``--max-event-time-skew``).

A consumer reads a partition's fetch, thousands of records, before the next partition's: on a
backlog one partition can run far ahead of another, and a learner would learn "the future" of
the stream before predicting its past. :class:`PartitionAlignment` pauses the partitions that
run ahead and resumes them once the others catch up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from stream_learner.io.retry import describe
from stream_learner.io.sources import Partition, Source

__all__ = ["PartitionAlignment"]

log = logging.getLogger(__name__)


class PartitionAlignment:
    """Pause partitions whose records run more than ``max_skew`` seconds of event time ahead
    of the owned partition furthest behind that still has records to read.

    The worker tells it each record's event time (:meth:`saw`), which partitions gave records
    (:meth:`gave`), and calls :meth:`align` after each poll.
    """

    # Empty polls in a row, while partitions wait, before the ones behind count as stalled: one
    # empty poll can be a fetch slower than the poll timeout on a loaded broker.
    EMPTY_POLLS_TO_STALL = 2

    def __init__(self, max_skew: float):
        self.max_skew = max_skew
        self.event_times: dict[Partition, float] = {}  # newest event time read, per partition
        self.paused: set[Partition] = set()  # paused by alignment (maybe no longer owned)
        self._stalled: set[Partition] = set()  # behind, yet gave nothing while others waited
        self._empty_polls = 0  # in a row, while some partitions were paused

    def saw(self, tp: Partition, when: float | None) -> None:
        """A record of ``tp`` with event time ``when`` (None: unknown) was read."""
        if when is not None and when > self.event_times.get(tp, float("-inf")):
            self.event_times[tp] = when

    def gave(self, partitions: Iterable[Partition]) -> None:
        """These partitions gave records: they may hold the others back again."""
        self._stalled.difference_update(partitions)

    def align(
        self,
        source: Source,
        owned: set[Partition],
        offsets: Mapping[Partition, int],
        *,
        polled: bool = True,
    ) -> None:
        """Pause the partitions that run ahead in event time, resume those that no longer do.
        ``owned``: the worker's partitions; ``offsets``: its next offset per partition;
        ``polled``: the last poll gave records."""
        owned = owned & source.assignment()
        self._empty_polls = self._empty_polls + 1 if not polled and self.paused & owned else 0
        if self._empty_polls >= self.EMPTY_POLLS_TO_STALL:
            # Nothing came while some partitions waited: the ones behind have nothing to give
            # after all (an old highwater, say). They hold nobody back until they give again.
            self._stalled |= owned - self.paused
        try:
            lags = source.lag(offsets)
        except Exception:  # lag is a hint: without it, read as if unaligned
            lags = {}
        # Partitions with records to read, or that may have (nothing read, no highwater yet);
        # one that has given nothing yet counts as furthest behind: its records may be the
        # oldest. If it has none after all, empty polls mark it stalled.
        waiting = {
            tp
            for tp in owned - self._stalled
            if lags.get(tp, 0) > 0 or (tp not in lags and tp not in self.event_times)
        }
        ahead = set()
        if waiting:
            times = {tp: self.event_times.get(tp, float("-inf")) for tp in waiting}
            limit = min(times.values()) + self.max_skew
            ahead = {tp for tp, when in times.items() if when > limit}
        try:
            if ahead - self.paused:
                source.pause(ahead - self.paused)
            # Partitions paused before a rebalance may come back still paused (librdkafka).
            if (self.paused & owned) - ahead:
                source.resume((self.paused & owned) - ahead)
        except Exception as error:  # ordering is best effort; never stop reading for it
            log.warning(
                "could not pause or resume partitions for event-time alignment: %s", describe(error)
            )
            return
        self.paused = (self.paused - owned) | ahead
