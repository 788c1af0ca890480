"""Readers of users' files and fetched datasets: JSONL, a JSON array, CSV, TSV, plain text.

``iter_records`` reads a fetched dataset (by name) or a user's file. Every row goes through
the same :class:`~stream_learner.core.records.Decoder` as a Kafka message, so files obey the
same rules. A row that cannot become a record is never dropped silently: it raises
:class:`~stream_learner.data.datasets.DatasetError` (``on_error="raise"``), or is handed to
``on_skip`` (``on_error="skip"``).

>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "mail.csv"
>>> _ = path.write_text("id,text,label\\nm1,Cheap pills,spam\\nm2,,\\nm3,Lunch at noon?,ham\\n")
>>> skipped = []
>>> [r.id for r in iter_records(path, on_error="skip", on_skip=skipped.append)]
['m1', 'm3']
>>> skipped[0].reason, skipped[0].line
('missing_text', 3)
>>> str(skipped[0]).endswith("mail.csv:3: missing_text: no 'text' field")
True

"""

from __future__ import annotations

import argparse
import codecs
import csv
import dataclasses
import gzip
import io
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from stream_learner.core.records import DecodeError, Decoder, Reason, Record
from stream_learner.data.builders.base import cap_text
from stream_learner.data.datasets import DATASET_NAMES, DatasetError, records_path

__all__ = [
    "FORMATS",
    "add_field_arguments",
    "field_options",
    "fields_of",
    "iter_records",
    "load_records",
    "read_raw_lines",
    "resolve_source",
]


def _row_error(source: str, line: int, reason: str, detail: str, raw: bytes | None) -> DatasetError:
    return DatasetError(
        f"{source}:{line}: {reason}: {detail}",
        source=source,
        line=line,
        reason=str(reason),
        raw=raw,
    )


_FORMATS = {
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "json",
    "csv": "csv",
    "tsv": "tsv",
    "tab": "tsv",
    "txt": "text",
    "text": "text",
    "lines": "text",
}
FORMATS = ("jsonl", "json", "csv", "tsv", "text")


