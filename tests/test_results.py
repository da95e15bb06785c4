"""`python aggregator.py results`: the counts a running service stored, in table, CSV and JSON."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from tests.proxy import TcpProxy
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    Service,
    VoteMsg,
    audit_count,
    declare_queue,
    publish,
    query,
    run_cli,
    scratch_queues,
    service_env,
    stop_all,
    wait_for,
)

# law -> (oui, non): a clear lead, a repeating decimal, a tie, and thousands.
VOTES = {"law-001": (7, 3), "law-002": (1, 2), "law-003": (2, 2), "law-010": (1234, 0)}


def vote(n: int, law: str, choice: str, timestamp: str = "2025-11-14T12:00:00Z") -> VoteMsg:
    citizen = f"citizen-{n:05d}"
    return VoteMsg(hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(), citizen, law, choice, timestamp)


def fill(svc: Service, queue: str, dbname: str) -> None:
    """Count VOTES with the service itself, plus messages that must not change them."""
    votes: list[VoteMsg] = []
    for law, (oui, non) in VOTES.items():
        for choice in ["oui"] * oui + ["non"] * non:
            votes.append(vote(len(votes) + 1, law, choice))
    first = votes[len(votes) // 2]
    attempt = VoteMsg(first.vote_hash, first.citizen_id, first.law_id, "non" if first.choice == "oui" else "oui")
    svc.start()
    publish(queue, [v.body() for v in votes] + [attempt.body(), votes[0].body(), b"not json"])
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="every vote counted")
    wait_for(lambda: svc.metric("messages_received_total") == len(votes) + 3, timeout=30, what="all received")
    assert svc.stop() == 0


def results_cli(dbname: str, *args: str, port: int = POSTGRES_PORT) -> subprocess.CompletedProcess[str]:
    return run_cli("results", *args, env=service_env(dbname=dbname, POSTGRES_PORT=str(port), RESULTS_EMBARGO="false"))


def percent(part: int, whole: int) -> Decimal:
    return (Decimal(100 * part) / whole).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def expected(law: str) -> dict[str, Any]:
    oui, non = VOTES[law]
    leading = "oui" if oui > non else "non" if non > oui else "tie"
    return {
        "law_id": law,
        "oui": oui,
        "non": non,
        "total": oui + non,
        "oui_percent": percent(oui, oui + non),
        "non_percent": percent(non, oui + non),
        "leading": leading,
    }


def updated_at(dbname: str) -> dict[str, datetime]:
    return {law: ts for law, ts in query(dbname, "SELECT law_id, updated_at FROM vote_results")}


@pytest.fixture(scope="module")
def counted(module_dbname: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """VOTES counted once for the module: the tests that use it only read."""
    with scratch_queues() as names:
        queue = declare_queue(names)
        svc = Service(queue=queue, dbname=module_dbname, log_path=tmp_path_factory.mktemp("counted") / "service.log")
        try:
            fill(svc, queue, module_dbname)
        finally:
            stop_all([svc])
    return module_dbname


def test_table_has_every_law_with_exact_numbers_and_a_totals_line(counted: str) -> None:
    result = results_cli(counted)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "law",
        "oui",
        "non",
        "total",
        "oui",
        "%",
        "non",
        "%",
        "leading",
        "last",
        "update",
        "(UTC)",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert set(lines[-2]) <= {"-", " "}
    rows = lines[2:-2]
    stamps = updated_at(counted)
    assert len(rows) == len(VOTES)
    for row, law in zip(rows, sorted(VOTES), strict=True):
        e = expected(law)
        assert row.split() == [
            law,
            f"{e['oui']:,}",
            f"{e['non']:,}",
            f"{e['total']:,}",
            f"{e['oui_percent']}%",
            f"{e['non_percent']}%",
            e["leading"],
            *stamps[law].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S").split(),
        ]
    oui = sum(o for o, _ in VOTES.values())
    non = sum(n for _, n in VOTES.values())
    assert lines[-1].split() == ["all", "laws", f"{oui:,}", f"{non:,}", f"{oui + non:,}"]
    assert "1,234" in result.stdout
    assert "33.33%" in result.stdout
    assert "66.67%" in result.stdout


def test_csv_equals_the_database(counted: str) -> None:
    result = results_cli(counted, "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    db_rows = query(
        counted,
        "SELECT law_id, oui_count, non_count, total_votes, oui_percentage, non_percentage, leading_choice, "
        "updated_at FROM vote_statistics ORDER BY law_id",
    )
    assert [r["law_id"] for r in rows] == sorted(VOTES)
    for row, db_row in zip(rows, db_rows, strict=True):
        law, oui, non, total, oui_pct, non_pct, leading, ts = db_row
        assert row == {
            "law_id": law,
            "oui": str(oui),
            "non": str(non),
            "total": str(total),
            "oui_percent": str(oui_pct),
            "non_percent": str(non_pct),
            "leading": leading,
            "updated_at": row["updated_at"],
        }
        assert datetime.fromisoformat(row["updated_at"]) == ts
        # ... and the database holds what was voted.
        e = expected(law)
        assert (int(row["oui"]), int(row["non"]), int(row["total"]), row["leading"]) == (
            e["oui"],
            e["non"],
            e["total"],
            e["leading"],
        )
        assert Decimal(row["oui_percent"]) == e["oui_percent"]
        assert Decimal(row["non_percent"]) == e["non_percent"]


def test_json_equals_the_database(counted: str) -> None:
    result = results_cli(counted, "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    stamps = updated_at(counted)
    assert [d["law_id"] for d in data] == sorted(VOTES)
    for item in data:
        e = expected(item["law_id"])
        assert item == {
            **{k: e[k] for k in ("law_id", "oui", "non", "total", "leading")},
            "oui_percent": float(e["oui_percent"]),
            "non_percent": float(e["non_percent"]),
            "updated_at": item["updated_at"],
        }
        assert datetime.fromisoformat(item["updated_at"]) == stamps[item["law_id"]]


def test_law_option_filters_every_format(counted: str) -> None:
    table = results_cli(counted, "--law", "law-002")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:-2]] == ["law-002"]
    assert lines[-1].split() == ["all", "laws", "1", "2", "3"]
    rows = list(csv.DictReader(io.StringIO(results_cli(counted, "--law", "law-002", "--format", "csv").stdout)))
    assert [(r["law_id"], r["oui"], r["non"], r["oui_percent"]) for r in rows] == [("law-002", "1", "2", "33.33")]
    data = json.loads(results_cli(counted, "--law", "law-010", "--format", "json").stdout)
    assert [(d["law_id"], d["oui"], d["non"], d["oui_percent"]) for d in data] == [("law-010", 1234, 0, 100.0)]


def test_unknown_law_exits_1(counted: str) -> None:
    for fmt in ("table", "csv", "json"):
        result = results_cli(counted, "--law", "law-999", "--format", fmt)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.strip() == "no votes counted for law 'law-999'"


def test_no_votes_yet_is_not_an_error(dbname: str) -> None:
    init = run_cli("--init-db", env=service_env(dbname=dbname))
    assert init.returncode == 0, init.stderr
    assert json.loads(results_cli(dbname, "--format", "json").stdout) == []
    csv_out = results_cli(dbname, "--format", "csv")
    assert csv_out.returncode == 0
    assert csv_out.stdout.splitlines() == ["law_id,oui,non,total,oui_percent,non_percent,leading,updated_at"]
    table = results_cli(dbname)
    assert table.returncode == 0
    assert len(table.stdout.splitlines()) == 2  # header and rule only


def test_missing_database_exits_2_with_one_line() -> None:
    result = results_cli("agg_test_does_not_exist")
    assert result.returncode == 2  # retrying cannot fix it: the same code as for the service
    assert result.stderr.startswith('error: database "agg_test_does_not_exist" does not exist')
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_postgres_exits_1_with_one_line(dbname: str) -> None:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    proxy.refuse()
    try:
        result = results_cli(dbname, port=proxy.port)
    finally:
        proxy.close()
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach PostgreSQL")
    assert len(result.stderr.strip().splitlines()) == 1


def test_database_without_the_schema_exits_1(dbname: str) -> None:
    result = results_cli(dbname)
    assert result.returncode == 1
    assert result.stdout == ""
    # One line that says what is wrong and how to fix it.
    assert result.stderr.startswith("error: the schema is missing")
    assert "--init-db" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
