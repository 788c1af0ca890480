"""``stream-learner evaluate``: the prequential loop over a dataset or a file.

Each record is predicted by every learner, then learned (test-then-train); a progress bar
shows records/s and rolling accuracy; a leaderboard ends the run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator

from stream_learner.cli.report import format_table, leaderboard, markdown_report, plot_accuracy
from stream_learner.core.drift import DETECTORS, REACTIONS
from stream_learner.core.labels import DEFAULT_MAX_BYTES
from stream_learner.core.processor import (
    DEFAULT_MAX_CLASSES,
    LearnerFailure,
    RecordRejected,
    StreamProcessor,
)
from stream_learner.core.records import Decoder, Record
from stream_learner.runtime.config import _byte_size

__all__ = ["EvaluationResult", "InputProblems", "evaluate", "delay_labels", "add_evaluate_parser"]

# What `evaluate` and `run` serve when no learner is named: chosen by measurement on the dev
# streams (benchmarks/results/learners.md; README "Defaults").
DEFAULT_LEARNERS = ("neural",)


@dataclasses.dataclass
class EvaluationResult:
    processor: StreamProcessor
    records: int
    seconds: float
    learner_errors: int
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> records

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds else float("nan")

    def rows(self) -> list[dict]:
        rows = leaderboard(self.processor.learner_stats())
        if len(rows) > 1:
            served = self.processor.served_stats()
            rows.append({"learner": self.processor.served_name, **served})
        return rows


@dataclasses.dataclass
class InputProblems:
    """What ``evaluate`` put up with in its input: rows the decoder refused (skipped), by
    reason; texts cut to the size limit; timestamps it could not read (dropped, records kept)."""

    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: int = 0
    timestamps_dropped: int = 0
    first_skipped: str | None = None

    def skip(self, problem) -> None:
        self.skipped[str(problem.reason or "unreadable")] += 1
        if self.first_skipped is None:
            self.first_skipped = str(problem)

    def truncate(self, line: int) -> None:
        self.truncated += 1

    def watch(self, records: Iterable[Record]) -> Iterator[Record]:
        """``records``, counting those whose timestamp was dropped."""
        for record in records:
            if record.ts_error is not None:
                self.timestamps_dropped += 1
            yield record

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def short(self) -> str:
        """For the progress line."""
        parts = []
        if self.n_skipped:
            parts.append(f"skipped {self.n_skipped:,}")
        if self.truncated:
            parts.append(f"truncated {self.truncated:,}")
        if self.timestamps_dropped:
            parts.append(f"ts dropped {self.timestamps_dropped:,}")
        return "  ".join(parts)

    def lines(self) -> list[str]:
        """For the summary and the report."""
        out = []
        if self.n_skipped:
            reasons = ", ".join(f"{reason} {n:,}" for reason, n in self.skipped.most_common())
            out.append(
                f"skipped {self.n_skipped:,} records the decoder refused ({reasons}); first: "
                f"{self.first_skipped} (--on-error stop stops at the first)"
            )
        if self.truncated:
            out.append(f"truncated {self.truncated:,} texts to the size limit (--on-oversize)")
        if self.timestamps_dropped:
            out.append(f"dropped {self.timestamps_dropped:,} timestamps that could not be read (records kept)")
        return out


def delay_labels(records: Iterable[Record], delay: int) -> Iterator[Record]:
    """Send each labelled record without its label, and its label ``delay`` records later.

    >>> stream = [Record("1", "a", "x"), Record("2", "b", "y"), Record("3", "c", "x")]
    >>> [(r.id, r.text, r.label) for r in delay_labels(stream, 1)]
    [('1', 'a', None), ('2', 'b', None), ('1', None, 'x'), ('3', 'c', None), ('2', None, 'y'), ('3', None, 'x')]

    """
    held: collections.deque[Record] = collections.deque()
    for i, record in enumerate(records):
        if record.label is None or record.is_label_only:
            yield record
            continue
        record_id = record.id if record.id is not None else f"#{i}"
        yield Record(record_id, record.text, None, record.ts)
        held.append(Record(record_id, None, record.label, record.ts))
        if len(held) > delay:
            yield held.popleft()
    yield from held


def evaluate(
    records: Iterable[Record],
    processor: StreamProcessor,
    *,
    progress=None,
    progress_every: int = 500,
    mini_batch: int = 0,
) -> EvaluationResult:
    """Run ``processor`` over ``records``; ``progress(n, seconds, processor)`` is called every
    ``progress_every`` records. With ``mini_batch`` above 1, records go through
    :meth:`StreamProcessor.process_many <stream_learner.core.processor.StreamProcessor.process_many>`
    that many at a time (each batch predicted before it is learned)."""
    learner_errors = 0
    skipped: collections.Counter = collections.Counter()
    n = 0
    start = time.perf_counter()
    if mini_batch > 1:
        iterator = iter(records)
        while batch := list(itertools.islice(iterator, mini_batch)):
            results = processor.process_many(batch, [record.ts for record in batch])
            for result in results:
                n += 1
                if isinstance(result, RecordRejected):
                    skipped[str(result.reason)] += 1
                elif isinstance(result, LearnerFailure):
                    learner_errors += 1
                    print(f"record {n}: {result}", file=sys.stderr)
            if progress is not None and n // progress_every != (n - len(batch)) // progress_every:
                progress(n, time.perf_counter() - start, processor)
        return EvaluationResult(processor, n, time.perf_counter() - start, learner_errors, skipped)
    process = processor.process
    for n, record in enumerate(records, 1):
        try:
            process(record, now=record.ts)
        except RecordRejected as rejected:
            skipped[str(rejected.reason)] += 1
        except LearnerFailure as failure:
            learner_errors += 1
            print(f"record {n}: {failure}", file=sys.stderr)
        if progress is not None and n % progress_every == 0:
            progress(n, time.perf_counter() - start, processor)
    seconds = time.perf_counter() - start
    return EvaluationResult(processor, n, seconds, learner_errors, skipped)


class _RichProgress:
    """One progress line, at most 80 columns: records done (of the total where it is known),
    records/s, the served rolling accuracy, input problems, elapsed time."""

    def __init__(self, total: int | None, problems: InputProblems | None = None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]evaluate"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7} rec/s"),
            TextColumn("{task.fields[accuracy]}"),
            TextColumn("{task.fields[problems]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._problems = problems
        self._task = self._progress.add_task(
            "evaluate", total=total, rate="", accuracy="acc n/a", problems=""
        )

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def __call__(self, n, seconds, processor):
        served = processor.served_stats()
        accuracy = f"acc {served['rolling_accuracy']:.3f}" if served["n"] else "acc n/a"
        self._progress.update(
            self._task,
            completed=n,
            rate=f"{n / seconds:,.0f}" if seconds else "",
            accuracy=accuracy,
            problems=self._problems.short() if self._problems is not None else "",
        )


def record_total(source, fmt: str | None, limit: int | None) -> int | None:
    """How many records ``evaluate`` will read, where that is known without reading them: a
    fetched dataset's count, or the non-blank lines of an uncompressed JSONL or text file."""
    from stream_learner.data.datasets import DATASET_NAMES, DatasetError, dataset_meta
    from stream_learner.data.readers import resolve_source

    total = None
    try:
        if isinstance(source, str) and source in DATASET_NAMES:
            total = int(dataset_meta(source)["records"])
        else:
            path, resolved = resolve_source(source, fmt)
            if resolved in ("jsonl", "text") and path.suffix.lower() != ".gz":
                total = _count_lines(path)
    except (DatasetError, OSError, KeyError, ValueError):
        total = None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return total


