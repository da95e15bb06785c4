"""psycopg2's exceptions translated at the edge: what a failure means for the service.

Callers see:
- RetryableError (DatabaseUnavailable, TransactionConflict): may succeed later;
- DatabaseRejected: the data of one or more votes was refused; retrying the
  same batch would fail the same way;
- DatabaseMissing / DatabaseConfigError: the service cannot run as configured.
Connection failures are classified by SQLSTATE, which libpq gives only to a second,
verbose attempt (`classify_connect_error`); failed statements by their pgcode (`translate`).
"""

from __future__ import annotations

import ctypes
import functools
import re
import select
import time
from collections.abc import Callable
from typing import Any, cast

import psycopg2
import psycopg2._psycopg
import psycopg2.extensions

from config import Config, node_text


class DatabaseError(Exception):
    """Base of every error this module raises."""


class RetryableError(DatabaseError):
    """The same transaction may succeed if tried again later."""


class DatabaseUnavailable(RetryableError):
    """PostgreSQL could not be reached, or the connection broke."""


class NotReplicated(RetryableError):
    """POSTGRES_REQUIRE_SYNC_STANDBY: the batch committed on the primary, but no synchronous standby
    is known to have it (no standby required, or the commit's wait for one was cancelled). It is
    not acked: the whole batch is tried again, which then proves it by the standbys' flush position.

    `outcome` is what the commit did (db.BatchOutcome), for the metrics: the retry finds the
    votes already stored.
    """

    def __init__(self, message: str, *, outcome: object = None) -> None:
        super().__init__(message)
        self.outcome = outcome


class TransactionConflict(RetryableError):
    """Deadlock, serialization failure or lock wait timeout: the whole transaction
    is retried. PostgreSQL itself is fine (the connection is kept)."""


class DatabaseRejected(DatabaseError):
    """PostgreSQL refused the data itself (constraint, type, length)."""


class DatabaseMissing(DatabaseError):
    """The configured database does not exist."""


class DatabaseConfigError(DatabaseError):
    """We cannot connect as configured and retrying cannot help (authentication,
    role, pg_hba.conf, permissions, TLS files or certificate)."""


# SQLSTATEs of connection failures that retrying can never fix: the service
# cannot run as configured until someone changes the configuration or the server.
# Everything else a server answers while we connect (57P03 starting up, shutting
# down, standby not accepting connections; 53300 too many connections; ...) is
# retried. 28000 also covers an LDAP or RADIUS server behind PostgreSQL being down:
# PostgreSQL reports it as the same failed authentication.
_CONFIG_SQLSTATES = {
    "28P01": "authentication failed",
    "28000": "not authorized (pg_hba.conf, missing role, login not permitted)",
    "42501": "no permission to connect to the database",
}
_MISSING_DATABASE = "3D000"
# libpq's failures of its own, before or instead of any server answer: the
# client's TLS files, the server's certificate, a missing password. English
# unless libpq's own translations are installed and in use; a translated one
# is retried, the safe side.
_CLIENT_CONFIG_PHRASES = (
    "certificate verify failed",
    "does not match host name",
    "certificate file",
    "private key file",
    "no password supplied",  # the server wants a password and POSTGRES_PASSWORD is empty
)
# The same certainties in English server messages, for when no SQLSTATE can be had.
_CONFIG_PHRASES = (
    "password authentication failed",
    "authentication failed for user",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects connection",
    "is not permitted to log in",
    "permission denied for database",
)
_ROLE_MISSING = re.compile(r'role ".*" does not exist')
_DATABASE_MISSING = re.compile(r'database ".*" does not exist')
# A server error in a libpq message: "<severity>:  <text>", two spaces after the
# severity (translated by the server), so it is found in any language.
_SERVER_ANSWER = re.compile(r"\S:  \S")
# With PQERRORS_VERBOSE the SQLSTATE follows the severity: "FATAL:  28P01: ...".
_VERBOSE_SQLSTATE = re.compile(r"\S:  ([0-9A-Z]{5}): ")
_PQERRORS_VERBOSE = 2


def classify_connect_error(
    exc: psycopg2.OperationalError, config: Config, *, dbname: str, probe: dict[str, Any]
) -> DatabaseError:
    """DatabaseMissing / DatabaseConfigError only when retrying can never help; otherwise DatabaseUnavailable.

    `probe` are the connection's settings, for one more attempt that asks for the SQLSTATE.
    """
    message = str(exc).strip()
    first = first_line(message)
    if any(phrase in message for phrase in _CLIENT_CONFIG_PHRASES):
        return DatabaseConfigError(f"PostgreSQL refused {config.postgres_target_for_logs()}: {first}")
    # libpq reports connection failures without an SQLSTATE (psycopg2's pgcode is
    # None), in the server's language: ask the server again, verbosely.
    codes = _connect_sqlstates(probe, config) if _SERVER_ANSWER.search(message) else None
    if codes is None:
        return _classify_by_text(message, config, dbname=dbname)
    if codes and all(code == _MISSING_DATABASE for code in codes):
        return _database_missing(config, dbname, first)
    if codes and all(code in _CONFIG_SQLSTATES or code == _MISSING_DATABASE for code in codes):
        # The meaning in English too: the server's text may be in any language.
        meaning = _CONFIG_SQLSTATES.get(codes[0], "database does not exist")
        return DatabaseConfigError(
            f"PostgreSQL refused {config.postgres_target_for_logs()}: {first} (SQLSTATE {codes[0]}: {meaning})"
        )
    # A code we do not know for certain, or the server let the second attempt in.
    suffix = f" (SQLSTATE {', '.join(codes)})" if codes else ""
    return DatabaseUnavailable(f"cannot reach PostgreSQL at {config.postgres_target_for_logs()}: {first}{suffix}")


