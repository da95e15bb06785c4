"""PostgreSQL: the connection pool, the schema, and the per-batch transaction.

psycopg2's exceptions stop here. Callers see:
- RetryableError (DatabaseUnavailable, TransactionConflict): may succeed later;
- DatabaseRejected: the data of one or more votes was refused; retrying the
  same batch would fail the same way;
- DatabaseMissing / DatabaseConfigError: the service cannot run as configured.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.pool
from psycopg2 import sql
from psycopg2.extras import execute_values
from psycopg2.pool import ThreadedConnectionPool
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from config import Config
from votes import Vote

logger = logging.getLogger(__name__)

SCHEMA_FILE = Path(__file__).with_name("init_db.sql")
SCHEMA_OBJECTS = ("vote_results", "vote_audit", "duplicate_attempts", "vote_statistics")
# Any constant shared by every instance: serialises concurrent schema set-up.
_SCHEMA_LOCK_KEY = 0x766F746573  # "votes"
PAGE_SIZE = 100


class DatabaseError(Exception):
    """Base of every error this module raises."""


class RetryableError(DatabaseError):
    """The same transaction may succeed if tried again later."""


class DatabaseUnavailable(RetryableError):
    """PostgreSQL could not be reached, or the connection broke."""


class TransactionConflict(RetryableError):
    """Deadlock or serialization failure: the whole transaction is retried."""


class DatabaseRejected(DatabaseError):
    """PostgreSQL refused the data itself (constraint, type, length)."""


class DatabaseMissing(DatabaseError):
    """The configured database does not exist."""


class DatabaseConfigError(DatabaseError):
    """PostgreSQL answered but refused us (authentication, role, permissions)."""


@dataclass
class BatchOutcome:
    """What one committed batch did."""

    counted: dict[tuple[str, str], int] = field(default_factory=dict)  # (law_id, choice) -> new votes
    totals: dict[str, tuple[int, int]] = field(default_factory=dict)  # law_id -> (oui, non) after commit
    redeliveries: int = 0
    duplicate_attempts: int = 0

    @property
    def new_votes(self) -> int:
        return sum(self.counted.values())


# Phrases of server messages that mean "try again later" although the server answered.
_TRANSIENT_FATAL = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "too many clients",
    "remaining connection slots are reserved",
)


def classify_connect_error(exc: psycopg2.OperationalError, config: Config) -> DatabaseError:
    message = str(exc).strip()
    # libpq reports connection failures without an SQLSTATE, so the text is all there is.
    if "FATAL:" not in message or any(p in message for p in _TRANSIENT_FATAL):
        return DatabaseUnavailable(
            f"cannot reach PostgreSQL at {config.postgres_target_for_logs()}: {_first_line(message)}"
        )
    if "does not exist" in message and "database" in message:
        return DatabaseMissing(
            f'database "{config.postgres_db}" does not exist on {config.postgres_host}:{config.postgres_port}; '
            f"create it with: createdb -h {config.postgres_host} -p {config.postgres_port} "
            f"-U {config.postgres_user} {config.postgres_db}   (or: python aggregator.py --init-db)"
        )
    return DatabaseConfigError(f"PostgreSQL refused {config.postgres_target_for_logs()}: {_first_line(message)}")


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else message


def connect_kwargs(config: Config, *, dbname: str | None = None) -> dict[str, Any]:
    tls = {
        key: value
        for key, value in (
            ("sslrootcert", config.postgres_sslrootcert),
            ("sslcert", config.postgres_sslcert),
            ("sslkey", config.postgres_sslkey),
        )
        if value
    }
    return {
        "sslmode": config.postgres_sslmode,
        **tls,
        "host": config.postgres_host,
        "port": config.postgres_port,
        "dbname": dbname or config.postgres_db,
        "user": config.postgres_user,
        "password": config.postgres_password,
        "connect_timeout": config.postgres_connect_timeout_s,
        "application_name": "vote-aggregator",
        # The server aborts a statement stuck on a lock; a server or network that
        # stops answering altogether is the watchdog's job (see _Watchdog).
        "options": f"-c statement_timeout={int(config.postgres_query_timeout_s * 1000)}",
        # Notice a dead peer within about a minute instead of the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": 15,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }


def create_database(config: Config) -> bool:
    """Create the configured database if it is missing. True when it was created."""
    try:
        conn = psycopg2.connect(**connect_kwargs(config, dbname="postgres"))
    except psycopg2.OperationalError as exc:
        raise classify_connect_error(exc, config) from None
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (config.postgres_db,))
            if cur.fetchone():
                return False
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(config.postgres_db)))
            except psycopg2.errors.DuplicateDatabase:
                return False
            return True
    finally:
        conn.close()


class _Watchdog:
    """Breaks connections whose transaction overran its deadline.

    A server that is paused, or a network path that silently drops packets,
    leaves libpq waiting forever for an answer; TCP keepalives do not help when
    something still acknowledges the packets. Shutting the socket down makes
    the blocked call fail at once with a connection error, so the connection is
    discarded and the batch retried.
    """

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._deadlines: dict[int, tuple[psycopg2.extensions.connection, float]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, conn: psycopg2.extensions.connection) -> None:
        with self._lock:
            self._deadlines[id(conn)] = (conn, time.monotonic() + self._timeout_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="db-watchdog", daemon=True)
                self._thread.start()

    def unwatch(self, conn: psycopg2.extensions.connection) -> None:
        with self._lock:
            self._deadlines.pop(id(conn), None)

    def _loop(self) -> None:
        while True:
            time.sleep(min(1.0, self._timeout_s / 4))
            now = time.monotonic()
            with self._lock:
                overdue = [conn for conn, deadline in self._deadlines.values() if deadline <= now]
                for conn in overdue:
                    del self._deadlines[id(conn)]
            for conn in overdue:
                logger.warning("PostgreSQL did not answer within %.0fs; dropping the connection", self._timeout_s)
                _break(conn)


def _break(conn: psycopg2.extensions.connection) -> None:
    try:
        # A duplicate of the descriptor: libpq keeps (and later closes) its own.
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, psycopg2.Error):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class Database:
    """A connection pool and the statements the service runs."""

    def __init__(
        self,
        *,
        config: Config,
        sleep: Callable[[float], None] | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._pool: ThreadedConnectionPool | None = None
        # The client-side bound sits above the server's statement_timeout, so the
        # server gets the first chance to cancel cleanly.
        self._watchdog = _Watchdog(config.postgres_query_timeout_s + 5.0)
        retry_kwargs: dict[str, Any] = {}
        if sleep is not None:
            retry_kwargs["sleep"] = sleep
        log_retry = before_sleep_log(logger, logging.WARNING)

        def before_sleep(state: RetryCallState) -> None:
            log_retry(state)
            if on_retry is not None:
                on_retry()

        # MAX_RETRY_ATTEMPTS counts retries after the first try: 3 gives waits of 1 s, 2 s, 4 s.
        self._retrying = Retrying(
            stop=stop_after_attempt(config.max_retry_attempts + 1),
            wait=wait_exponential(multiplier=config.retry_delay_s, max=config.retry_max_delay_s),
            retry=retry_if_exception_type(RetryableError),
            before_sleep=before_sleep,
            reraise=True,
            **retry_kwargs,
        )

    # -- pool ---------------------------------------------------------------

    def open(self) -> None:
        """Create the pool; raises DatabaseUnavailable, DatabaseMissing or DatabaseConfigError."""
        try:
            self._pool = ThreadedConnectionPool(
                self._config.postgres_min_connections,
                self._config.postgres_max_connections,
                **connect_kwargs(self._config),
            )
        except psycopg2.OperationalError as exc:
            raise classify_connect_error(exc, self._config) from None

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and not pool.closed:
            pool.closeall()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction on a pooled connection, with psycopg2's errors translated.

        A connection that failed at the connection level is closed, never
        handed back for reuse.
        """
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable("the connection pool is not open")
        try:
            conn = pool.getconn()
        except psycopg2.OperationalError as exc:
            raise classify_connect_error(exc, self._config) from None
        except psycopg2.pool.PoolError as exc:  # closed while shutting down, or exhausted
            raise DatabaseUnavailable(str(exc)) from None
        discard = False
        self._watchdog.watch(conn)
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except psycopg2.errors.TransactionRollbackError as exc:
            _rollback(conn)
            raise TransactionConflict(_first_line(str(exc))) from None
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            discard = True
            raise DatabaseUnavailable(_first_line(str(exc))) from None
        except (psycopg2.DataError, psycopg2.IntegrityError) as exc:
            _rollback(conn)
            raise DatabaseRejected(_first_line(str(exc))) from None
        except psycopg2.Error as exc:
            discard = not _rollback(conn)
            raise DatabaseError(_first_line(str(exc))) from None
        except BaseException:
            discard = _rollback(conn) is False
            raise
        finally:
            self._watchdog.unwatch(conn)
            try:
                pool.putconn(conn, close=discard or bool(conn.closed))
            except psycopg2.pool.PoolError:  # the pool was closed meanwhile (shutdown)
                conn.close()

    # -- schema -------------------------------------------------------------

    def missing_schema_objects(self) -> list[str]:
        with self._transaction() as cur:
            cur.execute(
                "SELECT name FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NULL",
                (list(SCHEMA_OBJECTS),),
            )
            return [row[0] for row in cur.fetchall()]

    def apply_schema(self) -> None:
        """Apply init_db.sql (idempotent), one instance at a time."""
        script = SCHEMA_FILE.read_text(encoding="utf-8")
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            cur.execute(script)

    def ensure_schema(self) -> bool:
        """Apply the schema when any of its objects is missing. True when it was applied."""
        missing = self.missing_schema_objects()
        if not missing:
            return False
        logger.info("schema objects missing (%s): applying %s", ", ".join(missing), SCHEMA_FILE.name)
        self.apply_schema()
        return True

    def ping(self) -> None:
        """A trivial round trip: raises DatabaseError if PostgreSQL cannot be used."""
        with self._transaction() as cur:
            cur.execute("SELECT 1")

    def read_totals(self) -> dict[str, tuple[int, int]]:
        with self._transaction() as cur:
            cur.execute("SELECT law_id, oui_count, non_count FROM vote_results")
            return {law: (oui, non) for law, oui, non in cur.fetchall()}

    # -- the batch ------------------------------------------------------------

    def write_batch(self, votes: Sequence[Vote]) -> BatchOutcome:
        """Count `votes` exactly once, in one transaction, retrying what can recover.

        Raises RetryableError once MAX_RETRY_ATTEMPTS retries have failed, and
        DatabaseRejected (never retried) when PostgreSQL refuses the data.
        """
        return self._retrying(self.write_batch_once, votes)

    def write_batch_once(self, votes: Sequence[Vote]) -> BatchOutcome:
        with self._transaction() as cur:
            return _write_batch(cur, votes)


