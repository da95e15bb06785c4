"""The schema's version, and the migrations that bring an older database up to it.

init_db.sql is the whole schema, idempotent, and records its version in `schema_version` as its
last statement. A migration is only what running init_db.sql again cannot do (a column altered,
rows moved): `migrations/NNNN_<what>.sql` takes a database from version NNNN-1 to NNNN.
`python aggregator.py --init-db` runs, in one transaction, every migration above the database's
version in order, then init_db.sql. A version without a file needs nothing but init_db.sql
(version 2 only adds `schema_version` itself). docs/operations.md#upgrading has the procedure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The version init_db.sql brings a database to, and that this code was written for. Raise it with
# any change the code relies on, and keep init_db.sql's last INSERT in step (tests/test_schema.py).
SCHEMA_VERSION = 2
# The oldest code (by its SCHEMA_VERSION) that still counts correctly on this schema. While a
# rolling upgrade runs, the replicas not yet replaced run that code on the migrated schema.
OLDEST_CODE = 1
# A database with the service's tables and no schema_version: every release before versions.
UNVERSIONED = 1
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
HOW_TO_MIGRATE = (
    "apply the migrations with `python aggregator.py --init-db` as the schema's owner (docs/operations.md#upgrading)"
)


@dataclass(frozen=True)
class Migration:
    version: int
    path: Path


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files, in version order; a misnamed or doubled one is refused (ValueError)."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path}: a migration is named NNNN_what_it_does.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"{path}: version {version} has two migrations ({found[version].path.name})")
        found[version] = Migration(version, path)
    return [found[version] for version in sorted(found)]


@dataclass(frozen=True)
class SchemaState:
    """What a database says of its schema: version 0 when it has none at all."""

    version: int
    oldest_code: int
    # False when this session's role may not read schema_version (its grant predates the table).
    readable: bool = True

    def problem(self, code: int = SCHEMA_VERSION) -> str | None:
        """Why code written for schema `code` must not count on this database, or None."""
        if not self.readable:
            return (
                "this role may not read schema_version: apply init_db.sql and service_role.sql again as an "
                "administrator (docs/security.md#least-privilege)"
            )
        if self.version == 0:
            return f"no schema: {HOW_TO_MIGRATE}"
        if self.version < code:
            return f"schema version {self.version} is older than this code's {code}: {HOW_TO_MIGRATE}"
        if code < self.oldest_code:
            return (
                f"schema version {self.version} needs code written for version {self.oldest_code} or later, "
                f"and this code is for version {code}: upgrade this instance to the release that migrated it"
            )
        return None

    def warning(self, code: int = SCHEMA_VERSION) -> str | None:
        """A newer schema this code still runs on: an upgrade under way (or left half done)."""
        if self.version > code >= self.oldest_code:
            return (
                f"schema version {self.version} is newer than this code's {code}, which it still runs: "
                "finish the upgrade of every instance (docs/operations.md#upgrading)"
            )
        return None


def read_state(cur: Any) -> SchemaState:
    """The schema's version, read on a psycopg2 cursor (any role that may read schema_version)."""
    cur.execute(
        "SELECT to_regclass('schema_version') IS NOT NULL, to_regclass('vote_results') IS NOT NULL, "
        "CASE WHEN to_regclass('schema_version') IS NULL THEN true "
        "ELSE has_table_privilege('schema_version', 'SELECT') END"
    )
    versioned, tables, readable = cur.fetchone()
    if not versioned:
        return SchemaState(UNVERSIONED, UNVERSIONED) if tables else SchemaState(0, 0)
    if not readable:
        return SchemaState(0, 0, readable=False)
    cur.execute("SELECT version, oldest_code FROM schema_version ORDER BY version DESC LIMIT 1")
    row = cur.fetchone()
    # The table made, and the statement recording its version not reached (psql without ON_ERROR_STOP).
    return SchemaState(int(row[0]), int(row[1])) if row else SchemaState(UNVERSIONED, UNVERSIONED)
