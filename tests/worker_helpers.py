"""In-memory worker fixtures shared by the worker, mini-batch, budget, alignment and fusion tests."""

from __future__ import annotations

import random

from river import base

from stream_learner.core.processor import StreamProcessor
from stream_learner.core.records import Decoder, Record
from stream_learner.io.sinks import MemorySink, Outputs
from stream_learner.runtime.worker import Worker

ENCODE = Decoder().encode
WORDS = {
    "pos": ["good", "great", "fine", "love", "nice"],
    "neg": ["bad", "awful", "hate", "poor", "sad"],
}


def records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        out.append(Record(f"id{i}", " ".join(rng.choice(WORDS[label]) for _ in range(5)), label))
    return out


def partitioned(recs, partitions=2):
    by_partition = {("in", p): [] for p in range(partitions)}
    for i, record in enumerate(recs):
        by_partition[("in", i % partitions)].append(ENCODE(record))
    return by_partition


def make_worker(store=None, processor=None, sink=None, **kwargs):
    sink = sink or MemorySink()
    outputs = Outputs(sink, predictions_topic="in.predictions", dead_letter_topic="in.dlq")
    return Worker(processor or StreamProcessor(["nb"]), outputs, store, **kwargs)


def drain(worker, source, max_batches=10_000):
    worker.source = source
    for _ in range(max_batches):
        batch = source.poll(0)
        if not batch:
            return
        worker.process_batch(batch)
        if worker.checkpoint_due() and worker.checkpoint():
            worker.commit()


def nb_parameters(processor):
    nb = processor.learners["nb"].steps["MultinomialNB"]
    return dict(nb.class_counts), {k: dict(v) for k, v in nb.feature_counts.items() if v}


def uninterrupted(records):
    """:func:`nb_parameters` after one processor learned ``records`` in order, uninterrupted."""
    processor = StreamProcessor(["nb"])
    for record in records:
        processor.process(record, now=0.0)
    return nb_parameters(processor)


class ExplodingClassifier(base.Classifier):
    """Raises on texts that contain 'boom'; otherwise predicts nothing."""

    def learn_one(self, x, y):
        if "boom" in x:
            raise RuntimeError("cannot learn a boom")

    def predict_proba_one(self, x):
        if "boom" in x:
            raise ValueError("boom in predict")
        return {}
