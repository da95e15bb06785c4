"""What the benchmark reads from a service's database: progress while it runs, exactly-once checks after."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.errors
from bench_settings import Endpoints
from procstat import CpuSources


class Watcher:
    """Read-only queries on a service's database, on one autocommit connection."""

    def __init__(self, endpoints: Endpoints, dbname: str) -> None:
        self._conn = endpoints.pg(dbname)

    def close(self) -> None:
        self._conn.close()

    def counted(self) -> int:
        """Votes counted so far: the sum of vote_results (about 50 rows).

        The service increments vote_results in the same transaction that inserts
        the audit rows, so at any snapshot this equals count(*) of vote_audit; it
        costs a fraction of a millisecond where count(*) over 100,000 audit rows
        costs several, which would steal CPU from the service at this poll rate.
        count(*) itself is checked once at the end.
        """
        try:
            with self._conn.cursor() as cur:
                cur.execute("SELECT coalesce(sum(oui_count + non_count), 0) FROM vote_results")
                row = cur.fetchone()
        except psycopg2.errors.UndefinedTable:  # the service has not applied the schema yet
            return 0
        return int(row[0]) if row else 0

    def backend_pids(self) -> list[int]:
        """The PostgreSQL backends connected to this database, this watcher's own left out."""
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
            return [int(row[0]) for row in cur.fetchall()]

    def audit_span(self) -> tuple[int, datetime | None, datetime | None]:
        with self._conn.cursor() as cur:
            cur.execute("SELECT count(*), min(recorded_at), max(recorded_at) FROM vote_audit")
            row = cur.fetchone()
        assert row is not None
        return int(row[0]), row[1], row[2]

    def visible(self, hashes: list[str]) -> list[str]:
        """Which of `hashes` are in vote_audit (primary-key lookups)."""
        with self._conn.cursor() as cur:
            cur.execute("SELECT vote_hash FROM vote_audit WHERE vote_hash = ANY(%s)", (hashes,))
            return [str(row[0]) for row in cur.fetchall()]


# -- checks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    run: str
    name: str
    ok: bool
    detail: str


def exactly_once_checks(
    endpoints: Endpoints, run: str, dbname: str, expected: dict[str, tuple[int, int]]
) -> list[Check]:
    """Every vote counted once: audit rows, totals per law, and both against what was published."""
    n = sum(oui + non for oui, non in expected.values())
    conn = endpoints.pg(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM vote_audit")
            audit_rows = int(_one(cur.fetchone()))
            cur.execute("SELECT law_id, choice, count(*) FROM vote_audit GROUP BY 1, 2")
            grouped: dict[str, list[int]] = {}
            for law, choice, count in cur.fetchall():
                grouped.setdefault(law, [0, 0])[0 if choice == "oui" else 1] = int(count)
            cur.execute("SELECT law_id, oui_count, non_count FROM vote_results")
            results = {law: (int(oui), int(non)) for law, oui, non in cur.fetchall() if oui or non}
            cur.execute("SELECT count(*) FROM duplicate_attempts")
            attempts = int(_one(cur.fetchone()))
    finally:
        conn.close()
    audit = {law: (oui, non) for law, (oui, non) in grouped.items()}
    total = sum(oui + non for oui, non in results.values())
    return [
        Check(run, "count(*) vote_audit == N", audit_rows == n, f"{audit_rows} rows, N={n}"),
        Check(run, "vote_results == vote_audit by law/choice", results == audit, _diff(results, audit)),
        Check(run, "sum(vote_results) == N", total == n, f"{total}, N={n}"),
        Check(run, "vote_results == published totals", results == expected, _diff(results, expected)),
        Check(run, "no duplicate_attempts", attempts == 0, f"{attempts} rows"),
    ]


def _one(row: tuple[Any, ...] | None) -> Any:
    assert row is not None
    return row[0]


def _diff(got: dict[str, tuple[int, int]], want: dict[str, tuple[int, int]]) -> str:
    wrong = sorted(law for law in got.keys() | want.keys() if got.get(law) != want.get(law))
    if not wrong:
        return f"{len(want)} laws equal"
    shown = ", ".join(f"{law}: {got.get(law)} vs {want.get(law)}" for law in wrong[:3])
    return f"{len(wrong)} laws differ ({shown})"


def service_checks(run: str, exit_code: int, queue_left: int) -> list[Check]:
    return [
        Check(run, "service exited 0 on SIGTERM", exit_code == 0, f"exit code {exit_code}"),
        Check(run, "queue drained (all acked)", queue_left == 0, f"{queue_left} messages left"),
    ]


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cpu_sources(endpoints: Endpoints) -> CpuSources:
    """The broker and database processes serving `endpoints`, when they run on this machine."""
    conn = endpoints.pg("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = int(_one(cur.fetchone()))
        # Read while the backend lives: its parent is the postmaster.
        return CpuSources.find(
            amqp_port=endpoints.rabbitmq_port if endpoints.rabbitmq_host in LOOPBACK else None,
            postgres_backend_pid=backend if endpoints.postgres_host in LOOPBACK else None,
        )
    finally:
        conn.close()
