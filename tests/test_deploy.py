"""The deploy kit: Prometheus config and alert rules (checked by promtool), the compose file,
the Kubernetes manifests and the Grafana dashboard, parsed and cross-checked against the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stream_learner.cli.main import build_parser
from stream_learner.runtime.config import _OPTIONS, ConfigError, config_from_args, env_name
from stream_learner.runtime.metrics import StreamMetrics

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-learner.json"
K8S = DEPLOY / "k8s"

promtool = pytest.mark.requires("promtool")

# Settings the worker reads from the environment besides its STREAM_LEARNER_<SETTING> options.
EXTRA_ENV = {"STREAM_LEARNER_CHECKPOINT_KEY", "STREAM_LEARNER_CONFIG", "STREAM_LEARNER_CACHE", "STREAM_LEARNER_LOG_LEVEL"}
KNOWN_ENV = {env_name(option.name) for option in _OPTIONS} | EXTRA_ENV


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def _alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [panel for panel in found if panel["type"] != "row"]


def _exposed_names() -> set[str]:
    """Every sample name stream-learner exposes, as Prometheus sees it."""
    metrics = StreamMetrics(learners=["nb"])
    metrics.set_lag("texts", 0, 1)  # the only series that exists only once reported
    names = {"up", "time"}
    for family in metrics.registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:stream_learner|process|python)_[a-z0-9_]+)\b", expr))


def _worker_config(argv: list[str], environ: dict[str, str]):
    """What `stream-learner <argv>` would run with in that environment (or ConfigError)."""
    args = build_parser().parse_args(argv)
    assert args.command == "run"
    return config_from_args(args, environ)


# -- Prometheus ------------------------------------------------------------------------------


@promtool
def test_promtool_accepts_the_prometheus_config():
    result = _run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@promtool
def test_promtool_accepts_the_alert_rules():
    result = _run(["promtool", "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(_alerts())} rules found" in result.stdout


@promtool
def test_promtool_unit_tests_of_the_alerts_pass():
    result = _run(["promtool", "test", "rules", str(ALERT_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in _alerts():
        name = rule["alert"]
        assert any(c["alertname"] == name and c.get("exp_alerts") for c in cases), f"{name} never fires"
        assert any(c["alertname"] == name and not c.get("exp_alerts") for c in cases), f"{name} never stays quiet"


def test_the_alerts_cover_what_operators_need():
    rules = {rule["alert"]: rule for rule in _alerts()}
    wanted = {
        "accuracy below a threshold": "stream_learner_accuracy_ratio",
        "drift detected": "stream_learner_drift_events_total",
        "consumer lag growing": "stream_learner_consumer_lag_records",
        "no records processed": "stream_learner_records_total",
        "checkpoints failing": "stream_learner_checkpoint_failures_total",
        "worker down": "up{",
        "dead-letter rate high": "stream_learner_dead_letters_total",
    }
    for need, metric in wanted.items():
        assert any(metric in rule["expr"] for rule in rules.values()), need
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alerts_and_panels_use_only_metrics_the_worker_exposes():
    exposed = _exposed_names()
    exprs = [rule["expr"] for rule in _alerts()]
    exprs += [t["expr"] for panel in _panels(_dashboard()) for t in panel["targets"]]
    exprs += [a["expr"] for a in _dashboard()["annotations"]["list"] if "expr" in a]
    unknown = {name for expr in exprs for name in _metric_names(expr)} - exposed
    assert not unknown, f"not exposed by StreamMetrics: {sorted(unknown)}"


def test_prometheus_config_scrapes_both_compose_workers_on_their_metrics_port():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["stream-learner"]["static_configs"] for t in sc["targets"]]
    compose = yaml.safe_load(COMPOSE.read_text())
    workers = [name for name in compose["services"] if name.startswith("worker-")]
    assert sorted(targets) == sorted(f"{name}:9108" for name in workers)
    # The rule file path is relative to the config file; compose mounts it at the same place.
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file()


def test_the_operator_rules_are_the_same_as_alerts_yml():
    rule = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


# -- docker compose --------------------------------------------------------------------------


def _compose_environment(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    # ${VAR:?message} and ${VAR:-default}: stand-ins, as the user's shell would provide.
    return {
        key: re.sub(r"\$\{[^}]*\}", "stand-in-value", str(value)) for key, value in environment.items()
    }


def test_compose_has_kraft_kafka_two_workers_prometheus_and_grafana():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in name for name in services)
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert len(workers) == 2
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    # Published ports stay on loopback.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    # Each worker keeps its own checkpoint volume (the checkpoint directory is locked).
    volumes = [tuple(w["volumes"]) for w in workers.values()]
    assert len(set(volumes)) == 2


def test_compose_workers_run_with_a_valid_configuration():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        if not name.startswith("worker-"):
            continue
        environment = _compose_environment(service)
        assert set(environment) <= KNOWN_ENV, f"{name}: unknown settings {set(environment) - KNOWN_ENV}"
        assert "STREAM_LEARNER_CHECKPOINT_KEY" in environment
        config = _worker_config(service["command"], environment)
        assert config.metrics_port == 9108 and config.metrics_host == "0.0.0.0"
        assert config.bootstrap_servers == "kafka:9092"
        assert config.drift_topic  # drift events go somewhere the operator can read them
        assert "/readyz" in " ".join(service["healthcheck"]["test"])


def test_compose_mounts_files_that_exist():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, volume)
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


def test_compose_grafana_provisions_the_datasource_and_dashboard():
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "stream-learner.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    assert any(p.name == "stream-learner.json" for p in (DEPLOY / "grafana" / "dashboards").iterdir())


@pytest.mark.requires("docker-compose")
def test_docker_compose_config_accepts_the_file():
    # Debian's docker-compose (v1) is stricter than the compose plugin: it accepts what both do.
    command = ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"]
    environment = dict(os.environ, STREAM_LEARNER_CHECKPOINT_KEY="0" * 64)
    result = _run(command, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the checkpoint key the stack refuses to start rather than run unsigned.
    environment.pop("STREAM_LEARNER_CHECKPOINT_KEY")
    result = _run(command, env=environment)
    assert result.returncode != 0 and "STREAM_LEARNER_CHECKPOINT_KEY" in result.stderr


@pytest.mark.requires("hadolint")
def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = _run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_cli_as_an_unprivileged_user():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE\s+9108\b", dockerfile, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["stream-learner"\]', dockerfile, re.MULTILINE)
    assert "/healthz" in dockerfile


# -- Kubernetes ------------------------------------------------------------------------------


def _k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "kind" in document and document["kind"] != "Kustomization":
                objects[document["kind"]] = document
    return objects


def test_k8s_has_every_object_the_deployment_needs():
    objects = _k8s_objects()
    assert {"StatefulSet", "Service", "ConfigMap", "Secret", "PodMonitor", "PrometheusRule"} <= set(objects)
    assert "Deployment" not in objects  # a Deployment's pods would share no durable volume
    for kind, obj in objects.items():
        assert obj["apiVersion"] and obj["metadata"]["name"] == "stream-learner", kind


def test_k8s_probes_hit_the_health_endpoints_on_the_metrics_port():
    deployment = _k8s_objects()["StatefulSet"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": 9108}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The grace period outlasts the worker's own shutdown timeout (checkpoint + commit).
    config = _k8s_objects()["ConfigMap"]["data"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(config["STREAM_LEARNER_SHUTDOWN_TIMEOUT"])


def test_k8s_selectors_ports_and_scrape_settings_agree():
    objects = _k8s_objects()
    deployment, service, monitor = objects["StatefulSet"], objects["Service"], objects["PodMonitor"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # The job label the alert rules match on.
    assert re.fullmatch(r".*stream-learner.*", pod_labels[monitor["spec"]["jobLabel"]])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9108"


def test_k8s_worker_runs_with_a_valid_configuration_and_secrets_from_the_secret():
    objects = _k8s_objects()
    deployment, config_map, secret = objects["StatefulSet"], objects["ConfigMap"], objects["Secret"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    refs = {kind: ref["name"] for ref in container["envFrom"] for kind, ref in ref.items()}
    assert refs == {"configMapRef": config_map["metadata"]["name"], "secretRef": secret["metadata"]["name"]}
    secret_keys = set(secret["stringData"])
    assert {"STREAM_LEARNER_SASL_PLAIN_PASSWORD", "STREAM_LEARNER_CHECKPOINT_KEY"} <= secret_keys
    # Credentials only in the Secret, never in the ConfigMap.
    assert not {key for key in config_map["data"] if "PASSWORD" in key or key.endswith("_KEY")}
    environment = {**config_map["data"], **secret["stringData"]}
    environment.update({e["name"]: "pod-name" for e in container.get("env", [])})
    assert set(environment) <= KNOWN_ENV, set(environment) - KNOWN_ENV
    config = _worker_config(container["args"], environment)
    assert config.metrics_port == 9108 and config.metrics_host == "0.0.0.0"
    assert config.sasl_plain_password == secret["stringData"]["STREAM_LEARNER_SASL_PLAIN_PASSWORD"]
    assert "sasl_plain_password" not in repr(config)


def test_k8s_workers_keep_their_own_checkpoint_volume_and_name():
    objects = _k8s_objects()
    stateful_set, service, config_map = objects["StatefulSet"], objects["Service"], objects["ConfigMap"]
    spec = stateful_set["spec"]
    # The governing Service is headless and selects these pods.
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    # One claim per pod, mounted where the checkpoint directory is, writable by the worker.
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    checkpoint_dir = config_map["data"]["STREAM_LEARNER_CHECKPOINT_DIR"]
    assert checkpoint_dir.startswith(mounts[claim["metadata"]["name"]].rstrip("/") + "/")
    # The claim is not shadowed by a pod volume of the same name (that would be an emptyDir).
    assert claim["metadata"]["name"] not in {v["name"] for v in pod.get("volumes", [])}
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # A stable worker id: the pod name, from the downward API.
    env = {e["name"]: e for e in container["env"]}
    assert env["STREAM_LEARNER_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    environment = {**config_map["data"], "STREAM_LEARNER_WORKER_ID": "stream-learner-1"}
    assert _worker_config(container["args"], environment).worker_id == "stream-learner-1"
    # Updates one pod at a time: a pod's successor needs its volume and its checkpoint lock.
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"].get("rollingUpdate", {}).get("maxUnavailable", 1) == 1


def test_a_worker_without_a_topic_is_a_configuration_error():
    # The cross-checks above would be vacuous if any environment were accepted.
    with pytest.raises(ConfigError, match="no input topic"):
        _worker_config(["run"], {"STREAM_LEARNER_METRICS_PORT": "9108"})


@pytest.mark.requires("kubectl")
def test_kustomize_renders_the_manifests():
    result = _run(["kubectl", "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(doc["kind"] for doc in documents) == ["ConfigMap", "Service", "StatefulSet"]
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stream-learner" for doc in documents)
    # The Secret is created by hand (never a placeholder credential applied by accident).
    assert "REPLACE-WITH" not in result.stdout


@pytest.mark.requires("kubernetes-validate")
def test_manifests_match_the_kubernetes_schemas():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    checked = []
    for path in sorted(K8S.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document["kind"] == "Kustomization":
                continue
            if document["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # Prometheus Operator resources: no schema in Kubernetes itself
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{path.relative_to(ROOT)} ({document['kind']}): {error.message}")
            checked.append(document["kind"])
    assert sorted(checked) == ["ConfigMap", "Secret", "Service", "StatefulSet"]


# -- Grafana dashboard -----------------------------------------------------------------------


def test_dashboard_is_well_formed():
    dashboard = _dashboard()
    assert dashboard["uid"] == "stream-learner" and dashboard["title"]
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    cells = set()
    for panel in panels:
        assert panel["title"] and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_shows_what_the_issue_asks_for():
    dashboard = _dashboard()
    exprs = " ".join(t["expr"] for panel in _panels(dashboard) for t in panel["targets"])
    for needed in (
        "rate(stream_learner_records_total",  # throughput
        'stream_learner_accuracy_ratio{window="rolling"',  # accuracy per learner
        "stream_learner_consumer_lag_records",  # lag per partition
        "histogram_quantile(0.99",  # latency percentiles
        "rate(stream_learner_dead_letters_total",  # dead-letter rate
        "time() - (stream_learner_checkpoint_last_success_timestamp_seconds",  # checkpoint age
    ):
        assert needed in exprs, needed
    lag = next(p for p in _panels(dashboard) if "stream_learner_consumer_lag_records" in p["targets"][0]["expr"])
    assert "partition" in lag["targets"][0]["legendFormat"]
    annotations = [a for a in dashboard["annotations"]["list"] if "expr" in a]
    assert any("stream_learner_drift_events_total" in a["expr"] for a in annotations)
