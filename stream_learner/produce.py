"""``stream-learner produce``: send a dataset or a file to a Kafka topic, one JSON message per record.

The key of each message is the record id, so a record and its late label land on the same
partition (and, with ``--labels-topic`` co-partitioned, on the same worker). With
``--labels-delay N`` the labels are held back: each record goes out unlabelled and its label
follows N records later as a label-only message ``{"id": ..., "label": ...}``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping

from .records import Decoder, Record

__all__ = ["produce_records", "produce_messages", "add_produce_parser"]

log = logging.getLogger(__name__)


def produce_messages(
    messages: Iterable[tuple[str, bytes | None, bytes | None]],
    *,
    bootstrap_servers: str,
    rate: float | None = None,
    client_options: Mapping | None = None,
    stop: threading.Event | None = None,
    progress=None,
) -> int:
    """Send ``(topic, key, value)`` triples, at most ``rate`` per second; returns how many.

    The producer is idempotent and every send is confirmed before this returns.
    """
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=True,
        acks="all",
        linger_ms=10,
        **dict(client_options or {}),
    )
    sent = 0
    start = time.monotonic()
    try:
        for topic, key, value in messages:
            if stop is not None and stop.is_set():
                break
            if rate:
                wait = start + sent / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            producer.send(topic, key=key, value=value)
            sent += 1
            if progress is not None and sent % 1000 == 0:
                progress(sent)
        producer.flush()
    finally:
        producer.close()
    return sent


def record_messages(
    records: Iterable[Record],
    topic: str,
    *,
    labels_delay: int | None = None,
    labels_topic: str | None = None,
    decoder: Decoder | None = None,
):
    """``(topic, key, value)`` for each record, labels held back ``labels_delay`` records."""
    from .evaluate import delay_labels

    decoder = decoder or Decoder()
    if labels_delay is not None:
        records = delay_labels(records, labels_delay)
    for record in records:
        target = labels_topic if (labels_topic and record.is_label_only) else topic
        key = record.id.encode("utf-8") if record.id is not None else None
        yield target, key, decoder.encode(record)


def produce_records(
    records: Iterable[Record],
    *,
    bootstrap_servers: str,
    topic: str,
    rate: float | None = None,
    labels_delay: int | None = None,
    labels_topic: str | None = None,
    client_options: Mapping | None = None,
    stop: threading.Event | None = None,
    progress=None,
) -> int:
    """Send records as JSON messages keyed by id; returns the number of messages sent."""
    return produce_messages(
        record_messages(records, topic, labels_delay=labels_delay, labels_topic=labels_topic),
        bootstrap_servers=bootstrap_servers,
        rate=rate,
        client_options=client_options,
        stop=stop,
        progress=progress,
    )


def add_produce_parser(subparsers) -> None:
    env = os.environ.get
    parser = subparsers.add_parser(
        "produce",
        help="send a dataset or file to a Kafka topic (key = record id)",
        description="Send SOURCE (a fetched dataset name or a .jsonl/.csv/.tsv/.txt file) to a "
        "topic, one JSON message per record keyed by its id.",
    )
    parser.add_argument("source", metavar="SOURCE", help="dataset name or file path")
    parser.add_argument("--topic", required=True, help="topic to send to")
    parser.add_argument(
        "--bootstrap-servers",
        default=env("STREAM_LEARNER_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (env STREAM_LEARNER_BOOTSTRAP_SERVERS; default %(default)s)",
    )
    parser.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    parser.add_argument(
        "--labels-delay",
        type=int,
        default=None,
        metavar="N",
        help="send records unlabelled and each label N records later as a label-only message",
    )
    parser.add_argument("--labels-topic", default=None, help="send the late labels to this topic instead")
    parser.add_argument("--limit", type=int, default=None, help="send at most this many records")
    parser.add_argument(
        "--partitions", type=int, default=None, help="create the topic(s) with this many partitions if missing"
    )
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .datasets import DatasetError, iter_records

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.partitions:
        from .broker import create_topics

        topics = {args.topic: args.partitions}
        if args.labels_topic:
            topics[args.labels_topic] = args.partitions
        create_topics(args.bootstrap_servers, topics)
    try:
        records = iter_records(args.source, limit=args.limit)
        started = time.monotonic()
        sent = produce_records(
            records,
            bootstrap_servers=args.bootstrap_servers,
            topic=args.topic,
            rate=args.rate,
            labels_delay=args.labels_delay,
            labels_topic=args.labels_topic,
            stop=stop,
        )
    except DatasetError as error:
        log.error("%s", error)
        return 2
    seconds = time.monotonic() - started
    print(f"sent {sent:,} messages to {args.topic} in {seconds:.1f} s", flush=True)
    return 0