def _rollback(conn: psycopg2.extensions.connection) -> bool:
    try:
        conn.rollback()
        return True
    except psycopg2.Error:
        return False


# One round trip counts a whole batch: insert the audit rows, aggregate the
# ones that were new per law, add them to vote_results, and return the new
# totals together with the hashes that were already stored. Rows are inserted
# and locked in key order (vote_hash, then law_id) so that instances writing
# overlapping batches cannot deadlock.
_COUNT_BATCH = """
WITH incoming AS (
    SELECT * FROM unnest(%s::varchar[], %s::varchar[], %s::varchar[], %s::varchar[], %s::timestamptz[])
        AS t(vote_hash, citizen_id, law_id, choice, ts)
), inserted AS (
    INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp")
    SELECT vote_hash, citizen_id, law_id, choice, ts FROM incoming ORDER BY vote_hash
    ON CONFLICT (vote_hash) DO NOTHING
    RETURNING vote_hash, law_id, choice
), counted AS (
    SELECT law_id,
           count(*) FILTER (WHERE choice = 'oui') AS oui,
           count(*) FILTER (WHERE choice = 'non') AS non
    FROM inserted GROUP BY law_id
), totals AS (
    INSERT INTO vote_results AS r (law_id, oui_count, non_count)
    SELECT law_id, oui, non FROM counted ORDER BY law_id
    ON CONFLICT (law_id) DO UPDATE SET
        oui_count = r.oui_count + EXCLUDED.oui_count,
        non_count = r.non_count + EXCLUDED.non_count,
        updated_at = now()
    RETURNING law_id, oui_count, non_count
)
SELECT c.law_id, c.oui, c.non, t.oui_count, t.non_count FROM counted c JOIN totals t USING (law_id)
UNION ALL
SELECT i.vote_hash, NULL, NULL, NULL, NULL FROM incoming i
WHERE NOT EXISTS (SELECT 1 FROM inserted n WHERE n.vote_hash = i.vote_hash)
"""
_SELECT_STORED = 'SELECT vote_hash, citizen_id, law_id, choice, "timestamp" FROM vote_audit WHERE vote_hash = ANY(%s)'
_INSERT_ATTEMPTS = (
    "INSERT INTO duplicate_attempts (vote_hash, citizen_id, law_id, choice, vote_timestamp) VALUES %s "
    "ON CONFLICT ON CONSTRAINT duplicate_attempts_once DO NOTHING RETURNING id"
)