def iter_records(
    source: str | os.PathLike,
    *,
    fmt: str | None = None,
    id_field: str = "id",
    text_field: str = "text",
    label_field: str = "label",
    ts_field: str = "ts",
    limit: int | None = None,
    on_error: str = "raise",
    on_skip: Callable[[DatasetError], object] | None = None,
    oversize: str = "error",
    on_truncate: Callable[[int], object] | None = None,
    max_text_bytes: int = Decoder.max_text_bytes,
) -> Iterator[Record]:
    """Records of a fetched dataset (by name) or of a file, in file order.

    Parameters
    ----------
    source
        A name in :data:`DATASET_NAMES` (the dataset wins over a file of the same name; say
        ``./vader`` for the file) or a path. ``.gz`` files are read decompressed.
    fmt
        ``jsonl``, ``json`` (a JSON array, or JSONL), ``csv``, ``tsv`` (both with a header
        row) or ``text`` (one text per line). Default: from the extension
        (``.jsonl .ndjson .json .csv .tsv .txt``).
    id_field, text_field, label_field, ts_field
        Field (JSON) or column (CSV/TSV) names. Ignored for datasets.
    limit
        Stop after this many records.
    on_error
        ``"raise"``: a row that is not a record raises :class:`DatasetError` naming the file,
        line and reason. ``"skip"``: it is passed to ``on_skip`` (if given) and reading goes
        on. Blank lines are not rows. Problems with the whole file (missing, unreadable, no
        text column) always raise.
    oversize
        A text over ``max_text_bytes``: ``"error"``, a row error like any
        other (``text_too_long``); ``"truncate"``: cut to the limit (at a character
        boundary), ``on_truncate(line)`` is called and the record kept; ``"skip"``: passed to
        ``on_skip`` whatever ``on_error`` says; ``"raise"``: raised whatever ``on_error`` says.
    max_text_bytes
        The decoder's limit on a text, in UTF-8 bytes (default 64 KiB), as the worker's
        ``--max-text-bytes``.

    The file is opened and checked when this is called; rows are read lazily.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if oversize not in ("error", "truncate", "skip", "raise"):
        raise ValueError(
            f"oversize must be 'error', 'truncate', 'skip' or 'raise', not {oversize!r}"
        )
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    if max_text_bytes < 1:
        raise ValueError(f"max_text_bytes must be at least 1, not {max_text_bytes}")
    path, fmt = _resolve(source, fmt)
    if isinstance(source, str) and source in DATASET_NAMES:
        id_field, text_field, label_field, ts_field = "id", "text", "label", "ts"
    fields = _Fields(id_field, text_field, label_field, ts_field)
    rows = _ROW_READERS[fmt](path, fields)
    first = next(rows, None)  # opens the file and checks the header now, not on first use
    oversized = _Oversize(oversize, on_truncate, max_text_bytes)
    return _records(_prepend(first, rows), fields, str(path), limit, on_error, on_skip, oversized)


def fields_of(source: str | os.PathLike, *, fmt: str | None = None, rows: int = 100) -> list[str]:
    """The field (JSON) or column (CSV/TSV) names of the first ``rows`` rows of ``source``,
    in order of first appearance: what a user can pass as ``--text-field`` and the like."""
    path, fmt = _resolve(source, fmt)
    if fmt == "text":
        return []
    names: dict[str, None] = {}
    if fmt in ("csv", "tsv"):
        with _open_binary(path) as binary:
            text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace", newline="")
            try:
                header = next(csv.reader(text, delimiter="," if fmt == "csv" else "\t"), [])
            except csv.Error:
                header = []
        return [name.strip() for name in header]
    try:
        for _, payload in itertools.islice(_ROW_READERS[fmt](path, _Fields("", "", "", "")), rows):
            if isinstance(payload, bytes):
                try:
                    obj = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    names.update(dict.fromkeys(map(str, obj)))
    except DatasetError:
        pass
    return list(names)


def read_raw_lines(source: str | os.PathLike) -> Iterator[bytes]:
    """The non-blank lines of a fetched dataset or a JSONL/text file, as they are."""
    path, fmt = _resolve(source, None)
    if fmt not in ("jsonl", "text"):
        raise DatasetError(f"{path}: lines can be sent unchanged only from a JSONL or text file")
    for _number, line in _read_lines(path):
        yield line


def field_options(args: argparse.Namespace) -> dict[str, str]:
    """The field names :func:`add_field_arguments` parsed, as keyword arguments of
    :func:`iter_records` and :class:`~stream_learner.core.records.Decoder`."""
    return {
        name: getattr(args, name) for name in ("id_field", "text_field", "label_field", "ts_field")
    }


def add_field_arguments(parser: argparse.ArgumentParser, what: str = "of the records") -> None:
    """``--text-field``, ``--label-field``, ``--id-field``, ``--ts-field``, each with its env form."""
    for name, default, meaning in (
        ("text", "text", "the text"),
        ("label", "label", "the label"),
        ("id", "id", "the record id (joins late labels, keys the outputs)"),
        ("ts", "ts", "the event time"),
    ):
        env = f"STREAM_LEARNER_{name.upper()}_FIELD"
        parser.add_argument(
            f"--{name}-field",
            default=os.environ.get(env, default),
            metavar="NAME",
            help=f"field or column {what} holding {meaning} (env {env}; default %(default)s)",
        )


def _prepend(first, rest):
    if first is not None:
        yield first
    yield from rest


def load_records(source: str | os.PathLike, **kwargs) -> list[Record]:
    """All records of ``source`` as a list; same arguments as :func:`iter_records`."""
    return list(iter_records(source, **kwargs))


@dataclasses.dataclass(frozen=True)
class _Fields:
    id: str
    text: str
    label: str
    ts: str


def resolve_source(source: str | os.PathLike, fmt: str | None = None) -> tuple[Path, str]:
    """``(path, format)`` of a fetched dataset or a file, as :func:`iter_records` reads it."""
    return _resolve(source, fmt)


def _resolve(source, fmt: str | None) -> tuple[Path, str]:
    if isinstance(source, str) and source in DATASET_NAMES:
        return records_path(source), "jsonl"
    path = Path(source)
    if not path.exists():
        raise DatasetError(
            f"no such file or dataset: {str(source)!r} (datasets: {', '.join(DATASET_NAMES)})"
        )
    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    if fmt is None:
        suffixes = [s.lower().lstrip(".") for s in path.suffixes]
        if suffixes and suffixes[-1] == "gz":
            suffixes.pop()
        extension = suffixes[-1] if suffixes else ""
        if extension not in _FORMATS:
            raise DatasetError(
                f"cannot tell the format of {path} from its extension; pass fmt= "
                f"(one of {', '.join(FORMATS)})"
            )
        return path, _FORMATS[extension]
    if fmt.lower() not in _FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return path, _FORMATS[fmt.lower()]


def _open_binary(path: Path):
    try:
        if path.suffix.lower() == ".gz":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as error:
        raise DatasetError(f"cannot open {path}: {error}") from error


# A row is (line number, payload bytes for the decoder) or (line number, DatasetError).
Row = tuple[int, "bytes | DatasetError"]


@dataclasses.dataclass(frozen=True)
class _Oversize:
    policy: str = "error"
    on_truncate: Callable[[int], object] | None = None
    max_text_bytes: int = Decoder.max_text_bytes

    def truncated(self, decoder: Decoder, payload: bytes, line: int) -> Record | None:
        """The record of an over-long row with its text cut to the limit, or None."""
        if self.policy != "truncate":
            return None
        limit = decoder.max_text_bytes
        lenient = dataclasses.replace(decoder, max_text_bytes=max(len(payload), limit))
        try:
            record = lenient.decode(payload)
        except DecodeError:
            return None
        text, _ = cap_text(record.text, limit)
        if not text.strip():
            return None
        if self.on_truncate is not None:
            self.on_truncate(line)
        return dataclasses.replace(record, text=text)


_OVERSIZE_REASONS = (Reason.TEXT_TOO_LONG, Reason.MESSAGE_TOO_LARGE)


def _records(
    rows: Iterable[Row],
    fields: _Fields,
    source: str,
    limit,
    on_error,
    on_skip,
    oversize=_Oversize(),
) -> Iterator[Record]:
    # Every payload is a JSON object (the readers build one per CSV/text row), so anything
    # else in a JSON file is an error, never silently a plain-text record.
    decoder = Decoder(
        id_field=fields.id,
        text_field=fields.text,
        label_field=fields.label,
        ts_field=fields.ts,
        allow_plain_text=False,
        max_text_bytes=oversize.max_text_bytes,
    )
    produced = 0
    if limit == 0:
        return
    for line, payload in rows:
        if isinstance(payload, DatasetError):
            problem = payload
        else:
            try:
                record = decoder.decode(payload)
            except DecodeError as error:
                record = None
                if error.reason in _OVERSIZE_REASONS:
                    record = oversize.truncated(decoder, payload, line)
                problem = _row_error(source, line, error.reason, error.detail, payload)
            if record is not None:
                yield record
                produced += 1
                if limit is not None and produced >= limit:
                    return
                continue
        policy = oversize.policy if problem.reason in _OVERSIZE_REASONS else "error"
        if policy == "raise" or (on_error == "raise" and policy != "skip"):
            raise problem
        if on_skip is not None:
            on_skip(problem)


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines without their line end (\\n or \\r\\n), numbered from 1."""
    with _open_binary(path) as file:
        try:
            for number, line in enumerate(file, start=1):
                if number == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8) :]
                line = line.removesuffix(b"\n").removesuffix(b"\r")
                if line.strip():
                    yield number, line
        except (OSError, EOFError) as error:
            raise DatasetError(f"cannot read {path}: {error}") from error


