"""Scale-out: 1 and 2 worker processes, with each Kafka client, fused and unfused, in one run.

On a 4-partition topic holding a fetched dataset (keyed by record id), every configuration
runs ``stream-learner run --processes P`` as a user would, from a fresh consumer group, until
it has been idle for a few seconds. Figures come from what the workers published:

* **records/s** — records divided by the time from the first to the last prediction message
  (producer timestamps; the group join before the first record is not counted, the
  rebalance when the second process joins is); *steady* is the rate between the 10th and the
  90th percentile of those timestamps, once the group has settled;
* **prequential accuracy** — each record's prediction (made before the record was learned)
  against its label, over the whole stream.

Figures to reach (issue #6): 2 processes ≥ 1.5× the records/s of 1; with fusion, 2 workers
within 1 point of the single worker's accuracy and above 2 unfused workers; the
confluent-kafka backend ≥ 2× the kafka-python backend end to end.

Run: ``.venv/bin/python -m benchmarks.scaling`` (needs ``stream-learner datasets fetch
healthtweets``). Writes benchmarks/results/scaling.md, scaling.png and scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stream_learner.cli.produce import produce_records
from stream_learner.data import readers
from stream_learner.io.broker import EmbeddedBroker, create_topics

RESULTS = Path(__file__).parent / "results"
PARTITIONS = 4


def read_predictions(bootstrap, topic, expected, timeout=300.0):
    """{record id: (label, timestamp ms)} of the first prediction of each record."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=2000)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        seen, timestamps, messages = {}, [], 0
        deadline = time.monotonic() + timeout
        idle = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            for records in batch.values():
                for m in records:
                    messages += 1
                    timestamps.append(m.timestamp)
                    seen.setdefault(m.key.decode(), json.loads(m.value)["label"])
                idle = time.monotonic()
            if len(seen) >= expected and time.monotonic() - idle > 1.0:
                break
            if time.monotonic() - idle > 10.0:
                break
        return seen, timestamps, messages
    finally:
        consumer.close()


