"""Benchmark of the numpy neural learner against its anchors, measured in one run.

    .venv/bin/python -m benchmarks.neural               # everything but the 1M-record memory run
    .venv/bin/python -m benchmarks.neural --memory      # ... and the memory run (a few minutes)

Needs the datasets (``stream-learner datasets fetch NAME`` for spamassassin, vader,
healthtweets, poetry) and, for the pretrained section, ``stream-learner models fetch minilm``. Writes
``benchmarks/results/neural.md``, ``neural.json`` and ``neural.png``. Speeds are reported as
ratios to anchors measured in the same run, since the machine is shared.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.anchors import characters, prequential, run_river, run_sklearn, run_vw
from stream_learner.cli.evaluate import evaluate
from stream_learner.core.features import TextFeaturizer
from stream_learner.core.processor import StreamProcessor
from stream_learner.data.datasets import dataset_meta
from stream_learner.data.readers import load_records
from stream_learner.learners.neural.format import load, save
from stream_learner.learners.neural.model import neural_step
from stream_learner.learners.registry import make_learner

STREAMS = ("spamassassin", "vader", "healthtweets", "poetry")
RIVER_CANDIDATES = ("nb", "cnb", "logreg", "pa", "softmax")
RIVER_BUDGET_SECONDS = 120.0  # a River learner slower than this on a stream is left out
RESULTS = Path(__file__).parent / "results"
BATCH = 256
COMMAND = "cd /work/main && .venv/bin/python -m benchmarks.neural --memory"


def _stream(name):
    records = load_records(name)
    return [r.text for r in records], [r.label for r in records]


def _learner(seed=0):
    """The registered "neural" learner's classifier and featurizer (same configuration)."""
    pipeline = make_learner("neural", seed=seed)
    featurizer, learner = list(pipeline.steps.values())
    return featurizer, learner


def neural_prequential(texts, labels, seed=0, **changes):
    """Featurize once per record, predict, learn: what the registry pipeline computes
    (it featurizes twice; the second featurization hits the forward-pass cache). ``changes``:
    learner parameters to change (``wide=False``: the embedding bag alone)."""
    featurizer, learner = _learner(seed)
    if changes:
        learner = learner.clone(changes)
    correct = 0
    start = time.perf_counter()
    for text, label in zip(texts, labels, strict=True):
        x = featurizer.transform_one(text)
        correct += learner.predict_one(x) == label
        learner.learn_one(x, label)
    return correct / len(texts), time.perf_counter() - start


def minibatch_prequential(texts, labels, batch=BATCH, seed=0):
    """Predict a batch, then learn it (prequential at batch granularity), featurizing included:
    raw texts → ``TextFeaturizer.buckets_many`` → ``predict_many`` → ``learn_many``, as a user
    calls the mini-batch path."""
    featurizer, learner = _learner(seed)
    correct = 0
    start = time.perf_counter()
    after_first = None
    for i in range(0, len(texts), batch):
        xs = featurizer.buckets_many(texts[i : i + batch])
        ys = labels[i : i + batch]
        predicted = learner.predict_many(xs)
        correct += sum(p == y for p, y in zip(predicted, ys, strict=True))
        learner.learn_many(xs, ys)
        if after_first is None:
            after_first = time.process_time()
    # Also the CPU seconds after the first batch (which allocates the learner's tables).
    return correct / len(texts), time.perf_counter() - start, time.process_time() - after_first


def minibatch_prequential_dicts(texts, labels, batch=BATCH, seed=0):
    """The same through River's dict interface: transform_one per record, lists of dicts."""
    featurizer, learner = _learner(seed)
    for i in range(0, len(texts), batch):
        xs = [featurizer.transform_one(t) for t in texts[i : i + batch]]
        ys = labels[i : i + batch]
        learner.predict_many(xs)
        learner.learn_many(xs, ys)


def per_sample_scored_by_batch(xs, labels, batch=BATCH, seed=0):
    """Per-record learning scored like the mini-batch run: each batch predicted before any
    of it is learned. Isolates the difference of the learning rule from the staleness."""
    _, learner = _learner(seed)
    correct = 0
    for i in range(0, len(xs), batch):
        ys = labels[i : i + batch]
        predicted = [learner.predict_one(x) for x in xs[i : i + batch]]
        correct += sum(p == y for p, y in zip(predicted, ys, strict=True))
        for x, y in zip(xs[i : i + batch], ys, strict=True):
            learner.learn_one(x, y)
    return correct / len(xs)


