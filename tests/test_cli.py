"""The command line (--help, --version, --check, --init-db, results) and the logs an operator reads."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from psycopg2 import sql

import aggregator
from config import Config, variables
from schema import SCHEMA_VERSION
from tests.roles import ServiceRole
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    POSTGRES_USER,
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    RABBITMQ_USER,
    ROOT,
    Service,
    audit_count,
    make_votes,
    pg_connect,
    problems,
    publish,
    query,
    run_cli,
    service_env,
    wait_for,
)
from tools.ports import free_port

SCHEMA_OBJECTS = ("vote_results", "vote_audit", "duplicate_attempts", "vote_statistics")


@pytest.fixture(scope="module")
def schema_db(module_dbname: str) -> str:
    """A database with the schema applied the operator's way, shared by the tests that only read it."""
    result = run_cli("--init-db", env=service_env(dbname=module_dbname))
    assert result.returncode == 0, result.stderr
    return module_dbname


@pytest.fixture
def new_dbname() -> Iterator[str]:
    """A database name that does not exist yet; dropped afterwards if a test created it."""
    name = f"agg_test_new_{uuid.uuid4().hex[:12]}"
    yield name
    admin = pg_connect("postgres")
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        admin.close()


def target(dbname: str) -> str:
    """How the service names a database of the test server in its output."""
    return f"postgresql://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{dbname}"


def missing_objects(dbname: str) -> list[str]:
    return [n for n in SCHEMA_OBJECTS if query(dbname, "SELECT to_regclass(%s)", (n,))[0][0] is None]


# -- --help, --version -----------------------------------------------------------------------


def test_help_lists_every_variable_and_option() -> None:
    result = run_cli("--help", env=service_env(dbname="unused"))
    assert result.returncode == 0
    out = result.stdout
    for name in variables():
        assert re.search(rf"^  {name} \(default [^)]*\): \S", out, re.MULTILINE), f"{name} missing from --help"
    for option in ("--check", "--init-db", "--version", "--help"):
        assert re.search(rf"^\s+(-\w, )?{option}\b", out, re.MULTILINE), option
    assert re.search(r"^\s+results\s+\S", out, re.MULTILINE)

    sub = run_cli("results", "--help", env=service_env(dbname="unused"))
    assert sub.returncode == 0
    assert "--law ID" in sub.stdout
    assert "{table,csv,json}" in sub.stdout


def test_version() -> None:
    result = run_cli("--version", env=service_env(dbname="unused"))
    assert result.returncode == 0
    assert result.stdout == f"aggregator.py {aggregator.VERSION}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", aggregator.VERSION)
    # One home for the version: pyproject.toml's [project] table.
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == aggregator.VERSION


def test_env_file_is_read_from_the_working_directory_only(tmp_path: Path, schema_db: str, queue: str) -> None:
    parent, child = tmp_path / "parent", tmp_path / "parent" / "child"
    child.mkdir(parents=True)
    (parent / ".env").write_text("BATCH_SIZE=abc\n")
    env = service_env(dbname=schema_db, queue=queue)
    # A .env in a parent directory is never read (it used to be searched for upwards).
    assert run_cli("--check", env=env, cwd=child).returncode == 0
    # The working directory's own .env is.
    result = run_cli("--check", env=env, cwd=parent)
    assert result.returncode == 2
    (problem,) = problems(result)
    assert "BATCH_SIZE" in problem
    # Variables already set win over it.
    assert run_cli("--check", env={**env, "BATCH_SIZE": "50"}, cwd=parent).returncode == 0


def test_init_db_without_createdb_says_so_in_one_line(dbname: str) -> None:
    role = f"agg_nocreatedb_{uuid.uuid4().hex[:8]}"
    query(dbname, f"CREATE ROLE {role} LOGIN NOCREATEDB")
    try:
        missing = f"agg_test_absent_{uuid.uuid4().hex[:8]}"
        result = run_cli("--init-db", env=service_env(dbname=missing, POSTGRES_USER=role))
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert f'role "{role}" may not create it (no CREATEDB)' in line
        assert f"createdb -O {role} {missing}" in line
        # With the database there (created by an administrator), the same role applies the schema.
        query(dbname, f"GRANT CREATE ON SCHEMA public TO {role}")
        done = run_cli("--init-db", env=service_env(dbname=dbname, POSTGRES_USER=role))
        assert done.returncode == 0, done.stderr
        assert "created database" not in done.stdout
    finally:
        query(dbname, f"DROP OWNED BY {role}")
        query(dbname, f"DROP ROLE {role}")


