"""The high-availability compose file (deploy/docker-compose.ha.yml), checked as tests/test_deploy.py
checks the main one: no Docker engine runs here, so it is validated against the Compose
Specification's JSON schema, against the files it mounts, and against the service's own
configuration parser; the shell scripts it mounts are checked by `sh -n`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from config import load_config, variables
from tests import pg_replication, pg_servers
from tests.deploy_files import compose_errors, pinned, port_mapping, timespan_s
from tests.support import ROOT, wait_for

COMPOSE = ROOT / "deploy" / "docker-compose.ha.yml"
AGGREGATORS = ("aggregator-1", "aggregator-2", "aggregator-3")
BROKERS = ("rabbitmq1", "rabbitmq2", "rabbitmq3")


def _compose() -> Any:
    return YAML(typ="safe", pure=True).load(COMPOSE)


def _services() -> dict[str, Any]:
    services: dict[str, Any] = _compose()["services"]
    return services


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts, host paths resolved from the compose file."""
    mounts = []
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE.parent / source).resolve(), rest.split(":")[0]))
    return mounts


def _environment(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in _services()[name]["environment"].items()}


def test_ha_compose_file_follows_the_compose_specification() -> None:
    assert compose_errors(_compose()) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["services"]["aggregator-1"]["depends_on"]["rabbitmq2"].update(condition="up"),
        lambda d: d["services"]["postgres-standby"].update(entrypont=d["services"]["postgres-standby"]["entrypoint"]),
        lambda d: d["services"]["rabbitmq3"]["healthcheck"].update(intervall="10s"),
        lambda d: d["services"]["aggregator-2"].update(ports={"8002": 8001}),
    ],
    ids=["bad-condition", "misspelt-key", "misspelt-healthcheck-key", "ports-mapping"],
)
def test_schema_rejects_a_broken_ha_compose_file(mutate: Callable[[Any], None]) -> None:
    document = _compose()
    mutate(document)
    assert compose_errors(document) != []


def test_ha_compose_mounts_files_that_exist() -> None:
    compose = _compose()
    named = set(compose["volumes"])
    for name, service in compose["services"].items():
        for source, _target in _bind_mounts(service):
            assert source.is_relative_to(ROOT), f"{name} mounts {source}, outside the repository"
            assert source.is_file(), f"{name} mounts {source}, which is not in the repository"
        for volume in service.get("volumes", []):
            if not volume.startswith((".", "/")):
                assert volume.split(":")[0] in named, f"{name}: undeclared volume {volume}"
        build = service.get("build")
        if build is not None:
            assert (COMPOSE.parent / build / "Dockerfile").is_file()


def test_three_clustered_broker_nodes_with_one_cookie() -> None:
    services = _services()
    cookies = {services[b]["environment"]["RABBITMQ_ERLANG_COOKIE"] for b in BROKERS}
    assert len(cookies) == 1
    for broker in BROKERS:
        (config,) = [source for source, target in _bind_mounts(services[broker]) if target.startswith("/etc/rabbitmq/")]
        listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = (\S+)$", config.read_text(), re.M)
        # A node's name is rabbit@<hostname>: every node is listed under the name it will have.
        assert listed == [f"rabbit@{services[b]['hostname']}" for b in BROKERS]
        assert services[broker]["healthcheck"]["test"]


def test_three_aggregators_reach_every_node_and_both_database_servers() -> None:
    services = _services()
    for name in AGGREGATORS:
        environment = _environment(name)
        assert set(environment) <= set(variables()), set(environment) - set(variables())
        config = load_config(environment)
        assert [host for host, _port in config.rabbitmq_nodes] == list(BROKERS)
        assert [host for host, _port in config.postgres_servers] == ["postgres-primary", "postgres-standby"]
        assert config.rabbitmq_queue_type == "quorum"
        assert config.postgres_require_sync_standby
        assert (config.rabbitmq_user, config.rabbitmq_password) == (
            services["rabbitmq1"]["environment"]["RABBITMQ_DEFAULT_USER"],
            services["rabbitmq1"]["environment"]["RABBITMQ_DEFAULT_PASS"],
        )
        assert config.postgres_db == services["postgres-primary"]["environment"]["POSTGRES_DB"]
        for server in (*BROKERS, "postgres-primary", "postgres-standby"):
            assert services[name]["depends_on"][server] == {"condition": "service_healthy"}
        assert timespan_s(services[name]["stop_grace_period"]) >= config.shutdown_timeout_s + 10
    ports = [port_mapping(port, {})[1] for name in AGGREGATORS for port in services[name]["ports"]]
    assert len(set(ports)) == len(AGGREGATORS), ports