def minibatch_learner_only(batches, labels, batch=BATCH, seed=0):
    """predict_many + learn_many on batches featurized beforehand (``BucketBatch``es). Also
    returns the CPU seconds of the batches after the first: the first one allocates and
    initializes the 2^18-row tables (a one-time cost of about 64 MB of page faults and random
    numbers), the rest is what a long stream runs at."""
    _, learner = _learner(seed)
    start = time.perf_counter()
    after_first = None
    for i, xs in zip(range(0, len(labels), batch), batches, strict=True):
        learner.predict_many(xs)
        learner.learn_many(xs, labels[i : i + batch])
        if after_first is None:
            after_first = time.process_time()
    return time.perf_counter() - start, time.process_time() - after_first


# --- sections -----------------------------------------------------------------------------------


def _river_from_learners_run(name: str) -> dict[str, float]:
    """River candidates' whole-stream accuracies from benchmarks/results/learners.json (the
    same pipelines under ``evaluate``, which scores exactly as River's plain loop), so that the
    slow ones are not run twice; empty when that run has no such stream."""
    path = RESULTS / "learners.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("streams", {}).get(name, {}).get("rows", {})
    return {c: rows[f"evaluate:{c}"]["accuracy"] for c in RIVER_CANDIDATES if f"evaluate:{c}" in rows}


def section_accuracy(results):
    rows = {}
    for name in STREAMS:
        texts, labels = _stream(name)
        vw = run_vw(texts, labels)
        if name == "poetry":  # the fair tokenization for Chinese: characters
            vw_chars = run_vw(texts, labels, tokenize=characters)
            vw = max(vw, vw_chars, key=lambda r: r.accuracy)
        accuracy, seconds = neural_prequential(texts, labels)
        deep_only, _ = neural_prequential(texts, labels, wide=False)
        river, too_slow = {}, {}
        reused = _river_from_learners_run(name)
        for candidate in RIVER_CANDIDATES:
            if candidate in reused:
                river[candidate] = type("Reused", (), {"name": f"river:{candidate}", "accuracy": reused[candidate]})
                continue
            run = run_river(candidate, texts, labels, max_seconds=RIVER_BUDGET_SECONDS)
            print(f"  {name} river:{candidate} {run.accuracy:.4f} {run.records}/{len(texts)}", flush=True)
            if run.records == len(texts):
                river[candidate] = run
            else:
                too_slow[candidate] = run.records_per_second
        best = max(river.values(), key=lambda r: r.accuracy)
        sklearn = run_sklearn(texts, labels, batch=BATCH)
        rows[name] = {
            "records": len(texts),
            "neural": accuracy,
            "neural_deep_only": deep_only,
            "neural_records_per_second": len(texts) / seconds,
            "vw": vw.accuracy,
            "vw_tokens": "characters" if name == "poetry" and vw is vw_chars else "words",
            "vw_records_per_second": vw.records_per_second,
            "river_best": best.name,
            "river_best_accuracy": best.accuracy,
            "river": {k: v.accuracy for k, v in river.items()},
            "river_too_slow": too_slow,
            "sklearn": sklearn.accuracy,
        }
        print(name, json.dumps(rows[name]), flush=True)
    results["accuracy"] = rows


