"""The stream processor's hot paths at two revisions of the code, measured in one run.

A refactoring must not slow the product down. This checks out ``--base`` (default: the last
release before the layout by role) into a temporary git worktree and times, on the VADER
stream, what ``evaluate`` and the Kafka worker run for every record: the
:class:`~stream_learner.core.processor.StreamProcessor` with the default ``neural`` learner,
one record at a time and in mini-batches of 256 (records per CPU second of the process); and
the whole Kafka worker with ``nb`` (the learner that leaves most of the time to the worker's
own path) on the embedded broker, as ``benchmarks.pipeline`` runs it with its defaults
(records per second, first to last batch: its producer is a child process). Each measurement
is a fresh interpreter (``python -c`` with the revision's tree first on the path), and the two
revisions alternate, ``--repeats`` times each, so that load from other processes hits both
alike. The report gives the median and the best run of each and the ratio of this tree to
the base.

    .venv/bin/python -m benchmarks.revisions                 # writes benchmarks/results/revisions.md + .png
    .venv/bin/python -m benchmarks.revisions --base HEAD~5 --repeats 5 --worker-limit 6000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_BASE = "7e5d3f7"  # the release before the layout by role (issue 15)
PATHS = ("per_record", "mini_batch_256", "worker_nb")
NAMES = {
    "per_record": "processor, one record at a time",
    "mini_batch_256": "processor, mini-batches of 256",
    "worker_nb": "Kafka worker, nb (defaults, 3 partitions)",
}
UNITS = {"per_record": "records per CPU second", "mini_batch_256": "records per CPU second", "worker_nb": "records/s"}

# Runs inside the revision's tree; module paths are looked up where they were at either revision.
_MEASURE = """
import json, sys, time
try:
    from stream_learner.cli.evaluate import evaluate
    from stream_learner.core.processor import StreamProcessor
except ImportError:
    from stream_learner.evaluate import evaluate
    from stream_learner.runner import StreamProcessor
try:
    from stream_learner.data.readers import load_records
except ImportError:
    from stream_learner.datasets import load_records
records = list(load_records("vader", limit=int(sys.argv[1]) or None))
rates = {}
for name, options in (("per_record", {}), ("mini_batch_256", {"mini_batch": 256})):
    started = time.process_time()
    evaluate(records, StreamProcessor(["neural"], drift_detector="none"), **options)
    rates[name] = len(records) / (time.process_time() - started)
print(json.dumps(rates))
"""


# The worker as benchmarks.pipeline runs it, with that revision's benchmark and package.
_MEASURE_WORKER = """
import json, logging, os, secrets, sys, tempfile
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
logging.getLogger("kafka").setLevel(logging.CRITICAL)
os.environ.setdefault("STREAM_LEARNER_CHECKPOINT_KEY", secrets.token_hex(32))
import benchmarks.pipeline as pipeline
try:
    from stream_learner.data.readers import load_records
except ImportError:
    from stream_learner.datasets import load_records
records = list(load_records("vader", limit=int(sys.argv[1])))
work = Path(tempfile.mkdtemp(prefix="bench-revisions-"))
with pipeline.EmbeddedBroker() as broker:
    pipeline.create_topics(broker.bootstrap_servers, {"bench": 3, "bench.predictions": 3})
    pipeline.produce_records(records, bootstrap_servers=broker.bootstrap_servers, topic="bench")
    rate, _ = pipeline.run_worker_timed(
        broker, "bench", "nb", "bench-group", work / "ckpt", len(records), "bench.predictions"
    )
print(json.dumps({"worker_nb": rate}))
"""


def measure(tree: Path, limit: int, worker_limit: int) -> dict[str, float]:
    rates = {}
    for script, size in ((_MEASURE, limit), (_MEASURE_WORKER, worker_limit)):
        done = subprocess.run(
            [sys.executable, "-c", script, str(size)],
            cwd=tempfile.gettempdir(),
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=True,
        )
        rates.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", default=DEFAULT_BASE, help="revision to compare with (default %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each revision (default %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=0, help="records of vader (default: all)")
    parser.add_argument(
        "--worker-limit", type=int, default=12_000, help="records of vader for the worker (default %(default)s)"
    )
    args = parser.parse_args(argv)
    base_commit = subprocess.run(
        ["git", "rev-parse", "--short", args.base],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    head_commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as scratch:
        base_tree = Path(scratch) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(base_tree), base_commit],
            cwd=ROOT,
            check=True,
        )
        try:
            for repeat in range(args.repeats):
                for side, tree in (("base", base_tree), ("this", ROOT)):
                    runs[side].append(measure(tree, args.limit, args.worker_limit))
                    print(repeat, side, json.dumps(runs[side][-1]), flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False
            )
    medians = {
        side: {p: statistics.median(r[p] for r in runs[side]) for p in PATHS} for side in runs
    }
    write_report(medians, runs, base_commit, head_commit, args)
    return 0


def write_report(medians, runs, base_commit, head_commit, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {side: {p: max(r[p] for r in runs[side]) for p in PATHS} for side in runs}
    command = f".venv/bin/python -m benchmarks.revisions --base {args.base} --repeats {args.repeats}"
    command += f" --limit {args.limit}" if args.limit else ""
    command += f" --worker-limit {args.worker_limit}" if args.worker_limit != 12_000 else ""
    lines = [
        "# The hot paths at two revisions",
        "",
        f"Command: `{command}`",
        "",
        f'`StreamProcessor(["neural"])` on vader ({"all records" if not args.limit else f"{args.limit} records"}), '
        "as `evaluate` runs it, in records per CPU second; and the Kafka worker with `nb` and its defaults "
        f"on {args.worker_limit:,} vader records in 3 partitions of the embedded broker, as `benchmarks.pipeline` "
        "runs it, in records/s from its first to its last batch. "
        f"{args.repeats} alternating runs of each revision in fresh interpreters; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs.",
        "",
        f"| path | unit | base `{base_commit}` median (best) | this tree `{head_commit}` median (best) "
        "| ratio of medians (of bests) |",
        "|---|---|---:|---:|---:|",
    ]
    for path in PATHS:
        base, this = medians["base"][path], medians["this"][path]
        lines.append(
            f"| {NAMES[path]} | {UNITS[path]} | {base:,.0f} ({best['base'][path]:,.0f}) | "
            f"{this:,.0f} ({best['this'][path]:,.0f}) | {this / base:.2f} ({best['this'][path] / best['base'][path]:.2f}) |"
        )
    lines += ["", "Every run:", ""]
    for side in ("base", "this"):
        for path in PATHS:
            lines.append(f"- {side}, {NAMES[path]}: " + ", ".join(f"{r[path]:,.0f}" for r in runs[side]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "revisions.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(7, 3.2))
    positions = range(len(PATHS))
    for offset, side, commit in ((-0.2, "base", base_commit), (0.2, "this", head_commit)):
        axis.bar(
            [p + offset for p in positions],
            [medians[side][p] / medians["base"][p] for p in PATHS],
            0.4,
            label=f"{side} {commit}",
        )
    axis.set_xticks(list(positions), ["processor,\none at a time", "processor,\nbatches of 256", "Kafka worker,\nnb"])
    axis.set_ylabel("median rate / base's")
    axis.set_ylim(0, 1.3)
    axis.legend(loc="upper center", ncols=2)
    figure.tight_layout()
    figure.savefig(RESULTS / "revisions.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
