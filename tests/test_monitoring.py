"""Alert rules and the Grafana dashboard: promtool, and a real Prometheus scraping the service under load.

promtool and prometheus come from Debian's `prometheus` package; these tests fail,
never skip, when it is missing (.ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    ROOT,
    Service,
    outside_checkout,
    tool_command,
    tool_env,
    wait_for,
)
from tools.ports import free_port

MakeService = Callable[..., Service]

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "aggregator.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "aggregator.yml"
JOB = "vote-aggregator"
SEVERITIES = {"critical", "warning", "info"}
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus (Debian's package; .ci/run installs it)"

# What Grafana would put in place of its variables, for queries sent to Prometheus directly.
SUBSTITUTIONS = {"$__rate_interval": "5s", "$__interval": "5s", "$instance": ".*"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed; install it with: {INSTALL_HINT}")
    return path


# -- reading the files ---------------------------------------------------------------------------


def alert_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule in alerts.yml."""
    text = ALERTS.read_text()
    parts = re.split(r"^\s*- alert:\s*", text, flags=re.MULTILINE)[1:]
    blocks = {}
    for part in parts:
        name, _, body = part.partition("\n")
        blocks[name.strip()] = body
    return blocks


def alert_cases() -> list[tuple[str, bool]]:
    """(alertname, expects the alert to fire) for every case in alerts.test.yml."""
    text = ALERT_TESTS.read_text()
    cases = []
    for block in re.split(r"^\s*- eval_time:", text, flags=re.MULTILINE)[1:]:
        name = re.search(r"^\s*alertname:\s*(\S+)", block, flags=re.MULTILINE)
        assert name is not None, f"a case without alertname in {ALERT_TESTS.name}: {block[:200]}"
        quiet = re.search(r"^\s*exp_alerts:\s*\[\]", block, flags=re.MULTILINE) is not None
        cases.append((name.group(1), not quiet))
    return cases


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return panels


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr with Grafana's variables substituted) for every panel target."""
    queries = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in SUBSTITUTIONS.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], target["refId"], expr))
    return queries


