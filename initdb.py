"""`--init-db`: create the database if missing and bring its schema to this version (migrations, then init_db.sql)."""

from __future__ import annotations

import db
import exits
from config import Config
from schema import SCHEMA_VERSION


def init_db(config: Config) -> int:
    if db.create_database(config):
        print(f"created database {config.postgres_db}")
    database = db.Database(config=config)
    database.open()
    try:
        found, applied = database.apply_schema()
    finally:
        database.close()
    was = f"was {found}" if found else "a new schema"
    steps = f"; migrations applied: {', '.join(applied)}" if applied else ""
    print(f"schema applied to {config.postgres_target_for_logs()}: version {SCHEMA_VERSION} ({was}){steps}")
    return exits.OK