# -- --check -------------------------------------------------------------------------------------


def test_check_passes_when_everything_is_ready(dbname: str, svc_role: ServiceRole, queue: str) -> None:
    # As the service's own role (service_role.sql): nothing to warn about.
    result = run_cli("--check", env=service_env(dbname=dbname, queue=queue, **svc_role.env()))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("ok: ") for line in lines), lines
    assert f"queue {queue} (0 ready, 0 consumers)" in lines[0]
    as_role = f"postgresql://{svc_role.name}@{POSTGRES_HOST}:{POSTGRES_PORT}/{dbname}"
    assert lines[1] == f"ok: PostgreSQL {as_role}, schema complete, version {SCHEMA_VERSION}"


def test_check_warns_when_the_service_would_run_as_a_superuser(schema_db: str, queue: str) -> None:
    result = run_cli("--check", env=service_env(dbname=schema_db, queue=queue))
    assert result.returncode == 0, result.stderr  # a warning, not a problem
    assert result.stderr == ""
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: PostgreSQL user {POSTGRES_USER} is a superuser: it can rewrite the audit trail; "
        "run the service as a role made by service_role.sql"
    ]


def test_check_accepts_a_queue_the_service_will_declare(schema_db: str) -> None:
    result = run_cli("--check", env=service_env(dbname=schema_db, queue=f"agg.test.absent.{uuid.uuid4().hex[:8]}"))
    assert result.returncode == 0, result.stderr
    assert "does not exist yet (the service declares it)" in result.stdout


@pytest.mark.parametrize("case", ["missing-database", "schema-missing", "rabbitmq-unreachable", "two-at-once"])
def test_check_reports_one_line_per_problem(case: str, dbname: str, queue: str) -> None:
    env = service_env(dbname=dbname, queue=queue)
    expected: list[str] = []  # a fragment of each problem line, in order
    if case in ("rabbitmq-unreachable", "two-at-once"):
        port = free_port()  # nothing listens there
        env["RABBITMQ_PORT"] = str(port)
        expected.append(f"RabbitMQ amqp://{RABBITMQ_USER}@{RABBITMQ_HOST}:{port}/")
    if case in ("missing-database", "two-at-once"):
        env["POSTGRES_DB"] = f"agg_test_absent_{uuid.uuid4().hex[:8]}"
        expected.append(f'database "{env["POSTGRES_DB"]}" does not exist')
    if case == "schema-missing":
        expected.append("schema incomplete, missing vote_results, vote_audit, duplicate_attempts, vote_statistics")
    if case == "rabbitmq-unreachable":
        assert run_cli("--init-db", env=env).returncode == 0

    result = run_cli("--check", env=env)
    # A missing database is certain (exit 2, as at start-up); the rest may pass later (exit 1).
    assert result.returncode == (2 if case in ("missing-database", "two-at-once") else 1)
    found = problems(result)
    # Exactly one line per problem, and nothing else on stderr (no traceback, no library noise).
    assert result.stderr.splitlines() == found
    assert len(found) == len(expected), found
    for line, fragment in zip(found, expected, strict=True):
        assert fragment in line
    # What does work is still confirmed.
    if "RabbitMQ" not in " ".join(expected):
        assert "ok: RabbitMQ" in result.stdout
    if case == "rabbitmq-unreachable":
        assert "ok: PostgreSQL" in result.stdout


def test_check_says_why_rabbitmq_is_unreachable(schema_db: str) -> None:
    result = run_cli("--check", env=service_env(dbname=schema_db, RABBITMQ_PORT=str(free_port())))
    (problem,) = problems(result)
    assert "Connection refused" in problem


# -- --init-db -------------------------------------------------------------------------------------


