"""A client that vanishes mid-transaction releases its row locks within a bound.

An instance whose host dies or is cut off after its upsert took row locks on vote_results leaves
its backend "idle in transaction". Without a bound every other instance waits on those rows until
TCP gives up (hours). Freezing a real instance with SIGSTOP is the same thing seen from the server.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable

import psycopg2
import psycopg2.errors
import pytest

from tests.support import (
    Service,
    apply_schema,
    assert_all_counted_once,
    audit_count,
    make_votes,
    pg_connect,
    publish,
    query,
    queue_state,
    wait_for,
)

pytestmark = pytest.mark.slow  # a frozen instance waited out

IDLE_TIMEOUT_S = 5
LAW = "law-000"


def _batch_backend(monitor: psycopg2.extensions.connection) -> int | None:
    """The pid of a service backend in this database running the batch statement, if any."""
    with monitor.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'vote-aggregator' AND state = 'active' AND query LIKE '%%WITH incoming AS%%'"
        )
        row = cur.fetchone()
    return int(row[0]) if row else None


def _backend_state(monitor: psycopg2.extensions.connection, pid: int) -> str | None:
    with monitor.cursor() as cur:
        cur.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cur.fetchone()
    return str(row[0]) if row else None


def _finished_state(monitor: psycopg2.extensions.connection, pid: int) -> str | None:
    """None while the backend runs a statement, then its state ("gone" once it ended)."""
    state = _backend_state(monitor, pid)
    return None if state == "active" else state or "gone"


def _row_locked(dbname: str) -> bool:
    """True if another session holds the law's row in vote_results."""
    conn = pg_connect(dbname)
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM vote_results WHERE law_id = %s FOR UPDATE NOWAIT", (LAW,))
        return False
    except psycopg2.errors.LockNotAvailable:
        return True
    finally:
        conn.rollback()
        conn.close()


def _freeze_inside_a_transaction(svc: Service, dbname: str) -> int:
    """SIGSTOP the service while its backend holds the law's row; returns that backend's pid."""
    monitor = pg_connect(dbname)
    try:
        for _attempt in range(20):
            pid: int = wait_for(lambda: _batch_backend(monitor), timeout=30, interval=0.005, what="a batch statement")
            svc.signal(signal.SIGSTOP)
            # The statement completes on the server, which then waits for a COMMIT that does not come.
            state = wait_for(
                functools.partial(_finished_state, monitor, pid), timeout=30, what="the batch statement to finish"
            )
            if state == "idle in transaction" and _row_locked(dbname):
                return pid
            svc.signal(signal.SIGCONT)  # stopped just after its commit: try the next batch
    finally:
        monitor.close()
    pytest.fail("never caught the service inside a transaction")


def test_a_frozen_instance_releases_its_locks_and_both_finish_exactly(
    make_service: Callable[..., Service], queue: str, dbname: str
) -> None:
    apply_schema(dbname)
    query(dbname, "INSERT INTO vote_results (law_id) VALUES (%s)", (LAW,))
    votes = make_votes(16000, laws=1, seed=51)
    assert {v.law_id for v in votes} == {LAW}
    publish(queue, [v.body() for v in votes])

    a = make_service(
        {
            "BATCH_SIZE": "2000",
            "RABBITMQ_PREFETCH_COUNT": "4000",
            "BATCH_TIMEOUT_SECONDS": "0.2",
            "RETRY_DELAY_SECONDS": "0.5",
            "POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": str(IDLE_TIMEOUT_S),
        }
    ).start()
    frozen_pid = _freeze_inside_a_transaction(a, dbname)
    frozen_at = time.monotonic()
    counted_before = audit_count(dbname)
    assert queue_state(queue)[0] > 0, "B needs votes of its own to count"

    # B's own timeouts are the defaults: its lock waits end its own statements, never A's session.
    b = make_service({"BATCH_SIZE": "500", "BATCH_TIMEOUT_SECONDS": "0.2"}).start()
    try:
        # Nothing but the server's idle-in-transaction timeout ends the session of a stopped process.
        wait_for(
            lambda: query(dbname, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (frozen_pid,)) == [(0,)],
            timeout=IDLE_TIMEOUT_S + 60,
            what="the server ending A's idle transaction",
        )
        wait_for(lambda: audit_count(dbname) > counted_before, timeout=60, what="B counting again")
        released_after = time.monotonic() - frozen_at
        print(f"B counted again {released_after:.1f}s after A froze (idle-in-transaction timeout {IDLE_TIMEOUT_S}s)")
    finally:
        a.signal(signal.SIGCONT)

    # A finds its connection gone and writes its batch again on a new one.
    wait_for(
        lambda: audit_count(dbname) == len(votes) and queue_state(queue)[0] == 0,
        timeout=120,
        what="every vote counted",
    )
    assert a.stop() == 0
    assert b.stop() == 0
    assert_all_counted_once(dbname, queue, votes)
    assert "DatabaseUnavailable" in a.logs()  # its batch was retried
    assert "Traceback" not in a.logs() + b.logs()
