"""Logging set-up shared by the commands and the child processes that talk to Kafka."""

from __future__ import annotations

import logging

__all__ = ["quiet_kafka_client_logs"]


def quiet_kafka_client_logs(level: int | None = None) -> None:
    """Hide kafka-python's INFO chatter unless ``level`` (default: the root's) is DEBUG.

    Its connection churn while a broker is away is logged by us, once per retry and clearly,
    so its own lines about it are hidden altogether.
    """
    if level is None:
        level = logging.getLogger().getEffectiveLevel()
    if level <= logging.DEBUG:
        return
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for name in ("kafka.net", "kafka.cluster", "kafka.producer.sender"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
