"""The service's least-privilege PostgreSQL role, made for a test database by service_role.sql.

Roles are cluster-wide: each test gets a role of its own (its name passed to the scripts in the
`vote_aggregator.service_role` setting, as an operator may), removed afterwards with whatever
was granted to it.
"""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
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


def apply_scripts(dbname: str, role: str | None = None) -> None:
    """init_db.sql, then service_role.sql for `role`, as an administrator would with psql."""
    conn = pg_connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(INIT_DB.read_text())
            if role is not None:
                cur.execute("SET vote_aggregator.service_role = %s", (role,))
                cur.execute(SERVICE_ROLE.read_text())
    finally:
        conn.close()


@contextmanager
def service_role(dbname: str) -> Iterator[ServiceRole]:
    """A login role with exactly the service's rights on `dbname` (whose schema is applied first)."""
    role = ServiceRole(name=f"agg_test_svc_{uuid.uuid4().hex[:12]}", password=secrets.token_hex(16))
    admin = pg_connect("postgres")
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role.name)), (role.password,))
        apply_scripts(dbname, role.name)
        yield role
    finally:
        drop_role(role.name, dbname)
        admin.close()


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
