"""Reports of a run: the leaderboard table, a markdown report, and the accuracy plot."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["SCORED_NOTE", "leaderboard", "format_table", "markdown_report", "plot_accuracy"]

_COLUMNS = [
    ("learner", "learner", "{}"),
    ("n", "scored", "{:,}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("rolling_accuracy", "rolling acc.", "{:.4f}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("log_loss", "log loss", "{:.4f}"),
    ("drifts", "drifts", "{}"),
]
_SCORES = {"accuracy", "rolling_accuracy", "macro_f1", "log_loss"}
SCORED_NOTE = (
    "scored: labelled records predicted before they were learned; a learner's predictions "
    "before it knows any class are not scored. n/a: nothing scored."
)


def leaderboard(stats: Mapping[str, Mapping], extra: Mapping[str, Mapping] | None = None):
    """Rows sorted by cumulative accuracy, best first; ``extra`` adds columns per learner."""
    rows = []
    for name, row in stats.items():
        merged = {"learner": name, **row, **((extra or {}).get(name, {}))}
        rows.append(merged)
    rows.sort(key=lambda r: -r.get("accuracy", 0.0))
    return rows


def _cells(rows: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    columns = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    header = [title for _, title, _ in columns]
    body = []
    for row in rows:
        cells = []
        nothing_scored = row.get("n", 1) == 0
        for key, _, fmt in columns:
            value = row.get(key)
            if key in _SCORES and nothing_scored:
                cells.append("n/a")
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("")
            else:
                cells.append(fmt.format(value))
        body.append(cells)
    return header, body


def format_table(rows: Sequence[Mapping], note: bool = True) -> str:
    """A plain-text table for terminals and logs, with a line saying what ``scored`` counts."""
    header, body = _cells(rows)
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    if note:
        lines.append(SCORED_NOTE)
    return "\n".join(lines)


def _markdown_table(rows: Sequence[Mapping]) -> str:
    header, body = _cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown_report(
    title: str,
    rows: Sequence[Mapping],
    drift_events: Iterable = (),
    notes: Sequence[str] = (),
    plot_path: str | None = None,
) -> str:
    parts = [f"# {title}", "", _markdown_table(rows), "", SCORED_NOTE, ""]
    events = list(drift_events)
    if events:
        parts += [
            "## Drift events",
            "",
            "| learner | detector | position | accuracy before | accuracy after | reaction |",
            "|---|---|---|---|---|---|",
        ]
        for e in events:
            after = "" if e.accuracy_after is None else f"{e.accuracy_after:.4f}"
            parts.append(
                f"| {e.learner} | {e.detector} | {e.position:,} | {e.accuracy_before:.4f} | {after} | {e.reaction} |"
            )
        parts.append("")
    if plot_path:
        parts += [f"![rolling accuracy]({plot_path})", ""]
    parts += list(notes)
    return "\n".join(parts).rstrip() + "\n"


_DRIFT_STYLES = (":", "--", "-.", (0, (1, 3)), (0, (5, 2, 1, 2)))
_DRIFT_MARKERS = ("v", "^", "D", "s", "P", "X")


def plot_accuracy(
    series: Iterable[Mapping], drift_events: Iterable, path: str, title: str = ""
) -> str:
    """Rolling accuracy along the stream, one line per learner, drift events marked.

    The served predictions (a row whose learner is ``served (...)``) are drawn in black, over
    the learners. Each learner's drift events are lines in its colour with a style and a
    marker of its own, so events of several learners at nearby positions stay apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_learner: dict[str, tuple[list, list]] = {}
    for row in series:
        xs, ys = by_learner.setdefault(row["learner"], ([], []))
        xs.append(row["position"])
        ys.append(row["rolling_accuracy"])
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    colors = {}
    for name, (xs, ys) in by_learner.items():
        if name.startswith("served ("):
            ax.plot(xs, ys, label=name, color="black", linewidth=2.0, zorder=3)
            continue
        (line,) = ax.plot(xs, ys, label=name, linewidth=1.2, alpha=0.85)
        colors[name] = line.get_color()
    styles: dict[str, int] = {}
    for event in drift_events:
        first = event.learner not in styles
        index = styles.setdefault(event.learner, len(styles))
        color = colors.get(event.learner, "grey")
        ax.axvline(
            event.position,
            color=color,
            linestyle=_DRIFT_STYLES[index % len(_DRIFT_STYLES)],
            linewidth=1,
            alpha=0.8,
        )
        ax.plot(
            [event.position],
            [1.0 - 0.03 * (index % 8)],
            marker=_DRIFT_MARKERS[index % len(_DRIFT_MARKERS)],
            color=color,
            linestyle="none",
            markersize=6,
            label=f"drift: {event.learner}" if first else None,
            clip_on=False,
        )
    ax.set_xlabel("labelled records")
    ax.set_ylabel("rolling accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
