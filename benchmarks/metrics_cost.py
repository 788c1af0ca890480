"""What Prometheus metrics cost the worker: the same records through the same loop, metrics off
and on, in one run.

The loop is the worker's own (:meth:`stream_learner.runtime.worker.Worker.process_batch`: decode,
StreamProcessor, outputs) over the VADER stream, in batches of 500 as polled from Kafka, with
an in-memory sink instead of a broker so that only our own work is timed. Three workers run
side by side on the same batches:

* ``metrics off`` — the anchor: the worker's no-op stand-in for StreamMetrics.
* ``metrics on`` — StreamMetrics on a fresh registry, updated as the worker does (per batch:
  outcome counts, batch/record timing, end-to-end delays, predictions; per message: dead
  letters and drifts; every 20 batches, as the worker's 10-second report: learner stats,
  label buffer, lag).
* ``per-record updates`` — what batching avoids: the same metrics updated once per record.

Paired design: batch by batch, each worker processes the same batch, in rotating order, and
only that call is timed (thread CPU time). A burst of load from other processes on a shared
machine then hits all three alike instead of one run of a before/after comparison. Every
pass starts fresh workers; the ratio of total times against the anchor is reported per pass.

Scraping runs in the HTTP server's thread, not in the loop: its cost is measured apart, as
CPU time per ``/metrics`` request on the populated registry, and put against the scrape
interval.

    .venv/bin/python -m benchmarks.metrics_cost            # writes benchmarks/results/metrics.md + .png
    .venv/bin/python -m benchmarks.metrics_cost --limit 5000 --repeats 1   # quicker
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from stream_learner.core.records import Decoder
from stream_learner.data.readers import load_records
from stream_learner.io.sinks import MemorySink, Outputs
from stream_learner.io.sources import Message
from stream_learner.runtime.config import WorkerConfig
from stream_learner.runtime.metrics import HealthServer, StreamMetrics
from stream_learner.runtime.worker import Worker, build_processor

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 500
REPORT_EVERY_BATCHES = 20
CONFIGS = ("metrics off", "metrics on", "per-record updates")


def make_messages(dataset: str, limit: int | None) -> list[Message]:
    """The dataset as Kafka would deliver it: JSON values, keys, timestamps, two partitions."""
    decoder = Decoder()
    records = load_records(dataset, limit=limit)
    now = time.time()
    messages = []
    for offset, record in enumerate(records):
        messages.append(
            Message(
                topic="texts",
                partition=offset % 2,
                offset=offset // 2,
                key=record.id.encode() if record.id else None,
                value=decoder.encode(record),
                timestamp=now - 1.0,
            )
        )
    # A few bad messages, as a real stream has: they take the dead-letter path.
    for i in range(0, len(messages), 997):
        old = messages[i]
        messages[i] = Message(old.topic, old.partition, old.offset, old.key, b"{not json", old.timestamp)
    return messages


class PerRecordWorker(Worker):
    """The worker with its metrics updated per record instead of per batch."""

    def process_batch(self, messages):
        self._record_seconds = None  # it times each record itself, below
        metrics = self.metrics
        for message in messages:
            started = time.perf_counter()
            before = self.counts.copy()
            self.handle(message)
            after = self.counts
            for outcome in ("learned", "predicted", "label_joined", "label_unmatched"):
                if after[outcome] != before[outcome]:
                    metrics.records.labels(outcome=outcome).inc()
            metrics.record_seconds.observe(time.perf_counter() - started)
            if message.timestamp is not None:
                metrics.end_to_end_delay.observe(time.time() - message.timestamp)
            metrics.predictions.inc()


def make_worker(config: str, learner: str) -> Worker:
    processor = build_processor(WorkerConfig(topics=("texts",), learners=(learner,)))
    outputs = Outputs(MemorySink(), predictions_topic="texts.predictions", dead_letter_topic="texts.dlq")
    if config == "metrics off":
        return Worker(processor, outputs, None)
    metrics = StreamMetrics(CollectorRegistry(), learners=[learner], detector="adwin")
    worker_class = PerRecordWorker if config == "per-record updates" else Worker
    return worker_class(processor, outputs, None, metrics=metrics)


def report(worker: Worker) -> None:
    """What the worker publishes every 10 s."""
    worker.metrics.set_learner_stats(worker.processor.learner_stats())
    worker.metrics.set_label_buffer(worker.processor.label_buffer_stats())
    worker.metrics.set_lag("texts", 0, 0)
    worker.metrics.set_lag("texts", 1, 0)


def paired_pass(messages: list[Message], learner: str) -> tuple[dict[str, float], Worker]:
    """Thread-CPU seconds of each configuration over the same batches, interleaved."""
    workers = {config: make_worker(config, learner) for config in CONFIGS}
    totals = dict.fromkeys(CONFIGS, 0.0)
    batches = [messages[i : i + BATCH] for i in range(0, len(messages), BATCH)]
    for index, batch in enumerate(batches):
        order = CONFIGS[index % 3 :] + CONFIGS[: index % 3]
        for config in order:
            worker = workers[config]
            started = time.thread_time()
            worker.process_batch(batch)
            if config != "metrics off" and index % REPORT_EVERY_BATCHES == REPORT_EVERY_BATCHES - 1:
                report(worker)
            totals[config] += time.thread_time() - started
    for worker in workers.values():
        assert worker.counts["messages"] == len(messages)
    return totals, workers["metrics on"]


def scrape_cost(worker: Worker, scrapes: int = 200) -> float:
    """Process CPU seconds per /metrics request (server thread and client together)."""
    report(worker)
    with HealthServer(worker.metrics.registry, port=0) as server:
        url = server.url + "/metrics"
        urllib.request.urlopen(url, timeout=5).read()
        started = time.process_time()
        for _ in range(scrapes):
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
        return (time.process_time() - started) / scrapes


def method_costs(n: int = 20_000) -> dict[str, float]:
    """Microseconds per call of the StreamMetrics methods the worker calls."""
    metrics = StreamMetrics(CollectorRegistry(), learners=["nb", "softmax"], process_metrics=False)
    stats = {"nb": {"n": 10, "accuracy": 0.9, "rolling_accuracy": 0.8, "macro_f1": 0.7, "log_loss": 0.3, "warning": False}}
    delays = [0.05] * BATCH
    record_times = [0.0002] * BATCH
    calls = {
        "record_outcomes (one batch)": lambda: metrics.record_outcomes({"learned": 480, "predicted": 20}),
        "observe_batch (one batch, each record's time)": lambda: metrics.observe_batch(BATCH, 0.1, record_times),
        f"observe_end_to_end_delay (one batch, {BATCH} delays)": lambda: metrics.observe_end_to_end_delay(delays),
        "predictions_produced (one batch)": lambda: metrics.predictions_produced(BATCH),
        "dead_lettered (one message)": lambda: metrics.dead_lettered("invalid_json"),
        "set_learner_stats (1 learner, every 10 s)": lambda: metrics.set_learner_stats(stats),
        "Histogram.observe (one value)": lambda: metrics.record_seconds.observe(0.001),
        "Counter.labels(...).inc()": lambda: metrics.records.labels(outcome="learned").inc(),
    }
    costs = {}
    for name, call in calls.items():
        rounds = n // 20 if "delays" in name else n
        start = time.thread_time()
        for _ in range(rounds):
            call()
        costs[name] = (time.thread_time() - start) / rounds * 1e6
    return costs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="vader")
    parser.add_argument("--learner", default="nb")
    parser.add_argument("--limit", type=int, default=None, help="records (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the stream")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    messages = make_messages(args.dataset, args.limit)
    print(f"{len(messages):,} messages from {args.dataset}, learner {args.learner}, batches of {BATCH}")
    paired_pass(messages[:2000], args.learner)  # warm-up: imports, caches
    passes = []
    worker_on = None
    for repeat in range(args.repeats):
        totals, worker_on = paired_pass(messages, args.learner)
        passes.append(totals)
        print(
            f"  pass {repeat + 1}: "
            + ", ".join(f"{c} {t:.2f} s ({totals['metrics off'] / t:.3f})" for c, t in totals.items())
        )
    scrape_seconds = scrape_cost(worker_on)
    costs = method_costs()
    write_report(args, messages, passes, scrape_seconds, costs)
    plot(passes, args.out / "metrics_cost.png")
    return 0


def write_report(args, messages, passes, scrape_seconds, costs) -> None:
    n = len(messages)
    ratios = {c: [p["metrics off"] / p[c] for p in passes] for c in CONFIGS}
    median_ratio = {c: statistics.median(r) for c, r in ratios.items()}
    verdict = "meets" if median_ratio["metrics on"] >= 0.95 else "does NOT meet"
    off_us = statistics.median(p["metrics off"] for p in passes) / n * 1e6
    lines = [
        "# Cost of Prometheus metrics",
        "",
        "Command: `.venv/bin/python -m benchmarks.metrics_cost"
        + (f" --limit {args.limit}" if args.limit else "")
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
        + "`",
        "",
        f"The worker's own loop (`Worker.process_batch`: decode, `StreamProcessor` with learner "
        f"`{args.learner}`, outputs to an in-memory sink) over {n:,} messages of `{args.dataset}` "
        f"(one in 997 malformed) in batches of {BATCH}. Three workers process the same batches "
        f"in rotating order, each call timed in thread CPU seconds; {args.repeats} passes with "
        f"fresh workers. Python {platform.python_version()}, {platform.machine()}, a shared "
        "2-core machine.",
        "",
        "| configuration | CPU s per pass | records per CPU-second | throughput vs metrics off (median of passes) | per pass |",
        "|---|---:|---:|---:|---|",
    ]
    for config in CONFIGS:
        seconds = statistics.median(p[config] for p in passes)
        lines.append(
            f"| {config} | {seconds:.2f} | {n / seconds:,.0f} | **{median_ratio[config]:.3f}** | "
            + ", ".join(f"{r:.3f}" for r in ratios[config])
            + " |"
        )
    per_batch_us = sum(us for name, us in costs.items() if "one batch" in name)
    lines += [
        "",
        f"**Result:** with metrics on, the worker's throughput is {median_ratio['metrics on']:.1%} "
        f"of the same loop with metrics off: this {verdict} the target of at least 95%. Updating "
        f"the same metrics once per record instead gives {median_ratio['per-record updates']:.1%}.",
        "",
        f"Scraping: one `/metrics` request costs {scrape_seconds * 1e3:.2f} ms of CPU (server "
        f"and client), i.e. {scrape_seconds / 15:.3%} of a core at the deploy kit's 15 s scrape "
        f"interval and {scrape_seconds:.2%} at the end-to-end test's 1 s.",
        "",
        "Why it is cheap: outcomes are counted in a dict and added once per batch; each "
        "record's own processing time is taken with one clock read and bucketed in Python "
        "with the rest of its batch, one increment per bucket; "
        "end-to-end delays are bucketed in Python and added with one increment per bucket; "
        "learner stats, label buffer and lag are published every 10 s, not per record.",
        "",
        "Cost per call of the methods the worker calls (thread CPU microseconds):",
        "",
        "| call | µs |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {us:.2f} |" for name, us in costs.items()]
    lines += [
        "",
        f"The per-batch calls add up to {per_batch_us:.0f} µs per batch, "
        f"{per_batch_us / BATCH:.2f} µs per record: {per_batch_us / BATCH / off_us:.2%} of the "
        f"{off_us:.0f} µs a record takes with metrics off. The measured ratios scatter around "
        "that by the run-to-run noise of the machine.",
        "",
        "![throughput per configuration](metrics_cost.png)",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.md").write_text("\n".join(lines))


def plot(passes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    for row, config in enumerate(reversed(CONFIGS)):
        ratios = [p["metrics off"] / p[config] for p in passes]
        median = statistics.median(ratios)
        ax.barh(row, median, color={"metrics off": "#888888", "metrics on": "#4c72b0"}.get(config, "#c44e52"))
        ax.plot(ratios, [row] * len(ratios), "k.", markersize=5)
        ax.text(max(ratios) + 0.03, row, f"{median:.3f}", va="center")
    ax.set_yticks(range(len(CONFIGS)), list(reversed(CONFIGS)))
    ax.axvline(0.95, color="black", linestyle="--", linewidth=1, label="target: 95% of metrics off")
    ax.set_xlim(0, 1.35)
    ax.set_xlabel("throughput relative to metrics off (bar: median; dots: passes)")
    ax.set_title("Worker loop throughput with Prometheus metrics")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
