#!/usr/bin/env python3
"""What the batch statement costs PostgreSQL per vote, schema variant against schema variant.

Run from the repository root, as root (a throwaway PostgreSQL server on a free port, with
PostgreSQL's defaults for durability, see bench/growth.py):

    .venv/bin/python bench/batch_cost.py                                  # every variant, 1 M stored
    .venv/bin/python bench/batch_cost.py --stored 200000 --batches 100 --variants today,law_choice_index

Each variant is a database of its own: init_db.sql, --stored votes generated in SQL (as
bench/growth.py loads them), then the variant's change. Rounds alternate the variants; in each,
--batches batches of --batch-size new votes (random vote hashes, as real ones are) go through
db.Database.write_batch, the service's own batch transaction, from this process. Per vote, median
over the rounds: the whole server's CPU (every process of the cluster, from /proc: the backend, the
WAL writer, the checkpointer), this process's CPU, WAL bytes (pg_current_wal_lsn) and wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import growth  # noqa: E402
from bench_settings import SCHEMA_FILE  # noqa: E402

import db  # noqa: E402
from config import load_config  # noqa: E402
from tests.pg_servers import PgServer  # noqa: E402
from votes import Vote  # noqa: E402

# What each variant changes after init_db.sql and the load.
VARIANTS: dict[str, str] = {
    "today": "",
    # The index earlier versions made, which init_db.sql now drops where it exists.
    "law_choice_index": "CREATE INDEX vote_audit_law_choice_idx ON vote_audit (law_id, choice)",
    "no_citizen_index": "DROP INDEX vote_audit_citizen_idx",
    # The key compared bytewise instead of by the database's collation (C.UTF-8 here).
    "key_collate_c": (
        'ALTER TABLE vote_audit ALTER COLUMN vote_hash TYPE varchar(64) COLLATE "C";'
        'ALTER TABLE duplicate_attempts ALTER COLUMN vote_hash TYPE varchar(64) COLLATE "C";'
        'ALTER TABLE vote_chain ALTER COLUMN vote_hashes TYPE varchar(64)[] COLLATE "C"'
    ),
    # Room on each page of the hot totals for their updates to stay on the page (HOT).
    "results_fillfactor": "ALTER TABLE vote_results SET (fillfactor = 20)",
}
WHEN = datetime(2025, 11, 14, 7, 0, tzinfo=UTC)


def make_batch(rng: random.Random, first: int, size: int, laws: int) -> list[Vote]:
    votes = []
    for i in range(first, first + size):
        citizen = f"citizen-{rng.randrange(10**9):09d}-{i}"
        law = f"law-{rng.randrange(laws) + 1:03d}"
        votes.append(
            Vote(
                hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(),
                citizen,
                law,
                rng.choice(("oui", "non")),
                WHEN + timedelta(milliseconds=rng.randrange(12 * 3600 * 1000)),
            )
        )
    return votes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stored", type=int, default=1_000_000, help="votes stored before the timed batches (1000000)")
    p.add_argument("--batches", type=int, default=150, help="batches per variant per round (150)")
    p.add_argument("--batch-size", type=int, default=200, help="votes per batch (200, BATCH_SIZE's default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--laws", type=int, default=50)
    p.add_argument("--variants", type=lambda raw: raw.split(","), default=list(VARIANTS))
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE", help="server setting, repeatable")
    a = p.parse_args(argv)
    settings = dict(growth.DURABLE)
    settings.update(item.split("=", 1) for item in a.setting)
    server = PgServer(settings=settings).start()
    rng = random.Random(7)
    results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in a.variants}
    stores: dict[str, db.Database] = {}
    try:
        for i, variant in enumerate(a.variants):
            name = f"v{i}"
            conn = server.connect()
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            conn.close()
            server.execute(SCHEMA_FILE.read_text(encoding="utf-8"), dbname=name)
            growth.fill(server, name, a.stored, laws=a.laws)
            if VARIANTS[variant]:
                server.execute(VARIANTS[variant], dbname=name)
            server.execute("VACUUM ANALYZE", dbname=name)
            env = {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(server.port), "POSTGRES_USER": "postgres"}
            stores[variant] = db.Database(config=load_config({**env, "POSTGRES_DB": name}))
            stores[variant].open()
            stores[variant].write_batch(make_batch(rng, 0, a.batch_size, a.laws))  # connection and caches warm
        server.execute("CHECKPOINT")
        print(f"loaded {len(a.variants)} databases of {a.stored:,} votes", flush=True)
        first = a.batch_size
        for r in range(a.rounds):
            order = a.variants if r % 2 == 0 else list(reversed(a.variants))
            for variant in order:
                batches = [make_batch(rng, first + k * a.batch_size, a.batch_size, a.laws) for k in range(a.batches)]
                first += a.batches * a.batch_size
                wal0 = int(server.execute("SELECT pg_current_wal_lsn() - '0/0'")[0][0])
                pg0, me0, t0 = growth.cluster_cpu_seconds(server), time.process_time(), time.perf_counter()
                for votes in batches:
                    stores[variant].write_batch(votes)
                pg1, me1, t1 = growth.cluster_cpu_seconds(server), time.process_time(), time.perf_counter()
                wal1 = int(server.execute("SELECT pg_current_wal_lsn() - '0/0'")[0][0])
                n = a.batches * a.batch_size
                row = (1e6 * (pg1 - pg0) / n, 1e6 * (me1 - me0) / n, (wal1 - wal0) / n, 1e6 * (t1 - t0) / n)
                results[variant].append(row)
                print(
                    f"  round {r + 1} {variant:20} PostgreSQL {row[0]:6.1f} us/vote, client {row[1]:5.1f} us/vote, "
                    f"WAL {row[2]:6.0f} B/vote, wall {row[3]:6.1f} us/vote",
                    flush=True,
                )
        print(
            f"\nbatch cost: {a.stored:,} stored, {a.batches} x {a.batch_size} new votes per variant per round, "
            f"median of {a.rounds} rounds; {datetime.now(UTC):%Y-%m-%d} UTC, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print(f"{'variant':20} {'PostgreSQL':>10} {'client':>7} {'WAL':>7} {'wall':>7}")
        print(f"{'':20} {'us/vote':>10} {'us/vote':>7} {'B/vote':>7} {'us/vote':>7}")
        for variant, rows in results.items():
            med = [statistics.median(col) for col in zip(*rows, strict=True)]
            print(f"{variant:20} {med[0]:10.1f} {med[1]:7.1f} {med[2]:7.0f} {med[3]:7.1f}")
    finally:
        for store in stores.values():
            store.close()
        server.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