def _count_lines(path) -> int:
    lines = 0
    with open(path, "rb") as file:
        for line in file:
            lines += bool(line.strip())
    return lines


class _DeprecatedAlias(argparse.Action):
    """An old spelling kept for one release: it works, and says what replaces it."""

    def __init__(self, *args, replacement: str, append: bool = False, **kwargs):
        self.replacement, self.append = replacement, append
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"note: {option_string} is deprecated; use {self.replacement}", file=sys.stderr
        )
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


# Options that change what a run computes, in the order the report's Command: line names them.
_REPRODUCED = (
    "learners", "serving", "drift_detector", "drift_reaction", "window", "series_every",
    "labels_delay", "label_buffer_bytes", "max_classes", "limit", "mini_batch", "seed", "fmt", "on_error", "on_oversize",
    "max_text_bytes",
    "text_field", "label_field", "id_field", "ts_field",
)  # fmt: skip


def add_evaluate_parser(subparsers) -> None:
    from stream_learner.data.readers import add_field_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="prequential (test-then-train) evaluation over a dataset or file",
        description="Run learners prequentially over SOURCE: a fetched dataset name "
        "(see 'stream-learner datasets list') or a .jsonl/.json/.csv/.tsv/.txt file. Every "
        "record is predicted by every learner before any learner learns it.",
    )
    parser.add_argument("source", help="dataset name or file path")
    parser.add_argument(
        "--learners",
        action="append",
        metavar="NAMES",
        help="learners side by side, comma-separated (repeatable): names from "
        "'stream-learner learners', module:factory, or a saved model.npz "
        f"(default: {','.join(DEFAULT_LEARNERS)}, the wide-and-deep numpy learner: the best "
        "on the dev streams)",
    )
    parser.add_argument(
        "--model", "-m", dest="learners", action=_DeprecatedAlias, append=True,
        replacement="--learners", help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument(
        "--serving",
        default="leader",
        help="which prediction is served: leader, ensemble or fixed:LEARNER (default %(default)s)",
    )
    parser.add_argument(
        "--drift-detector",
        default="adwin",
        choices=[*DETECTORS, "none"],
        help="drift detector watching each learner's errors (default %(default)s)",
    )
    parser.add_argument(
        "--drift", dest="drift_detector", action=_DeprecatedAlias, choices=[*DETECTORS, "none"],
        replacement="--drift-detector", default=argparse.SUPPRESS, help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument(
        "--drift-reaction",
        default="alert",
        choices=REACTIONS,
        help="reaction to drift (default %(default)s)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1000,
        help="rolling-accuracy window, records (default %(default)s)",
    )
    parser.add_argument(
        "--series-every",
        type=int,
        default=200,
        help="plot/report a point every N labelled records (default %(default)s)",
    )
    parser.add_argument(
        "--labels-delay",
        type=int,
        default=0,
        metavar="N",
        help="hold each label back N records and send it as a label-only record, as late "
        "labels arrive (default %(default)s: labels come with their records)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="stop after N records (default: all)"
    )
    parser.add_argument(
        "--label-buffer-bytes",
        type=_byte_size,
        default=DEFAULT_MAX_BYTES,
        metavar="BYTES",
        help="most bytes the records waiting for a delayed label take; the oldest are evicted "
        "(KiB/MiB/GiB allowed; default 256MiB)",
    )
    parser.add_argument(
        "--max-classes",
        type=int,
        default=DEFAULT_MAX_CLASSES,
        metavar="N",
        help="most classes learned; records with a label past them are skipped "
        "(too_many_classes) (default %(default)s)",
    )
    parser.add_argument(
        "--mini-batch",
        type=int,
        default=0,
        metavar="N",
        help="predict, then learn, N records at a time (numpy learners learn them in one "
        "step; default %(default)s: one record at a time)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the learners (default %(default)s)"
    )
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=["jsonl", "json", "csv", "tsv", "text"],
        default=None,
        help="file format (default: from the extension)",
    )
    parser.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="a record the decoder refuses (blank text, bad JSON, ...): skip it, counted by "
        "reason and reported, or stop the run (default %(default)s)",
    )
    parser.add_argument(
        "--on-oversize",
        choices=["truncate", "skip", "stop"],
        default="truncate",
        help="a text over --max-text-bytes: cut it to the limit (counted), skip it, or stop "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-text-bytes",
        type=_byte_size,
        default=Decoder.max_text_bytes,
        metavar="BYTES",
        help="longest text, in UTF-8 bytes, as the worker's option of that name (KiB/MiB "
        "allowed; default 64KiB)",
    )
    add_field_arguments(parser, what="of the records")
    parser.add_argument(
        "--report", metavar="OUT.md", help="write a markdown report (default: none)"
    )
    parser.add_argument(
        "--plot", metavar="OUT.png", help="write the rolling-accuracy plot (default: none)"
    )
    parser.add_argument(
        "--save-models",
        metavar="DIR",
        help="save each neural learner at the end as DIR/<learner>.npz (warm start: pass the "
        "file to --learners later; default: not saved)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress line (default: shown on a terminal)",
    )
    parser.set_defaults(func=_run, parser=parser)