def metric_names(expr: str) -> set[str]:
    """Metric names in the selectors of a PromQL expression (every selector here has braces)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))


# -- promtool --------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [binary("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_blocks())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = subprocess.run(
        [binary("promtool"), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_labels_annotations_and_unit_tests() -> None:
    blocks = alert_blocks()
    assert len(blocks) >= 10
    for name, body in blocks.items():
        assert f'job="{JOB}"' in body, f"{name} does not select job={JOB}"
        severity = re.search(r"^\s*severity:\s*(\S+)", body, flags=re.MULTILINE)
        assert severity is not None, f"{name}: severity"
        assert severity.group(1) in SEVERITIES, f"{name}: severity"
        for annotation in ("summary", "description", "runbook"):
            assert re.search(rf"^\s*{annotation}:\s*\S", body, flags=re.MULTILINE), f"{name}: no {annotation}"
    cases = alert_cases()
    tested = {name for name, _ in cases}
    # promtool passes a case about an alert that does not exist: a typo would test nothing.
    assert tested <= set(blocks), f"cases about unknown alerts: {tested - set(blocks)}"
    for name in blocks:
        assert (name, True) in cases, f"no case where {name} fires"
        assert (name, False) in cases, f"no case where {name} stays quiet"


# -- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    uid = re.search(r"^\s*uid:\s*(\S+)", DATASOURCES.read_text(), flags=re.MULTILINE)
    assert uid is not None
    datasource = {"type": "prometheus", "uid": uid.group(1)}
    assert "url: http://prometheus:9090" in DATASOURCES.read_text()
    assert "path: /var/lib/grafana/dashboards" in DASHBOARD_PROVIDERS.read_text()

    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["w"] > 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == datasource
            assert target["expr"].strip()
            # Every selector reads this service's job and honours the instance picker.
            for selector in re.findall(r"\{([^}]*)\}", target["expr"]):
                assert f'job="{JOB}"' in selector, target["expr"]
                assert 'instance=~"$instance"' in selector, target["expr"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"instance"}

    titles = " | ".join(p["title"] for p in panels).lower()
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for needed in ("votes_aggregated_total", "current_vote_totals", "batch_duration_seconds_bucket",
                   "aggregation_errors_total", "votes_rejected_total", "duplicate_vote_attempts_total",
                   "votes_redelivered_total", "vote_buffer_depth", "last_successful_flush_timestamp_seconds",
                   "database_up", "rabbitmq_connected"):  # fmt: skip
        assert needed in exprs, f"no panel shows {needed}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in exprs
    assert "postgresql" in titles
    assert "rabbitmq" in titles


# -- a real Prometheus -------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: HTTP {exc.code}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data]
        return result

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    started: list[Prometheus] = []

    def start(metrics_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
                    ],
                }
            )
        )
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        prometheus = Prometheus(f"http://127.0.0.1:{port}", proc, log)
        started.append(prometheus)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{prometheus.logs()}")
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout=30, interval=0.2, what="prometheus to be ready")
        return prometheus

    yield start
    for prometheus in started:
        if prometheus.proc.poll() is None:
            prometheus.proc.terminate()
            try:
                prometheus.proc.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.proc.kill()
                prometheus.proc.wait(5)


def start_load(queue: str, *, rate: int, seconds: int) -> subprocess.Popen[bytes]:
    """The demo publisher: votes with duplicate attempts, replays and invalid messages, paced."""
    return subprocess.Popen(
        tool_command(
            f"--count={rate * seconds}",
            f"--rate={rate}",
            "--laws=4",
            "--duplicates=0.05",
            "--replays=0.05",
            "--invalid=0.1",
            "--reuse-after=50",
            f"--queue={queue}",
            f"--host={RABBITMQ_HOST}",
            f"--port={RABBITMQ_PORT}",
            "--progress=none",
        ),
        cwd=outside_checkout(),
        env=tool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_dashboard_queries_and_alert_rules_work_on_a_real_prometheus(
    make_service: MakeService, queue: str, start_prometheus: Callable[[int], Prometheus]
) -> None:
    svc = make_service({"BATCH_TIMEOUT_SECONDS": "0.2"}).start()
    load = start_load(queue, rate=300, seconds=60)
    try:
        prometheus = start_prometheus(svc.metrics_port)
        wait_for(
            lambda: [s["value"][1] for s in prometheus.query(f'up{{job="{JOB}"}}')] == ["1"],
            timeout=20,
            what="Prometheus to scrape the service",
        )

        # Every panel query answers with data once votes, rejects and duplicates flow.
        queries = dashboard_queries()
        assert len(queries) >= 20

        def empty_queries() -> list[str]:
            return [f"{title} [{ref}]: {expr}" for title, ref, expr in queries if not prometheus.query(expr)]

        missing: list[str] = []

        def all_answer() -> bool:
            missing[:] = empty_queries()
            return not missing

        try:
            wait_for(all_answer, timeout=40, interval=1.0, what="every dashboard query to return data")
        except AssertionError:
            raise AssertionError("queries without data:\n" + "\n".join(missing)) from None
        assert load.poll() is None, "the load ended too early"

        def value(expr: str) -> float:
            return float(prometheus.query(expr)[0]["value"][1])

        assert value(f'sum(rate(votes_aggregated_total{{job="{JOB}"}}[5s]))') > 0
        assert value(f'database_up{{job="{JOB}"}}') == 1
        assert value(f'rabbitmq_connected{{job="{JOB}"}}') == 1
        reasons = {s["metric"]["reason"] for s in prometheus.query(f'votes_rejected_total{{job="{JOB}"}}')}
        assert {"invalid_json", "missing_field", "invalid_choice"} <= reasons
        assert value(f'duplicate_vote_attempts_total{{job="{JOB}"}}') > 0
        assert value(f'votes_redelivered_total{{job="{JOB}"}}') > 0
        laws = {s["metric"]["law_id"] for s in prometheus.query(f'current_vote_totals{{job="{JOB}"}}')}
        assert laws == {"law-001", "law-002", "law-003", "law-004"}

        # Every metric the rules and the dashboard name is one the service exports:
        # a misspelt name would not fail a query, it would only never return data.
        exported = set(prometheus.api("/api/v1/label/__name__/values"))
        named = metric_names(ALERTS.read_text()) | {n for _t, _r, e in queries for n in metric_names(e)}
        assert named <= exported, f"not exported by the service: {sorted(named - exported)}"

        # The rule file loads and every rule evaluates without error.
        def rules() -> dict[str, dict[str, Any]]:
            groups = prometheus.api("/api/v1/rules")["groups"]
            return {r["name"]: r for g in groups for r in g["rules"]}

        def all_evaluated() -> bool:
            return all(r["health"] == "ok" for r in rules().values())

        wait_for(all_evaluated, timeout=15, what="every rule to be evaluated")
        loaded = rules()
        assert set(loaded) == set(alert_blocks())
        for name, rule in loaded.items():
            assert rule["type"] == "alerting", name
            assert rule["labels"]["severity"] in SEVERITIES, name
            assert rule.get("lastError", "") == "", f"{name}: {rule['lastError']}"
        # 10% invalid and 5% duplicate attempts are spikes by the rules' standards;
        # a healthy service trips none of the others.
        wait_for(
            lambda: (
                rules()["VoteAggregatorRejectedVotesSpike"]["state"] in ("pending", "firing")
                and rules()["VoteAggregatorDuplicateAttemptsSpike"]["state"] in ("pending", "firing")
            ),
            timeout=15,
            what="the reject and duplicate spike alerts to become pending",
        )
        for name in (
            "VoteAggregatorDown",
            "VoteAggregatorAbsent",
            "VoteAggregatorNotFlushing",
            "VoteAggregatorDatabaseDown",
            "VoteAggregatorRabbitMQDisconnected",
            "VoteAggregatorErrors",
            "VoteAggregatorUnexpectedError",
            "VoteAggregatorBatchLatencyHigh",
            "VoteAggregatorDatabaseRetries",
            "VoteAggregatorRestarting",
            "VoteAggregatorLawLabelCapReached",
        ):
            assert rules()[name]["state"] == "inactive", f"{name} is {rules()[name]['state']} on a healthy service"
    finally:
        if load.poll() is None:
            load.send_signal(signal.SIGTERM)
        try:
            load.wait(20)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait(5)
        assert load.stderr is not None
        load.stderr.close()
    assert svc.stop() == 0


def test_prometheus_scrapes_the_service_down_as_up_zero(
    make_service: MakeService, start_prometheus: Callable[[int], Prometheus]
) -> None:
    """What VoteAggregatorDown relies on: a stopped service is up == 0 for its job and instance."""
    svc = make_service().start()
    prometheus = start_prometheus(svc.metrics_port)
    wait_for(lambda: prometheus.query(f'up{{job="{JOB}"}} == 1'), timeout=20, what="a successful scrape")
    assert svc.stop() == 0
    started = time.monotonic()
    down = wait_for(lambda: prometheus.query(f'up{{job="{JOB}"}} == 0'), timeout=20, what="up == 0")
    assert down[0]["metric"]["instance"] == f"127.0.0.1:{svc.metrics_port}"
    assert time.monotonic() - started < 20
