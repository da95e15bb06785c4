#!/usr/bin/env python3
"""The least PostgreSQL can spend on a counted vote, against what the service's batch spends.

Run from the repository root, as root (a throwaway PostgreSQL server on a free port, with
PostgreSQL's defaults for durability, as bench/growth.py starts it):

    .venv/bin/python bench/pg_floor.py                              # empty databases, 5 rounds
    .venv/bin/python bench/pg_floor.py --stored 0,8000000 --rounds 3  # and each rung on 8 M stored votes

Each rung is a database of its own (one per --stored size) and one transaction per batch of --batch-size new votes
(random vote hashes, as real ones are), committed with synchronous_commit on:

- key: only what exactly-once needs, a table of vote hashes (the `varchar(64)` primary key) and
  INSERT ... ON CONFLICT DO NOTHING of the batch's hashes, sent as one array;
- row_totals: the seed's `vote_audit` row (its primary key only) and the per-law totals
  (`vote_results`) raised by what was inserted, in one statement: a count with no audit trail
  beyond the row itself;
- row_totals_citizen: the same with the `citizen_id` index of init_db.sql;
- service: db.Database.write_batch on init_db.sql, the service's own transaction (the rows, the
  totals, the duplicates, the hash chain's link and the check of what was stored).

Rounds alternate the databases' order. Per vote, median over the rounds: the whole server's CPU (every
process of the cluster, from /proc: backends, WAL writer, checkpointer), this process's CPU and the
WAL written. The rungs below `service` keep fewer guarantees: they are a floor to measure the
service against, never a way to count.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import growth  # noqa: E402
from batch_cost import make_batch  # noqa: E402
from bench_settings import SCHEMA_FILE  # noqa: E402

import db  # noqa: E402
from config import load_config  # noqa: E402
from tests.pg_servers import PgServer  # noqa: E402
from votes import Vote  # noqa: E402

_KEY_SCHEMA = "CREATE TABLE floor_key (vote_hash varchar(64) PRIMARY KEY)"
_KEY_INSERT = "INSERT INTO floor_key SELECT unnest(%s::varchar(64)[]) ON CONFLICT DO NOTHING"
_ROW_SCHEMA = """
CREATE TABLE vote_results (
    law_id     varchar(50) PRIMARY KEY,
    oui_count  bigint      NOT NULL DEFAULT 0,
    non_count  bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE vote_audit (
    vote_hash   varchar(64)  PRIMARY KEY,
    citizen_id  varchar(100) NOT NULL CHECK (citizen_id <> ''),
    law_id      varchar(50)  NOT NULL CHECK (law_id <> ''),
    choice      varchar(3)   NOT NULL CHECK (choice IN ('oui', 'non')),
    "timestamp" timestamptz  NOT NULL,
    recorded_at timestamptz  NOT NULL DEFAULT now()
);
"""
_ROW_INSERT = """
WITH new AS (
    INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp")
    SELECT * FROM unnest(%s::varchar(64)[], %s::varchar(100)[], %s::varchar(50)[], %s::varchar(3)[],
                         %s::timestamptz[])
    ON CONFLICT DO NOTHING
    RETURNING law_id, choice
)
INSERT INTO vote_results AS r (law_id, oui_count, non_count)
SELECT law_id, count(*) FILTER (WHERE choice = 'oui'), count(*) FILTER (WHERE choice = 'non')
FROM new GROUP BY law_id
ON CONFLICT (law_id) DO UPDATE
SET oui_count = r.oui_count + excluded.oui_count, non_count = r.non_count + excluded.non_count,
    updated_at = now()
"""
_CITIZEN_INDEX = "CREATE INDEX vote_audit_citizen_idx ON vote_audit (citizen_id)"
_ROW_FILL = """
INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp")
SELECT encode(sha256(convert_to('filler:' || i, 'UTF8')), 'hex'), 'filler-' || lpad(i::text, 9, '0'),
       'law-' || lpad((i %% %(laws)s + 1)::text, 3, '0'), CASE WHEN i %% 2 = 0 THEN 'oui' ELSE 'non' END,
       now()
FROM generate_series(1, %(n)s) AS i
"""
_KEY_FILL = """
INSERT INTO floor_key SELECT encode(sha256(convert_to('filler:' || i, 'UTF8')), 'hex')
FROM generate_series(1, %(n)s) AS i
"""

RUNGS = ("key", "row_totals", "row_totals_citizen", "service")


class Rung:
    """One database and how a batch is written to it."""

    def __init__(self, server: PgServer, name: str, rung: str, *, stored: int, laws: int) -> None:
        self.rung = rung
        conn = server.connect()
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        conn.close()
        self.store: db.Database | None = None
        self.conn: Any = None
        if rung == "service":
            server.execute(SCHEMA_FILE.read_text(encoding="utf-8"), dbname=name)
            if stored:
                growth.fill(server, name, stored, laws=laws)
            env = {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(server.port), "POSTGRES_USER": "postgres"}
            self.store = db.Database(config=load_config({**env, "POSTGRES_DB": name}))
            self.store.open()
            self.write: Callable[[list[Vote]], None] = self._service
            return
        if rung == "key":
            server.execute(_KEY_SCHEMA, dbname=name)
            fill = _KEY_FILL
            self.write = self._key
        else:
            server.execute(_ROW_SCHEMA, dbname=name)
            fill = _ROW_FILL
            self.write = self._row
        if stored:
            conn = server.connect(name)
            with conn.cursor() as cur:
                cur.execute(fill, {"n": stored, "laws": laws})
            conn.close()
        if rung == "row_totals_citizen":
            server.execute(_CITIZEN_INDEX, dbname=name)
        server.execute("VACUUM ANALYZE", dbname=name)
        self.conn = server.connect(name)
        self.conn.autocommit = False

    def _service(self, votes: list[Vote]) -> None:
        assert self.store is not None
        self.store.write_batch(votes)

    def _key(self, votes: list[Vote]) -> None:
        with self.conn.cursor() as cur:
            cur.execute(_KEY_INSERT, ([v.vote_hash for v in votes],))
        self.conn.commit()

    def _row(self, votes: list[Vote]) -> None:
        with self.conn.cursor() as cur:
            cur.execute(
                _ROW_INSERT,
                (
                    [v.vote_hash for v in votes],
                    [v.citizen_id for v in votes],
                    [v.law_id for v in votes],
                    [v.choice for v in votes],
                    [v.timestamp for v in votes],
                ),
            )
        self.conn.commit()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.conn is not None:
            self.conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--stored",
        type=lambda raw: [int(n) for n in raw.split(",")],
        default=[0],
        help="votes stored in each database first; several sizes, comma-separated, are compared (0)",
    )
    p.add_argument("--batches", type=int, default=150, help="batches per rung per round (150)")
    p.add_argument("--batch-size", type=int, default=200, help="votes per batch (200, BATCH_SIZE's default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--laws", type=int, default=50)
    p.add_argument("--rungs", type=lambda raw: raw.split(","), default=list(RUNGS))
    a = p.parse_args(argv)
    unknown = set(a.rungs) - set(RUNGS)
    if unknown:
        p.error(f"unknown rung(s): {', '.join(sorted(unknown))}")
    server = PgServer(settings=dict(growth.DURABLE)).start()
    rng = random.Random(11)
    keys = [(rung, stored) for stored in a.stored for rung in a.rungs]
    rungs: dict[tuple[str, int], Rung] = {}
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {k: [] for k in keys}
    try:
        for i, (rung, stored) in enumerate(keys):
            rungs[rung, stored] = Rung(server, f"floor{i}", rung, stored=stored, laws=a.laws)
            rungs[rung, stored].write(make_batch(rng, 10**9 + i * a.batch_size, a.batch_size, a.laws))  # warm
            print(f"  {rung} on {stored:,} stored votes ready", flush=True)
        server.execute("CHECKPOINT")
        first = 0
        for r in range(a.rounds):
            for key in keys if r % 2 == 0 else list(reversed(keys)):
                rung, stored = key
                batches = [make_batch(rng, first + k * a.batch_size, a.batch_size, a.laws) for k in range(a.batches)]
                first += a.batches * a.batch_size
                wal0 = int(server.execute("SELECT pg_current_wal_lsn() - '0/0'")[0][0])
                pg0, me0 = growth.cluster_cpu_seconds(server), time.process_time()
                for votes in batches:
                    rungs[key].write(votes)
                pg1, me1 = growth.cluster_cpu_seconds(server), time.process_time()
                wal1 = int(server.execute("SELECT pg_current_wal_lsn() - '0/0'")[0][0])
                n = a.batches * a.batch_size
                row = (1e6 * (pg1 - pg0) / n, 1e6 * (me1 - me0) / n, (wal1 - wal0) / n)
                results[key].append(row)
                print(
                    f"  round {r + 1} {rung:20} {stored:>10,} stored: PostgreSQL {row[0]:6.1f} us/vote, "
                    f"client {row[1]:5.1f} us/vote, WAL {row[2]:6.0f} B/vote",
                    flush=True,
                )
        print(
            f"\nPostgreSQL floor: {a.batches} x {a.batch_size} new votes per rung per round, "
            f"median of {a.rounds} rounds; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print(f"{'rung':20} {'stored':>10} {'PostgreSQL':>10} {'(range)':>13} {'client':>7} {'WAL':>7}")
        print(f"{'':20} {'':>10} {'us/vote':>10} {'':>13} {'us/vote':>7} {'B/vote':>7}")
        medians: dict[tuple[str, int], float] = {}
        for (rung, stored), rows in results.items():
            pg = [row[0] for row in rows]
            med = [statistics.median(col) for col in zip(*rows, strict=True)]
            medians[rung, stored] = med[0]
            span = f"{min(pg):.1f}-{max(pg):.1f}"
            print(f"{rung:20} {stored:>10,} {med[0]:10.1f} {span:>13} {med[1]:7.1f} {med[2]:7.0f}")
        smallest, largest = min(a.stored), max(a.stored)
        if smallest != largest:
            for rung in a.rungs:
                growth_pct = 100 * (medians[rung, largest] / medians[rung, smallest] - 1)
                print(f"{rung:20} PostgreSQL CPU per vote at {largest:,} stored vs {smallest:,}: {growth_pct:+.0f} %")
    finally:
        for db_rung in rungs.values():
            db_rung.close()
        server.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
