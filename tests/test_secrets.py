"""Secrets stay off command lines: password flags are refused, files and the environment work,
``--processes`` hands settings to its workers through their environment; their checkpoints are
private."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from kafka_helpers import ASSIGNED, KEY, synthetic_records, wait_for_log

from stream_learner.cli.produce import produce_records
from stream_learner.io.broker import create_topics
from stream_learner.runtime.config import ConfigError, config_from_args, load_config, to_environment

PASSWORD = "hunter2-sasl-password"


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--sasl-plain-password", "--ssl-password"])
def test_a_password_given_as_a_flag_is_refused_naming_the_alternatives(flag):
    result = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli.main", "run", "--topic", "t", flag, PASSWORD],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY),
    )
    assert result.returncode == 2
    variable = "STREAM_LEARNER_" + flag[2:].replace("-", "_").upper()
    assert f"{flag}-file" in result.stderr and variable in result.stderr
    assert PASSWORD not in result.stderr


def test_passwords_come_from_files_or_the_environment(tmp_path):
    sasl, ssl = tmp_path / "sasl", tmp_path / "ssl"
    sasl.write_text(PASSWORD + "\n")
    ssl.write_text("key-password")
    config = load_config(
        ["--topic", "t", "--sasl-plain-password-file", str(sasl), "--ssl-password-file", str(ssl)], environ={}
    )
    assert config.sasl_plain_password == PASSWORD and config.ssl_password == "key-password"
    assert PASSWORD not in repr(config) and PASSWORD not in str(config.describe())
    from_env = load_config(["--topic", "t"], environ={"STREAM_LEARNER_SASL_PLAIN_PASSWORD": PASSWORD})
    assert from_env.client_options()["sasl_plain_password"] == PASSWORD
    with pytest.raises(ConfigError, match="not both"):
        load_config(
            ["--topic", "t", "--sasl-plain-password-file", str(sasl)],
            environ={"STREAM_LEARNER_SASL_PLAIN_PASSWORD": PASSWORD},
        )
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--topic", "t", "--ssl-password-file", str(tmp_path / "missing")], environ={})


def test_the_environment_carries_every_setting(tmp_path):
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    config = load_config(
        [
            "--topic", "a,b", "--learners", "nb,pa", "--label-ttl", "none", "--metrics-port", "9400",
            "--fusion", "nb=counts", "--sasl-plain-password-file", str(password), "--allow-fresh-start",
            "--checkpoint-dir", str(tmp_path / "c"), "--drift-topic", "drift",
        ],
        environ={},
    )
    import argparse

    again = config_from_args(argparse.Namespace(), environ=to_environment(config))
    # The password itself is handed over, not the file it was read from.
    assert again == dataclasses.replace(config, sasl_plain_password_file=None)
    assert again.sasl_plain_password == PASSWORD and again.allow_fresh_start


@pytest.mark.kafka
@pytest.mark.slow
def test_processes_keep_secrets_off_the_workers_command_lines(kafka_broker, kafka_names, tmp_path):
    topic = f"{kafka_names}-in"
    create_topics(kafka_broker.bootstrap_servers, {topic: 2})
    produce_records(synthetic_records(200), bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic)
    password_file = tmp_path / "sasl-password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    log_path = tmp_path / "supervisor.log"
    env = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY=KEY, PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run", "--topic", topic,
        "--bootstrap-servers", kafka_broker.bootstrap_servers, "--group-id", f"{kafka_names}-group",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--session-timeout-ms", "3000", "--processes", "2",
        # PLAINTEXT ignores the SASL settings: they only have to reach the workers.
        "--sasl-plain-username", "me", "--sasl-plain-password-file", str(password_file),
    ]
    with open(log_path, "ab") as log:
        supervisor = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_log(log_path, ASSIGNED, count=2, process=supervisor)
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 2
        for child in children:
            cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().decode()
            assert PASSWORD not in cmdline and KEY not in cmdline and "password" not in cmdline
            environment = Path(f"/proc/{child.pid}/environ").read_bytes().decode(errors="replace")
            assert f"STREAM_LEARNER_SASL_PLAIN_PASSWORD={PASSWORD}" in environment.split("\0")
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if supervisor.poll() is None:
            for child in psutil.Process(supervisor.pid).children():
                child.kill()
            supervisor.kill()
    assert PASSWORD not in log_path.read_text()
    for index in (0, 1):
        directory = tmp_path / "ckpt" / f"worker-{index}"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        files = [p for p in directory.iterdir() if p.name != "lock"]
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o700


@pytest.mark.slow
def test_without_a_key_the_worker_refuses_unless_it_may_generate_one_outside_the_checkpoints(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_LEARNER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run", "--topic", "t",
        "--bootstrap-servers", "127.0.0.1:1", "--checkpoint-dir", str(tmp_path / "ckpt"),
    ]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--generate-key" in refused.stderr
    assert not (tmp_path / "config").exists()

    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen([*command, "--generate-key"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_log(log_path, "broker unreachable", process=worker)
        key = tmp_path / "config" / "stream-learner" / "checkpoint.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
        assert not list((tmp_path / "ckpt").glob("*.key"))
        assert key.read_text() not in log_path.read_text()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
