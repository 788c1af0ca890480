"""`stream-learner run` as an operator meets it: a mistyped topic is refused, not served;
`--create-topics` creates it; a metrics port in use is one line and exit 2; nothing is
written before the configuration is known to be good."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from kafka_helpers import KEY

from stream_learner.io.broker import existing_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def run(broker, names, tmp_path, *extra, timeout=120):
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run",
        "--bootstrap-servers", broker.bootstrap_servers,
        "--group-id", f"{names}-g",
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--session-timeout-ms", "6000",
        "--learners", "nb",
        "--stop-when-idle", "2",
        *extra,
    ]  # fmt: skip
    env = {"STREAM_LEARNER_CHECKPOINT_KEY": KEY, "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def test_a_missing_input_topic_is_refused_in_one_line(kafka_broker, kafka_names, tmp_path):
    topic = f"{kafka_names}-reveiws"
    result = run(kafka_broker, kafka_names, tmp_path, "--topic", topic)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = errors(result)
    assert f"input topic {topic} does not exist" in line and "--create-topics" in line
    assert topic not in existing_topics(kafka_broker.bootstrap_servers)  # and it was not auto-created
    assert "Traceback" not in result.stderr


def test_create_topics_creates_the_missing_input_topic(kafka_broker, kafka_names, tmp_path):
    topic = f"{kafka_names}-new"
    result = run(kafka_broker, kafka_names, tmp_path, "--topic", topic, "--create-topics")
    assert result.returncode == 0, result.stderr[-2000:]
    assert topic in existing_topics(kafka_broker.bootstrap_servers)
    assert "from the earliest (no committed offset)" in result.stderr


def test_a_metrics_port_in_use_is_one_line_and_exit_2(kafka_broker, kafka_names, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(kafka_broker, kafka_names, tmp_path, "--topic", f"{kafka_names}-in", "--metrics-port", str(port))
    assert result.returncode == 2
    [line] = errors(result)
    assert f"port {port}" in line and "--metrics-port" in line
    assert "Traceback" not in result.stderr


def test_an_unknown_learner_is_refused_before_anything_is_written(tmp_path):
    command = [sys.executable, "-m", "stream_learner.cli.main", "run", "--topic", "t", "--learners", "no-such-learner",
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--generate-key"]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    [line] = errors(result)
    assert "no-such-learner" in line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "config").exists()