def run_configuration(broker, records, *, name, client, processes, fusion, fusion_every, learner, workdir, extra=None):
    topic = f"{name}-in"
    create_topics(broker.bootstrap_servers, {topic: PARTITIONS, f"{topic}.predictions": PARTITIONS, f"{topic}.dlq": 1})
    produce_records(records, bootstrap_servers=broker.bootstrap_servers, topic=topic)
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "--log-level", "WARNING", "run",
        "--topic", topic,
        "--bootstrap-servers", broker.bootstrap_servers,
        "--group-id", f"{name}-group",
        "--checkpoint-dir", str(workdir / name),
        "--client", client,
        "--learners", learner,
        "--drift-detector", "none",
        "--processes", str(processes),
        "--session-timeout-ms", "6000",
        "--stop-when-idle", "6",
    ]
    if fusion:
        command += ["--fusion", "on", "--fusion-every-seconds", str(fusion_every)]
    command += list(extra or ())
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=secrets.token_hex(32))
    started = time.monotonic()
    broker_cpu, workers_cpu = process_cpu_seconds(broker.pid), children_cpu_seconds()
    code = subprocess.run(command, env=env, timeout=1800).returncode
    broker_cpu = process_cpu_seconds(broker.pid) - broker_cpu
    workers_cpu = children_cpu_seconds() - workers_cpu
    wall = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"{name}: the workers exited with {code}")
    predicted, timestamps, messages = read_predictions(broker.bootstrap_servers, f"{topic}.predictions", len(records))
    labels = {r.id: r.label for r in records}
    hits = sum(predicted.get(rid) == str(label) or predicted.get(rid) == label for rid, label in labels.items())
    span = (max(timestamps) - min(timestamps)) / 1000.0
    ordered = sorted(timestamps)
    low, high = ordered[len(ordered) // 10], ordered[(9 * len(ordered)) // 10]
    steady = 0.8 * len(ordered) / ((high - low) / 1000.0) if high > low else float("nan")
    return {
        "name": name,
        "client": client,
        "processes": processes,
        "fusion": fusion,
        "records": len(records),
        "predicted": len(predicted),
        "prediction_messages": messages,
        "records_per_s": len(records) / span if span > 0 else float("nan"),
        "steady_records_per_s": steady,
        "accuracy": 100.0 * hits / len(records),
        "wall_seconds": wall,
        # CPU of everything `run` started (supervisor, workers, producer processes), start-up
        # and idle wait included, and of the broker while they ran.
        "workers_cpu_us_per_record": 1e6 * workers_cpu / len(records),
        "broker_cpu_us_per_record": 1e6 * broker_cpu / len(records),
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children and their waited-for
    descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="healthtweets")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--learner", default="nb")
    parser.add_argument("--clients", default="kafka-python,confluent")
    parser.add_argument("--fusion-every", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per configuration (best kept)")
    parser.add_argument("--worker-flags", default="", help="more `stream-learner run` flags for every configuration")
    parser.add_argument("--output", default="scaling", help="results file stem in benchmarks/results/")
    args = parser.parse_args(argv)

    records = [r for r in readers.load_records(args.dataset, limit=args.limit) if r.label is not None]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    runs = []
    load_before = os.getloadavg()[0]
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        counter = 0
        for client in clients:
            for processes, fusion in ((1, False), (2, False), (2, True)):
                repeats = args.repeats if not fusion else 1
                best = None
                for _ in range(repeats):
                    counter += 1
                    name = f"scale{counter}-{client}-{processes}{'f' if fusion else ''}"
                    result = run_configuration(
                        broker, records, name=name, client=client, processes=processes, fusion=fusion,
                        fusion_every=args.fusion_every, learner=args.learner, workdir=workdir,
                        extra=args.worker_flags.split(),
                    )
                    print(json.dumps(result), flush=True)
                    if best is None or result["steady_records_per_s"] > best["steady_records_per_s"]:
                        best = result
                runs.append(best)
    write_results(runs, args, records, load_before)


def _find(runs, client, processes, fusion):
    for run in runs:
        if run["client"] == client and run["processes"] == processes and run["fusion"] == fusion:
            return run
    return None


def write_results(runs, args, records, load_before):
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"runs": runs, "args": vars(args)}, indent=2))
    clients = sorted({r["client"] for r in runs}, key=["kafka-python", "confluent"].index)
    lines = [
        "# Scale-out: worker processes, clients and fusion",
        "",
        f"Stream: `{args.dataset}`, {len(records):,} labelled records, keyed by id on a {PARTITIONS}-partition topic "
        f"of the embedded Tansu broker; learner `{args.learner}`"
        + (f" with `{args.worker_flags}`" if args.worker_flags else "")
        + ", drift detection off. Every configuration is "
        "`stream-learner run --processes P` from a fresh group, run to the end of the stream. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared by the broker, the workers and their "
        f"producer processes), Python {platform.python_version()}; load average {load_before:.1f} at the start.",
        "",
        "Reproduce: `.venv/bin/python -m benchmarks.scaling"
        + (f" --limit {args.limit}" if args.limit else "")
        + (f" --learner {args.learner}" if args.learner != "nb" else "")
        + (f' --worker-flags="{args.worker_flags}"' if args.worker_flags else "")
        + (f" --output {args.output}" if args.output != "scaling" else "")
        + f" --fusion-every {args.fusion_every:g} --repeats {args.repeats}`",
        "",
        "CPU columns: CPU time per record of everything `run` started (workers, supervisor, producer processes; "
        "start-up and the final idle wait included) and of the broker while they ran. With 2 cores for all of it, "
        "records/s is bounded by 2 cores ÷ their sum.",
        "",
        "| client | processes | fusion | records/s (first to last) | steady records/s | steady × 1 process | prequential accuracy % | records predicted | workers CPU µs/record | broker CPU µs/record |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    every = f"every {args.fusion_every:g} s"
    for client in clients:
        one = _find(runs, client, 1, False)
        for run in runs:
            if run["client"] != client:
                continue
            lines.append(
                f"| {client} | {run['processes']} | {every if run['fusion'] else 'off'} "
                f"| {run['records_per_s']:,.0f} | {run['steady_records_per_s']:,.0f} "
                f"| {run['steady_records_per_s'] / one['steady_records_per_s']:.2f} "
                f"| {run['accuracy']:.2f} | {run['predicted']:,} "
                f"| {run.get('workers_cpu_us_per_record', float('nan')):.0f} | {run.get('broker_cpu_us_per_record', float('nan')):.0f} |"
            )
    lines += ["", "## Figures against the targets", ""]
    verdicts = []
    for client in clients:
        one, two, fused = (_find(runs, client, 1, False), _find(runs, client, 2, False), _find(runs, client, 2, True))
        speedup = two["steady_records_per_s"] / one["steady_records_per_s"]
        whole = two["records_per_s"] / one["records_per_s"]
        verdicts.append(
            f"* {client}: 2 processes = **{speedup:.2f}×** the steady records/s of 1 (target ≥ 1.5): "
            f"{'PASS' if speedup >= 1.5 else 'FAIL'}; first to last message, rebalance included: {whole:.2f}×."
        )
        gap = fused["accuracy"] - one["accuracy"]
        verdicts.append(
            f"* {client}: 2 fused workers {fused['accuracy']:.2f} % vs 1 worker {one['accuracy']:.2f} % "
            f"({gap:+.2f} points; target within 1) and vs 2 unfused {two['accuracy']:.2f} % "
            f"(target above): {'PASS' if abs(gap) <= 1.0 and fused['accuracy'] > two['accuracy'] else 'FAIL'}."
        )
    if len(clients) == 2:
        for processes in (1, 2):
            a, b = _find(runs, "kafka-python", processes, False), _find(runs, "confluent", processes, False)
            ratio = b["steady_records_per_s"] / a["steady_records_per_s"]
            verdicts.append(
                f"* {processes} process{'es' if processes > 1 else ''}: confluent-kafka = **{ratio:.2f}×** "
                f"kafka-python end to end (target ≥ 2): {'PASS' if ratio >= 2 else 'FAIL'}."
            )
        a, b = _find(runs, "kafka-python", 1, False), _find(runs, "confluent", 1, False)
        if "workers_cpu_us_per_record" in a and "workers_cpu_us_per_record" in b:
            total_a = a["workers_cpu_us_per_record"] + a["broker_cpu_us_per_record"]
            total_b = b["workers_cpu_us_per_record"] + b["broker_cpu_us_per_record"]
            verdicts.append(
                f"* CPU per record, 1 process: kafka-python {a['workers_cpu_us_per_record']:.0f} µs in the workers + "
                f"{a['broker_cpu_us_per_record']:.0f} µs in the broker = {total_a:.0f} µs; confluent "
                f"{b['workers_cpu_us_per_record']:.0f} + {b['broker_cpu_us_per_record']:.0f} = {total_b:.0f} µs. "
                f"Where every process shares the same cores, records/s can rise by about their ratio at most: {total_a / total_b:.2f}×."
            )
    lines += verdicts
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    plot(runs, clients, RESULTS / f"{args.output}.png")
    print("\n".join(lines))


def plot(runs, clients, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels, rates, accuracies = [], [], []
    for client in clients:
        for run in runs:
            if run["client"] == client:
                labels.append(f"{client}\n{run['processes']}p{' fused' if run['fusion'] else ''}")
                rates.append(run["steady_records_per_s"])
                accuracies.append(run["accuracy"])
    left.bar(labels, rates, color="#4c72b0")
    left.set_ylabel("steady records/s")
    left.set_title("throughput")
    right.bar(labels, accuracies, color="#55a868")
    right.set_ylim(min(accuracies) - 3, max(accuracies) + 1)
    right.set_ylabel("prequential accuracy %")
    right.set_title("accuracy over the whole stream")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