def test_the_aggregators_log_in_as_the_least_privilege_role() -> None:
    services = _services()
    primary = services["postgres-primary"]
    superuser = primary["environment"]["POSTGRES_USER"]
    mounts = dict((target, source) for source, target in _bind_mounts(primary))
    scripts = sorted(t for t in mounts if t.startswith("/docker-entrypoint-initdb.d/"))
    # The image runs its first-start scripts in name order: the schema, then the role, then its login.
    assert [mounts[t] for t in scripts if t.endswith(".sql")] == [
        ROOT / "init_db.sql",
        ROOT / "service_role.sql",
        ROOT / "deploy" / "postgres" / "compose-login.sql",
    ]
    (login,) = re.findall(r"ALTER ROLE (\w+) LOGIN PASSWORD '([^']*)'", mounts[scripts[-1]].read_text())
    for name in AGGREGATORS:
        config = load_config(_environment(name))
        assert config.postgres_user != superuser, f"{name} logs in as the superuser"
        assert (config.postgres_user, config.postgres_password) == login


def test_ha_compose_pins_every_image_and_publishes_on_loopback() -> None:
    for name, service in _services().items():
        if "build" in service:
            assert ":" in service["image"], name
            assert not service["image"].endswith(":latest"), name
        else:
            assert pinned(service["image"]), f"{name}: {service['image']} is not pinned to a release"
        for entry in service.get("ports", []):
            assert port_mapping(entry, {})[0] == "127.0.0.1", f"{name} publishes {entry} beyond this machine"
            assert port_mapping(entry, {"PUBLISH_ADDRESS": "0.0.0.0"})[0] == "0.0.0.0", f"{name}: {entry}"


def test_a_configuration_error_is_not_restarted_forever() -> None:
    compose_files = {"deploy/docker-compose.ha.yml": _services(), "docker-compose.yml": None}
    compose_files["docker-compose.yml"] = YAML(typ="safe", pure=True).load(ROOT / "docker-compose.yml")["services"]
    for path, services in compose_files.items():
        assert services is not None
        for name, service in services.items():
            policy = str(service.get("restart", "no"))
            # Docker restarts on any non-zero code: only a bounded count stops exit 2 looping.
            assert policy == "no" or re.fullmatch(r"on-failure:[1-9]\d?", policy), f"{path} {name}: restart {policy}"


def test_the_standby_is_the_synchronous_one_the_primary_waits_for() -> None:
    services = _services()
    mounts = dict((target, source) for source, target in _bind_mounts(services["postgres-primary"]))
    init = mounts["/docker-entrypoint-initdb.d/10-replication.sh"].read_text()
    (waits_for,) = re.findall(r"synchronous_standby_names = '(\w+)'", init)
    standby = services["postgres-standby"]
    script = dict((target, source) for source, target in _bind_mounts(standby))[standby["entrypoint"][0]].read_text()
    assert f"application_name={waits_for}" in script
    assert "host=postgres-primary" in script
    assert "replication replicator" in init
    assert mounts["/docker-entrypoint-initdb.d/init_db.sql"] == ROOT / "init_db.sql"


@pytest.mark.parametrize("script", sorted((ROOT / "deploy" / "ha").glob("*.sh")), ids=lambda p: p.name)
def test_mounted_scripts_parse_and_stop_on_errors(script: Path) -> None:
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    assert "set -eu" in script.read_text()
    assert script.stat().st_mode & 0o111, f"{script.name} must be executable: it is an entry point"


# -- the PostgreSQL entry points, run for real against throwaway servers -------------------------------


