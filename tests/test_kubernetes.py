"""deploy/kubernetes/: valid against the Kubernetes and Prometheus Operator schemas (offline, no
cluster runs here), in step with the service's settings, and in step with the other ways to deploy
it (the systemd unit, the Dockerfile and the compose files)."""

from __future__ import annotations

import copy
import functools
import io
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # no type hints shipped
import pytest
from ruamel.yaml import YAML

import config
from config import load_config
from tests import skips
from tests.deploy_files import (
    COMPOSE,
    DOCKERFILE,
    ENV_EXAMPLE,
    UNIT,
    dockerfile_instructions,
    env_file_assignments,
    healthcheck_command,
    port_mapping,
    timespan_s,
    unit_settings,
)
from tests.proxy import TcpProxy
from tests.support import POSTGRES_HOST, POSTGRES_PORT, Service, key_files, private_key_file, wait_for

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE_HA = ROOT / "deploy" / "docker-compose.ha.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def load(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


def dump(data: Any) -> str:
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, out)
    return out.getvalue()


# The oldest Kubernetes the manifests are meant for (PodDisruptionBudget's unhealthyPodEvictionPolicy
# is GA from 1.31) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
OPERATOR_KINDS = {"PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}
# What the rules and the dashboard select (docs/monitoring.md#scrape-labels).
APP_LABEL = "vote-aggregator"


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) of every object in deploy/kubernetes/, in file order: a copy of their
    parse, which a test may change."""
    return copy.deepcopy(_parsed_documents())


@functools.cache
def _parsed_documents() -> list[tuple[str, dict[str, Any]]]:
    # Parsed once for the module's tests: the pure-Python YAML parser took a tenth of a second a time.
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in YAML(typ="safe", pure=True).load_all(path.read_text()):
            if document is not None:
                found.append((path.name, document))
    return found


def one(kind: str, name: str = "vote-aggregator") -> dict[str, Any]:
    (found,) = [d for _f, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return dict(found)


def container() -> dict[str, Any]:
    (found,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(found)


def manifest_env() -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container()["env"]}


def manifest_config(tmp_path: Path) -> config.Config:
    """The configuration the container's environment gives, its secret files stood in for (the
    signing key by a real one: it is read when the configuration is)."""
    env = manifest_env()
    for file_name in config.SECRET_FILES:
        if file_name in env:
            stand_in = tmp_path / Path(env[file_name]).name
            stand_in.write_text("secret\n")
            env[file_name] = str(stand_in)
    key, _public = key_files(tmp_path, "signing")
    env["CHAIN_SIGNING_KEY_FILE"] = str(private_key_file(key, tmp_path / "chain-signing-key.pem"))
    env["CHAIN_HEADS_FILE"] = str(tmp_path / "chain-heads.jsonl")
    return load_config(env)


def kubernetes_errors(document: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


def _strict(schema: Any) -> Any:
    """An OpenAPI schema of a CRD that refuses unknown fields (the API server would drop them)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def operator_schema(kind: str) -> dict[str, Any]:
    """The CRD's schema, parsed once (74 kB of YAML for PodMonitor); jsonschema does not change it."""
    crd = load((SCHEMAS / f"monitoring.coreos.com_{OPERATOR_KINDS[kind]}.yaml").read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return dict(_strict(served["schema"]["openAPIV3Schema"]))


def operator_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(operator_schema(document["kind"]))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


# -- the schemas ------------------------------------------------------------------------------------


def test_every_object_is_valid_for_kubernetes() -> None:
    docs = documents()
    kinds = {d["kind"] for _f, d in docs}
    assert {"Deployment", "PodDisruptionBudget", "NetworkPolicy", "ServiceAccount"} <= kinds
    assert set(OPERATOR_KINDS) <= kinds
    for file_name, document in docs:
        where = f"{file_name}: {document['kind']} {document['metadata']['name']}"
        if document["kind"] in OPERATOR_KINDS:
            assert document["apiVersion"] == "monitoring.coreos.com/v1", where
            assert operator_errors(document) == [], where
            continue
        for version in KUBERNETES_VERSIONS:
            assert kubernetes_errors(document, version) is None, f"{where} (Kubernetes {version})"


@pytest.mark.parametrize(
    ("kind", "mutate", "complaint"),
    [
        ("Deployment", lambda d: d["spec"].update(replicas="3"), "is not of type 'integer'"),
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=30), "terminationGrace"),
        ("PodDisruptionBudget", lambda d: d["spec"].update(maxUnavailabel=1), "maxUnavailabel"),
    ],
)
def test_kubernetes_schema_finds_a_broken_object(kind: str, mutate: Callable[[Any], None], complaint: str) -> None:
    broken = copy.deepcopy(one(kind))
    mutate(broken)
    errors = kubernetes_errors(broken, KUBERNETES_VERSIONS[-1])
    assert errors is not None
    assert complaint in errors


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "complaint"),
    [
        ("PodMonitor", "vote-aggregator", lambda d: d["spec"].update(podMetricEndpoints=[]), "podMetricEndpoints"),
        ("PrometheusRule", "vote-aggregator", lambda d: d["spec"]["groups"][0].update(rules="x"), "'x'"),
    ],
)
def test_operator_schema_finds_a_broken_object(
    kind: str, name: str, mutate: Callable[[Any], None], complaint: str
) -> None:
    broken = copy.deepcopy(one(kind, name))
    mutate(broken)
    assert any(complaint in error for error in operator_errors(broken)), operator_errors(broken)


