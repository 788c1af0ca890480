"""``stream-learner demo`` (``make demo``): the whole pipeline on one machine, in a few minutes.

1. fetch the VADER dataset (once, from PyPI),
2. start the embedded Tansu broker on a free port and create the topics,
3. produce the stream (tweets → movie reviews → Amazon reviews → NYT editorials: real drift),
4. run the worker with the numpy learner and a River learner side by side, drift detection on,
   the metrics endpoint up, and a live line (records/s, rolling accuracy, drift events),
5. print a summary table and write the accuracy plot,

then stop everything it started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["run_demo", "add_demo_parser"]

TOPIC = "reviews"


def _learners(wanted: list[str]) -> list[str]:
    from stream_learner.learners.registry import available_learners

    known = available_learners()
    chosen = [name for name in wanted if name in known]
    return chosen or ["nb"]


class _LiveLine:
    """One status line, rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.last_count = 0
        self.last_time = self.started
        self.drifts_seen = 0

    def __call__(self, worker) -> None:
        now = time.monotonic()
        count = worker.counts["messages"]
        rate = (count - self.last_count) / max(now - self.last_time, 1e-9)
        self.last_count, self.last_time = count, now
        stats = worker.processor.learner_stats()
        accuracy = "  ".join(
            f"{name} {row['rolling_accuracy']:.3f}" if row["n"] else f"{name} n/a"
            for name, row in stats.items()
        )
        events = list(worker.processor.drift_events)
        total = sum(row.get("drifts", 0) for row in stats.values())
        line = (
            f"{count:>7,} records  {rate:>6,.0f} rec/s  rolling acc: {accuracy}  "
            f"drift events: {total}  lag: {getattr(worker, 'lag', 0):,}"
        )
        # The processor keeps only the newest events: what is new is counted from the end.
        new = min(max(0, total - self.drifts_seen), len(events))
        for event in events[len(events) - new :]:
            self._print(
                f"  drift: {event.learner} at record {event.position:,} "
                f"(rolling acc {event.accuracy_before:.3f}, {event.detector})",
                final=True,
            )
        self.drifts_seen = total
        self._print(line)

    def _print(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_demo(
    *,
    dataset: str = "vader",
    learners: tuple[str, ...] = ("neural", "nb"),
    limit: int | None = None,
    partitions: int = 3,
    output_dir: str | os.PathLike = "demo-output",
    rate: float | None = None,
) -> int:
    from stream_learner.cli.produce import produce_records
    from stream_learner.cli.report import format_table, leaderboard, plot_accuracy
    from stream_learner.data import datasets, readers
    from stream_learner.io.broker import EmbeddedBroker, create_topics
    from stream_learner.runtime.config import load_config
    from stream_learner.runtime.worker import run_worker

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] dataset {dataset}: ", end="", flush=True)
    path = datasets.fetch(dataset)
    records = readers.load_records(dataset, limit=limit)
    print(f"{len(records):,} records ({path})")

    chosen = _learners(list(learners))
    work_dir = Path(tempfile.mkdtemp(prefix="stream-learner-demo-"))
    # A fresh broker holds no offsets: start from fresh checkpoints too, signed with a key
    # that lives only as long as the demo.
    os.environ.setdefault("STREAM_LEARNER_CHECKPOINT_KEY", secrets.token_hex(32))
    broker = EmbeddedBroker()
    try:
        broker.start()
        print(f"[2/5] Tansu broker on {broker.bootstrap_servers}")
        topics = {TOPIC: partitions, f"{TOPIC}.predictions": partitions, f"{TOPIC}.dlq": 1, f"{TOPIC}.drift": 1}
        create_topics(broker.bootstrap_servers, topics)
        print(f"      topics: {', '.join(f'{name} ({n})' for name, n in topics.items())}")

        print(f"[3/5] producing {len(records):,} records to {TOPIC} (key = record id)")
        producer_done = threading.Event()
        produced = {}

        def produce():
            try:
                produced["n"] = produce_records(
                    records, bootstrap_servers=broker.bootstrap_servers, topic=TOPIC, rate=rate
                )
            finally:
                producer_done.set()

        producer = threading.Thread(target=produce, name="demo-producer", daemon=True)
        producer.start()

        config = load_config(
            [
                "--topic", TOPIC,
                "--bootstrap-servers", broker.bootstrap_servers,
                "--group-id", "demo",
                "--learners", ",".join(chosen),
                "--serving", "leader",
                "--drift-detector", "adwin",
                "--drift-reaction", "alert",
                "--drift-topic", f"{TOPIC}.drift",
                "--checkpoint-dir", str(work_dir / "checkpoints"),
                "--checkpoint-every-seconds", "10",
                "--metrics-port", "0",
                "--session-timeout-ms", "6000",
                # The demo ends when the worker has read all that was produced (below); this
                # only ends a demo whose producer stalls.
                "--stop-when-idle", "60",
            ],
            environ={},
        )
        print(f"[4/5] worker: learners {', '.join(chosen)}, serving the leader, ADWIN drift detection")
        live = _LiveLine()

        def on_ready(worker):
            print(f"      metrics: {worker.metrics_url}/metrics  health: {worker.metrics_url}/healthz")

        read_everything = threading.Event()

        def progress(worker):
            live(worker)
            # Done once the producer has finished and the worker has read what it sent (a
            # producer that failed has said why on stderr: nothing more will come).
            if producer_done.is_set() and worker.counts["messages"] >= produced.get("n", 0):
                read_everything.set()

        started = time.monotonic()
        code = run_worker(config, progress=progress, progress_every=1.0, on_ready=on_ready, stop=read_everything)
        live.close()
        seconds = time.monotonic() - started
        producer.join(timeout=30)
        if code != 0:
            print(f"worker exited with code {code}", file=sys.stderr)
            return code

        from stream_learner.state.checkpoint import CheckpointStore, resolve_key

        key = resolve_key(work_dir / "checkpoints")
        final = CheckpointStore(work_dir / "checkpoints", key).load_latest()
        from stream_learner.runtime.worker import read_state

        processor = read_state(final.state)["processor"]
        counts = final.state["counts"]
        print(f"[5/5] done in {seconds:.0f} s: {counts.get('messages', 0):,} records, "
              f"{counts.get('dead_lettered', 0):,} dead letters, {len(processor.drift_events)} drift events")
        rows = leaderboard(processor.learner_stats())
        print(format_table(rows))
        plot = plot_accuracy(
            list(processor.series),
            processor.drift_events,
            str(output / "accuracy.png"),
            title=f"{dataset}: rolling accuracy through the Kafka worker",
        )
        print(f"accuracy plot: {plot}")
        return 0
    finally:
        broker.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
        print("stopped the broker and removed the demo's checkpoints")


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole pipeline on an embedded broker: dataset → Kafka → worker → predictions",
        description="The whole pipeline on one machine, in a few minutes: fetch a dataset, start "
        "the embedded broker, produce the stream, run the worker with drift detection and "
        "metrics, print a summary table and write the accuracy plot, then stop everything.",
    )
    parser.add_argument("--dataset", default="vader", help="dataset to stream (default %(default)s)")
    parser.add_argument(
        "--learners", default="neural,nb", help="learners side by side (default %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=None, help="stream at most this many records")
    parser.add_argument("--partitions", type=int, default=3, help="partitions of the input topic")
    parser.add_argument("--rate", type=float, default=None, help="produce at most this many records/s")
    parser.add_argument("--output-dir", default="demo-output", help="where the plot goes (default %(default)s)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import logging

    logging.getLogger("kafka").setLevel(logging.ERROR)
    # The live line reports progress and drift; keep only warnings from the layers below it.
    for name in ("stream_learner.runtime.worker", "stream_learner.io.sources", "stream_learner.state.checkpoint", "stream_learner.io.broker", "stream_learner.runtime.metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return run_demo(
        dataset=args.dataset,
        learners=tuple(name.strip() for name in args.learners.split(",") if name.strip()),
        limit=args.limit,
        partitions=args.partitions,
        output_dir=args.output_dir,
        rate=args.rate,
    )
