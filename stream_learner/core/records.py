"""Records and decoding: raw message bytes → :class:`Record`, or a :class:`DecodeError`.

A message is JSON ``{"id": str, "text": str, "label": str|int|null, "ts": number|ISO-8601|null}``
(field names configurable); a value that is not a JSON object is taken as plain text. A
record with an id and a label but no text is a *label-only* record: it delivers the label
of a record that was predicted earlier (delayed labels).

Decoding never raises anything but :class:`DecodeError`, which carries a machine-readable
reason code and the original bytes so the caller can dead-letter the message.

>>> decoder = Decoder()
>>> decoder.decode(b'{"id": "a1", "text": "Free money!!!", "label": "spam"}')
Record(id='a1', text='Free money!!!', label='spam', ts=None)
>>> decoder.decode(b"just some words").text
'just some words'
>>> try:
...     decoder.decode(b'{"id": "a1", "text": ""}')
... except DecodeError as error:
...     print(error.reason)
empty_text

"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import re
import unicodedata

__all__ = ["Record", "Reason", "DecodeError", "Decoder", "OVERSIZE_POLICIES", "parse_timestamp"]


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One message of the stream.

    ``text`` is None only for label-only records; ``ts`` is seconds since the epoch (UTC).
    ``ts_error`` says why a timestamp the message gave was dropped (it could not be parsed).
    ``truncated_from`` is the text's size in UTF-8 bytes when the decoder cut it to its limit.
    """

    id: str | None
    text: str | None
    label: str | int | None = None
    ts: float | None = None
    ts_error: str | None = dataclasses.field(default=None, repr=False, compare=False)
    truncated_from: int | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def is_label_only(self) -> bool:
        return self.text is None


class Reason(enum.StrEnum):
    """Why a message could not be decoded. Values are stable: they label metrics and headers."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    EMPTY_MESSAGE = "empty_message"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    TEXT_NOT_STRING = "text_not_string"
    TEXT_TOO_LONG = "text_too_long"
    MESSAGE_TOO_LARGE = "message_too_large"
    INVALID_ID = "invalid_id"
    INVALID_LABEL = "invalid_label"
    INVALID_TIMESTAMP = "invalid_timestamp"
    LABEL_WITHOUT_ID = "label_without_id"
    # Not raised by the decoder; used by the runner for records a learner could not handle.
    LEARNER_ERROR = "learner_error"
    # Not raised by the decoder; a label past the runner's cap on classes (--max-classes).
    TOO_MANY_CLASSES = "too_many_classes"


def json_type(value) -> str:
    """How a JSON value's type reads in a sentence: ``an array``, ``a number``, ``null``.

    >>> json_type([1]), json_type(5), json_type(None), json_type({"a": 1})
    ('an array', 'a number', 'null', 'an object')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


class DecodeError(ValueError):
    """A message that cannot become a :class:`Record`.

    Parameters
    ----------
    reason
        Machine-readable reason code.
    detail
        Human-readable explanation.
    raw
        The original bytes, untouched, for the dead-letter sink.

    """

    def __init__(self, reason: Reason, detail: str, raw: bytes):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.raw = raw

    def __reduce__(self):
        return type(self), (self.reason, self.detail, self.raw)


_INT64 = 2**63
# A string (skipped whole: brackets inside it do not nest) or a bracket. Possessive: linear.
_JSON_NESTING = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)


def _nesting_beyond(value: str, limit: int) -> tuple[int, bool] | None:
    """None when ``value`` nests arrays and objects at most ``limit`` deep; else (its deepest
    nesting, whether its brackets close). A scan, without recursion."""
    if value.count("[") + value.count("{") <= limit:
        return None  # the common case, at C speed
    depth = deepest = 0
    for match in _JSON_NESTING.finditer(value):
        bracket = match.group()
        if bracket == "[" or bracket == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif bracket == "]" or bracket == "}":
            depth -= 1
            if depth < 0:
                break
    return (deepest, depth == 0) if deepest > limit else None


