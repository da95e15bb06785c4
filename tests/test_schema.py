"""The schema's version (schema.py): what init_db.sql records, the migrations `--init-db` applies,
the start-up check, and a rolling upgrade of three instances with the previous release and this one
counting side by side on the migrated schema (docs/operations.md#upgrading).

The previous release is this repository's code from before the current schema version, taken from
git history (`git archive` of the parent of the commit that last changed SCHEMA_VERSION: today the one
that added schema.py, so the code from before versions) into a temporary directory. The other tests
make the older schema from this init_db.sql, its version's row taken out, and need no history.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Release:
    checkout: Path
    schema_version: int  # the SCHEMA_VERSION its code was written for (1: before versions)


def _previous_release(into: Path) -> Release:
    """The code of the release before this schema version, unpacked under `into`: the parent of the
    commit that last changed SCHEMA_VERSION (of the one that added schema.py, while version is 2).
    Skipped, saying why, where the clone has no such history."""

    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=60)

    listed = git("log", "--format=%H", "-G", r"^SCHEMA_VERSION = ", "--", "schema.py")
    if listed.returncode != 0:
        pytest.skip(f"NOT RUN: no git history here to take the previous release from: {listed.stderr.decode().strip()}")
    changes = listed.stdout.decode().split()
    committed = git("show", "HEAD:schema.py")
    current = f"SCHEMA_VERSION = {schema.SCHEMA_VERSION}\n"
    # SCHEMA_VERSION raised and not yet committed: HEAD is the previous release.
    commit = "HEAD" if not changes or current not in committed.stdout.decode() else f"{changes[0]}^"
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
    old_schema = target / "schema.py"
    found = re.search(r"^SCHEMA_VERSION = (\d+)$", old_schema.read_text(), re.M) if old_schema.exists() else None
    release = Release(target, int(found.group(1)) if found else schema.UNVERSIONED)
    assert release.schema_version < schema.SCHEMA_VERSION, f"{commit} has schema version {release.schema_version}"
    return release


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Release:
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


def test_init_db_sql_drops_the_law_choice_index_earlier_versions_made(dbname: str) -> None:
    """No statement reads vote_audit by law: the index only cost every vote an entry and its WAL
    (docs/performance.md). Applying init_db.sql again removes it from a database that has it."""
    assert _init_db(dbname).returncode == 0
    query(dbname, "CREATE INDEX vote_audit_law_choice_idx ON vote_audit (law_id, choice)")
    done = _init_db(dbname)
    assert done.returncode == 0, done.stderr
    assert query(dbname, "SELECT indexname FROM pg_indexes WHERE tablename = 'vote_audit' ORDER BY 1") == [
        ("vote_audit_citizen_idx",),
        ("vote_audit_pkey",),
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


def _one_version_back(dbname: str) -> int:
    """The schema as it was one version ago, as far as versions go: this init_db.sql applied, its own
    version's row taken out. Returns that older version."""
    assert _init_db(dbname).returncode == 0
    query(dbname, "DELETE FROM schema_version WHERE version = %s", (schema.SCHEMA_VERSION,))
    return schema.SCHEMA_VERSION - 1


def test_migrations_above_the_version_run_in_one_transaction_before_init_db_sql(dbname: str, tmp_path: Path) -> None:
    older = _one_version_back(dbname)
    steps = tmp_path / "migrations"
    steps.mkdir()
    # At or below the database's version: never run again.
    (steps / f"{older:04d}_old.sql").write_text("CREATE TABLE must_not_exist (x int);")
    # Runs before init_db.sql, which has not yet recorded the new version.
    (steps / f"{schema.SCHEMA_VERSION:04d}_probe.sql").write_text(
        "CREATE TABLE migration_probe AS SELECT NOT EXISTS "
        f"(SELECT FROM schema_version WHERE version = {schema.SCHEMA_VERSION}) AS before_init_db;"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{schema.SCHEMA_VERSION:04d}_broken.sql").write_text(
        "CREATE TABLE half_done (x int); SELECT no_such_column FROM vote_results;"
    )

    database = _database(dbname)
    try:
        with pytest.raises(db.DatabaseError):
            database.apply_schema(migrations_dir=broken)
        # Nothing of it stayed: still the older version, no half-made table.
        assert database.schema_state().version == older
        assert query(dbname, "SELECT to_regclass('half_done') IS NULL") == [(True,)]

        assert database.apply_schema(migrations_dir=steps) == (older, [f"{schema.SCHEMA_VERSION:04d}_probe.sql"])
        assert database.schema_state() == schema.SchemaState(schema.SCHEMA_VERSION, schema.OLDEST_CODE)
        assert query(dbname, "SELECT before_init_db FROM migration_probe") == [(True,)]
        assert query(dbname, "SELECT to_regclass('must_not_exist') IS NULL") == [(True,)]
        # Again: nothing above the version now.
        assert database.apply_schema(migrations_dir=steps) == (schema.SCHEMA_VERSION, [])
    finally:
        database.close()


# -- the start-up check ----------------------------------------------------------------------------


@pytest.mark.slow
def test_an_older_schema_stops_the_new_code_until_init_db_migrates_it(
    dbname: str, queue: str, tmp_path: Path, services: list[Service]
) -> None:
    older = _one_version_back(dbname)
    said = (
        f"schema version {older} is older than this code's {schema.SCHEMA_VERSION}: apply the migrations with "
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
    assert migrated.stdout.strip().endswith(f": version {schema.SCHEMA_VERSION} (was {older})")
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


@pytest.mark.slow
def test_a_rolling_upgrade_of_three_instances_counts_every_vote_once(
    dbname: str, queue: str, previous_release: Release, tmp_path: Path, services: list[Service]
) -> None:
    """docs/operations.md#upgrading, step by step: three instances of the previous release; the
    schema migrated under them; each replaced in turn, old and new counting side by side."""
    if previous_release.schema_version < schema.OLDEST_CODE:
        pytest.skip(
            f"NOT RUN: OLDEST_CODE {schema.OLDEST_CODE} says the previous release (schema version "
            f"{previous_release.schema_version}) cannot count on this schema: its upgrade stops the old instances first"
        )
    made = _init_db(dbname, previous_release.checkout)
    assert made.returncode == 0, made.stderr

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

    replicas = [start(f"old-{i}", previous_release.checkout) for i in range(3)]
    send(600, seed=1)

    migrated = _init_db(dbname)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip().endswith(
        f": version {schema.SCHEMA_VERSION} (was {previous_release.schema_version})"
    )
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