def test_init_db_creates_the_database_and_can_run_again(new_dbname: str) -> None:
    env = service_env(dbname=new_dbname)
    first = run_cli("--init-db", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"created database {new_dbname}",
        f"schema applied to {target(new_dbname)}: version {SCHEMA_VERSION} (a new schema)",
    ]
    assert missing_objects(new_dbname) == []
    query(new_dbname, "INSERT INTO vote_results (law_id, oui_count, non_count) VALUES ('law-x', 3, 4)")

    second = run_cli("--init-db", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        f"schema applied to {target(new_dbname)}: version {SCHEMA_VERSION} (was {SCHEMA_VERSION})"
    ]
    assert missing_objects(new_dbname) == []
    assert query(new_dbname, "SELECT oui_count, non_count FROM vote_results WHERE law_id = 'law-x'") == [(3, 4)]


# -- results ---------------------------------------------------------------------------------------


def statistics(dbname: str, law: str | None = None) -> list[tuple[Any, ...]]:
    return query(
        dbname,
        "SELECT law_id, oui_count, non_count, total_votes, oui_percentage, non_percentage, leading_choice, updated_at "
        "FROM vote_statistics WHERE %s::text IS NULL OR law_id = %s ORDER BY law_id",
        (law, law),
    )


def _table_rows(out: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]


