"""Alert rules and the Grafana dashboard: promtool, and a real Prometheus scraping the service under
load and a real RabbitMQ node's rabbitmq_prometheus plugin.

promtool and prometheus come from Debian's `prometheus` package, the node from Debian's
`rabbitmq-server` (tests/rabbitmq_cluster.py); without one these tests are skipped, saying
which, and a skip fails the run in CI (tests/skips.py; .ci/run installs them).
"""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from ruamel.yaml import YAML

from config import Config
from tests.prometheus import (
    JOB,
    PROMETHEUS_CONFIG,
    RUNBOOK_LABEL,
    Prometheus,
    binary,
    dashboard,
    dashboard_panels,
    runbook_url,
)
from tests.rabbitmq_cluster import RabbitNode, standalone_node
from tests.support import (
    PER_LAW_METRICS,
    ROOT,
    Service,
    make_votes,
    outside_checkout,
    tool_command,
    tool_env,
    wait_for,
)

MakeService = Callable[..., Service]

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "aggregator.yml"
# The rules and the dashboard select targets by this label, whatever their job is called
# (docs/monitoring.md#scrape-labels); the scrape jobs of these tests are named otherwise, as the
# Prometheus Operator names them, to show that the name does not matter.
APP = "vote-aggregator"
RABBITMQ_APP = "rabbitmq-queues"  # RabbitMQ's plugin, on /metrics/detailed
BROKER_APP = "rabbitmq"  # the same plugin's plain /metrics (global counters)
RABBITMQ_JOB = "votes/rabbitmq"
BROKER_JOB = "votes/rabbitmq-global"
# The label value each group of alerts.yml selects.
GROUP_APPS = {"vote-aggregator": APP, "vote-aggregator-queue": RABBITMQ_APP, "vote-aggregator-broker": BROKER_APP}
# The queues the queue alerts and the dashboard's defaults name: the service's defaults.
VOTE_QUEUE = Config().rabbitmq_queue
DEAD_LETTER_QUEUE = Config().dead_letter_queue
SEVERITIES = {"critical", "warning", "info"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Units of per-second rates and of durations (Grafana's ids); "percentunit" is CPU seconds per second.
RATE_UNITS = {"ops", "reqps", "cps", "s", "percentunit"}

# What Grafana would put in place of its variables, for queries sent to Prometheus directly.
SUBSTITUTIONS = {
    "$__rate_interval": "5s",
    "$__interval": "5s",
    "$instance": ".*",
    "$vote_queue": VOTE_QUEUE,
    "$dead_letter_queue": DEAD_LETTER_QUEUE,
}


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


def alert_groups() -> dict[str, str]:
    """Alert name -> the name of its group in alerts.yml."""
    groups = YAML(typ="safe", pure=True).load(ALERTS)["groups"]
    return {rule["alert"]: group["name"] for group in groups for rule in group["rules"] if "alert" in rule}


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


def test_prometheus_links_the_runbooks_under_its_runbook_base_url(tmp_path: Path) -> None:
    """A real Prometheus with the compose stack's external labels and nothing to scrape: the
    absent-target alerts go pending, and their runbook_url is the resolved link (promtool 2.42's
    rule tests cannot set external labels; they see the fallback)."""
    external_labels = YAML(typ="safe", pure=True).load(PROMETHEUS_CONFIG)["global"]["external_labels"]
    assert external_labels[RUNBOOK_LABEL].startswith("http")
    config = {
        "global": {"evaluation_interval": "1s", "external_labels": external_labels},
        "rule_files": [str(ALERTS)],
    }
    prometheus = Prometheus.launch(config, tmp_path, "prometheus")
    try:
        expected = {"VoteAggregatorAbsent", "VoteQueueMetricsAbsent"}

        def pending() -> list[dict[str, Any]]:
            alerts = prometheus.api("/api/v1/alerts")["alerts"]
            return alerts if expected <= {a["labels"]["alertname"] for a in alerts} else []

        alerts = wait_for(pending, timeout=30, what=f"{expected} to go pending")
        for alert in alerts:
            name = alert["labels"]["alertname"]
            assert alert["annotations"]["runbook_url"] == runbook_url(name, external_labels), name
            assert alert["annotations"]["runbook_url"].startswith(external_labels[RUNBOOK_LABEL] + "/"), name
    finally:
        prometheus.stop()


def test_every_alert_has_labels_annotations_and_unit_tests() -> None:
    blocks = alert_blocks()
    groups = alert_groups()
    assert len(blocks) >= 10
    assert set(groups) == set(blocks)
    for name, body in blocks.items():
        app = GROUP_APPS[groups[name]]
        assert f'app="{app}"' in body, f"{name} does not select app={app}"
        assert "job=" not in body, f"{name} selects a job by name"
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


def test_queue_alerts_watch_the_services_queues() -> None:
    """Each queue alert selects the vote queue or its dead-letter queue by the names the service
    uses by default, and every dead-letter check names the dead-letter queue."""
    blocks = alert_blocks()
    queue_alerts = [name for name, group in alert_groups().items() if group == "vote-aggregator-queue"]
    assert {"VoteQueueNoConsumer", "VoteQueueBacklogGrowing", "VoteQueueDeadLetters"} <= set(queue_alerts)
    for name in queue_alerts:
        named = set(re.findall(r'queue="([^"]*)"', blocks[name].partition("annotations:")[0]))
        expected = {DEAD_LETTER_QUEUE} if "DeadLetter" in name else {VOTE_QUEUE}
        assert named == expected, f"{name} selects {named}"
        assert "queue=~" not in blocks[name], name
    # The oldest unacked delivery is the service's own alert, not a second one.
    assert "oldest_unacked_delivery_age_seconds" in blocks["VoteAggregatorStalled"]
    others = [n for n, body in blocks.items() if "oldest_unacked_delivery_age_seconds" in body]
    assert others == ["VoteAggregatorStalled"]


# -- the dashboard ---------------------------------------------------------------------------------


def datasources_in(value: Any) -> list[Any]:
    """Every "datasource" value anywhere in a piece of the dashboard."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += [item] if key == "datasource" else datasources_in(item)
    elif isinstance(value, list):
        for item in value:
            found += datasources_in(item)
    return found


def panel_unit(panel: dict[str, Any], ref_id: str) -> str | None:
    """The unit Grafana shows a target's series in: an override for its query, or the panel's."""
    field_config = panel.get("fieldConfig", {})
    unit = field_config.get("defaults", {}).get("unit")
    legend = next(t.get("legendFormat") for t in panel["targets"] if t["refId"] == ref_id)
    for override in field_config.get("overrides", []):
        matcher = override["matcher"]
        if (matcher["id"], matcher["options"]) in (("byFrameRefID", ref_id), ("byName", legend)):
            unit = next((p["value"] for p in override["properties"] if p["id"] == "unit"), unit)
    return None if unit is None else str(unit)


def test_dashboard_is_well_formed_and_takes_its_datasource_from_a_variable() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    assert "url: http://prometheus:9090" in DATASOURCES.read_text()
    assert "isDefault: true" in DATASOURCES.read_text()  # what the variable starts on
    assert "path: /var/lib/grafana/dashboards" in DASHBOARD_PROVIDERS.read_text()

    # The datasource is a variable of type datasource, so the dashboard works with any
    # Prometheus, whatever its uid; no panel, query or variable names one directly.
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"DS_PROMETHEUS", "instance", "vote_queue", "dead_letter_queue"}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    builtin = {"type": "grafana", "uid": "-- Grafana --"}  # the annotations' own
    assert [d for d in datasources_in(board) if d not in (DATASOURCE, builtin)] == []
    assert variables["instance"]["datasource"] == DATASOURCE
    # The queue variables start on the service's default queue names.
    for name, default in (("vote_queue", VOTE_QUEUE), ("dead_letter_queue", DEAD_LETTER_QUEUE)):
        assert variables[name]["type"] == "textbox"
        assert variables[name]["query"] == default
        assert variables[name]["current"]["value"] == default

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
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == DATASOURCE
            expr = target["expr"]
            assert expr.strip()
            # Every selector reads this service's targets and honours the instance picker, or
            # reads RabbitMQ's and the queue variables; none names a job.
            for selector in re.findall(r"\{([^}]*)\}", expr):
                assert "job=" not in selector, expr
                if f'app="{RABBITMQ_APP}"' in selector:
                    assert re.search(r'queue="\$(vote_queue|dead_letter_queue)"', selector), expr
                else:
                    assert f'app="{APP}"' in selector, expr
                    assert 'instance=~"$instance"' in selector, expr
            # A rate is shown per second (or, for a quantile of durations, in seconds);
            # only a ratio of two rates is a plain number.
            if "rate(" in expr and " / " not in expr:
                unit = panel_unit(panel, target["refId"])
                assert unit in RATE_UNITS, f"{panel['title']} [{target['refId']}]: unit {unit} for {expr}"

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
    # The queue: its depth, its consumers and the dead-letter queue.
    assert 'rabbitmq_detailed_queue_messages_ready{app="rabbitmq-queues", queue="$vote_queue"}' in exprs
    assert 'rabbitmq_detailed_queue_consumers{app="rabbitmq-queues", queue="$vote_queue"}' in exprs
    assert 'rabbitmq_detailed_queue_messages{app="rabbitmq-queues", queue="$dead_letter_queue"}' in exprs
    assert "dead-letter" in titles


def test_the_unit_check_sees_a_rate_in_plain_numbers() -> None:
    panel = next(p for p in dashboard_panels() if p["title"] == "Batches per second and messages per batch")
    assert panel_unit(panel, "A") == "ops"
    assert panel_unit(panel, "B") == "short"  # messages per batch: a ratio of two rates
    panel["fieldConfig"]["defaults"]["unit"] = "short"
    assert panel_unit(panel, "A") not in RATE_UNITS


# -- a real Prometheus -------------------------------------------------------------------------------


def rabbitmq_jobs(metrics_port: int) -> list[dict[str, Any]]:
    """The compose stack's scrape jobs of RabbitMQ's plugin (paths, families and labels, as
    committed), under other names, pointed at a node on 127.0.0.1:`metrics_port`."""
    jobs = YAML(typ="safe", pure=True).load(PROMETHEUS_CONFIG)["scrape_configs"]
    names = {"rabbitmq-queues": RABBITMQ_JOB, "rabbitmq": BROKER_JOB}
    chosen = [j for j in jobs if j["job_name"] in names]
    assert len(chosen) == 2, chosen
    renamed = []
    for job in chosen:
        (static,) = job["static_configs"]
        target = {**static, "targets": [f"127.0.0.1:{metrics_port}"]}
        renamed.append({**job, "job_name": names[job["job_name"]], "static_configs": [target]})
    return renamed


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """start(service metrics port, RabbitMQ node metrics port or None): Prometheus scraping
    them every second and evaluating alerts.yml every second."""
    started: list[Prometheus] = []

    def start(metrics_port: int, rabbitmq_metrics_port: int | None = None) -> Prometheus:
        jobs = [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"app": APP}}]}
        ]
        if rabbitmq_metrics_port is not None:
            jobs.extend(rabbitmq_jobs(rabbitmq_metrics_port))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": jobs,
        }
        started.append(Prometheus.launch(config, tmp_path, "prometheus"))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


def start_load(queue: str, *, port: int, rate: int, seconds: int) -> subprocess.Popen[bytes]:
    """The demo publisher: votes with duplicate attempts, replays and invalid messages, paced,
    into a queue of the broker on 127.0.0.1:`port` (guest/guest)."""
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
            "--host=127.0.0.1",
            f"--port={port}",
            "--progress=none",
        ),
        cwd=outside_checkout(),
        env=tool_env(RABBITMQ_USER="guest", RABBITMQ_PASSWORD="guest"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitNode]:
    """A RabbitMQ node of this module's own, with rabbitmq_prometheus, started once."""
    with standalone_node(metrics=True) as node:
        yield node


@pytest.fixture
def node(rabbit: RabbitNode) -> Iterator[RabbitNode]:
    """The module's node without the vote queue, its dead-letter queue and exchange, which the
    service declares again when it starts: every test begins with no message and no consumer."""
    names = {"queues": [VOTE_QUEUE, DEAD_LETTER_QUEUE], "exchanges": [Config().dead_letter_exchange]}
    rabbit.delete(**names)
    yield rabbit
    rabbit.delete(**names)


def node_env(node: RabbitNode) -> dict[str, str]:
    """The service's settings for the node: its port, guest (allowed from loopback)."""
    return {
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": str(node.port),
        "RABBITMQ_USER": "guest",
        "RABBITMQ_PASSWORD": "guest",
    }


@pytest.mark.ha
def test_dashboard_queries_and_alert_rules_work_on_a_real_prometheus(
    make_service: MakeService, node: RabbitNode, start_prometheus: Callable[..., Prometheus]
) -> None:
    # The dashboard's per-law panels are queried too: the embargo lifted, as after the close of polls.
    svc = make_service(
        {"BATCH_TIMEOUT_SECONDS": "0.2", **node_env(node), **PER_LAW_METRICS}, queue_name=VOTE_QUEUE
    ).start()
    # Longer than any wait below can take, however loaded the machine: it is stopped at the end.
    load = start_load(VOTE_QUEUE, port=node.port, rate=300, seconds=600)
    try:
        prometheus = start_prometheus(svc.metrics_port, node.metrics_port)
        wait_for(
            lambda: (
                sorted(s["metric"]["job"] for s in prometheus.query("up == 1"))
                == sorted([JOB, RABBITMQ_JOB, BROKER_JOB])
            ),
            timeout=20,
            what=f"Prometheus to scrape jobs {JOB}, {RABBITMQ_JOB} and {BROKER_JOB}",
        )

        # Every panel query answers with data once votes, rejects and duplicates flow.
        queries = dashboard_queries()
        assert len(queries) >= 26

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

        value = prometheus.value
        assert value(f'sum(rate(votes_aggregated_total{{app="{APP}"}}[5s]))') > 0
        assert value(f'database_up{{app="{APP}"}}') == 1
        assert value(f'rabbitmq_connected{{app="{APP}"}}') == 1
        reasons = {s["metric"]["reason"] for s in prometheus.query(f'votes_rejected_total{{app="{APP}"}}')}
        assert {"invalid_json", "missing_field", "invalid_choice"} <= reasons
        assert value(f'duplicate_vote_attempts_total{{app="{APP}"}}') > 0
        assert value(f'votes_redelivered_total{{app="{APP}"}}') > 0
        laws = {s["metric"]["law_id"] for s in prometheus.query(f'current_vote_totals{{app="{APP}"}}')}
        assert laws == {"law-001", "law-002", "law-003", "law-004"}
        # The queue as RabbitMQ reports it: one consumer (this service), the rejected
        # messages in the dead-letter queue.
        queue_panels = {title: expr for title, _ref, expr in queries if RABBITMQ_APP in expr}
        assert value(queue_panels["Consumers on the queue"]) == 1
        assert value(queue_panels["Dead-lettered messages"]) > 0

        # Every metric the rules and the dashboard name is one the service or RabbitMQ exports:
        # a misspelt name would not fail a query, it would only never return data.
        exported = set(prometheus.api("/api/v1/label/__name__/values"))
        named = metric_names(ALERTS.read_text()) | {n for _t, _r, e in queries for n in metric_names(e)}
        assert named <= exported, f"not exported: {sorted(named - exported)}"

        # The rule file loads and every rule evaluates without error.
        wait_for(
            lambda: all(r["health"] == "ok" for r in prometheus.rules().values()),
            timeout=15,
            what="every rule to be evaluated",
        )
        loaded = prometheus.rules()
        assert set(loaded) == set(alert_blocks())
        for name, rule in loaded.items():
            assert rule["type"] == "alerting", name
            assert rule["labels"]["severity"] in SEVERITIES, name
            assert rule.get("lastError", "") == "", f"{name}: {rule['lastError']}"
        # 10% invalid and 5% duplicate attempts are spikes by the rules' standards, and the
        # invalid messages wait in the dead-letter queue; a healthy service trips none of the others.
        for name in ("VoteAggregatorRejectedVotesSpike", "VoteAggregatorDuplicateAttemptsSpike"):
            prometheus.wait_state(name, "pending", "firing", timeout=15)
        prometheus.wait_state("VoteQueueDeadLetters", "firing", timeout=15)
        rules = prometheus.rules()
        for name in (
            "VoteAggregatorDown",
            "VoteAggregatorAbsent",
            "VoteAggregatorNotFlushing",
            "VoteAggregatorStalled",
            "VoteAggregatorDatabaseDown",
            "VoteAggregatorRabbitMQDisconnected",
            "VoteAggregatorErrors",
            "VoteAggregatorUnexpectedError",
            "VoteAggregatorBatchLatencyHigh",
            "VoteAggregatorDatabaseRetries",
            "VoteAggregatorRestarting",
            "VoteAggregatorLawLabelCapReached",
            "VoteQueueNoConsumer",
            "VoteQueueBacklogGrowing",
            "VoteQueueMetricsAbsent",
        ):
            assert rules[name]["state"] == "inactive", f"{name} is {rules[name]['state']} on a healthy service"
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


def firing(prometheus: Prometheus, alert: str) -> list[dict[str, Any]]:
    """The instances of an alert Prometheus has firing or pending: labels, state and value."""
    return [a for a in prometheus.api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == alert]


@pytest.mark.ha
def test_queue_alerts_follow_a_real_rabbitmq_queue(
    make_service: MakeService, node: RabbitNode, start_prometheus: Callable[..., Prometheus]
) -> None:
    """Each queue alert's expression on RabbitMQ's real series: quiet while the service consumes,
    matching once the queue is in the state it describes (pending is enough: the durations of
    `for` are promtool's business)."""
    svc = make_service(node_env(node), queue_name=VOTE_QUEUE).start()
    prometheus = start_prometheus(svc.metrics_port, node.metrics_port)
    consumers = f'rabbitmq_detailed_queue_consumers{{app="{RABBITMQ_APP}", queue="{VOTE_QUEUE}"}}'
    ready = f'rabbitmq_detailed_queue_messages_ready{{app="{RABBITMQ_APP}", queue="{VOTE_QUEUE}"}}'
    wait_for(lambda: prometheus.query(f"{consumers} == 1"), timeout=20, what="the service's consumer in Prometheus")
    queue_alerts = ("VoteQueueNoConsumer", "VoteQueueBacklogGrowing", "VoteQueueDeadLetters", "VoteQueueMetricsAbsent")
    states: dict[str, str] = {}

    def all_quiet() -> bool:
        # Evaluated before the first scrape, VoteQueueMetricsAbsent is pending for a moment.
        rules = prometheus.rules()
        assert all(rules[a]["health"] in ("ok", "unknown") for a in queue_alerts), rules
        states.update({a: f"{rules[a]['state']} ({rules[a]['health']})" for a in queue_alerts})
        return set(states.values()) == {"inactive (ok)"}

    try:
        wait_for(all_quiet, timeout=15, interval=0.5, what="the queue alerts to be evaluated, and quiet")
    except AssertionError:
        raise AssertionError(f"while the service consumes: {states}") from None

    # A message the service rejects waits in the dead-letter queue.
    node.publish(VOTE_QUEUE, [b"not json"])
    prometheus.wait_state("VoteQueueDeadLetters", "firing")
    (dead,) = firing(prometheus, "VoteQueueDeadLetters")
    assert dead["labels"]["queue"] == DEAD_LETTER_QUEUE
    assert float(dead["value"]) == 1

    # The service stops: the queue has no consumer.
    assert svc.stop() == 0
    prometheus.wait_state("VoteQueueNoConsumer", "pending")
    (nobody,) = firing(prometheus, "VoteQueueNoConsumer")
    assert nobody["labels"]["queue"] == VOTE_QUEUE

    # Votes keep arriving with nobody to count them: growing, but up to 1000 it is no backlog yet.
    votes = make_votes(1800, laws=2)
    node.publish(VOTE_QUEUE, [v.body() for v in votes[:900]])
    wait_for(lambda: prometheus.query(f"{ready} == 900"), timeout=20, what="900 votes waiting, in Prometheus")
    assert prometheus.rules()["VoteQueueBacklogGrowing"]["state"] == "inactive"
    node.publish(VOTE_QUEUE, [v.body() for v in votes[900:]])
    prometheus.wait_state("VoteQueueBacklogGrowing", "pending")
    (backlog,) = firing(prometheus, "VoteQueueBacklogGrowing")
    assert float(backlog["value"]) == 1800

    # The queue is gone: nothing is known about it any more.
    node.delete(queues=[VOTE_QUEUE])
    prometheus.wait_state("VoteQueueMetricsAbsent", "pending")


@pytest.mark.slow
def test_prometheus_scrapes_the_service_down_as_up_zero(
    make_service: MakeService, start_prometheus: Callable[[int], Prometheus]
) -> None:
    """What VoteAggregatorDown relies on: a stopped service is up == 0 for its job and instance."""
    svc = make_service().start()
    prometheus = start_prometheus(svc.metrics_port)
    wait_for(lambda: prometheus.query(f'up{{app="{APP}"}} == 1'), timeout=20, what="a successful scrape")
    assert svc.stop() == 0
    down = wait_for(lambda: prometheus.query(f'up{{app="{APP}"}} == 0'), timeout=30, what="up == 0")
    assert down[0]["metric"]["instance"] == f"127.0.0.1:{svc.metrics_port}"


@pytest.mark.ha
def test_a_real_node_counts_what_it_dead_letters_for_a_delivery_count(rabbit: RabbitNode) -> None:
    """VoteQueueDeliveryLimitDeadLetters' counter, as RabbitMQ 3.10's plain /metrics names it, rises
    when a quorum queue dead-letters a message past its x-delivery-limit."""
    series = (
        "rabbitmq_global_messages_dead_lettered_delivery_limit_total"
        '{queue_type="rabbit_quorum_queue",dead_letter_strategy="at_least_once"}'
    )

    def counted() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{rabbit.metrics_port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(series + " "):
                    return float(line.split()[-1])
        return -1.0

    before = counted()
    assert before >= 0, "no such series"
    queue, dead, exchange = (f"agg.limit.{uuid.uuid4().hex[:8]}{suffix}" for suffix in ("", ".dead", ".dlx"))
    conn = pika.BlockingConnection(rabbit.params())
    try:
        channel = conn.channel()
        channel.exchange_declare(exchange, "fanout", durable=True)
        channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(dead, exchange)
        channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 1,
                "x-dead-letter-exchange": exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        rabbit.publish(queue, [b"a vote delivered too often"])
        for _ in range(2):
            method, _properties, _body = channel.basic_get(queue, auto_ack=False)
            assert method is not None
            channel.basic_nack(int(method.delivery_tag or 0), requeue=True)
        wait_for(lambda: counted() == before + 1, timeout=20, what="the delivery-limit counter to rise")
    finally:
        conn.close()
        rabbit.delete(queues=[queue, dead], exchanges=[exchange])
