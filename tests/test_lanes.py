"""The test lanes of tests/conftest.py: markers implied by fixtures, requirements that skip
locally and stop the run in CI, and the broker kept out of tests not marked ``kafka``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SAMPLE = """
import pytest
from stream_learner.io.broker import EmbeddedBroker

@pytest.mark.requires("docker-compose")
def test_needs_compose():
    pass

def test_plain():
    pass

def test_on_the_broker(kafka_broker):
    pass

def test_starts_a_broker_unmarked():
    EmbeddedBroker().start()
"""


def _pytest(tmp_path: Path, *args: str, ci: bool) -> subprocess.CompletedProcess:
    """pytest on SAMPLE with this conftest, a PATH without docker-compose, CI on or off."""
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "empty-bin").mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env.update(PATH=str(tmp_path / "empty-bin"), PYTHONPATH=str(ROOT))
    if ci:
        env["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    return subprocess.run(
        [*command, "-o", "addopts=", *args, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _docker_compose_not_beside_python():
    if (Path(sys.executable).parent / "docker-compose").exists():
        pytest.skip("docker-compose is installed beside this Python: PATH cannot hide it")


@pytest.mark.slow
def test_the_broker_fixture_marks_a_test_kafka(tmp_path):
    result = _pytest(tmp_path, "--co", "-q", "-m", "kafka", ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_on_the_broker" in result.stdout and "test_plain" not in result.stdout
    result = _pytest(tmp_path, "--co", "-q", "-m", "not kafka", ci=False)
    assert "test_plain" in result.stdout and "test_on_the_broker" not in result.stdout


@pytest.mark.slow
def test_a_missing_requirement_skips_outside_ci(tmp_path):
    result = _pytest(tmp_path, "-rs", "-m", "not kafka", "-k", "compose or plain", ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout
    assert "'docker-compose' is not installed" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["one process", "pytest-xdist"])
def test_a_missing_requirement_stops_the_run_in_ci(tmp_path, workers):
    result = _pytest(tmp_path, "-m", "not kafka", *workers, ci=True)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "docker-compose: the program 'docker-compose' is not installed" in output
    assert "make system-deps" in output
    assert "passed" not in output  # stopped before the first test


@pytest.mark.slow
def test_an_unmarked_test_cannot_start_the_broker(tmp_path):
    result = _pytest(tmp_path, "-k", "unmarked", ci=False)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED
    assert "mark it @pytest.mark.kafka" in result.stdout


def test_no_test_imports_another_test_file():
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in TESTS.glob("*.py")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith(("from test_", "import test_", "from tests.test_"))
    ]
    assert not offenders, offenders


def test_no_test_assigns_to_os_environ():
    # Tests change the environment through monkeypatch, or pass env= to the child process.
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in TESTS.glob("*.py")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith(
            ("os.environ[", "os.environ.update(", "os.environ.pop(", "del os.environ")
        )
    ]
    assert not offenders, offenders