def learner_names(values: list[str] | None) -> list[str]:
    """``--learners a,b --learners c`` → ``["a", "b", "c"]``; the default when none is given.

    >>> learner_names(["nb,neural", "pa"]), learner_names(None)
    (['nb', 'neural', 'pa'], ['neural'])
    """
    names = [name.strip() for value in values or () for name in value.split(",") if name.strip()]
    return names or list(DEFAULT_LEARNERS)


def command_line(args: argparse.Namespace) -> str:
    """The ``stream-learner evaluate`` command that reruns this run, every option that changes
    its results spelled out (so a later release's defaults cannot change it)."""
    parser: argparse.ArgumentParser = args.parser
    flags = {
        action.dest: next(o for o in action.option_strings if o.startswith("--"))
        for action in parser._actions
        if action.option_strings and action.help != argparse.SUPPRESS
    }
    words = ["stream-learner", "evaluate", str(args.source)]
    for dest in _REPRODUCED:
        value = getattr(args, dest, None)
        if dest == "learners":
            value = ",".join(learner_names(value))
        if value is None:
            continue
        words += [flags[dest], str(value)]
    return shlex.join(words)


def _run(args) -> int:
    from stream_learner.data.datasets import DatasetError
    from stream_learner.data.readers import field_options, iter_records

    models = learner_names(args.learners)
    try:
        processor = StreamProcessor(
            models,
            serving=args.serving,
            drift_detector=args.drift_detector,
            drift_reaction=args.drift_reaction,
            window=args.window,
            series_every=args.series_every,
            label_ttl=None,
            label_buffer_bytes=args.label_buffer_bytes,
            max_classes=args.max_classes,
            seed=args.seed,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problems = InputProblems()
    try:
        records: Iterable[Record] = iter_records(
            args.source,
            fmt=args.fmt,
            limit=args.limit,
            **field_options(args),
            on_error="skip" if args.on_error == "skip" else "raise",
            on_skip=problems.skip,
            oversize={"truncate": "truncate", "skip": "skip", "stop": "raise"}[args.on_oversize],
            on_truncate=problems.truncate,
            max_text_bytes=args.max_text_bytes,
        )
        records = problems.watch(records)
        if args.labels_delay:
            records = delay_labels(records, args.labels_delay)
        bar = None
        if not args.no_progress and (
            sys.stderr.isatty() or os.environ.get("STREAM_LEARNER_PROGRESS") == "1"
        ):
            try:
                total = None if args.labels_delay else record_total(args.source, args.fmt, args.limit)
                bar = _RichProgress(total=total, problems=problems)
            except ImportError:  # rich is in the `report` extra
                bar = None
        if bar is not None:
            with bar:
                result = evaluate(records, processor, progress=bar, mini_batch=args.mini_batch)
        else:
            result = evaluate(records, processor, mini_batch=args.mini_batch)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if not any(row["learned"] for row in processor.learner_stats().values()):
        print(f"error: {_nothing_scored(args, result, problems)}", file=sys.stderr)
        return 1
    rows = result.rows()
    print(format_table(rows))
    print(
        f"\n{result.records:,} records in {result.seconds:.1f} s ({result.records_per_s:,.0f} records/s)"
    )
    buffer = processor.label_buffer_stats()
    if args.labels_delay:
        print(
            f"delayed labels: joined {buffer['joined']:,}, unmatched {buffer['unmatched']:,}, evicted {buffer['evicted']:,}"
        )
    drifts = sum(row["drifts"] for row in processor.learner_stats().values())
    if drifts > len(processor.drift_events):
        print(f"{drifts:,} drift events; the newest {len(processor.drift_events):,}:")
    for event in processor.drift_events:
        after = "" if event.accuracy_after is None else f" → {event.accuracy_after:.3f}"
        print(
            f"drift: {event.learner} at {event.position:,} ({event.detector}, {event.reaction}) rolling accuracy {event.accuracy_before:.3f}{after}"
        )
    if result.learner_errors:
        print(f"{result.learner_errors} records made a learner fail (see stderr)")
    for reason, count in sorted(result.skipped.items()):
        print(f"{count:,} records skipped: {reason}")
    for line in problems.lines():
        print(line)
    if args.plot:
        plot_accuracy(
            processor.series,
            processor.drift_events,
            args.plot,
            title=f"{args.source}: rolling accuracy (window {args.window})",
        )
        print(f"plot: {args.plot}")
    if args.save_models:
        for path in _save_models(processor, args.save_models):
            print(f"saved: {path}")
    if args.report:
        notes = [
            f"Command: `{command_line(args)}`",
            "",
            f"{result.records:,} records in {result.seconds:.1f} s.",
            *(f"\n{line}." for line in problems.lines()),
        ]
        plot_ref = (
            os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.report)))
            if args.plot
            else None
        )
        with open(args.report, "w") as out:
            out.write(
                markdown_report(
                    f"Prequential evaluation: {args.source}",
                    rows,
                    processor.drift_events,
                    notes,
                    plot_ref,
                )
            )
        print(f"report: {args.report}")
    return 0


