"""``stream-learner produce``: send a dataset or a file to a Kafka topic, one JSON message per record.

The key of each message is the record id, so a record and its late label land on the same
partition (and, with ``--labels-topic`` co-partitioned, on the same worker). With
``--labels-delay N`` the labels are held back: each record goes out unlabelled and its label
follows N records later as a label-only message ``{"id": ..., "label": ...}``.

The field options (``--text-field`` and the others) name the fields of the records on both
sides: the columns or JSON fields read from the file, and the JSON fields of the messages sent,
so ``produce --text-field body`` and ``run --text-field body`` agree. ``--pass-through`` sends
each line of a JSONL or text file unchanged instead (the worker decides what it makes of it).

A line that is not a record is skipped and counted by reason (``--on-error stop`` stops at the
first one instead); the command always ends by saying what it sent and what it skipped.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from stream_learner.core.records import Decoder, Record

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
    from stream_learner.cli.evaluate import delay_labels

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
    decoder: Decoder | None = None,
    client_options: Mapping | None = None,
    stop: threading.Event | None = None,
    progress=None,
) -> int:
    """Send records as JSON messages keyed by id; returns the number of messages sent.

    ``decoder`` names the messages' fields (default: ``id``, ``text``, ``label``, ``ts``).
    """
    messages = record_messages(
        records, topic, labels_delay=labels_delay, labels_topic=labels_topic, decoder=decoder
    )
    return produce_messages(
        messages,
        bootstrap_servers=bootstrap_servers,
        rate=rate,
        client_options=client_options,
        stop=stop,
        progress=progress,
    )


def raw_line_messages(path, topic: str, limit: int | None = None):
    """``(topic, None, line)`` for each non-blank line of a JSONL or text file, unchanged."""
    from stream_learner.data.readers import read_raw_lines

    for count, line in enumerate(read_raw_lines(path)):
        if limit is not None and count >= limit:
            return
        yield topic, None, line


def add_produce_parser(subparsers) -> None:
    from stream_learner.data.readers import add_field_arguments

    env = os.environ.get
    parser = subparsers.add_parser(
        "produce",
        help="send a dataset or file to a Kafka topic (key = record id)",
        description="Send SOURCE (a fetched dataset name or a .jsonl/.csv/.tsv/.txt file) to a "
        "topic, one JSON message per record keyed by its id. Lines that are not records are "
        "skipped and counted by reason.",
    )
    parser.add_argument("source", metavar="SOURCE", help="dataset name or file path")
    parser.add_argument(
        "--topic",
        default=env("STREAM_LEARNER_TOPIC"),
        help="topic to send to (env STREAM_LEARNER_TOPIC; required)",
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=env("STREAM_LEARNER_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (env STREAM_LEARNER_BOOTSTRAP_SERVERS; default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="messages per second (default: as fast as possible)",
    )
    parser.add_argument(
        "--labels-delay",
        type=int,
        default=None,
        metavar="N",
        help="send records unlabelled and each label N records later as a label-only message "
        "(default: labels go with their records)",
    )
    parser.add_argument(
        "--labels-topic",
        default=None,
        help="send the late labels to this topic (default: the --topic itself)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="send at most this many records (default: all)"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="create the topic(s) with this many partitions if missing (default: leave topics "
        "to the broker)",
    )
    add_field_arguments(parser, what="of the file's records and of the messages sent")
    parser.add_argument(
        "--on-error",
        choices=("skip", "stop"),
        default="skip",
        help="a line that is not a record: skip and count it by reason, or stop there "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pass-through",
        action="store_true",
        help="send each line of a JSONL or text file unchanged, without reading it as a record "
        "(no key; the field options and --labels-delay do not apply)",
    )
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from stream_learner.data.datasets import DatasetError
    from stream_learner.data.readers import field_options, iter_records
    from stream_learner.io.logs import quiet_kafka_client_logs

    quiet_kafka_client_logs()
    if not args.topic:
        log.error("name the topic to send to with --topic (or $STREAM_LEARNER_TOPIC)")
        return 2
    if args.pass_through and (args.labels_delay is not None or args.labels_topic):
        log.error("--pass-through sends lines unchanged; it cannot hold labels back")
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    skipped: Counter[str] = Counter()
    stopped_at: list[DatasetError] = []

    def on_skip(problem: DatasetError) -> None:
        skipped[problem.reason or "unreadable"] += 1
        if args.on_error == "stop":
            stopped_at.append(problem)
            stop.set()

    started = time.monotonic()
    sent = 0
    try:
        if args.pass_through:
            messages = raw_line_messages(args.source, args.topic, limit=args.limit)
        else:
            fields = field_options(args)
            records = iter_records(
                args.source, limit=args.limit, on_error="skip", on_skip=on_skip, **fields
            )
            messages = record_messages(
                records,
                args.topic,
                labels_delay=args.labels_delay,
                labels_topic=args.labels_topic,
                decoder=Decoder(**fields),
            )
        if args.partitions:
            from stream_learner.io.broker import create_topics

            topics = {args.topic: args.partitions}
            if args.labels_topic:
                topics[args.labels_topic] = args.partitions
            create_topics(args.bootstrap_servers, topics)
        sent = produce_messages(
            messages, bootstrap_servers=args.bootstrap_servers, rate=args.rate, stop=stop
        )
    except DatasetError as error:
        log.error("%s", error)
        _summary(args.topic, sent, skipped, time.monotonic() - started)
        return 2
    _summary(args.topic, sent, skipped, time.monotonic() - started)
    if stopped_at:
        log.error("stopped at the first bad line (--on-error stop): %s", stopped_at[0])
        return 2
    return 0


def _summary(topic: str, sent: int, skipped: Counter, seconds: float) -> None:
    line = f"sent {sent:,} messages to {topic} in {seconds:.1f} s"
    if skipped:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in skipped.most_common())
        line += f"; skipped {sum(skipped.values()):,} lines that are not records ({reasons})"
    else:
        line += "; skipped none"
    print(line, flush=True)
