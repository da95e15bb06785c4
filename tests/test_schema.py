"""The schema's version (schema.py): what init_db.sql records, the migrations `--init-db` applies,
the start-up check, and a rolling upgrade of three instances with the previous release and this one
counting side by side on the migrated schema (docs/operations.md#upgrading).

The previous release is this repository's code from before schema versions, taken from git history
(`git archive` of the parent of the commit that added schema.py) into a temporary directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import db
import exits
import schema
from config import Config
from tests.roles import ServiceRole
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    POSTGRES_USER,
    ROOT,
    Service,
    VoteMsg,
    assert_all_counted_once,
    audit_count,
    make_votes,
    outside_checkout,
    publish,
    query,
    run_cli,
    service_env,
    stop_all,
    wait_for,
)


def _previous_release(into: Path) -> Path:
    """The code from before schema versions, unpacked under `into`; skipped (saying why) without history."""

    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=60)

    listed = git("rev-list", "HEAD", "--", "schema.py")
    if listed.returncode != 0:
        pytest.skip(f"NOT RUN: no git history here to take the previous release from: {listed.stderr.decode().strip()}")
    introduced = listed.stdout.decode().split()
    # Before schema.py is committed, HEAD is the previous release.
    commit = f"{introduced[-1]}^" if introduced else "HEAD"
    archive = git("archive", "--format=tar", commit)
    if archive.returncode != 0:
        pytest.skip(
            f"NOT RUN: the previous release ({commit}) is not in this clone's history: "
            + archive.stderr.decode().strip()
        )
    target = into / "previous-release"
    target.mkdir()
    tar_path = into / "previous-release.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(target, filter="data")
    assert not (target / "schema.py").exists(), f"{commit} already has schema versions"
    return target


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _previous_release(tmp_path_factory.mktemp("releases"))


def _database(dbname: str) -> db.Database:
    config = Config(
        postgres_host=POSTGRES_HOST, postgres_port=POSTGRES_PORT, postgres_user=POSTGRES_USER, postgres_db=dbname
    )
    database = db.Database(config=config)
    database.open()
    return database


def _init_db(dbname: str, checkout: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(checkout / "aggregator.py"), "--init-db"],
        cwd=outside_checkout(),
        env=service_env(dbname=dbname),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    stop_all(started)


# -- what init_db.sql records ----------------------------------------------------------------------


def test_init_db_sql_records_the_version_schema_py_declares(dbname: str) -> None:
    text = (ROOT / "init_db.sql").read_text()
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", text).split(";") if s.strip()]
    # The last statement, so that nothing records a version the file did not finish applying.
    assert re.fullmatch(
        r"INSERT INTO schema_version \(version, oldest_code\) "
        rf"VALUES \({schema.SCHEMA_VERSION}, {schema.OLDEST_CODE}\) ON CONFLICT \(version\) DO NOTHING",
        statements[-1],
    ), statements[-1]
    done = _init_db(dbname)
    assert done.returncode == 0, done.stderr
    assert query(dbname, "SELECT version, oldest_code, applied_by FROM schema_version") == [
        (schema.SCHEMA_VERSION, schema.OLDEST_CODE, POSTGRES_USER)
    ]


def test_migration_files_are_named_and_ordered(tmp_path: Path) -> None:
    assert all(m.version <= schema.SCHEMA_VERSION for m in schema.migrations())
    for name in ("0010_later.sql", "0003_earlier.sql", "0004_middle.sql"):
        (tmp_path / name).write_text("SELECT 1;")
    assert [m.version for m in schema.migrations(tmp_path)] == [3, 4, 10]
    (tmp_path / "0004_again.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="version 4 has two migrations"):
        schema.migrations(tmp_path)
    (tmp_path / "0004_again.sql").unlink()
    (tmp_path / "5_unpadded.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match=r"NNNN_what_it_does\.sql"):
        schema.migrations(tmp_path)


# -- migrations ------------------------------------------------------------------------------------


def _unversioned(dbname: str, previous: Path) -> None:
    """The schema as the previous release made it: version 1."""
    done = _init_db(dbname, previous)
    assert done.returncode == 0, done.stderr
    assert query(dbname, "SELECT to_regclass('schema_version') IS NULL") == [(True,)]


def test_migrations_above_the_version_run_in_one_transaction_before_init_db_sql(
    dbname: str, previous_release: Path, tmp_path: Path
) -> None:
    _unversioned(dbname, previous_release)
    steps = tmp_path / "migrations"
    steps.mkdir()
    # At or below the database's version: never run again.
    (steps / "0001_old.sql").write_text("CREATE TABLE must_not_exist (x int);")
    # Runs before init_db.sql, which has not yet made schema_version.
    (steps / "0002_probe.sql").write_text(
        "CREATE TABLE migration_probe AS SELECT to_regclass('schema_version') IS NULL AS before_init_db;"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0002_broken.sql").write_text("CREATE TABLE half_done (x int); SELECT no_such_column FROM vote_results;")

    database = _database(dbname)
    try:
        with pytest.raises(db.DatabaseError):
            database.apply_schema(migrations_dir=broken)
        # Nothing of it stayed: still version 1, no half-made table.
        assert database.schema_state() == schema.SchemaState(schema.UNVERSIONED, schema.UNVERSIONED)
        assert query(dbname, "SELECT to_regclass('half_done') IS NULL") == [(True,)]

        assert database.apply_schema(migrations_dir=steps) == (1, ["0002_probe.sql"])
        assert database.schema_state() == schema.SchemaState(schema.SCHEMA_VERSION, schema.OLDEST_CODE)
        assert query(dbname, "SELECT before_init_db FROM migration_probe") == [(True,)]
        assert query(dbname, "SELECT to_regclass('must_not_exist') IS NULL") == [(True,)]
        # Again: nothing above the version now.
        assert database.apply_schema(migrations_dir=steps) == (schema.SCHEMA_VERSION, [])
    finally:
        database.close()


# -- the start-up check ----------------------------------------------------------------------------


def test_an_older_schema_stops_the_new_code_until_init_db_migrates_it(
    dbname: str, queue: str, previous_release: Path, tmp_path: Path, services: list[Service]
) -> None:
    _unversioned(dbname, previous_release)
    said = (
        f"schema version 1 is older than this code's {schema.SCHEMA_VERSION}: apply the migrations with "
        "`python aggregator.py --init-db` as the schema's owner (docs/operations.md#upgrading)"
    )
    early = Service(queue=queue, dbname=dbname, log_path=tmp_path / "early.log")
    services.append(early)
    early.start(wait_consuming=False)
    assert early.proc is not None
    assert early.proc.wait(30) == exits.CONFIG
    assert said in early.logs()
    assert "consuming " not in early.logs()
    checked = run_cli("--check", env=service_env(dbname=dbname, queue=queue))
    assert checked.returncode == exits.CONFIG
    assert any(said in line for line in checked.stderr.splitlines()), checked.stderr

    migrated = _init_db(dbname)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip().endswith(f": version {schema.SCHEMA_VERSION} (was 1)")
    votes = make_votes(200, laws=3)
    later = Service(queue=queue, dbname=dbname, log_path=tmp_path / "later.log")
    services.append(later)
    later.start()
    publish(queue, (v.body() for v in votes))
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="the votes to be counted")
    assert later.stop() == exits.OK
    assert_all_counted_once(dbname, queue, votes)


@pytest.mark.parametrize(("oldest_code", "runs"), [(schema.SCHEMA_VERSION, True), (schema.SCHEMA_VERSION + 1, False)])
def test_a_newer_schema_runs_this_code_only_if_it_says_so(
    dbname: str, queue: str, tmp_path: Path, services: list[Service], oldest_code: int, runs: bool
) -> None:
    assert _init_db(dbname).returncode == 0
    newer = schema.SCHEMA_VERSION + 1
    query(dbname, "INSERT INTO schema_version (version, oldest_code) VALUES (%s, %s)", (newer, oldest_code))
    svc = Service(queue=queue, dbname=dbname, log_path=tmp_path / "service.log")
    services.append(svc)
    svc.start(wait_consuming=runs)
    if runs:
        assert (
            f"schema version {newer} is newer than this code's {schema.SCHEMA_VERSION}, which it still runs"
            in svc.logs()
        )
        assert svc.stop() == exits.OK
    else:
        assert svc.proc is not None
        assert svc.proc.wait(30) == exits.CONFIG
        assert f"schema version {newer} needs code written for version {oldest_code} or later" in svc.logs()
    # This code's init_db.sql would undo the newer schema's changes: refused.
    refused = _init_db(dbname)
    assert refused.returncode == exits.CONFIG
    assert f"schema version {newer} is newer than this code's {schema.SCHEMA_VERSION}" in refused.stderr


# -- a rolling upgrade -----------------------------------------------------------------------------


def _counted(svc: Service) -> float:
    return sum(v for (name, _labels), v in svc.metrics().items() if name == "votes_aggregated_total")


def test_a_rolling_upgrade_of_three_instances_counts_every_vote_once(
    dbname: str, queue: str, previous_release: Path, tmp_path: Path, services: list[Service]
) -> None:
    """docs/operations.md#upgrading, step by step: three instances of the previous release; the
    schema migrated under them; each replaced in turn, old and new counting side by side."""
    _unversioned(dbname, previous_release)

    def start(name: str, checkout: Path) -> Service:
        svc = Service(queue=queue, dbname=dbname, log_path=tmp_path / f"{name}.log", checkout=checkout)
        services.append(svc)
        return svc.start()

    published: list[VoteMsg] = []

    def send(count: int, seed: int) -> None:
        votes = make_votes(count, laws=4, seed=seed, prefix=f"round{seed}")
        published.extend(votes)
        publish(queue, (v.body() for v in votes))
        wait_for(lambda: audit_count(dbname) == len(published), timeout=90, what=f"round {seed} to be counted")

    replicas = [start(f"old-{i}", previous_release) for i in range(3)]
    send(600, seed=1)

    migrated = _init_db(dbname)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip().endswith(f": version {schema.SCHEMA_VERSION} (was 1)")
    # The previous release goes on counting on the migrated schema.
    before = [_counted(r) for r in replicas]
    send(600, seed=2)
    assert sum(_counted(r) for r in replicas) - sum(before) == 600

    for i in range(3):
        assert replicas[i].stop() == exits.OK
        replicas[i] = start(f"new-{i}", ROOT)
        before = [_counted(r) for r in replicas]
        send(900, seed=3 + i)
        gained = [_counted(r) - b for r, b in zip(replicas, before, strict=True)]
        assert sum(gained) == 900
        if i < 2:
            # Side by side: the new code and the previous release each counted some of this round.
            new = sum(gained[: i + 1])
            old = sum(gained[i + 1 :])
            assert new > 0, gained
            assert old > 0, gained

    for svc in replicas:
        assert svc.stop() == exits.OK
    assert_all_counted_once(dbname, queue, published)
    checked = run_cli("verify", env=service_env(dbname=dbname))
    assert checked.returncode == exits.OK, checked.stdout + checked.stderr


def test_a_role_that_may_not_read_the_version_is_told_to_reapply_the_grants(
    dbname: str, queue: str, tmp_path: Path, services: list[Service], svc_role: ServiceRole
) -> None:
    # A grant from before schema_version: the role has everything else.
    query(dbname, f"REVOKE SELECT ON schema_version FROM {svc_role.name}")
    svc = Service(queue=queue, dbname=dbname, log_path=tmp_path / "service.log", env=svc_role.env())
    services.append(svc)
    svc.start(wait_consuming=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == exits.CONFIG
    assert "this role may not read schema_version: apply init_db.sql and service_role.sql again" in svc.logs()
