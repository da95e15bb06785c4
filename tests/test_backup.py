"""The backup and restore drill of docs/operations.md#backup-and-restore, on throwaway servers: a
base backup (pg_basebackup) plus the WAL archive, a restore to a point in time on a new server,
verify on the restored database, and the votes acked after that point found and sent again, each
counted once. Then RabbitMQ's definitions exported from the shared node and imported into a
throwaway one.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import exits
from tests import pg_servers, rabbitmq_cluster
from tests.pg_servers import PgServer
from tests.roles import create_service_role
from tests.support import (
    Service,
    VoteMsg,
    expected_totals,
    make_votes,
    publish,
    queue_state,
    run_cli,
    service_env,
    stop_all,
    wait_for,
)

pytestmark = pytest.mark.ha  # both drills on throwaway servers

DBNAME = "election_drill"


def _postgres_dir(prefix: str) -> Path:
    """A directory the server's OS user writes (the archive, the backup)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    shutil.chown(path, "postgres", "postgres")
    return path


@pytest.fixture
def archive() -> Iterator[Path]:
    path = _postgres_dir("agg-wal-archive-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backups() -> Iterator[Path]:
    path = _postgres_dir("agg-base-backup-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[list[PgServer]]:
    made: list[PgServer] = []
    yield made
    for server in made:
        server.remove()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    stop_all(started)


def _count(server: PgServer) -> int:
    return int(server.execute("SELECT count(*) FROM vote_audit", dbname=DBNAME)[0][0])


@pytest.mark.skipif(pg_servers.unavailable() is not None, reason=str(pg_servers.unavailable()))
def test_a_point_in_time_restore_verifies_and_the_votes_acked_after_it_are_sent_again(
    queue: str, tmp_path: Path, archive: Path, backups: Path, servers: list[PgServer], services: list[Service]
) -> None:
    primary = PgServer(
        settings={
            "wal_level": "replica",
            "full_page_writes": "on",
            "archive_mode": "on",
            # The docs' archive_command: never overwrite a segment already archived.
            "archive_command": f"'test ! -f {archive}/%f && cp %p {archive}/%f'",
        },
        hba=["host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"],
    )
    servers.append(primary)
    primary.start()
    primary.execute(f"CREATE DATABASE {DBNAME}")
    # The service's role, made on the primary (the base backup and the restore carry it over).
    role = create_service_role(DBNAME, server=primary)
    env = {**primary.env(DBNAME), **role.env()}

    def serve(server_env: dict[str, str], name: str) -> Service:
        svc = Service(queue=queue, dbname=DBNAME, log_path=tmp_path / f"{name}.log", env=server_env)
        services.append(svc)
        return svc.start()

    def count_in(server: PgServer, svc: Service, votes: list[VoteMsg], total: int) -> None:
        publish(queue, (v.body() for v in votes))
        wait_for(lambda: _count(server) == total, timeout=60, what=f"{total} votes counted")

    svc = serve(env, "primary")
    before_backup = make_votes(300, laws=3, seed=31, prefix="before-backup")
    count_in(primary, svc, before_backup, 300)

    # The base backup, while the service counts on.
    primary.run_as_postgres(
        "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
        "-D", str(backups / "base"), "-X", "stream", "-c", "fast",
    )  # fmt: skip
    primary.run_as_postgres("pg_verifybackup", str(backups / "base"))

    after_backup = make_votes(300, laws=3, seed=32, prefix="after-backup")
    count_in(primary, svc, after_backup, 600)
    restore_point: datetime.datetime = primary.execute("SELECT clock_timestamp()")[0][0]
    after_target = make_votes(300, laws=3, seed=33, prefix="after-target")
    count_in(primary, svc, after_target, 900)
    assert svc.stop() == exits.OK
    # The segment holding the last commits goes to the archive now, not when it fills.
    (segment,) = primary.execute("SELECT pg_walfile_name(pg_switch_wal())")[0]
    wait_for(lambda: (archive / segment).exists(), timeout=60, what=f"WAL segment {segment} archived")
    primary.stop()  # the disaster

    restored = PgServer().restore_from(
        backups / "base",
        settings={
            "restore_command": f"'cp {archive}/%f %p'",
            "recovery_target_time": f"'{restore_point.isoformat()}'",
            "recovery_target_action": "'promote'",
            "archive_mode": "off",
        },
    )
    servers.append(restored)
    restored.start()
    wait_for(
        lambda: restored.execute("SELECT pg_is_in_recovery()") == [(False,)],
        timeout=60,
        what="the restore to reach its target and promote",
    )
    assert "recovery stopping before commit" in restored.server_log()
    restored_env = {**restored.env(DBNAME), **role.env()}
    # verify, as an administrator runs it.
    admin_env = {**restored.env(DBNAME), "POSTGRES_USER": "postgres"}
    # Everything acked up to the restore point, nothing after it.
    upstream = [*before_backup, *after_backup, *after_target]
    missing = restored.execute(
        "SELECT h FROM unnest(%s::text[]) AS h EXCEPT SELECT vote_hash FROM vote_audit",
        ([v.vote_hash for v in upstream],),
        dbname=DBNAME,
    )
    assert sorted(h for (h,) in missing) == sorted(v.vote_hash for v in after_target)
    verified = run_cli("verify", env=service_env(dbname=DBNAME, **admin_env))
    assert verified.returncode == exits.OK, verified.stdout + verified.stderr
    # The last heads the instance logged (at its stop, after the restore point) are not there: the loss shows.
    heads = re.findall(r"hash chain head (\S+)", svc.logs())
    assert heads, svc.logs()
    lost = run_cli("verify", "--head", heads[-1], env=service_env(dbname=DBNAME, **admin_env))
    assert lost.returncode == exits.FAILURE, lost.stdout + lost.stderr

    # Upstream sends again everything after the backup's start: what is stored is absorbed.
    again = serve(restored_env, "restored")
    count_in(restored, again, [*after_backup, *after_target], 900)
    assert again.stop() == exits.OK
    assert {law: (oui, non) for law, oui, non in restored.execute(
        "SELECT law_id, oui_count, non_count FROM vote_results", dbname=DBNAME
    )} == expected_totals(upstream)  # fmt: skip
    assert restored.execute("SELECT count(*) FROM duplicate_attempts", dbname=DBNAME) == [(0,)]
    assert queue_state(queue)[0] == 0
    verified = run_cli("verify", env=service_env(dbname=DBNAME, **admin_env))
    assert verified.returncode == exits.OK, verified.stdout + verified.stderr


@pytest.mark.skipif(rabbitmq_cluster.unavailable() is not None, reason=str(rabbitmq_cluster.unavailable()))
def test_rabbitmq_definitions_exported_and_imported_bring_the_queues_back(
    make_service: Callable[..., Service], queue_names: list[str], tmp_path: Path
) -> None:
    queue = f"agg.test.defs.{os.getpid()}"
    queue_names.append(queue)
    # The service declares the queue with its dead-letter exchange and queue (on the shared node).
    svc = make_service(queue_name=queue).start()
    assert svc.stop() == exits.OK
    exported = tmp_path / "definitions.json"
    # To stdout: a file path is opened by the node, as its own OS user.
    done = subprocess.run(["rabbitmqctl", "-q", "export_definitions", "-"], capture_output=True, check=True, timeout=60)
    exported.write_bytes(done.stdout)
    saved = json.loads(exported.read_text())
    names = {q["name"] for q in saved["queues"]}
    assert {queue, f"{queue}.dead"} <= names

    nodes = rabbitmq_cluster.RabbitNodes(1, clustered=1).start()
    try:
        (node,) = nodes.cluster
        shutil.copy(exported, node.dir / "definitions.json")
        shutil.chown(node.dir / "definitions.json", "rabbitmq", "rabbitmq")
        node.ctl("import_definitions", str(node.dir / "definitions.json"))
        queues = node.queues()
        # list_queues gives the arguments as [name, AMQP type, value].
        restored = {argument[0]: argument[-1] for argument in queues[queue]["arguments"]}
        assert restored == next(q for q in saved["queues"] if q["name"] == queue)["arguments"]
        assert restored["x-queue-type"] == "quorum"
        assert f"{queue}.dead" in queues
    finally:
        nodes.remove()
