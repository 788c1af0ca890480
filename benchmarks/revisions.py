"""The stream processor's hot paths at two revisions of the code, measured in one run.

A refactoring must not slow the product down. This checks out ``--base`` (default: the last
release before the layout by role) into a temporary git worktree and times, on the VADER
stream, what ``evaluate`` and the Kafka worker run for every record: the
:class:`~stream_learner.core.processor.StreamProcessor` with the default ``neural`` learner,
one record at a time and in mini-batches of 256. Each measurement is a fresh interpreter
(``python -c`` with the revision's tree first on the path), and the two revisions alternate,
``--repeats`` times each, so that load from other processes hits both alike. Rates are records
per CPU second of the process; the report gives the median of each and the ratio of this
tree to the base.

    .venv/bin/python -m benchmarks.revisions                 # writes benchmarks/results/revisions.md + .png
    .venv/bin/python -m benchmarks.revisions --base HEAD~5 --repeats 5
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
PATHS = ("per_record", "mini_batch_256")

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


def measure(tree: Path, limit: int) -> dict[str, float]:
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(limit)],
        cwd=tempfile.gettempdir(),
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", default=DEFAULT_BASE, help="revision to compare with (default %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each revision (default %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=0, help="records of vader (default: all)")
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
                    runs[side].append(measure(tree, args.limit))
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

    names = {"per_record": "one record at a time", "mini_batch_256": "mini-batches of 256"}
    lines = [
        "# The processor's hot paths at two revisions",
        "",
        f"Command: `.venv/bin/python -m benchmarks.revisions --base {args.base} --repeats {args.repeats}`"
        + (f" `--limit {args.limit}`" if args.limit else ""),
        "",
        f'`StreamProcessor(["neural"])` on vader ({"all records" if not args.limit else f"{args.limit} records"}), '
        f"as `evaluate` runs it; records per CPU second, median of {args.repeats} alternating runs of each revision "
        f"in fresh interpreters; {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs.",
        "",
        f"| path | base `{base_commit}` | this tree `{head_commit}` | ratio |",
        "|---|---:|---:|---:|",
    ]
    for path in PATHS:
        base, this = medians["base"][path], medians["this"][path]
        lines.append(f"| {names[path]} | {base:,.0f} | {this:,.0f} | {this / base:.2f} |")
    lines += ["", "Every run (records per CPU second):", ""]
    for side in ("base", "this"):
        for path in PATHS:
            lines.append(
                f"- {side}, {names[path]}: " + ", ".join(f"{r[path]:,.0f}" for r in runs[side])
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "revisions.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6, 3.2))
    positions = range(len(PATHS))
    axis.bar(
        [p - 0.2 for p in positions],
        [medians["base"][p] for p in PATHS],
        0.4,
        label=f"base {base_commit}",
    )
    axis.bar(
        [p + 0.2 for p in positions],
        [medians["this"][p] for p in PATHS],
        0.4,
        label=f"this {head_commit}",
    )
    axis.set_xticks(list(positions), [names[p] for p in PATHS])
    axis.set_ylabel("records per CPU second")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "revisions.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
