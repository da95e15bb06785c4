"""Connecting to PostgreSQL: the session settings, the watchdog that cuts a silent server off,
and creating the database (`--init-db`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from config import Config
from dberrors import DatabaseConfigError, DatabaseError, DatabaseMissing
from dberrors import classify_connect_error as _classify

logger = logging.getLogger(__name__)


def classify_connect_error(
    exc: psycopg2.OperationalError, config: Config, *, dbname: str | None = None
) -> DatabaseError:
    """What a failed connection means (dberrors.classify_connect_error), probing with the same settings."""
    dbname = dbname or config.postgres_db
    return _classify(exc, config, dbname=dbname, probe=connect_kwargs(config, dbname=dbname))


def _session_options(config: Config) -> str:
    """Server settings for every session, sent at connection time (libpq `options`)."""
    statement_ms = int(config.postgres_query_timeout_s * 1000)
    idle_ms = int(config.postgres_idle_in_transaction_timeout_s * 1000)
    settings: dict[str, object] = {
        # Timestamps are read back exactly as written whatever the database's or
        # role's timezone: west of UTC, 0001-01-01T00:00:00Z would come back as a
        # BC date that Python cannot represent.
        "TimeZone": "UTC",
        # The server aborts a statement that runs too long; a server or network
        # that stops answering altogether is the watchdog's job (see Watchdog).
        "statement_timeout": statement_ms,
        # A lock wait ends a little earlier, as 55P03, so contention is told apart
        # from a slow server (57014): a conflict, retried on the same connection.
        "lock_timeout": max(statement_ms - 1000, statement_ms * 9 // 10),
        # The service's own transactions never sit idle (one statement, then
        # commit), so only a frozen, dead or cut-off instance reaches this: the
        # server ends its session and releases its row locks on vote_results,
        # instead of holding them until TCP gives up (hours).
        "idle_in_transaction_session_timeout": idle_ms,
        # The server's side of the keepalives below: a vanished client's session
        # (and its connection slot) goes within about 30 s even when idle, or
        # when the server is blocked sending to it.
        "tcp_keepalives_idle": 15,
        "tcp_keepalives_interval": 5,
        "tcp_keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    if config.postgres_require_sync_standby:
        # Acked means on two servers: no role, database or server default of local or off
        # (libpq options win over them) lets a commit skip the standby. "on" waits until the
        # standby has flushed it; remote_apply would also wait for its replay, which a
        # failover to it does not need.
        settings["synchronous_commit"] = "on"
    return " ".join(f"-c {name}={value}" for name, value in settings.items())


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
        "port": config.postgres_libpq_port,
        # With several hosts libpq tries each in turn and keeps the first that accepts
        # writes: the primary, wherever a failover has put it. With one host, a standby
        # is refused the same way, and retried, rather than failing every batch.
        "target_session_attrs": "read-write",
        "dbname": dbname or config.postgres_db,
        "user": config.postgres_user,
        "password": config.postgres_password,
        "connect_timeout": config.postgres_connect_timeout_s,
        "application_name": "vote-aggregator",
        "options": _session_options(config),
        # Notice a dead peer within about a minute instead of the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": 15,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }


def create_database(config: Config) -> bool:
    """Create the configured database if it is missing. True when it was created.

    The database itself is tried first: a role that may use it but not create
    databases, or see the maintenance database, still gets "already there".
    """
    try:
        psycopg2.connect(**connect_kwargs(config)).close()
        return False
    except psycopg2.OperationalError as exc:
        error = classify_connect_error(exc, config)
        if not isinstance(error, DatabaseMissing):
            raise error from None
    conn = _maintenance_connection(config)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(config.postgres_db)))
            except psycopg2.errors.DuplicateDatabase:
                return False  # another instance created it meanwhile
            except psycopg2.errors.InsufficientPrivilege:
                raise DatabaseConfigError(
                    f'database "{config.postgres_db}" does not exist and role "{config.postgres_user}" may not '
                    f"create it (no CREATEDB): have an administrator run: createdb -O {config.postgres_user} "
                    f"{config.postgres_db}"
                ) from None
            return True
    finally:
        conn.close()


def _maintenance_connection(config: Config) -> psycopg2.extensions.connection:
    """A connection to `postgres`, or to `template1` where `postgres` was dropped."""
    conn: psycopg2.extensions.connection
    try:
        conn = psycopg2.connect(**connect_kwargs(config, dbname="postgres"))
        return conn
    except psycopg2.OperationalError as exc:
        first = exc
    try:
        conn = psycopg2.connect(**connect_kwargs(config, dbname="template1"))
        return conn
    except psycopg2.OperationalError:
        raise classify_connect_error(first, config, dbname="postgres") from None


class Watchdog:
    """Breaks connections whose transaction overran its deadline (or all of them, at shutdown).

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

    def break_all(self) -> None:
        """Break every connection in a transaction now (shutdown)."""
        with self._lock:
            # Under the lock, as in _loop: a connection is unwatched before it is
            # closed, so no descriptor broken here can have been reused.
            for conn, _deadline in self._deadlines.values():
                _break(conn)

    def _loop(self) -> None:
        while True:
            time.sleep(min(1.0, self._timeout_s / 4))
            now = time.monotonic()
            with self._lock:
                overdue = [conn for conn, deadline in self._deadlines.values() if deadline <= now]
                for conn in overdue:
                    del self._deadlines[id(conn)]
                    logger.warning("PostgreSQL did not answer within %.0fs; dropping the connection", self._timeout_s)
                    # Under the lock: unwatch() comes before the connection is
                    # closed, so its descriptor cannot have been reused meanwhile.
                    _break(conn)


def _break(conn: psycopg2.extensions.connection) -> None:
    """Make every call blocked on `conn`, and every later one, fail at once."""
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


class PooledConnection(psycopg2.extensions.connection):
    """A pooled connection that remembers the pool's generation when it was opened (Database._checkout)."""

    def __init__(self, dsn: str, *args: Any, generation: int = 0, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.generation = generation
