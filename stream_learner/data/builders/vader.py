"""VADER sentiment ground truth (PyPI ``vadersentiment`` sdist): pos vs neg in four domains."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

from stream_learner.core.records import Record
from stream_learner.data.builders.base import DatasetSource, cap_text

__all__ = ["SOURCE", "VADER_DOMAINS", "build", "parse_ground_truth"]

# (domain used in ids and segments, file stem in hutto_ICWSM_2014/), in stream order.
VADER_DOMAINS = (
    ("tweets", "tweets"),
    ("movie_reviews", "movieReviewSnippets"),
    ("amazon_reviews", "amazonReviewSnippets"),
    ("nyt_editorials", "nytEditorialSnippets"),
)
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"


def build(artifact: Path) -> tuple[list[Record], dict]:
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
        text, _ = cap_text(fields[2].strip())
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


SOURCE = DatasetSource(
    name="vader",
    description="VADER sentiment ground truth (Hutto & Gilbert 2014): pos vs neg in four "
    "domains, streamed tweets -> movie reviews -> Amazon reviews -> NYT editorials",
    registry="pypi",
    package="vadersentiment",
    version="3.3.2",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    pip_options=("--no-binary", ":all:"),
    ordering="by domain (see segments), then file order",
    build=build,
)