def _classify_by_text(message: str, config: Config, *, dbname: str) -> DatabaseError:
    """The fallback without SQLSTATE: English phrases that are certain; anything else is retried."""
    first = first_line(message)
    if _DATABASE_MISSING.search(message):
        return _database_missing(config, dbname, first)
    if any(phrase in message for phrase in _CONFIG_PHRASES) or _ROLE_MISSING.search(message):
        return DatabaseConfigError(f"PostgreSQL refused {config.postgres_target_for_logs()}: {first}")
    return DatabaseUnavailable(f"cannot reach PostgreSQL at {config.postgres_target_for_logs()}: {first}")


def _database_missing(config: Config, dbname: str, first: str) -> DatabaseError:
    if dbname != config.postgres_db:  # a maintenance database (create_database), not ours
        return DatabaseConfigError(f"PostgreSQL refused {config.postgres_target_for_logs()}: {first}")
    servers = ",".join(node_text(host, port) for host, port in config.postgres_servers)
    return DatabaseMissing(
        f'database "{config.postgres_db}" does not exist on {servers}; '
        f"create it with: createdb -h {config.postgres_host} -p {config.postgres_libpq_port} "
        f"-U {config.postgres_user} {config.postgres_db}   (or: python aggregator.py --init-db)"
    )


def _connect_sqlstates(kwargs: dict[str, Any], config: Config) -> list[str] | None:
    """The SQLSTATEs a fresh connection attempt fails with: [] if it succeeds, None if unknown.

    The attempt is made asynchronously so that libpq's error verbosity can be
    raised before the server answers; libpq then writes the SQLSTATE into the
    message ("FATAL:  28P01: ..."), whatever language the server speaks.
    """
    set_verbosity = _libpq_set_error_verbosity()
    if set_verbosity is None:
        return None
    try:
        conn = psycopg2.connect(psycopg2.extensions.make_dsn(**kwargs), async_=True)
    except (psycopg2.Error, UnicodeError):
        return None
    deadline = time.monotonic() + config.postgres_connect_timeout_s
    try:
        if conn.pgconn_ptr is None:
            return None
        set_verbosity(conn.pgconn_ptr, _PQERRORS_VERBOSE)
        while True:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return []
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if state == psycopg2.extensions.POLL_READ:
                select.select([conn.fileno()], [], [], remaining)
            else:
                select.select([], [conn.fileno()], [], remaining)
    except psycopg2.OperationalError as exc:
        return list(dict.fromkeys(_VERBOSE_SQLSTATE.findall(str(exc)))) or None  # each once (prefer tries twice)
    except (psycopg2.Error, OSError, ValueError, UnicodeError):
        return None
    finally:
        conn.close()


@functools.cache
def _libpq_set_error_verbosity() -> Callable[[int, int], int] | None:
    """PQsetErrorVerbosity of the libpq psycopg2 itself is linked with, or None.

    Looked up through psycopg2's extension module, so it is the very library that
    made the connection (psycopg2-binary bundles its own libpq).
    """
    try:
        function = ctypes.CDLL(psycopg2._psycopg.__file__).PQsetErrorVerbosity
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int], int], function)


def first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else message


# What each SQLSTATE of a failed statement means for the batch. A conflict and a
# statement timeout leave the session healthy: the transaction is rolled back
# and the connection reused.
_CONFLICTS = {
    "40P01": "deadlock",
    "40001": "serialization failure",
    "55P03": "lock wait timeout",
}
_STATEMENT_TIMEOUT = "57014"
# The server refuses writes: a primary demoted or fenced (default_transaction_read_only)
# after a failover. The new primary is elsewhere: the connection goes, the batch is
# retried on a new one, which libpq opens only on a server that accepts writes.
_READ_ONLY = "25006"
_INSUFFICIENT_PRIVILEGE = "42501"


def translate(exc: psycopg2.Error, *, lost: bool = False) -> tuple[DatabaseError, bool]:
    """This module's error for psycopg2's, and whether the connection may be kept after a rollback.

    `lost`: the connection is closed (broken at shutdown, or by the server);
    psycopg2 then raises plain DatabaseError or InterfaceError as often as OperationalError.
    """
    message = first_line(str(exc))
    if lost:
        return DatabaseUnavailable(message), False
    if exc.pgcode in _CONFLICTS:
        return TransactionConflict(f"{_CONFLICTS[exc.pgcode]}: {message}"), True
    if exc.pgcode == _READ_ONLY:
        return DatabaseUnavailable(f"the server accepts no writes: {message}"), False
    if exc.pgcode == _STATEMENT_TIMEOUT:
        # Lock waits end earlier (lock_timeout), so this is a server too slow to
        # answer in time: retried, but not a conflict.
        return DatabaseUnavailable(f"statement timeout: {message}"), True
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return DatabaseUnavailable(message), False
    if exc.pgcode == _INSUFFICIENT_PRIVILEGE:
        # A role without a right it needs (least privilege gone too far, or the
        # schema to create): retrying cannot help until someone grants it.
        return DatabaseConfigError(f"permission denied: {message}"), True
    if isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError)):
        # The primary message only: its DETAIL line quotes the failing row, citizen id and choice
        # included, which must not reach the logs or the dead-letter headers.
        return DatabaseRejected(exc.diag.message_primary or message.split(" DETAIL:")[0]), True
    return DatabaseError(message), True