def _row(vote: Vote) -> tuple[str, str, str, str, Any]:
    return (vote.vote_hash, vote.citizen_id, vote.law_id, vote.choice, vote.timestamp)


def _write_batch(cur: psycopg2.extensions.cursor, votes: Sequence[Vote]) -> BatchOutcome:
    outcome = BatchOutcome()
    # The first copy of each hash is the candidate; later copies in the batch are
    # judged against whichever vote ends up stored under that hash.
    candidates: dict[str, Vote] = {}
    copies: list[Vote] = []
    for vote in votes:
        if vote.vote_hash in candidates:
            copies.append(vote)
        else:
            candidates[vote.vote_hash] = vote
    if not candidates:
        return outcome

    cur.execute(
        _COUNT_BATCH,
        (
            [v.vote_hash for v in candidates.values()],
            [v.citizen_id for v in candidates.values()],
            [v.law_id for v in candidates.values()],
            [v.choice for v in candidates.values()],
            [v.timestamp for v in candidates.values()],
        ),
    )
    conflicting: list[str] = []
    for key, oui, non, oui_total, non_total in cur.fetchall():
        if oui is None:
            conflicting.append(key)
            continue
        outcome.totals[key] = (oui_total, non_total)
        if oui:
            outcome.counted[(key, "oui")] = oui
        if non:
            outcome.counted[(key, "non")] = non

    if not conflicting and not copies:
        return outcome
    already_stored = set(conflicting)
    stored = {h: v for h, v in candidates.items() if h not in already_stored}
    if conflicting:
        # A new statement sees rows another instance committed while our
        # INSERT waited on them (READ COMMITTED takes a snapshot per statement).
        cur.execute(_SELECT_STORED, (conflicting,))
        for vote_hash, citizen_id, law_id, choice, timestamp in cur.fetchall():
            stored[vote_hash] = Vote(vote_hash, citizen_id, law_id, choice, timestamp)
        if len(stored) != len(candidates):
            raise TransactionConflict("a conflicting vote_hash vanished; retrying the batch")

    attempts: dict[tuple[str, str, str, str, Any], Vote] = {}
    for vote in [candidates[h] for h in conflicting] + copies:
        if vote.same_content(stored[vote.vote_hash]) or _row(vote) in attempts:
            outcome.redeliveries += 1
        else:
            attempts[_row(vote)] = vote

    if attempts:
        recorded = execute_values(cur, _INSERT_ATTEMPTS, sorted(attempts), page_size=PAGE_SIZE, fetch=True)
        outcome.duplicate_attempts = len(recorded)
        # An attempt already on record (a redelivered attempt) is not a new one.
        outcome.redeliveries += len(attempts) - len(recorded)
    return outcome