def _jsonl_rows(path: Path, fields: _Fields) -> Iterator[Row]:
    yield from _read_lines(path)


def _json_rows(path: Path, fields: _Fields) -> Iterator[Row]:
    with _open_binary(path) as file:
        try:
            content = file.read()
        except (OSError, EOFError) as error:
            raise DatasetError(f"cannot read {path}: {error}") from error
    if content.startswith(codecs.BOM_UTF8):
        content = content[len(codecs.BOM_UTF8) :]
    if content.lstrip()[:1] != b"[":
        yield from _jsonl_rows(path, fields)  # a .json file holding JSON lines
        return
    try:
        items = json.loads(content)
    except (ValueError, RecursionError) as error:
        where = getattr(error, "lineno", 1)
        yield (
            where,
            _row_error(
                str(path),
                where,
                "invalid_json",
                f"the JSON array cannot be parsed, nothing after this point "
                f"can be read: {str(error)[:200]}",
                None,
            ),
        )
        return
    for number, item in enumerate(items, start=1):
        yield number, json.dumps(item, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _csv_rows(path: Path, fields: _Fields, delimiter: str) -> Iterator[Row]:
    source = str(path)
    with _open_binary(path) as binary:
        # surrogateescape: bad UTF-8 survives parsing and is reported per row by the decoder.
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
        except (csv.Error, OSError, EOFError) as error:
            raise DatasetError(f"{source}:1: cannot read the header row: {error}") from error
        if header is None:
            return
        header = [name.strip() for name in header]
        if fields.text not in header:
            raise DatasetError(
                f"{source}: the header row has no {fields.text!r} column (columns: "
                f"{', '.join(map(repr, header))}); name the text column with text_field / "
                "--text-field"
            )
        columns = {
            name: header.index(name)
            for name in (fields.id, fields.text, fields.label, fields.ts)
            if name in header
        }
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield start, _row_error(source, start, "invalid_csv", str(error), None)
                continue
            except (OSError, EOFError) as error:
                raise DatasetError(f"cannot read {path}: {error}") from error
            if not any(cell.strip() for cell in row):
                continue  # a blank line holds no record
            raw = delimiter.join(row).encode("utf-8", "surrogateescape")
            if len(row) != len(header):
                yield (
                    start,
                    _row_error(
                        source,
                        start,
                        "invalid_csv",
                        f"row has {len(row)} fields, the header has {len(header)}",
                        raw,
                    ),
                )
                continue
            obj: dict[str, object] = {}
            for name, index in columns.items():
                value = row[index]
                if value == "":
                    continue  # an empty cell is a missing value
                if name == fields.ts:
                    obj[name] = _number_or_text(value)
                else:
                    obj[name] = value
            try:
                payload = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                payload = raw + b"\xff"  # not UTF-8: the decoder reports invalid_utf8
            yield start, payload


def _number_or_text(value: str):
    # CSV cells are strings; a number is epoch seconds (or ms), anything else ISO-8601.
    try:
        return float(value)
    except ValueError:
        return value.strip()


def _text_rows(path: Path, fields: _Fields) -> Iterator[Row]:
    for number, line in _read_lines(path):
        obj = {fields.text: line.decode("utf-8", "surrogateescape")}
        yield number, json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogateescape")


_ROW_READERS: dict[str, Callable[[Path, _Fields], Iterator[Row]]] = {
    "jsonl": _jsonl_rows,
    "json": _json_rows,
    "csv": lambda path, fields: _csv_rows(path, fields, ","),
    "tsv": lambda path, fields: _csv_rows(path, fields, "\t"),
    "text": _text_rows,
}