# Whitespace (Z*), control (Cc) and format (Cf) characters: no content to learn from.
_NOT_CONTENT = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def _has_content(text: str) -> bool:
    """Whether ``text`` holds a character other than whitespace, control and format ones."""
    text = text.strip()
    if not text:
        return False
    if text[0].isprintable():  # not C* or Z*: the common case, at once
        return True
    category = unicodedata.category
    return any(category(char) not in _NOT_CONTENT for char in text)


#: What the decoder does with a text over its limit (``Decoder.oversize``).
OVERSIZE_POLICIES = ("error", "truncate")


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Turns message bytes into records.

    Parameters
    ----------
    id_field, text_field, label_field, ts_field
        Names of the JSON fields.
    max_text_bytes
        Longest text accepted, in UTF-8 bytes (default 64 KiB).
    oversize
        A longer text: ``"error"``, a ``text_too_long`` error; ``"truncate"``, cut to the
        limit at a character boundary (``Record.truncated_from`` keeps its size). A message
        over :attr:`max_message_bytes` is an error either way.
    allow_plain_text
        Take a value that is not a JSON object as a record with text only. When False,
        such a value is an ``invalid_json`` / ``not_an_object`` error.
    max_json_depth
        Deepest nesting of arrays and objects accepted; a JSON value nested deeper is
        ``invalid_json``, whatever its shape (checked without recursion, before parsing).

    A UTF-8 byte-order mark before the value is dropped. A text without printable content
    (only whitespace, control and format characters) is ``empty_text``.

    invalid_timestamps
        ``"drop"``: a timestamp string or number that :func:`parse_timestamp` cannot read is
        dropped (the record keeps everything else; ``Record.ts_error`` says why);
        ``"error"``: it is an ``invalid_timestamp`` error. A timestamp of another JSON type
        (boolean, list, object) is always an error.

    """

    id_field: str = "id"
    text_field: str = "text"
    label_field: str = "label"
    ts_field: str = "ts"
    max_text_bytes: int = 64 * 1024
    allow_plain_text: bool = True
    max_json_depth: int = 128
    invalid_timestamps: str = "drop"
    oversize: str = "error"

    def __post_init__(self):
        if self.oversize not in OVERSIZE_POLICIES:
            raise ValueError(f"oversize must be one of {', '.join(OVERSIZE_POLICIES)}, not {self.oversize!r}")
        if self.max_text_bytes < 1:
            raise ValueError(f"max_text_bytes must be at least 1, not {self.max_text_bytes}")

    @property
    def max_message_bytes(self) -> int:
        # JSON escaping can make a text up to 6x longer (\uXXXX); leave room for the other fields.
        return 6 * self.max_text_bytes + 64 * 1024

    def decode(self, raw: bytes | bytearray | memoryview | str | None) -> Record:
        if raw is None:
            raise DecodeError(Reason.EMPTY_MESSAGE, "message has no value (tombstone)", b"")
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        raw = bytes(raw)
        if not raw.strip():
            raise DecodeError(Reason.EMPTY_MESSAGE, "message is empty or blank", raw)
        if len(raw) > self.max_message_bytes:
            raise DecodeError(
                Reason.MESSAGE_TOO_LARGE,
                f"message is {len(raw)} bytes, limit {self.max_message_bytes}",
                raw,
            )
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DecodeError(Reason.INVALID_UTF8, str(error), raw) from None

        value = value.removeprefix("\ufeff")  # a byte-order mark some producers write
        first = value.lstrip()[:1]
        if first in ("{", "[") and (too_deep := _nesting_beyond(value, self.max_json_depth)):
            # The JSON parser recurses: a deeper value would exhaust the stack. After "[", an
            # unclosed one is no JSON at all: text.
            deepest, closed = too_deep
            if closed or first == "{" or not self.allow_plain_text:
                raise DecodeError(
                    Reason.INVALID_JSON,
                    f"JSON nests {deepest} levels deep, limit {self.max_json_depth}",
                    raw,
                )
        elif first == "{" or (first == "[" and not self.allow_plain_text):
            try:
                obj = json.loads(value)
            except (ValueError, RecursionError) as error:
                raise DecodeError(Reason.INVALID_JSON, str(error)[:200], raw) from None
            if not isinstance(obj, dict):
                raise DecodeError(
                    Reason.NOT_AN_OBJECT, f"the JSON value is {json_type(obj)}, not an object", raw
                )
            return self._from_object(obj, raw)
        if first == "[":
            # "[URGENT] call me" is text; a JSON array is a producer's mistake.
            try:
                obj = json.loads(value)
            except (ValueError, RecursionError):
                pass
            else:
                raise DecodeError(Reason.NOT_AN_OBJECT, "JSON value is a list", raw)
        if not self.allow_plain_text:
            raise DecodeError(Reason.INVALID_JSON, "value is not a JSON object", raw)
        text, truncated_from = self._check_text(value, raw)
        return Record(id=None, text=text, truncated_from=truncated_from)

    def _from_object(self, obj: dict, raw: bytes) -> Record:
        record_id = self._check_id(obj.get(self.id_field), raw)
        label = self._check_label(obj.get(self.label_field), raw)
        ts, ts_error = self._check_ts(obj.get(self.ts_field), raw)

        if self.text_field not in obj or obj[self.text_field] is None:
            if label is not None:
                if record_id is None:
                    raise DecodeError(
                        Reason.LABEL_WITHOUT_ID,
                        f"label-only record needs a {self.id_field!r} to join on",
                        raw,
                    )
                return Record(id=record_id, text=None, label=label, ts=ts, ts_error=ts_error)
            raise DecodeError(Reason.MISSING_TEXT, f"no {self.text_field!r} field", raw)
        text = obj[self.text_field]
        if not isinstance(text, str):
            raise DecodeError(
                Reason.TEXT_NOT_STRING,
                f"field {self.text_field!r} holds {json_type(text)}, not a string",
                raw,
            )
        text, truncated_from = self._check_text(text, raw)
        return Record(
            id=record_id, text=text, label=label, ts=ts, ts_error=ts_error, truncated_from=truncated_from
        )

    def _check_text(self, text: str, raw: bytes) -> tuple[str, int | None]:
        """The text, and its size when it was cut to the limit (None: whole)."""
        if not _has_content(text):
            raise DecodeError(
                Reason.EMPTY_TEXT,
                "text is empty or only whitespace, control or format characters",
                raw,
            )
        # Lone surrogates (from "\ud800" in JSON) cannot be encoded: reject them here, where
        # the reason is clear, not later in the tokenizer.
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise DecodeError(Reason.INVALID_UTF8, "text holds a lone surrogate", raw) from None
        if size <= self.max_text_bytes:
            return text, None
        if self.oversize == "truncate":
            # Encoded once more only for a text over the limit; the cut is at a character boundary.
            cut = text.encode("utf-8")[: self.max_text_bytes].decode("utf-8", "ignore")
            if _has_content(cut):
                return cut, size
        raise DecodeError(
            Reason.TEXT_TOO_LONG, f"text is {size} bytes, limit {self.max_text_bytes}", raw
        )

    def _check_id(self, value, raw: bytes) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DecodeError(
                Reason.INVALID_ID, f"field {self.id_field!r} holds {json_type(value)}, not a string or an integer", raw
            )
        value = str(value)
        if not value or len(value) > 1024:
            raise DecodeError(Reason.INVALID_ID, "id is empty or longer than 1024 chars", raw)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError(Reason.INVALID_ID, "id holds a lone surrogate", raw) from None
        return value

    def _check_label(self, value, raw: bytes) -> str | int | None:
        if value is None:
            return None
        if isinstance(value, bool):
            return value  # JSON true/false: binary labels are common and unambiguous.
        if isinstance(value, int):
            if abs(value) >= _INT64:
                raise DecodeError(Reason.INVALID_LABEL, "integer label out of range", raw)
            return value
        if isinstance(value, str):
            if not value or len(value) > 256:
                raise DecodeError(
                    Reason.INVALID_LABEL, "label is empty or longer than 256 chars", raw
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DecodeError(
                    Reason.INVALID_LABEL, "label holds a lone surrogate", raw
                ) from None
            return value
        raise DecodeError(
            Reason.INVALID_LABEL,
            f"field {self.label_field!r} holds {json_type(value)}, not a string, an integer or a boolean",
            raw,
        )

    def _check_ts(self, value, raw: bytes) -> tuple[float | None, str | None]:
        """(seconds since the epoch or None, why a given timestamp was dropped or None)."""
        if value is None:
            return None, None
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise DecodeError(
                Reason.INVALID_TIMESTAMP, f"the timestamp is {json_type(value)}, not a number or a string", raw
            )
        try:
            return parse_timestamp(value), None
        except ValueError as error:
            if self.invalid_timestamps == "error":
                raise DecodeError(Reason.INVALID_TIMESTAMP, str(error), raw) from None
            return None, str(error)

    def encode(self, record: Record) -> bytes:
        """The inverse of :meth:`decode`: a JSON message for ``record`` (used by ``produce``)."""
        obj: dict = {}
        if record.id is not None:
            obj[self.id_field] = record.id
        if record.text is not None:
            obj[self.text_field] = record.text
        if record.label is not None:
            obj[self.label_field] = record.label
        if record.ts is not None:
            obj[self.ts_field] = record.ts
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# --- timestamps ---------------------------------------------------------------------------------

_DATE_TIME = re.compile(
    r"(?P<year>\d{4})(?P<sep>[-/])(?P<month>\d{1,2})(?P=sep)(?P<day>\d{1,2})"
    r"(?:[ T]+(?P<hour>\d{1,2}):(?P<minute>\d{1,2})"
    r"(?::(?P<second>\d{1,2})(?:[.,](?P<fraction>\d+))?)?)?"
    r" *(?P<zone>Z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?",
    re.IGNORECASE | re.ASCII,
)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# Numbers above this are milliseconds (1e11 s is the year 5138; 1e11 ms is March 1973).
_MS_THRESHOLD = 1e11


def parse_timestamp(value: str | int | float) -> float:
    """Seconds since the epoch (UTC) of a timestamp, or ValueError saying why not.

    Accepted: a number of seconds or milliseconds since the epoch (a number above 1e11 is
    milliseconds), also as a string; ISO-8601 with ``T`` or a space between date and time;
    ``YYYY/MM/DD[ HH:MM[:SS]]``; months, days and hours with or without their leading zero,
    fractions of a second, ``Z`` / ``UTC`` / ``±HH[:MM]`` offsets (none: UTC); surrounding
    whitespace.

    >>> parse_timestamp("2016/12/30 7:11")
    1483081860.0
    >>> parse_timestamp(" 2016-12-30T07:11:00Z ") == parse_timestamp(1483081860000)
    True
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("timestamp is blank")
        if _NUMBER.fullmatch(text):
            return _epoch(float(text))
        return _parse_date_time(text, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"the timestamp is {json_type(value)}, not a number or a string")
    return _epoch(float(value))


