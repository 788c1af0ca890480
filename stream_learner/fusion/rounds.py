"""The worker's side of fusion: when to hold a round, and what a round does (publish this
worker's snapshots to the models topic, fold in its peers' from the feed)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from stream_learner.io.retry import describe

if TYPE_CHECKING:
    from stream_learner.fusion.fusion import Fusion, ModelFeed

__all__ = ["FusionRounds"]

log = logging.getLogger(__name__)


class FusionRounds:
    """Fusion rounds of one worker.

    Parameters
    ----------
    fusion
        The rules and the snapshots' state (:class:`~stream_learner.fusion.fusion.Fusion`).
    feed
        The peers' snapshots, read from the models topic (None: publish only).
    topic
        The models topic (default: the feed's).
    start_wait
        Seconds :meth:`start` waits for the feed to read the topic to its end.

    """

    def __init__(
        self,
        fusion: Fusion,
        feed: ModelFeed | None = None,
        *,
        topic: str | None = None,
        start_wait: float = 15.0,
    ):
        self.fusion = fusion
        self.feed = feed
        self.topic = topic if topic is not None or feed is None else feed.topic
        self.start_wait = start_wait
        self.since_round = 0  # records processed since the last round
        self._peers_logged: dict | None = None

    def state(self) -> dict:
        """What goes into the worker's checkpoint."""
        return self.fusion.state()

    def start(self, processor) -> bool:
        """Before the first poll: journal the learners' increments, and fold in what the peers
        learned (a worker that joins late does not start from scratch). True if it folded."""
        self.fusion.attach(processor)
        if self.feed is None:
            return False
        if not self.feed.wait_caught_up(self.start_wait):
            log.warning(
                "models topic not read to its end within %.0f s; starting without it",
                self.start_wait,
            )
        return self.fold(processor)

    def processed(self, records: int) -> None:
        self.since_round += records

    def due(self) -> bool:
        return self.fusion.due(records=self.since_round)

    def round(self, processor, sink) -> bool:
        """Publish what we learned since the last round, fold in what the peers published.
        True if the learners changed."""
        self.since_round = 0
        self.publish_snapshots(processor, sink)
        return self.fold(processor)

    def publish_snapshots(self, processor, sink, full: bool | None = None) -> None:
        try:
            messages = self.fusion.snapshots(processor, full=full)
        except Exception as error:  # a learner that cannot be snapshot must not stop learning
            log.error("cannot publish learner snapshots: %s", describe(error))
            return
        self._send(sink, messages)

    def publish_tombstones(self, sink) -> None:
        """A clean exit: delete our keys from the models topic, so peers forget us at once."""
        try:
            earlier = self.feed.own_keys() if self.feed is not None else {}
            messages = self.fusion.tombstones(earlier)
        except Exception as error:
            log.error("cannot publish tombstones for our snapshots: %s", describe(error))
            return
        self._send(sink, messages)

    def _send(self, sink, messages) -> None:
        for key, value, headers in messages:
            sink.send(self.topic, key, value, headers)
        sink.dispatch()

    def fold(self, processor) -> bool:
        """Fold the peers' newest snapshots into ``processor``; True if a learner changed
        (its model version moves on)."""
        if self.feed is None:
            return False
        peers = self.feed.latest()
        try:
            used = self.fusion.fold(processor, peers)
        except Exception as error:
            log.error(
                "folding the peers' snapshots failed (learners unchanged where it failed): %s",
                describe(error),
            )
            return False
        changed = any(used.values())
        if changed:
            processor.model_version += 1
        if used != self._peers_logged:
            self._peers_logged = used
            log.info(
                "fused with peers: %s",
                "; ".join(f"{name} <- {','.join(w) or '-'}" for name, w in used.items()),
            )
        return changed
