"""Kafka clients side by side: kafka-python (the anchor) and confluent-kafka (librdkafka)
reading the same topic of small messages from an embedded Tansu broker, in one run.

Two levels, each client in turn, alternating over the repeats:

* ``bare`` — the client's own consumer, partitions assigned (no group join), read from the
  beginning until every message is in: ``KafkaConsumer.poll`` / ``Consumer.consume``.
* ``source`` — the worker's source (:class:`~stream_learner.io.sources.KafkaSource`,
  :class:`~stream_learner.io.confluent.ConfluentSource`): group member, manual commits, messages
  converted to :class:`~stream_learner.io.sources.Message`; timed from its first message, so the
  group join is not counted.

Reported: records per second (wall) and process CPU seconds per 100k records (librdkafka and
kafka-python both read on their own threads; process CPU time counts them), and the ratio to
kafka-python's records per second in the same run. At the ``source`` level librdkafka has
prefetched (up to 100,000 messages, its ``queued.min.messages``) while the untimed group join
went on, so its wall rate there flatters it; CPU seconds per record do not depend on that.

    .venv/bin/python -m benchmarks.clients                       # 100,000 messages, 3 repeats
    .venv/bin/python -m benchmarks.clients --messages 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from stream_learner.io.broker import EmbeddedBroker, create_topics
from stream_learner.io.sources import StartAtCommitted

RESULTS = Path(__file__).parent / "results"


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def produce(bootstrap: str, topic: str, count: int, size: int) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 256 * 1024})
    value = b"x" * size
    for i in range(count):
        while True:
            try:
                producer.produce(topic, value, f"k{i}".encode())
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0, "not every message was delivered"


def bare_kafka_python(bootstrap: str, topic: str, count: int, partitions: int) -> tuple[float, float]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=500)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        seen = 0
        wall, cpu = time.perf_counter(), _cpu()
        while seen < count:
            for records in consumer.poll(timeout_ms=1000).values():
                seen += len(records)
        return time.perf_counter() - wall, _cpu() - cpu
    finally:
        consumer.close()


def bare_confluent(bootstrap: str, topic: str, count: int, partitions: int) -> tuple[float, float]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-unused", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        seen = 0
        wall, cpu = time.perf_counter(), _cpu()
        while seen < count:
            for message in consumer.consume(500, 1.0):
                if message.error() is None:
                    seen += 1
        return time.perf_counter() - wall, _cpu() - cpu
    finally:
        consumer.close()


def through_source(client: str, bootstrap: str, topic: str, count: int, group: str) -> tuple[float, float]:
    if client == "confluent":
        from stream_learner.io.confluent import ConfluentSource as source_class
    else:
        from stream_learner.io.sources import KafkaSource as source_class
    source = source_class([topic], bootstrap_servers=bootstrap, group_id=group, handler=StartAtCommitted(), session_timeout_ms=6000)
    try:
        batch = []
        while not batch:  # the group join is not timed
            batch = source.poll(1.0)
        seen = len(batch)
        wall, cpu = time.perf_counter(), _cpu()
        while seen < count:
            seen += len(source.poll(1.0))
        return time.perf_counter() - wall, _cpu() - cpu
    finally:
        source.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100, help="bytes per message value")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topic = "bench-clients"
        create_topics(bootstrap, {topic: args.partitions})
        produce(bootstrap, topic, args.messages, args.size)
        for repeat in range(args.repeats):
            order = ["kafka-python", "confluent"] if repeat % 2 == 0 else ["confluent", "kafka-python"]
            for level in ("bare", "source"):
                for client in order:
                    if level == "bare":
                        run = bare_confluent if client == "confluent" else bare_kafka_python
                        seconds, cpu = run(bootstrap, topic, args.messages, args.partitions)
                    else:
                        seconds, cpu = through_source(client, bootstrap, topic, args.messages, f"bench-{repeat}-{client}")
                    rate = args.messages / seconds
                    results.setdefault((level, client), []).append((rate, cpu, seconds))
                    print(f"repeat {repeat} {level:6} {client:12} {rate:12,.0f} records/s  "
                          f"{cpu / args.messages * 1e5:6.2f} CPU s / 100k", flush=True)
    lines = [
        "# Kafka clients side by side",
        "",
        f"{args.messages:,} messages of {args.size} B, {args.partitions} partitions, embedded Tansu broker; "
        f"median of {args.repeats}; ratio = records/s against kafka-python in the same run. "
        f"Load average {os.getloadavg()[0]:.1f} at the end. Reproduce: `.venv/bin/python -m benchmarks.clients"
        f" --messages {args.messages} --repeats {args.repeats}` (the module docstring explains the levels).",
        "",
        "| level | client | records/s | CPU s per 100k | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for level in ("bare", "source"):
        anchor = statistics.median(r for r, _, _ in results[(level, "kafka-python")])
        for client in ("kafka-python", "confluent"):
            rate = statistics.median(r for r, _, _ in results[(level, client)])
            cpu = statistics.median(c for _, c, _ in results[(level, client)]) / args.messages * 1e5
            lines.append(f"| {level} | {client} | {rate:,.0f} | {cpu:.2f} | {rate / anchor:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "clients.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