def _epoch(ts: float) -> float:
    if not math.isfinite(ts):
        raise ValueError("timestamp is not finite")
    if abs(ts) > _MS_THRESHOLD:
        ts /= 1000.0  # milliseconds since the epoch are common in Kafka land
    if abs(ts) > _MS_THRESHOLD:
        raise ValueError("timestamp out of range")
    return ts


def _parse_date_time(text: str, value: str) -> float:
    match = _DATE_TIME.fullmatch(text)
    try:
        if match is None:
            # Other ISO-8601 forms Python reads (week dates, compact forms).
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        else:
            fraction = (match["fraction"] or "0")[:6].ljust(6, "0")
            parsed = dt.datetime(
                int(match["year"]),
                int(match["month"]),
                int(match["day"]),
                int(match["hour"] or 0),
                int(match["minute"] or 0),
                int(match["second"] or 0),
                int(fraction),
                tzinfo=_zone(match["zone"]),
            )
    except ValueError:
        raise ValueError(f"not a timestamp: {value[:64]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        return parsed.timestamp()
    except (OverflowError, ValueError, OSError):
        raise ValueError(f"timestamp out of range: {value[:64]!r}") from None


def _zone(zone: str | None) -> dt.tzinfo:
    if zone is None or zone.upper() in ("Z", "UTC", "GMT"):
        return dt.UTC
    sign = -1 if zone[0] == "-" else 1
    digits = zone[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:] or 0)
    if hours > 23 or minutes > 59:
        raise ValueError("offset out of range")
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