def _stubs(directory: Path, scripts: dict[str, str]) -> Path:
    """A directory of small commands standing in for the image's, first on PATH."""
    bin_dir = directory / "stub-bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    os.chmod(directory, 0o755)
    return bin_dir


@pytest.mark.ha
@pytest.mark.skipif(pg_servers.unavailable() is not None, reason=str(pg_servers.unavailable()))
def test_a_promoted_standby_does_not_wait_for_the_primarys_synchronous_standby() -> None:
    """ha/postgres-standby.sh copies a primary whose ALTER SYSTEM names standby1 (as
    ha/postgres-primary-init.sh does); promoted, the copy must not make its commits wait for it."""
    primary = pg_replication.primary(synchronous=False)
    standby = pg_servers.PgServer()
    try:
        primary.start()
        primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
        primary.execute("SELECT pg_reload_conf()")
        os.chmod(standby.base, 0o755)
        shutil.chown(standby.base, "postgres", "postgres")
        # The image's commands: gosu (run as a user), pg_basebackup reaching "postgres-primary",
        # and its entry point (the server is started below instead).
        bin_dir = _stubs(
            standby.base,
            {
                "gosu": 'user=$1; shift; exec runuser -u "$user" -- "$@"',
                "pg_basebackup": (
                    'for a; do shift; case "$a" in --host=*|--username=*) ;; *) set -- "$@" "$a";; esac; done; '
                    f"exec {pg_servers.PG_BIN}/pg_basebackup --host=127.0.0.1 --port={primary.port} "
                    '--username=postgres --no-sync "$@"'
                ),
                "docker-entrypoint.sh": "exit 0",
            },
        )
        script = ROOT / "deploy" / "ha" / "postgres-standby.sh"
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PGDATA": str(standby.data), "REPLICATION_PASSWORD": "x"}
        result = subprocess.run(["sh", str(script), "postgres"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        with (standby.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"port = {standby.port}\nunix_socket_directories = '{standby.base}'\n")
        standby._created = True  # made by the script, not by PgServer
        standby.start()
        standby.promote()
        wait_for(lambda: standby.execute("SELECT pg_is_in_recovery()") == [(False,)], timeout=30, what="promoted")
        assert standby.execute("SHOW synchronous_standby_names") == [("",)]
        conn = standby.connect(options="-c statement_timeout=5000")
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE after_promotion (x int)")  # a commit
            # A commit left waiting for a standby is cancelled by statement_timeout with this warning.
            assert not [n for n in conn.notices if "synchronous replication" in n], conn.notices
        finally:
            conn.close()
    finally:
        standby.remove()
        primary.remove()


@pytest.mark.parametrize(("standby_answers", "starts"), [("t", False), ("f", True), (None, True)])
def test_the_old_primary_refuses_to_start_once_the_standby_was_promoted(
    tmp_path: Path, standby_answers: str | None, starts: bool
) -> None:
    """ha/postgres-primary.sh, with the image's psql and entry point stood in for: it asks
    postgres-standby whether it is a primary now ("t"), a standby ("f"), or gets no answer."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "PG_VERSION").write_text("16\n")
    psql = "exit 2" if standby_answers is None else f"echo {standby_answers}"
    bin_dir = _stubs(tmp_path, {"psql": psql, "docker-entrypoint.sh": 'echo "entry point: $*"'})
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PGDATA": str(data), "POSTGRES_USER": "postgres"}
    env["POSTGRES_PASSWORD"] = "postgres"
    script = ROOT / "deploy" / "ha" / "postgres-primary.sh"
    result = subprocess.run(["sh", str(script), "postgres"], env=env, capture_output=True, text=True, timeout=30)
    if starts:
        assert result.returncode == 0, result.stderr
        assert result.stdout == "entry point: postgres\n"
    else:
        assert result.returncode == 1
        assert "postgres-standby has been promoted" in result.stderr
        assert "entry point" not in result.stdout


def test_the_primary_runs_its_entry_point() -> None:
    primary = _services()["postgres-primary"]
    mounts = {target: source for source, target in _bind_mounts(primary)}
    assert mounts[primary["entrypoint"][0]] == ROOT / "deploy" / "ha" / "postgres-primary.sh"
