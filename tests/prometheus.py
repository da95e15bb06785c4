"""A real Prometheus on a free loopback port (Debian's `prometheus` package), and what the tests
of the alert rules, the dashboard, the alert routes and the locked metrics port read alike: the
scrape job's name, the committed Prometheus configuration and dashboard, and the runbook links
the rules carry (docs/monitoring.md#runbook-links).
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests import skips
from tests.support import ROOT, wait_for
from tools.ports import free_port

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "aggregator.json"
JOB = "votes/vote-aggregator"
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus (Debian's package; .ci/run installs it)"
# Every alert's runbook_url: its section of docs/monitoring.md under the Prometheus external label
# runbook_base_url, or under a host that says the label is missing (docs/monitoring.md#runbook-links).
RUNBOOK_LABEL = "runbook_base_url"
RUNBOOK_FALLBACK = "https://runbook-base-url-not-set.invalid/docs"


def runbook_url_template(alert: str) -> str:
    """The runbook_url annotation every rule of alerts.yml carries, as written there."""
    return f"{{{{ or $externalLabels.{RUNBOOK_LABEL} `{RUNBOOK_FALLBACK}` }}}}/monitoring.md#{alert.lower()}"


def runbook_url(alert: str, external_labels: dict[str, str]) -> str:
    """The link Prometheus makes of runbook_url_template(alert) under these external labels."""
    return f"{external_labels.get(RUNBOOK_LABEL) or RUNBOOK_FALLBACK}/monitoring.md#{alert.lower()}"


def binary(name: str) -> str:
    return skips.tool(name, install=INSTALL_HINT)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return panels


class Prometheus:
    """A real Prometheus on a free loopback port, for the tests that check queries, rules and scrapes."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    @classmethod
    def launch(cls, config: dict[str, Any], directory: Path, name: str) -> Prometheus:
        """Start one with `config` (written as JSON, which is YAML) and wait until it is ready."""
        config_file, log = directory / f"{name}.yml", directory / f"{name}.log"
        config_file.write_text(json.dumps(config))
        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={directory / f'{name}-tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        prometheus = cls(f"http://127.0.0.1:{port}", proc, log)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{prometheus.logs()}")
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        try:
            wait_for(ready, timeout=30, interval=0.2, what="prometheus to be ready")
        except AssertionError:
            prometheus.stop()
            raise
        return prometheus

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

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

    def value(self, expr: str) -> float:
        """The value of a query that answers with one sample."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def rules(self) -> dict[str, dict[str, Any]]:
        """Alert name -> its rule as Prometheus evaluates it (state, health, lastError)."""
        groups = self.api("/api/v1/rules")["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}

    def wait_state(self, alert: str, *states: str, timeout: float = 20) -> None:
        wait_for(
            lambda: self.rules()[alert]["state"] in states,
            timeout=timeout,
            interval=0.5,
            what=f"{alert} to be {' or '.join(states)}",
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
