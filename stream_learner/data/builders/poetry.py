"""Chinese poetry (npm ``chinese-poetry``): which poet wrote the poem."""

from __future__ import annotations

import json
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

from stream_learner.core.records import Record
from stream_learner.data.builders.base import DatasetSource, cap_text

__all__ = ["POETRY_AUTHORS", "POETRY_SEED", "SOURCE", "build"]

POETRY_AUTHORS = 10
POETRY_SEED = 13
_POETRY_FILE = re.compile(r"package/dist/quantangshi/poet\.(?:tang|song)\.\d+\.json")
# Placeholders for an unknown author, not poets.
_NO_AUTHOR = frozenset({"不詳", "无名氏", "無名氏", "佚名", "不详"})


def build(artifact: Path) -> tuple[list[Record], dict]:
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
                text = "\n".join(
                    line.strip() for line in lines if isinstance(line, str) and line.strip()
                )
                author = author.strip()
                if not text or not author or author in _NO_AUTHOR:
                    skipped += 1
                    continue
                poem_id = poem.get("id") if isinstance(poem.get("id"), str) else f"{stem}/{index}"
                poems.append((poem_id, cap_text(text)[0], author))
    if not poems:
        raise ValueError("no poems found under package/dist/quantangshi/poet.*.json")
    counts = Counter(author for _, _, author in poems)
    top = [author for author, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][
        :POETRY_AUTHORS
    ]
    chosen = set(top)
    records = [
        Record(id=i, text=text, label=author) for i, text, author in poems if author in chosen
    ]
    random.Random(POETRY_SEED).shuffle(records)
    stats = {
        "files": files,
        "poems": len(poems),
        "skipped_without_author_or_text": skipped,
        "authors": {author: counts[author] for author in top},
    }
    return records, stats


SOURCE = DatasetSource(
    name="poetry",
    description="Tang and Song poems (chinese-poetry, traditional characters): which of the "
    f"{POETRY_AUTHORS} most prolific poets wrote it",
    registry="npm",
    package="chinese-poetry",
    version="2.0.1",
    sha256="25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",
    ordering=f"a seeded shuffle (seed {POETRY_SEED}); the corpus has no time",
    build=build,
)