# -- in step with the service -------------------------------------------------------------------------


def test_the_environment_is_a_configuration_the_service_accepts(tmp_path: Path) -> None:
    env = manifest_env()
    known = set(config.variables()) | set(config.SECRET_FILES)
    assert set(env) <= known, set(env) - known
    # Passwords come from the mounted secret only, never from the manifest.
    assert not set(env) & set(config.SECRET_FILES.values())
    manifest_config(tmp_path)


def test_the_database_settings_follow_the_high_availability_advice(tmp_path: Path) -> None:
    """docs/high-availability.md: an acked vote survives a failover, and the next attempt after
    one comes within a second."""
    settings = manifest_config(tmp_path)
    assert settings.postgres_require_sync_standby
    assert settings.retry_max_delay_s <= 1


def test_secrets_are_mounted_files(tmp_path: Path) -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files: dict[str, str] = {}  # path in the container -> key of the Secret
    for mount in container()["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            # The one writable place: the signed chain heads' file, on a volume of the pod's own.
            assert "emptyDir" in volumes[mount["name"]], mount
            assert Path(manifest_env()["CHAIN_HEADS_FILE"]).parent == Path(mount["mountPath"])
        else:
            assert mount.get("readOnly") is True, mount
            for item in secret["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
            # Readable by the service's group only (fsGroup), not by every user of the node.
            assert secret["defaultMode"] & 0o007 == 0
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    env = manifest_env()
    for file_name in (*config.SECRET_FILES, "CHAIN_SIGNING_KEY_FILE"):
        assert env[file_name] in files, f"{file_name}={env[file_name]} is not a file of a mounted secret"


def test_probes_port_and_grace_agree_with_the_service(tmp_path: Path) -> None:
    settings = manifest_config(tmp_path)
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": settings.prometheus_port}
    probes = {name: c[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert ports[probe["port"]] == settings.prometheus_port
        assert probe.get("scheme", "HTTP") == ("HTTPS" if settings.prometheus_tls_cert_file else "HTTP")
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/readyz"
    # Not /readyz: a database outage or a hold must not make every replica unready at once.
    assert probes["readinessProbe"]["path"] == "/healthz"
    # The liveness probe gives up no sooner than the service's own stall verdict can change.
    liveness = c["livenessProbe"]
    assert liveness["timeoutSeconds"] < liveness["periodSeconds"]

    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= settings.shutdown_timeout_s + 10
    assert "lifecycle" not in c, "a preStop hook would eat into the drain's grace period"
    # Kubernetes' service links (RABBITMQ_PORT=tcp://...) would be read as the service's settings.
    assert pod["enableServiceLinks"] is False


def test_the_pods_run_unprivileged_on_a_read_only_root() -> None:
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    c = container()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()


def pod_labels() -> dict[str, str]:
    return dict(one("Deployment")["spec"]["template"]["metadata"]["labels"])


def test_the_budget_the_policy_and_the_monitor_select_the_pods(tmp_path: Path) -> None:
    labels = pod_labels()
    budget = one("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"

    settings = manifest_config(tmp_path)
    policy = one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert [p["port"] for p in ingress["ports"]] == ["metrics"]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert {53, settings.rabbitmq_port} | {port for _host, port in settings.postgres_servers} <= egress_ports

    monitor = one("PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert {"targetLabel": "app", "replacement": APP_LABEL} in endpoint["relabelings"]
    queues = one("PodMonitor", "vote-aggregator-rabbitmq-queues")["spec"]["podMetricsEndpoints"][0]
    assert {"targetLabel": "app", "replacement": "rabbitmq-queues"} in queues["relabelings"]
    assert queues["path"] == "/metrics/detailed"
    (broker,) = one("PodMonitor", "vote-aggregator-rabbitmq-global")["spec"]["podMetricsEndpoints"]
    assert {"targetLabel": "app", "replacement": "rabbitmq"} in broker["relabelings"]
    assert broker["path"] == "/metrics"


def test_the_prometheus_rule_carries_the_alerts_of_alerts_yml(tmp_path: Path) -> None:
    rule = one("PrometheusRule")
    assert rule["spec"]["groups"] == load(ALERTS.read_text())["groups"]
    # The committed file is exactly what the generator writes (comments included).
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prometheus_rule.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # promtool reads the rules as the Operator hands them to Prometheus.
    promtool = skips.tool("promtool", install="make test-tools installs it (Debian's prometheus package)")
    rules = tmp_path / "rules.yml"
    rules.write_text(dump(rule["spec"]))
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the probes against the running service ----------------------------------------------------------


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    yield proxy
    proxy.close()


@pytest.mark.slow
def test_probes_through_a_database_outage(make_service: Callable[..., Service], pg_proxy: TcpProxy) -> None:
    """The manifest's probe paths on the running service: while PostgreSQL is unreachable the
    readiness and liveness probes pass (the pod stays ready and is not restarted), and only the
    startup probe's path, which a new pod must pass once, fails."""
    c = container()
    startup, readiness, liveness = (
        c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    svc = make_service(
        {"POSTGRES_PORT": str(pg_proxy.port), "POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS": "1"}
    ).start()
    assert [svc.http(path)[0] for path in (startup, readiness, liveness)] == [200, 200, 200]

    pg_proxy.refuse()
    pg_proxy.cut()
    wait_for(lambda: svc.http(startup)[0] == 503, timeout=30, what=f"{startup} to fail without PostgreSQL")
    assert "PostgreSQL" in svc.http(startup)[1]
    assert svc.http(readiness)[0] == 200
    assert svc.http(liveness)[0] == 200

    pg_proxy.resume()
    wait_for(lambda: svc.http(startup)[0] == 200, timeout=60, what=f"{startup} to pass again")
    assert svc.stop() == 0


# -- the other ways to deploy it ---------------------------------------------------------------------


def _compose_aggregators() -> dict[str, dict[str, Any]]:
    """Every aggregator service of the two compose files, by file and name."""
    found = {}
    for path in (COMPOSE, COMPOSE_HA):
        for name, service in load(path.read_text())["services"].items():
            environment = service.get("environment", {})
            if "SHUTDOWN_TIMEOUT_SECONDS" in environment or "aggregator" in name:
                found[f"{path.name}:{name}"] = service
    return found


def test_kubernetes_compose_systemd_and_the_image_agree(tmp_path: Path) -> None:
    """Grace periods, ports, users and probe paths, wherever the service is deployed."""
    k8s = manifest_config(tmp_path)
    pod = one("Deployment")["spec"]["template"]["spec"]
    unit = unit_settings(UNIT.read_text())
    unit_env = load_config(env_file_assignments(ENV_EXAMPLE.read_text(), commented=False))
    dockerfile = dict(dockerfile_instructions(DOCKERFILE.read_text()))
    aggregators = _compose_aggregators()
    assert len(aggregators) >= 3, aggregators

    # The drain budget and the stop grace around it.
    grace_s = {
        "kubernetes": float(pod["terminationGracePeriodSeconds"]),
        "systemd": timespan_s(unit["TimeoutStopSec"][-1]),
    }
    budget_s = {"kubernetes": k8s.shutdown_timeout_s, "systemd": unit_env.shutdown_timeout_s}
    for name, service in aggregators.items():
        grace_s[name] = timespan_s(service["stop_grace_period"])
        budget_s[name] = float(service["environment"]["SHUTDOWN_TIMEOUT_SECONDS"])
    assert len(set(budget_s.values())) == 1, budget_s
    assert len(set(grace_s.values())) == 1, grace_s
    for where, grace in grace_s.items():
        assert grace >= budget_s[where] + 10, where

    # The metrics and health port, and the container port each compose file publishes.
    ports = {"kubernetes": k8s.prometheus_port, "systemd": unit_env.prometheus_port, "image": int(dockerfile["EXPOSE"])}
    for name, service in aggregators.items():
        ports[name] = int(service["environment"].get("PROMETHEUS_PORT", config.Config().prometheus_port))
        for entry in service.get("ports", []):
            ports[f"{name} ports {entry}"] = int(port_mapping(entry, {})[2])
    assert len(set(ports.values())) == 1, ports

    # Users: never root; every container (pod or compose) runs as the image's uid; the database
    # role is the same one everywhere.
    uids = {"image": int(dockerfile["USER"]), "kubernetes": pod["securityContext"]["runAsUser"]}
    for name, service in aggregators.items():
        uids[name] = int(str(service.get("user", dockerfile["USER"])).split(":")[0])
    assert len(set(uids.values())) == 1, uids
    assert 0 not in uids.values()
    assert unit["DynamicUser"] == ["yes"]
    roles = {"kubernetes": k8s.postgres_user, "systemd": unit_env.postgres_user}
    for name, service in aggregators.items():
        roles[name] = service["environment"]["POSTGRES_USER"]
    assert len(set(roles.values())) == 1, roles

    # Liveness: the image's HEALTHCHECK (compose uses it, unless a service replaces it) and the
    # pod's liveness probe ask the same path.
    paths = {"kubernetes": container()["livenessProbe"]["httpGet"]["path"]}
    image_check = healthcheck_command()
    for name, service in {"image": {}, **aggregators}.items():
        check = service.get("healthcheck", {}).get("test", image_check)
        path = re.search(r"/(\w+)'", " ".join(check) if isinstance(check, list) else check)
        assert path is not None, f"{name}: {check}"
        paths[name] = f"/{path.group(1)}"
    assert set(paths.values()) == {"/healthz"}, paths
    # A start is given as long under Kubernetes (the startup probe) as under systemd.
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == timespan_s(unit["TimeoutStartSec"][-1])


def test_the_high_availability_advice_is_the_same_everywhere(tmp_path: Path) -> None:
    """What docs/high-availability.md recommends with several database servers: the Kubernetes
    manifest and the HA compose file set it, the systemd environment file proposes it (commented,
    in its high-availability section)."""
    names = ("POSTGRES_REQUIRE_SYNC_STANDBY", "RETRY_DELAY_SECONDS", "RETRY_MAX_DELAY_SECONDS")
    section = ENV_EXAMPLE.read_text().split("# --- High availability", 1)[1].split("\n# ---", 1)[0]
    proposed = env_file_assignments(section, commented=True)
    advice = {
        "kubernetes": manifest_config(tmp_path),
        "systemd": load_config({name: proposed[name] for name in names}),
    }
    for name, service in _compose_aggregators().items():
        if name.startswith(COMPOSE_HA.name):
            advice[name] = load_config({n: service["environment"][n] for n in names})
    assert len(advice) == 5, advice.keys()
    settings = {
        where: (c.postgres_require_sync_standby, c.retry_delay_s, c.retry_max_delay_s) for where, c in advice.items()
    }
    # docs/high-availability.md#settings: 0.5 s and 1 s, and the hold for a synchronous standby.
    assert set(settings.values()) == {(True, 0.5, 1.0)}, settings