def test_results_match_the_database(make_service: Callable[..., Service], queue: str, dbname: str) -> None:
    votes = make_votes(2600, laws=3, seed=31)
    svc = make_service().start()
    publish(queue, [v.body() for v in votes])
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
    assert svc.stop() == 0
    rows = statistics(dbname)
    assert len(rows) == 3
    assert sum(r[3] for r in rows) == len(votes)
    env = service_env(dbname=dbname, RESULTS_EMBARGO="false")  # the polls are closed

    as_csv = run_cli("results", "--format", "csv", env=env)
    assert as_csv.returncode == 0, as_csv.stderr
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [
        (
            r["law_id"],
            int(r["oui"]),
            int(r["non"]),
            int(r["total"]),
            Decimal(r["oui_percent"]),
            Decimal(r["non_percent"]),
            r["leading"],
            datetime.fromisoformat(r["updated_at"]),
        )
        for r in parsed
    ] == rows

    as_json = run_cli("results", "--format", "json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [
        {
            "law_id": law,
            "oui": oui,
            "non": non,
            "total": total,
            "oui_percent": float(oui_pct),
            "non_percent": float(non_pct),
            "leading": leading,
            "updated_at": updated.isoformat(),
        }
        for law, oui, non, total, oui_pct, non_pct, leading, updated in rows
    ]

    as_table = run_cli("results", env=env)  # table is the default
    assert as_table.returncode == 0, as_table.stderr
    table = _table_rows(as_table.stdout)
    assert table[0] == ["law", "oui", "non", "total", "oui %", "non %", "leading", "last update (UTC)"]
    assert table[2 : 2 + len(rows)] == [
        [
            law,
            f"{oui:,}",
            f"{non:,}",
            f"{total:,}",
            f"{oui_pct:.2f}%",
            f"{non_pct:.2f}%",
            leading,
            updated.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for law, oui, non, total, oui_pct, non_pct, leading, updated in rows
    ]
    oui_all, non_all = sum(r[1] for r in rows), sum(r[2] for r in rows)
    assert table[-1] == ["all laws", f"{oui_all:,}", f"{non_all:,}", f"{oui_all + non_all:,}"]
    assert "," in table[-1][3]  # thousands are grouped

    law = rows[1][0]
    one = run_cli("results", "--law", law, "--format", "csv", env=env)
    assert one.returncode == 0
    assert [r["law_id"] for r in csv.DictReader(io.StringIO(one.stdout))] == [law]
    one_table = _table_rows(run_cli("results", "--law", law, env=env).stdout)
    assert [r[0] for r in one_table[2:-2]] == [law]

    unknown = run_cli("results", "--law", "no-such-law", "--format", "json", env=env)
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == "no votes counted for law 'no-such-law'\n"


# -- logs ----------------------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line as a JSON object with the four keys a log shipper needs, or an assertion error."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= set(entry), line
        assert datetime.fromisoformat(entry["time"]).tzinfo is not None, line
        assert entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        entries.append(entry)
    return entries


def test_json_logs_and_periodic_summaries_under_load(
    make_service: Callable[..., Service], queue: str, dbname: str
) -> None:
    svc = make_service({"LOG_FORMAT": "json", "LOG_SUMMARY_INTERVAL_SECONDS": "1"}).start()
    votes = make_votes(4000, laws=5, seed=41)
    publish(queue, [b"{not json"])  # one warning line among the rest
    # A steady stream for about three seconds, so that summaries fall due while votes flow.
    for i in range(0, len(votes), 400):
        publish(queue, [v.body() for v in votes[i : i + 400]])
        time.sleep(0.3)
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")

    def summaries() -> list[dict[str, Any]]:
        return [e for e in json_lines(svc.logs()) if "votes_per_s" in e]

    wait_for(lambda: sum(e["counted"] for e in summaries()) == len(votes), timeout=10, what="summaries of every vote")
    assert svc.stop() == 0

    entries = json_lines(svc.logs())  # every line, from start-up to "stopped", is JSON
    assert entries[-1]["message"] == "stopped (exit code 0)"
    assert any(e["level"] == "WARNING" and "rejected message" in e["message"] for e in entries)
    found = summaries()
    assert len(found) >= 2
    keys = {"votes_per_s", "received", "counted", "redelivered", "rejected", "batches", "buffered", "interval_s"}
    for entry in found:
        assert entry["level"] == "INFO"
        assert keys <= set(entry), set(entry)
        assert entry["message"].startswith("last ")
    # Every message is counted as received before its vote can be counted as written, so the
    # lines that carry every vote counted carry every message received, the refused one too.
    assert sum(e["received"] for e in found) == len(votes) + 1
    assert sum(e["rejected"] for e in found) == 1
    assert sum(e["batches"] for e in found) >= len(votes) // Config().batch_size
    assert max(e["votes_per_s"] for e in found) > 0
    # At 10k votes/s a line per batch would drown the log: batches are logged at DEBUG only.
    assert per_batch(entries) == []


def per_batch(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-batch lines: they carry the batch's size as context."""
    return [e for e in entries if "batch_size" in e or re.match(r"batch\b.*\bcommitted\b", e["message"])]


def test_batches_are_logged_at_debug(make_service: Callable[..., Service], queue: str, dbname: str) -> None:
    # The counterpart of the test above: the per-batch lines exist, one level down.
    # The default batch timeout: the 50 votes arrive well within it, as one batch.
    svc = make_service({"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG", "BATCH_TIMEOUT_SECONDS": "1"}).start()
    publish(queue, [v.body() for v in make_votes(50, laws=2, seed=42)])
    wait_for(lambda: audit_count(dbname) == 50, timeout=30, what="votes counted")
    wait_for(lambda: per_batch(json_lines(svc.logs())), timeout=10, what="the batch line")
    assert svc.stop() == 0
    (batch,) = per_batch(json_lines(svc.logs()))
    assert batch["level"] == "DEBUG"
    assert batch["batch_size"] == 50


def test_check_reports_a_bad_variable_as_one_problem() -> None:
    result = run_cli("--check", env=service_env(dbname="postgres", BATCH_SIZE="abc"))
    assert result.returncode == 2  # a configuration error, the same code as for the service
    assert problems(result) == result.stderr.splitlines()
    (problem,) = problems(result)
    assert "BATCH_SIZE" in problem
    assert "'abc'" in problem


def test_make_says_in_one_line_how_to_start_a_server_that_is_down(tmp_path: Path) -> None:
    # scripts/check_services.sh runs before `make run` and `make test`.
    closed = str(free_port())
    env = {"PATH": os.environ["PATH"], "RABBITMQ_HOST": RABBITMQ_HOST, "RABBITMQ_PORT": closed}
    env |= {"POSTGRES_HOST": POSTGRES_HOST, "POSTGRES_PORT": str(POSTGRES_PORT)}
    done = subprocess.run(
        [str(ROOT / "scripts" / "check_services.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert f"RabbitMQ is not reachable at {RABBITMQ_HOST}:{closed}" in line
    assert "rabbitmq-server -detached" in line

    env["RABBITMQ_PORT"] = str(RABBITMQ_PORT)
    ok = subprocess.run([str(ROOT / "scripts" / "check_services.sh")], cwd=tmp_path, env=env, timeout=30)
    assert ok.returncode == 0
