"""What hostile text costs the featurizer: time per KiB on the adversarial corpus against
ordinary text of the same size, for every registered learner's featurizer, in one run.

The corpus is :func:`stream_learner.data.adversarial.worst_cases` (the fixed corpus the tests use):
texts of 60,000 UTF-8 bytes, each a long run of what some pattern reads, most ending in the
near miss that once made a pattern backtrack. Ordinary text is records of the dev datasets
(``spamassassin`` e-mails, ``vader`` reviews, ``healthtweets``) joined until the same size.
Every text is featurized by a fresh featurizer (cold caches, as a never-seen text meets them)
``--repeats`` times; the fastest run counts (thread CPU time), so that load from other
processes on a shared machine inflates no figure. Learners whose featurizers are configured
alike share a row.

With ``--before REV`` the featurizer of git revision REV is timed on the same texts, once
each (it is quadratic on some: minutes in all).

    .venv/bin/python -m benchmarks.adversarial                       # writes results/adversarial.md + .png
    .venv/bin/python -m benchmarks.adversarial --before 72bc361      # with the old featurizer beside it
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stream_learner.core.features import TextFeaturizer
from stream_learner.data.adversarial import worst_cases
from stream_learner.data.readers import load_records
from stream_learner.learners.registry import LearnerError, available_learners, make_learner

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 60_000
ORDINARY_DATASETS = ("spamassassin", "vader", "healthtweets")
TARGET = 2.0  # worst adversarial time per KiB ÷ ordinary
# The memory half of the benchmark is its own run (about 15 minutes).
MEMORY_SECTION = (
    "## Memory\n\n"
    "Resident memory of a worker under 60 KB unlabelled texts and fresh labels past the class "
    "cap, against ordinary records, and its records/s before and after the byte budgets: "
    "[adversarial_memory.md](adversarial_memory.md) (`.venv/bin/python -m "
    "benchmarks.adversarial_memory`).\n"
)


def featurizer_groups() -> dict[str, TextFeaturizer]:
    """Learners that share a featurizer configuration (joined names) → that featurizer."""
    groups: list[tuple[list[str], dict, TextFeaturizer]] = []
    for name in available_learners():
        try:
            model = make_learner(name)
        except LearnerError:  # needs a fetched model
            continue
        featurizer = next(iter(model.steps.values()))
        params = featurizer._get_params()
        for names, seen, _ in groups:
            if seen == params:
                names.append(name)
                break
        else:
            groups.append(([name], params, featurizer))
    return {", ".join(names): featurizer for names, _, featurizer in groups}


def ordinary_texts(per_dataset: int, size: int = SIZE) -> dict[str, str]:
    """Consecutive records of each dev dataset joined into texts of about ``size`` bytes."""
    texts = {}
    for dataset in ORDINARY_DATASETS:
        records = load_records(dataset)
        step = max(len(records) // per_dataset, 1)
        for k in range(per_dataset):
            parts, length = [], 0
            for record in records[k * step :]:
                piece = record.text.encode()
                if length + len(piece) + 1 > size:
                    break
                parts.append(record.text)
                length += len(piece) + 1
            texts[f"{dataset} #{k + 1}"] = "\n".join(parts)
    return texts


def seconds_per_kib(featurizer: TextFeaturizer, text: str, repeats: int, batch: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        fresh = featurizer.clone()
        start = time.thread_time()
        if batch:
            fresh.buckets_many([text])
        else:
            fresh.transform_one(text)
        best = min(best, time.thread_time() - start)
    return best / (len(text.encode()) / 1024)


def old_featurizer_class(revision: str):
    """``TextFeaturizer`` as git revision ``revision`` had it."""
    source = subprocess.run(
        ["git", "show", f"{revision}:stream_learner/core/features.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    source = source.replace("from . ", "from stream_learner ")
    path = Path(tempfile.mkdtemp()) / "features_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("features_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TextFeaturizer


def measure(groups, texts, repeats: int, featurizer_of=None, batch: bool = False) -> dict:
    """group → text name → seconds per KiB."""
    results = {}
    for group, featurizer in groups.items():
        if batch and featurizer.dense:
            continue
        if featurizer_of is not None:
            featurizer = featurizer_of(featurizer)
        results[group] = {}
        for name, text in texts.items():
            results[group][name] = seconds_per_kib(featurizer, text, repeats, batch)
        print(f"  {group}: done", flush=True)
    return results


def summary(times: dict[str, float], ordinary: list[str], adversarial: list[str]) -> dict:
    base = statistics.median(times[n] for n in ordinary)
    ranked = sorted(adversarial, key=times.__getitem__, reverse=True)
    return {
        "ordinary": base,
        "median": statistics.median(times[n] for n in adversarial),
        "worst": times[ranked[0]],
        "worst_name": ranked[0],
        "next": times[ranked[1]],
        "next_name": ranked[1],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per text (default 5)")
    parser.add_argument(
        "--ordinary", type=int, default=4, help="ordinary texts per dataset (default 4)"
    )
    parser.add_argument(
        "--before", default=None, help="git revision to time beside (default: none)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    groups = featurizer_groups()
    ordinary = ordinary_texts(args.ordinary)
    adversarial = worst_cases(SIZE)
    texts = {**ordinary, **adversarial}
    print(
        f"{len(adversarial)} adversarial and {len(ordinary)} ordinary texts, {len(groups)} featurizers"
    )
    print("per record (transform_one):")
    single = measure(groups, texts, args.repeats)
    print("batch path (buckets_many):")
    batch = measure(groups, texts, args.repeats, batch=True)
    before = None
    if args.before:
        print(f"featurizer of {args.before}:")
        old_class = old_featurizer_class(args.before)
        before = measure(
            groups, texts, 1, featurizer_of=lambda f: old_class(**{
                k: v for k, v in f._get_params().items() if k not in ("cache_bytes", "segment_unspaced")
            })
        )  # fmt: skip
    write_report(args, groups, ordinary, adversarial, single, batch, before)
    plot(args, single, batch, before, list(ordinary), list(adversarial))
    return 0


def write_report(args, groups, ordinary, adversarial, single, batch, before) -> None:
    names_o, names_a = list(ordinary), list(adversarial)
    command = "`.venv/bin/python -m benchmarks.adversarial" + (
        f" --before {args.before}" if args.before else ""
    ) + (f" --repeats {args.repeats}" if args.repeats != 5 else "") + "`"  # fmt: skip
    lines = [
        "# Adversarial input",
        "",
        f"Command: {command}",
        "",
        "## Featurizing time per KiB",
        "",
        f"{len(adversarial)} adversarial texts of {SIZE:,} UTF-8 bytes "
        "(`stream_learner.data.adversarial.worst_cases`, the corpus the tests feed every registered "
        f"featurizer) against {len(ordinary)} ordinary texts of the same size (records of "
        f"{', '.join(f'`{d}`' for d in ORDINARY_DATASETS)} joined). Each text is featurized by "
        f"a fresh featurizer (cold caches), fastest of {args.repeats} runs, thread CPU time; "
        "figures are milliseconds per KiB of input. Target: the worst adversarial text costs at "
        f"most {TARGET:g}× ordinary text per KiB. Python {platform.python_version()}, "
        f"{platform.machine()}, a shared 2-core machine.",
        "",
        "| learners (shared featurizer) | path | ordinary ms/KiB | adversarial median | worst | worst ÷ ordinary | worst case | next worst ÷ ordinary (case) |"
        + (" before: worst ÷ ordinary (case) |" if before else ""),
        "|---|---|---:|---:|---:|---:|---|---|" + ("---|" if before else ""),
    ]  # fmt: skip
    verdicts = []
    for group in groups:
        for path, results in (("per record", single), ("batch", batch)):
            if group not in results:
                continue
            s = summary(results[group], names_o, names_a)
            ratio = s["worst"] / s["ordinary"]
            verdicts.append((group, path, ratio, s["worst_name"]))
            row = (
                f"| {group} | {path} | {s['ordinary'] * 1e3:.3f} | {s['median'] * 1e3:.3f} | "
                f"{s['worst'] * 1e3:.3f} | **{ratio:.2f}** | `{s['worst_name']}` | "
                f"{s['next'] / s['ordinary']:.2f} (`{s['next_name']}`) |"
            )
            if before:
                if path == "per record":
                    b = summary(before[group], names_o, names_a)
                    row += f" {b['worst'] / b['ordinary']:,.0f} (`{b['worst_name']}`) |"
                else:
                    row += " |"
            lines.append(row)
    missed = [v for v in verdicts if v[2] > TARGET]
    lines += ["", "**Result:** "]
    if not missed:
        lines[-1] += (
            f"every featurizer meets the target: the worst adversarial text costs at most {max(v[2] for v in verdicts):.2f}× ordinary text per KiB."
        )
    else:
        lines[-1] += (
            f"{len(verdicts) - len(missed)} of {len(verdicts)} featurizer paths meet the target; "
            + "; ".join(f"{g} ({p}) reaches {r:.2f}× on `{c}`" for g, p, r, c in missed)
            + "."
        )  # fmt: skip
    lines += [
        "",
        "Per case, ms per KiB (per record path):",
        "",
        "| case | " + " | ".join(groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    lines.append(
        "| *ordinary (median)* | "
        + " | ".join(
            f"{statistics.median(single[g][n] for n in names_o) * 1e3:.3f}" for g in groups
        )
        + " |"
    )
    for name in names_a:
        lines.append(
            f"| `{name}` | " + " | ".join(f"{single[g][name] * 1e3:.3f}" for g in groups) + " |"
        )
    lines += [
        "",
        "What keeps it linear: e-mail addresses are found from their `@` and read backwards "
        "(the pattern `[\\w.+-]+@…` rescanned a long word from each of its positions: 3 to 10 s "
        "for 40 to 60 kB); every other pattern is possessive or provably gives back at most one "
        "character; runs of more than 30 combining marks are cut before NFKC, whose canonical "
        "reordering CPython does by insertion sort; the caches are bounded in bytes.",
        "",
        "What keeps hostile text near ordinary text per KiB: texts that make many tokens per "
        "byte (ordinary text makes 150–215 per KiB; `@a@a…`, `a@a@…` and U+FDFA repeated 1,024, "
        "`''a''a…` 683, `a a a…` 512) have short tokens, so they repeat them. On a text of 1,024 "
        "characters or more `transform_one` hashes each distinct token and word pair once and "
        "counts its occurrences (same features, same order as before); a text that NFKC and case "
        "folding make more than 1.5 times longer is tokenized one distinct whitespace-free chunk "
        "at a time. The characters NFKC expands to 4 or more (U+FDFA: 18, four words for 3 bytes) "
        "and that it maps alone are written by `str.translate` before NFKC, which then finds them "
        "normalized: CPython's NFKC takes about 60 ns per character it writes. The batch path "
        "already tokenizes each distinct chunk once; a long chunk hashes each distinct token once. "
        "What is left in the batch path is one tokenizer pass over a long whitespace-free chunk "
        "(`@a@a…`: 60,000 tokens), against ordinary text whose chunks repeat across the text.",
        "",
        "![time per KiB, adversarial against ordinary](adversarial.png)",
        "",
        MEMORY_SECTION,
    ]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adversarial.md").write_text("\n".join(lines))


def plot(args, single, batch, before, names_o, names_a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [(g, "per record", single[g]) for g in single] + [(g, "batch", batch[g]) for g in batch]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    for i, (_, _, times) in enumerate(reversed(rows)):
        s = summary(times, names_o, names_a)
        ax.barh(i + 0.18, s["worst"] / s["ordinary"], height=0.34, color="#c44e52")
        ax.barh(i - 0.18, s["median"] / s["ordinary"], height=0.34, color="#4c72b0")
        ax.text(
            s["worst"] / s["ordinary"] + 0.03, i + 0.18, s["worst_name"], va="center", fontsize=7
        )
    ax.set_yticks(range(len(rows)), [f"{g} ({p})" for g, p, _ in reversed(rows)], fontsize=8)
    ax.axvline(1.0, color="#888888", linewidth=1)
    target = ax.axvline(
        TARGET,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"target: worst ≤ {TARGET:g}× ordinary",
    )
    handles = [
        target,
        Patch(color="#c44e52", label="worst adversarial text"),
        Patch(color="#4c72b0", label="median adversarial text"),
    ]
    ratios = [summary(t, names_o, names_a) for _, _, t in rows]
    ax.set_xlim(0, max(3.0, max(r["worst"] / r["ordinary"] for r in ratios) + 0.7))
    ax.set_xlabel("featurizing time per KiB ÷ ordinary text's")
    ax.set_title(f"Adversarial texts of {SIZE // 1000} kB against ordinary text")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "adversarial.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