class _Clock:
    """Wall time and this process's CPU time of a block."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def section_speed(results):
    texts, labels = _stream("vader")
    n = len(texts)
    vw_runs = [run_vw(texts, labels) for _ in range(3)]
    featurizer = TextFeaturizer()
    with _Clock() as featurize:
        xs = [featurizer.transform_one(t) for t in texts]
    featurizer = TextFeaturizer()
    with _Clock() as featurize_batch:
        batches = [featurizer.buckets_many(texts[i : i + BATCH]) for i in range(0, n, BATCH)]

    featurizer, learner = _learner()
    correct = 0
    with _Clock() as per_sample:
        for text, label in zip(texts, labels, strict=True):
            x = featurizer.transform_one(text)
            correct += learner.predict_one(x) == label
            learner.learn_one(x, label)
    _, learner = _learner()
    with _Clock() as learner_only:
        for x, y in zip(xs, labels, strict=True):
            learner.predict_one(x)
            learner.learn_one(x, y)
    with _Clock() as pipeline:
        prequential(make_learner("neural"), texts, labels)
    with _Clock() as minibatch:
        mb_accuracy, _, mb_steady_cpu = minibatch_prequential(texts, labels)
    with _Clock() as minibatch_learner:
        _, steady_cpu = minibatch_learner_only(batches, labels)
    with _Clock() as minibatch_dicts:
        minibatch_prequential_dicts(texts, labels)
    # The product's paths: the stream processor (scores, serving, per-record results) that
    # `evaluate` and the Kafka worker run, one record at a time and with --mini-batch.
    records = load_records("vader")
    with _Clock() as processor_per_sample:
        evaluate(records, StreamProcessor(["neural"], drift_detector="none"))
    with _Clock() as processor_minibatch:
        evaluate(records, StreamProcessor(["neural"], drift_detector="none"), mini_batch=BATCH)
    vw_runs += [run_vw(texts, labels) for _ in range(2)]
    # The best of five VW runs: the anchor at its fastest.
    vw_wall = max(r.records_per_second for r in vw_runs)
    vw_cpu = max(r.records_per_cpu_second for r in vw_runs)
    clocks = {
        "featurize_only": featurize,
        "featurize_batch_only": featurize_batch,
        "per_sample": per_sample,
        "per_sample_learner_only": learner_only,
        "pipeline_plain_loop": pipeline,
        "minibatch": minibatch,
        "minibatch_learner_only": minibatch_learner,
        "minibatch_dicts": minibatch_dicts,
        "processor_per_sample": processor_per_sample,
        "processor_minibatch": processor_minibatch,
    }
    speed = {
        "records": n,
        "vw_records_per_second": vw_wall,
        "vw_records_per_cpu_second": vw_cpu,
        "vw_runs": [r.records_per_second for r in vw_runs],
        "per_sample_accuracy": correct / n,
        "minibatch_accuracy": mb_accuracy,
        "per_sample_scored_by_batch_accuracy": per_sample_scored_by_batch(xs, labels),
        "load_average": os.getloadavg()[0],
    }
    for name, clock in clocks.items():
        speed[name] = n / clock.wall
        speed[f"{name}_cpu"] = n / clock.cpu
    speed["minibatch_learner_steady_cpu"] = (n - BATCH) / steady_cpu
    speed["minibatch_steady_cpu"] = (n - BATCH) / mb_steady_cpu
    speed["distinct_buckets_per_batch"] = float(np.mean([np.unique(b.ids).size for b in batches]))
    speed["minibatch_vs_vw"] = speed["minibatch_cpu"] / vw_cpu
    speed["minibatch_learner_only_vs_vw"] = speed["minibatch_learner_only_cpu"] / vw_cpu
    speed["per_sample_vs_vw"] = speed["per_sample_cpu"] / vw_cpu
    print("speed", json.dumps(speed), flush=True)
    results["speed"] = speed


def section_warm_start(results):
    texts, labels = _stream("vader")
    segments = {s["domain"]: s for s in dataset_meta("vader")["segments"]}
    tweets, movies = segments["tweets"], segments["movie_reviews"]
    first = slice(movies["start"], movies["start"] + 2000)
    warm = make_learner("neural", seed=0)
    prequential(warm, texts[tweets["start"] : tweets["end"]], labels[tweets["start"] : tweets["end"]])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tweets.npz"
        save(warm, path)  # warm start from the file, as a user would
        warm = load(path, expected_hashing=TextFeaturizer().hashing_config())
        kept = load(path)  # the same, without resetting the optimizer
        warm_whole = load(path)
        warm_shuffled = load(path)
    neural_step(warm).reset_optimizer()  # fine-tuning: fresh AdaGrad sums, learned weights
    first_labels = labels[first]
    scores = {}
    for name, model in [("warm", warm), ("warm_kept_optimizer", kept), ("cold", make_learner("neural", seed=0))]:
        predictions = []
        for text, label in zip(texts[first], first_labels, strict=True):
            predictions.append(model.predict_one(text))
            model.learn_one(text, label)
        scores[name] = _scores(predictions, first_labels)
    whole = slice(movies["start"], movies["end"])
    neural_step(warm_whole).reset_optimizer()
    results["warm_start"] = {
        "trained_on": f"vader tweets ({tweets['end'] - tweets['start']} records)",
        "evaluated_on": "first 2000 vader movie reviews",
        "first_2000_positive_share": first_labels.count("pos") / len(first_labels),
        **{f"{k}_{m}": v for k, s in scores.items() for m, v in s.items()},
        "warm": scores["warm"]["accuracy"],
        "cold": scores["cold"]["accuracy"],
        "whole_domain_records": movies["end"] - movies["start"],
        "whole_domain_warm": prequential(warm_whole, texts[whole], labels[whole])[0],
        "whole_domain_cold": prequential(make_learner("neural", seed=0), texts[whole], labels[whole])[0],
    }
    # The same question with the label order taken out: the movie reviews in a seeded shuffle.
    import random

    order = list(range(movies["start"], movies["end"]))
    random.Random(0).shuffle(order)
    shuffled_texts = [texts[i] for i in order[:2000]]
    shuffled_labels = [labels[i] for i in order[:2000]]
    neural_step(warm_shuffled).reset_optimizer()
    results["warm_start"]["shuffled_warm"] = prequential(warm_shuffled, shuffled_texts, shuffled_labels)[0]
    results["warm_start"]["shuffled_cold"] = prequential(
        make_learner("neural", seed=0), shuffled_texts, shuffled_labels
    )[0]
    print("warm", json.dumps(results["warm_start"]), flush=True)


def _scores(predictions, labels) -> dict:
    """Accuracy and balanced accuracy (mean per-class recall)."""
    accuracy = sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
    recalls = []
    for c in set(labels):
        rows = [p == y for p, y in zip(predictions, labels, strict=True) if y == c]
        recalls.append(sum(rows) / len(rows))
    return {"accuracy": accuracy, "balanced_accuracy": sum(recalls) / len(recalls)}


def section_pretrained(results):
    from stream_learner.learners.neural.pretrained_init import init_embeddings, read_minilm

    vocab, matrix = read_minilm()
    variants = {
        "cold": None,
        "pca, rms 0.03 (scale of the random init)": {"projection": "pca", "rms": 0.03},
        "random projection, rms 0.03": {"projection": "random", "rms": 0.03},
        "pca, rms 0.6 (default)": {"projection": "pca", "rms": 0.6},
        "random projection, rms 0.6": {"projection": "random", "rms": 0.6},
        "pca, rms 0.6, rows held (AdaGrad sums 1.0)": {
            "projection": "pca",
            "rms": 0.6,
            "accumulator": 1.0,
        },
    }
    table = {}
    for name in STREAMS:
        records = load_records(name, limit=2000)
        texts, labels = [r.text for r in records], [r.label for r in records]
        table[name] = {}
        for variant, options in variants.items():
            model = make_learner("neural", seed=0)
            rows = 0
            if options is not None:
                rows = init_embeddings(model, vocab, matrix, **options)
            accuracy, _, _ = prequential(model, texts, labels)
            table[name][variant] = {"accuracy": accuracy, "rows": rows}
        print("pretrained", name, json.dumps(table[name]), flush=True)
    results["pretrained"] = table


def _memory_child(total: int, checkpoint: int) -> None:
    """Runs in a subprocess: prequential over vader repeated, RSS at checkpoint and total."""
    texts, labels = _stream("vader")
    featurizer, learner = _learner()
    rss = {}
    seen = 0
    while seen < total:
        for text, label in zip(texts, labels, strict=True):
            x = featurizer.transform_one(text)
            learner.predict_one(x)
            learner.learn_one(x, label)
            seen += 1
            if seen in (checkpoint, total):
                gc.collect()
                rss[seen] = _rss_bytes()
            if seen >= total:
                break
    print(json.dumps({str(k): v for k, v in rss.items()}))


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def section_memory(results, total=1_000_000, checkpoint=100_000):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.neural", "--memory-child", str(total), str(checkpoint)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    rss = json.loads(out.strip().splitlines()[-1])
    results["memory"] = {
        "records_checkpoint": checkpoint,
        "records_total": total,
        "rss_checkpoint_mb": rss[str(checkpoint)] / 2**20,
        "rss_total_mb": rss[str(total)] / 2**20,
        "growth": rss[str(total)] / rss[str(checkpoint)] - 1.0,
        "seconds": time.perf_counter() - start,
    }
    print("memory", json.dumps(results["memory"]), flush=True)


# --- report ---------------------------------------------------------------------------------------


def _pct(x):
    return f"{100 * x:.2f}"


def write_report(results):
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = {}
    json_path = RESULTS / "neural.json"
    if json_path.exists():
        previous = json.loads(json_path.read_text())
    merged = {**previous, **results}
    json_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    (RESULTS / "neural.md").write_text(_markdown(merged))
    _plot(merged, RESULTS / "neural.png")


def _markdown(r) -> str:
    cfg = _learner()[1]
    lines = [
        "# Neural learner benchmark",
        "",
        "stream-learner's numpy wide-and-deep learner (registry name `neural`: "
        f"`TextFeaturizer(2**18 buckets, word uni+bigrams, letters and letter bigrams in "
        f"unspaced scripts) | NeuralClassifier(dim={cfg.dim}, bag={cfg.bag!r}, "
        f"optimizer={cfg.optimizer!r}, lr={cfg.lr}, wide={cfg.wide})`: an embedding bag plus a "
        "linear term over the same hashed features), against anchors run "
        "in the same process: Vowpal Wabbit 9 (`vw -d FILE --oaa K --ngram 2 -b 18`, C++ "
        "reading a file of our tokenizer's tokens, and for poetry also of characters, the "
        "better of the two counting; prequential = progressive validation), "
        "River learners from the core registry, and scikit-learn "
        f"(HashingVectorizer + SGDClassifier.partial_fit, batches of {BATCH}). River's "
        "figures are those of the same pipelines in benchmarks/results/learners.json (same "
        "code, same records; the slow ones are not run twice).",
        "",
        f"Reproduce: `{COMMAND}` (needs the four datasets and the MiniLM model fetched).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs; "
        f"Python {platform.python_version()}, numpy {np.__version__}. "
        f"Latest section run: {r.get('when', '?')} (sections can be rerun one at a time with --sections; the JSON keeps the others).",
        "",
    ]
    if r.get("note"):
        lines += [r["note"], ""]
    if "accuracy" in r:
        lines += [
            "## Prequential accuracy (%), whole streams",
            "",
            "| stream | records | neural (wide and deep) | embedding bag alone | VW (tokens) | Δ vs VW | best River (name) | sklearn SGD |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for name, row in r["accuracy"].items():
            deep = _pct(row["neural_deep_only"]) if "neural_deep_only" in row else "—"
            lines.append(
                f"| {name} | {row['records']} | **{_pct(row['neural'])}** | {deep} | {_pct(row['vw'])} "
                f"({row.get('vw_tokens', 'words')}) | "
                f"{100 * (row['neural'] - row['vw']):+.2f} | {_pct(row['river_best_accuracy'])} "
                f"({row['river_best']}) | {_pct(row['sklearn'])} |"
            )
        n = len(r["accuracy"])
        wins = sum(row["neural"] >= row["vw"] for row in r["accuracy"].values())
        worst = min(100 * (row["neural"] - row["vw"]) for row in r["accuracy"].values())
        lines += [
            "",
            f"Pass mark (≥ VW on ≥ 3 of 4 streams, never > 1 point below): neural ≥ VW on "
            f"{wins} of {n}; worst difference {worst:+.2f} points → "
            f"**{'PASS' if wins >= 3 and worst >= -1 else 'FAIL'}**.",
            "",
            "River candidates (accuracy %): "
            + "; ".join(
                f"{name}: " + ", ".join(f"{k} {_pct(v)}" for k, v in row["river"].items())
                for name, row in r["accuracy"].items()
            )
            + _too_slow(r["accuracy"])
            + f". scikit-learn is scored by batches of {BATCH} (each predicted before it is "
            "learned): `partial_fit` one record at a time runs at about 25 records/s with "
            "2^18 features. It tokenizes with its own analyzer, which keeps the pieces of "
            "URLs: on healthtweets the link shortener's host (n.pr, lat.ms, khne.ws, nbcnews.to, ...) "
            "names the account, hence its 95 %. The core featurizer (used by VW, River and "
            "the neural learner here) replaces every URL with `__url__` and throws that away: "
            "keeping the host would help every learner on that stream.",
            "",
        ]
    if "speed" in r:
        s = r["speed"]
        lines += [
            "## Speed on `vader` (records/s, one process, same run)",
            "",
            f"Records per second of CPU time of the process (wall-clock in brackets). The two "
            f"cores were shared with other jobs (load average {s.get('load_average', float('nan')):.1f} "
            "at the start of the section), so wall-clock rates include time spent waiting for "
            "a core; CPU time is what one core delivers. Ratios are CPU-time rates over "
            "VW's (the best of five runs).",
            "",
            "| mode | records/s CPU (wall) | ratio to VW |",
            "|---|---:|---:|",
            f"| VW `--oaa 2 --ngram 2` reading its file (C++) | {s['vw_records_per_cpu_second']:,.0f} ({s['vw_records_per_second']:,.0f}) | 1 |",
        ]
        rows = [
            ("featurizer alone (`TextFeaturizer.transform_one`)", "featurize_only"),
            ("**per-sample**, tokenizing included: transform_one + predict_one + learn_one", "per_sample"),
            ("per-sample, learner only (pre-featurized)", "per_sample_learner_only"),
            ("registry pipeline in River's plain loop (tokenizes twice)", "pipeline_plain_loop"),
            (f"featurizer alone, batches of {BATCH} (`TextFeaturizer.buckets_many`)", "featurize_batch_only"),
            (
                f"**mini-batch {BATCH}**, tokenizing included: buckets_many + predict_many + learn_many",
                "minibatch",
            ),
            (f"mini-batch {BATCH}, learner only (pre-featurized `BucketBatch`es)", "minibatch_learner_only"),
            (
                f"mini-batch {BATCH} through River's dict interface: transform_one per record + "
                "predict_many / learn_many on lists of dicts",
                "minibatch_dicts",
            ),
            ("`stream-learner evaluate --learners neural` (the stream processor: scores, serving), one record at a time", "processor_per_sample"),
            (f"`stream-learner evaluate --learners neural --mini-batch {BATCH}` (`StreamProcessor.process_many`)", "processor_minibatch"),
        ]
        for label, key in rows:
            if key + "_cpu" not in s:
                continue
            lines.append(
                f"| {label} | {s[key + '_cpu']:,.0f} ({s[key]:,.0f}) | "
                f"{s[key + '_cpu'] / s['vw_records_per_cpu_second']:.3f} |"
            )
        lines += [
            "",
            f"Prequential accuracy on vader: per-sample {_pct(s['per_sample_accuracy'])} %; "
            f"mini-batch {BATCH} (each batch predicted before it is learned) "
            f"{_pct(s['minibatch_accuracy'])} %; per-sample learning scored the same way (each "
            f"batch predicted before it is learned record by record) "
            f"{_pct(s.get('per_sample_scored_by_batch_accuracy', float('nan')))} %. The last two differ only in "
            "the learning rule (one AdaGrad step on a batch's summed gradient vs one step per "
            "record): close, not equal, as documented. Part of the gap to per-sample "
            "prequential accuracy is only the scoring: a batch's records are predicted before "
            "the learner has seen the ones just before them, which costs most where the stream "
            "is ordered (vader's movie reviews come sorted by label).",
            "",
            f"Where the time goes: tokenizing and hashing alone (the core featurizer, pure "
            f"Python) take {1e6 / s['featurize_only_cpu']:.0f} µs of CPU per record one text at a "
            f"time, the learner's predict + learn {1e6 / s['per_sample_learner_only_cpu']:.0f} µs "
            "(about 30 numpy calls on arrays of a few dozen rows: call overhead, not arithmetic). "
            "VW does all of it in C++.",
            "",
        ]
        if "featurize_batch_only_cpu" in s:
            lines += [
                f"The mini-batch path: `TextFeaturizer.buckets_many` featurizes a batch in "
                f"{1e6 / s['featurize_batch_only_cpu']:.1f} µs per record (one pass over vader, so "
                "its chunk cache starts cold, as on a new stream): one `split()` of the batch, a "
                "cache lookup per whitespace-separated chunk (tokenized and hashed only the first "
                "time it is seen) and the n-grams combined in numpy. The learner reads the "
                f"`BucketBatch` in {1e6 / s['minibatch_learner_only_cpu']:.1f} µs per record, "
                f"{1e6 / s['minibatch_learner_steady_cpu']:.1f} µs once its tables exist (the "
                "first batch allocates and initializes the 2^18 × 32 embedding table and its "
                "AdaGrad sums, 64 MB: a one-time cost that a 23,000-record stream does not "
                f"amortize). What remains is memory traffic: each batch of {BATCH} touches "
                f"{s['distinct_buckets_per_batch']:,.0f} distinct rows of the two 32 MB tables at "
                "random (read the rows, read and "
                "write the AdaGrad sums, write the rows), and two sparse products "
                "(scipy.sparse) for the bags and the per-bucket gradient sums.",
                "",
            ]
        lines += [
            f"Pass marks: per-sample ≥ 10,000 records/s on one core → {s['per_sample_cpu']:,.0f} "
            f"per CPU second **{'PASS' if s['per_sample_cpu'] >= 10_000 else 'FAIL'}** "
            f"({s['per_sample']:,.0f} wall-clock on the shared machine); mini-batch ≥ 1/3 of VW → "
            f"{s['minibatch_vs_vw']:.3f} with tokenizing "
            f"**{'PASS' if s['minibatch_vs_vw'] >= 1 / 3 else 'FAIL'}**, "
            f"{s['minibatch_learner_only_vs_vw']:.3f} learner only "
            f"**{'PASS' if s['minibatch_learner_only_vs_vw'] >= 1 / 3 else 'FAIL'}**"
            + (
                f". After the first batch (the one-time allocation of the learner's tables "
                f"left out): {s['minibatch_steady_cpu'] / s['vw_records_per_cpu_second']:.3f} "
                "with tokenizing, "
                f"{s['minibatch_learner_steady_cpu'] / s['vw_records_per_cpu_second']:.3f} "
                "learner only."
                if "minibatch_steady_cpu" in s
                else "."
            ),
            "",
        ]
    if "memory" in r:
        m = r["memory"]
        lines += [
            "## Memory",
            "",
            f"Resident memory of a process running the default `neural` learner per sample "
            f"over `vader` repeated: {m['rss_checkpoint_mb']:.1f} MiB after "
            f"{m['records_checkpoint']:,} records, {m['rss_total_mb']:.1f} MiB after "
            f"{m['records_total']:,} ({100 * m['growth']:+.2f} %; pass mark within 10 %: "
            f"**{'PASS' if abs(m['growth']) <= 0.10 else 'FAIL'}**). "
            f"Run time {m['seconds']:.0f} s.",
            "",
        ]
    if "warm_start" in r:
        w = r["warm_start"]
        lines += [
            "## Warm start",
            "",
            f"Trained on {w['trained_on']}, saved, loaded with the hashing configuration "
            f"checked, optimizer reset (`reset_optimizer()`: fine-tuning keeps the weights, "
            f"starts AdaGrad afresh), continued on the {w['evaluated_on']}: prequential "
            f"accuracy **{_pct(w['warm'])} %** warm vs {_pct(w['cold'])} % cold (same seed) → "
            f"**{'PASS' if w['warm'] > w['cold'] else 'FAIL'}**.",
            "",
            "| first 2,000 movie reviews | accuracy | balanced accuracy |",
            "|---|---:|---:|",
            f"| warm, optimizer reset | {_pct(w['warm_accuracy'])} | {_pct(w['warm_balanced_accuracy'])} |",
            f"| warm, optimizer state kept | {_pct(w['warm_kept_optimizer_accuracy'])} | {_pct(w['warm_kept_optimizer_balanced_accuracy'])} |",
            f"| cold | {_pct(w['cold_accuracy'])} | {_pct(w['cold_balanced_accuracy'])} |",
            "",
            f"Read with care: the movie-review file is sorted by label, so "
            f"{_pct(w['first_2000_positive_share'])} % of its first 2,000 records are positive "
            "and a learner that only tracks the prior scores about that: the pass is a margin "
            "of a record or two, and balanced accuracy (mean recall of the two classes, about "
            "0.5 for all three) shows that no learner, warm or cold, catches the rare negatives "
            "there. Over the whole label-sorted domain "
            f"({w['whole_domain_records']:,} records): warm {_pct(w['whole_domain_warm'])} % vs "
            f"cold {_pct(w['whole_domain_cold'])} %. Without the optimizer reset the warm learner "
            "adapts its prior too slowly (AdaGrad's sums from the tweets make its steps small) "
            "and loses. What the tweets teach shows once the label order is taken out: on the "
            "first 2,000 movie reviews of a seeded shuffle of the domain, warm "
            f"**{_pct(w['shuffled_warm'])} %** vs cold {_pct(w['shuffled_cold'])} %.",
            "",
        ]
    if "pretrained" in r:
        p = r["pretrained"]
        variants = list(next(iter(p.values())))
        lines += [
            "## Pretrained initialization (MiniLM token embeddings), first 2,000 records",
            "",
            "all-MiniLM-L6-v2's 30,522 × 384 WordPiece embedding matrix, projected to the "
            "learner's dimension, written to the unigram buckets of the ~21,700 vocabulary "
            "entries that are single whole-word tokens (rows sharing a bucket averaged). "
            "Prequential accuracy %, Δ in points vs cold:",
            "",
            "| variant | " + " | ".join(p) + " |",
            "|---|" + "---:|" * len(p),
        ]
        for variant in variants:
            cells = []
            for name in p:
                acc = p[name][variant]["accuracy"]
                cold = p[name]["cold"]["accuracy"]
                cells.append(
                    f"{_pct(acc)}" + ("" if variant == "cold" else f" ({100 * (acc - cold):+.2f})")
                )
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "What makes it pay is the scale. Written at the scale of the random initialization "
            "(RMS 0.03) the pretrained rows are washed out by AdaGrad's first steps, whose size "
            "is about the learning rate per entry, and the effect is within noise. Written about "
            "twenty times larger (RMS 0.6, the default of `init_embeddings`) they survive long "
            "enough to carry similarity between words the stream has not shown yet: that helps "
            "sentiment (vader), where unseen words with known polarity are common, and does "
            "nearly nothing for spam and news-account attribution, where the signal is in "
            "tokens (URL placeholders, names, formatting) that MiniLM's vocabulary does not "
            "describe. The projection matters as much as the scale: PCA keeps the directions "
            "along which MiniLM's token vectors vary most, and those carry the similarity; a "
            "random 384 → 32 projection at the same scale keeps distances only loosely and "
            "gains nothing. Holding the rows (large initial AdaGrad sums) gains less on vader "
            "and loses elsewhere: the task needs the rows to move. One seed, 2,000 records: a "
            "point is 20 records, so differences under half a point are noise.",
            "",
        ]
    lines += ["![neural benchmark](neural.png)", ""]
    return "\n".join(lines)


def _too_slow(rows) -> str:
    slow = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["river_too_slow"].items())
        for name, row in rows.items()
        if row.get("river_too_slow")
    )
    if not slow:
        return ""
    return f". Left out for taking more than {RIVER_BUDGET_SECONDS:.0f} s on the stream (records/s when stopped): {slow}"


def _plot(r, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("accuracy", "speed", "pretrained") if k in r]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = np.atleast_1d(axes)
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "accuracy":
            names = list(r["accuracy"])
            series = {
                "neural": [r["accuracy"][n]["neural"] for n in names],
                "VW": [r["accuracy"][n]["vw"] for n in names],
                "best River": [r["accuracy"][n]["river_best_accuracy"] for n in names],
                "sklearn SGD": [r["accuracy"][n]["sklearn"] for n in names],
            }
            width = 0.2
            ax.set_xlim(-0.6, len(names) - 0.4)
            for i, (label, values) in enumerate(series.items()):
                ax.bar(np.arange(len(names)) + (i - 1.5) * width, [100 * v for v in values], width, label=label)
            ax.set_xticks(range(len(names)), names)
            low = min(min(v) for v in series.values())
            ax.set_ylim(100 * low - 5, 100)
            ax.set_ylabel("prequential accuracy (%)")
            ax.set_title("Accuracy, whole streams")
            ax.legend(fontsize=8)
        elif panel == "speed":
            s = r["speed"]
            labels = ["per-sample", "per-sample\nlearner only", f"mini-batch {BATCH}", "mini-batch\nlearner only"]
            values = [s["per_sample"], s["per_sample_learner_only"], s["minibatch"], s["minibatch_learner_only"]]
            ax.bar(labels, [v / s["vw_records_per_second"] for v in values], color="tab:blue")
            ax.axhline(1 / 3, color="tab:red", linestyle="--", label="1/3 of VW")
            ax.set_ylabel("records/s ÷ VW's records/s (same run)")
            ax.set_title(f"Speed on vader (VW: {s['vw_records_per_second']:,.0f} rec/s)")
            ax.tick_params(axis="x", labelsize=8)
            ax.legend(fontsize=8)
        else:
            p = r["pretrained"]
            names = list(p)
            variants = [v for v in next(iter(p.values())) if v != "cold"]
            width = 0.8 / len(variants)
            for i, variant in enumerate(variants):
                deltas = [100 * (p[n][variant]["accuracy"] - p[n]["cold"]["accuracy"]) for n in names]
                ax.bar(np.arange(len(names)) + (i - len(variants) / 2 + 0.5) * width, deltas, width, label=variant)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(names)), names)
            ax.set_ylabel("Δ accuracy vs cold (points)")
            ax.set_title("MiniLM init, first 2,000 records")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        default="accuracy,speed,warm,pretrained",
        help="comma-separated: accuracy, speed, warm, pretrained, memory",
    )
    parser.add_argument("--memory", action="store_true", help="also run the 1,000,000-record memory run")
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(*args.memory_child)
        return 0
    sections = set(args.sections.split(","))
    if args.memory:
        sections.add("memory")
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    runners = {
        "accuracy": section_accuracy,
        "speed": section_speed,
        "warm": section_warm_start,
        "pretrained": section_pretrained,
        "memory": section_memory,
    }
    for name, runner in runners.items():
        if name in sections:
            runner(results)
    write_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
