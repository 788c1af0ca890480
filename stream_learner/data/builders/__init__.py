"""One builder per dataset, and the registry that names them.

Each module describes where its dataset comes from (``SOURCE``: one pinned registry
artifact and its sha256) and how the artifact becomes an ordered record stream (``build``).
A new dataset is a new module here and one entry in :data:`SOURCES`.
"""

from __future__ import annotations

from stream_learner.data.builders import healthtweets, poetry, spamassassin, vader
from stream_learner.data.builders.base import DatasetSource

__all__ = ["DATASET_NAMES", "SOURCES", "DatasetSource"]

SOURCES: dict[str, DatasetSource] = {
    builder.SOURCE.name: builder.SOURCE for builder in (spamassassin, vader, healthtweets, poetry)
}
DATASET_NAMES = tuple(SOURCES)
