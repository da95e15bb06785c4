"""Alerts reach someone: Prometheus sends them to the compose stack's Alertmanager, whose route
takes every severity to the on-call receiver (deploy/alertmanager/alertmanager.yml). And the
dashboard tells a deliberate hold from a disconnection.

The route is checked by a real Alertmanager (Debian's prometheus-alertmanager, installed by
`make test-tools`): the committed configuration, its webhook pointed at a receiver in this test, is
sent one of the committed critical alerts as the compose stack's Prometheus sends it (its external
labels added, its runbook_url resolved), which must arrive with that link.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from ruamel.yaml import YAML

from tests import skips
from tests.deploy_files import COMPOSE, bind_mounts, pinned
from tests.prometheus import JOB, PROMETHEUS_CONFIG, Prometheus, dashboard_panels, runbook_url
from tests.support import ROOT, Service, wait_for
from tools.ports import free_port

ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
INSTALL_HINT = "make test-tools installs it (Debian's prometheus-alertmanager package)"


def _yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_prometheus_sends_alerts_to_the_stacks_alertmanager() -> None:
    services = _yaml(COMPOSE)["services"]
    alertmanager = services["alertmanager"]
    assert pinned(alertmanager["image"]), alertmanager["image"]
    mounts = dict((target, source) for source, target in bind_mounts(alertmanager))
    assert (ROOT / mounts["/etc/alertmanager/alertmanager.yml"]).resolve() == ALERTMANAGER_CONFIG
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    (targets,) = [
        c["targets"]
        for a in _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")["alerting"]["alertmanagers"]
        for c in a["static_configs"]
    ]
    assert targets == ["alertmanager:9093"]
    assert "alertmanager" in services["prometheus"]["depends_on"]


def test_every_severity_is_routed_to_someone() -> None:
    amtool = skips.tool("amtool", install=INSTALL_HINT)
    checked = subprocess.run([amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    severities = {rule["labels"]["severity"] for rule in _rules()}
    assert severities == {"critical", "warning", "info"}
    for severity in severities:
        routed = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", f"severity={severity}"],
            capture_output=True,
            text=True,
        )
        assert routed.stdout.split() == ["on-call"], f"{severity}: {routed.stdout}{routed.stderr}"


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@skips.unless(None if ALERTMANAGER else f"prometheus-alertmanager is not installed: {INSTALL_HINT}")
def test_a_critical_alert_reaches_the_on_call_receiver_with_its_runbook(receiver: str, tmp_path: Path) -> None:
    config = _yaml(ALERTMANAGER_CONFIG)
    (on_call,) = [r for r in config["receivers"] if r["name"] == "on-call"]
    on_call["webhook_configs"][0]["url"] = receiver  # the one change: where the pager is
    config_path = tmp_path / "alertmanager.yml"
    with config_path.open("w") as f:
        YAML().dump(config, f)
    port = free_port()
    assert ALERTMANAGER is not None
    process = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config_path}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "alertmanager.log").open("w"),
    )
    try:
        (rule,) = [r for r in _rules() if r["alert"] == "VoteAggregatorDown"]
        assert rule["labels"]["severity"] == "critical"
        # Prometheus adds its external labels to what it sends, and resolves the runbook link with them.
        external_labels = _yaml(PROMETHEUS_CONFIG)["global"]["external_labels"]
        link = runbook_url(rule["alert"], external_labels)
        assert link == f"{external_labels['runbook_base_url']}/monitoring.md#voteaggregatordown"
        labels = {**external_labels, "alertname": rule["alert"], **rule["labels"], "instance": "aggregator:8001"}
        alert = [{"labels": labels, "annotations": {"summary": "test", "runbook_url": link}}]

        def posted() -> bool:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v2/alerts",
                data=json.dumps(alert).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(posted, timeout=30, what="Alertmanager to take the alert")
        wait_for(lambda: _Receiver.received, timeout=60, what="the on-call receiver to be notified")
        (notification,) = _Receiver.received[:1]
        assert notification["receiver"] == "on-call"
        assert notification["status"] == "firing"
        (sent,) = notification["alerts"]
        assert sent["labels"]["alertname"] == "VoteAggregatorDown"
        assert sent["annotations"]["runbook_url"] == link
    finally:
        process.terminate()
        process.wait(30)


# -- the dashboard during a deliberate hold ---------------------------------------------------------


def _panel(title: str) -> dict[str, Any]:
    (panel,) = [p for p in dashboard_panels() if p["title"] == title]
    return panel


def _shown(panel: dict[str, Any], value: float) -> str:
    """The text a stat panel's value mappings give `value`."""
    for mapping in panel["fieldConfig"]["defaults"]["mappings"]:
        found = mapping["options"].get(f"{value:g}")
        if found:
            return str(found["text"])
    return f"{value:g}"


@pytest.fixture
def scraping(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """A real Prometheus scraping the service's metrics port every second, as the stack's job."""
    started: list[Prometheus] = []

    def start(metrics_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"app": "vote-aggregator"}}
                    ],
                }
            ],
        }
        started.append(Prometheus.launch(config, tmp_path, "prometheus"))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


@pytest.mark.slow
def test_a_hold_for_the_synchronous_standby_shows_as_held_not_disconnected(
    make_service: Callable[..., Service], scraping: Callable[[int], Prometheus]
) -> None:
    # The shared server has no standby: with POSTGRES_REQUIRE_SYNC_STANDBY the service holds.
    svc = make_service({"POSTGRES_REQUIRE_SYNC_STANDBY": "true", "RESULTS_EMBARGO": "true"})
    svc.start(wait_consuming=False)

    def held() -> bool:
        try:
            return svc.metric("vote_consumption_held") == 1
        except OSError:  # not serving yet
            return False

    wait_for(held, timeout=30, what="the service to hold")
    prometheus = scraping(svc.metrics_port)

    def value(title: str, ref: str = "A") -> float:
        (target,) = [t for t in _panel(title)["targets"] if t["refId"] == ref]
        expr = target["expr"].replace("$instance", ".*")
        wait_for(lambda: prometheus.query(expr), timeout=30, what=f"{title}: {expr} to return data")
        return prometheus.value(expr)

    rabbitmq = _panel("RabbitMQ")
    assert _shown(rabbitmq, value("RabbitMQ")) == "HELD"
    assert _shown(rabbitmq, 0) == "DISCONNECTED"  # what the same panel says of a lost connection
    assert value("Synchronous-standby hold", "A") == 1
    assert value("Synchronous-standby hold", "B") == 0
    assert value("Oldest unacked vote") == 0  # held in RabbitMQ, not by the service
    assert _shown(_panel("Results embargo"), value("Results embargo")) == "EMBARGOED"
    assert svc.stop() == 0
