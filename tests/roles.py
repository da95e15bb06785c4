"""The service's least-privilege PostgreSQL role, made for a test database by service_role.sql.

Roles are cluster-wide: each test gets a role of its own (its name passed to the scripts in the
`vote_aggregator.service_role` setting, as an operator may). On the shared server it is removed
afterwards with whatever was granted to it; on a throwaway server (a primary and its standby, a
Patroni cluster) it goes with the server.
"""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from tests.support import ROOT, pg_connect

INIT_DB = ROOT / "init_db.sql"
SERVICE_ROLE = ROOT / "service_role.sql"


@dataclass(frozen=True)
class ServiceRole:
    name: str
    password: str

    def env(self) -> dict[str, str]:
        """The service's settings to connect as this role."""
        return {"POSTGRES_USER": self.name, "POSTGRES_PASSWORD": self.password}


class Server(Protocol):
    """A throwaway server, as an administrator reaches it (tests.pg_servers.PgServer, a Patroni member)."""

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg2.extensions.connection: ...


def _admin(dbname: str, server: Server | None) -> psycopg2.extensions.connection:
    return pg_connect(dbname) if server is None else server.connect(dbname)


def apply_scripts(dbname: str, role: str | None = None, *, server: Server | None = None) -> None:
    """init_db.sql, then service_role.sql for `role`, as an administrator would with psql (on the
    shared server, or on `server`)."""
    conn = _admin(dbname, server)
    try:
        with conn.cursor() as cur:
            cur.execute(INIT_DB.read_text())
            if role is not None:
                cur.execute("SET vote_aggregator.service_role = %s", (role,))
                cur.execute(SERVICE_ROLE.read_text())
    finally:
        conn.close()


def create_service_role(dbname: str, *, server: Server | None = None) -> ServiceRole:
    """A new login role with exactly the service's rights on `dbname`, its schema applied first by
    an administrator (on the shared server, or on `server`)."""
    role = ServiceRole(name=f"agg_test_svc_{uuid.uuid4().hex[:12]}", password=secrets.token_hex(16))
    admin = _admin("postgres", server)
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role.name)), (role.password,))
    finally:
        admin.close()
    try:
        apply_scripts(dbname, role.name, server=server)
    except BaseException:
        if server is None:
            drop_role(role.name, dbname)
        raise
    return role


@contextmanager
def service_role(dbname: str) -> Iterator[ServiceRole]:
    """The service's role on the shared server's `dbname`, dropped afterwards."""
    role = create_service_role(dbname)
    try:
        yield role
    finally:
        drop_role(role.name, dbname)


def drop_role(name: str, dbname: str) -> None:
    """End the role's sessions, revoke what it was granted in `dbname` (and on the database), drop it."""
    with contextlib.suppress(psycopg2.OperationalError):  # the database may be gone already
        conn = pg_connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
                cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        finally:
            conn.close()
    admin = pg_connect("postgres")
    try:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(dbname), sql.Identifier(name))
            )
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    finally:
        admin.close()