def _nothing_scored(args, result: EvaluationResult, problems: InputProblems) -> str:
    """Why no record could be scored, in words a user can act on."""
    from stream_learner.data.readers import fields_of

    source = args.source
    if result.records == 0:
        if problems.n_skipped:
            return (
                f"no record could be scored: every one of the {problems.n_skipped:,} rows of "
                f"{source} was refused ({', '.join(problems.skipped)}); first: {problems.first_skipped}"
            )
        return f"no record could be scored: {source} holds no records"
    try:
        fields = fields_of(source, fmt=args.fmt)
    except Exception:  # the reason we are here is not the file's readability
        fields = []
    seen = f" (fields seen: {', '.join(fields)})" if fields else ""
    return (
        f"no record could be scored: {result.records:,} records read from {source}, none with a "
        f"label in field {args.label_field!r}{seen}; name the label field with --label-field"
    )


def _save_models(processor: StreamProcessor, directory: str) -> list[str]:
    from stream_learner.learners.neural.format import save
    from stream_learner.learners.neural.model import NeuralClassifier, neural_step
    from stream_learner.state.files import private_directory

    private_directory(directory)  # models may be trained on users' texts: 0700, files 0600
    saved = []
    for name, model in processor.learners.items():
        try:
            step = neural_step(model)
        except TypeError:
            continue  # only the numpy learner has a pickle-free file format
        if isinstance(step, NeuralClassifier):
            path = os.path.join(directory, f"{os.path.basename(name).removesuffix('.npz')}.npz")
            save(model, path)
            saved.append(path)
    return saved
