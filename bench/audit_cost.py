#!/usr/bin/env python3
"""What tamper evidence costs, and how long `aggregator.py verify` takes on a large database.

Run from the repository root against the local PostgreSQL (POSTGRES_HOST, POSTGRES_PORT,
POSTGRES_USER, POSTGRES_PASSWORD; defaults localhost:5432, postgres):

    .venv/bin/python bench/audit_cost.py                        # both phases
    .venv/bin/python bench/audit_cost.py --phases chain --batches 300
    .venv/bin/python bench/audit_cost.py --phases verify --votes 1000000

- chain:  the batch statement with its hash-chain link (db.py) against the same statement
          without it (the one before hash chains, kept here only for this comparison), on
          batches of --batch-size new votes, alternating rounds on two fresh databases.
- verify: --votes votes written through db.Database.write_batch, then `python aggregator.py
          verify` timed on them.

Databases are created for the run and dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import db  # noqa: E402
from config import Config, load_config  # noqa: E402
from votes import Vote  # noqa: E402

# The batch statement as it was before hash chains (commit d8373b0), for the comparison only.
_UNCHAINED = """
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

WHEN = datetime(2025, 11, 14, 12, 0, tzinfo=UTC)


def config_for(dbname: str) -> Config:
    env = {k: v for k, v in os.environ.items() if k.startswith("POSTGRES_")}
    return load_config({**env, "POSTGRES_DB": dbname})


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    admin = psycopg2.connect(**db.connect_kwargs(config_for("postgres"), dbname="postgres"))
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        store = db.Database(config=config_for(name))
        store.open()
        store.apply_schema()
        store.close()
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def batch(first: int, size: int, *, laws: int = 50) -> list[Vote]:
    return [
        Vote(f"{i:064x}", f"citizen-{i}", f"law-{i % laws:03d}", ("oui", "non")[i % 2], WHEN)
        for i in range(first, first + size)
    ]


def chained_writer(dbname: str) -> tuple[Callable[[list[Vote]], None], Callable[[], None]]:
    store = db.Database(config=config_for(dbname))
    store.open()

    def write(votes: list[Vote]) -> None:
        store.write_batch(votes, chain="bench")

    return write, store.close


def unchained_writer(dbname: str) -> tuple[Callable[[list[Vote]], None], Callable[[], None]]:
    conn = psycopg2.connect(**db.connect_kwargs(config_for(dbname)))

    def write(votes: list[Vote]) -> None:
        with conn.cursor() as cur:
            columns = ([v.vote_hash for v in votes], [v.citizen_id for v in votes], [v.law_id for v in votes],
                       [v.choice for v in votes], [v.timestamp for v in votes])  # fmt: skip
            cur.execute(_UNCHAINED, columns)
            cur.fetchall()
        conn.commit()

    return write, conn.close


def phase_chain(args: argparse.Namespace) -> None:
    timings: dict[str, list[float]] = {"with the chain": [], "without": []}
    with scratch_database("bench_chain") as chained_db, scratch_database("bench_plain") as plain_db:
        writers = {"with the chain": chained_writer(chained_db), "without": unchained_writer(plain_db)}
        rounds, per_round = args.rounds, max(args.batches // args.rounds, 1)
        for r in range(rounds):
            for name, (write, _close) in writers.items():
                for b in range(per_round):
                    votes = batch((r * per_round + b) * args.batch_size, args.batch_size)
                    started = time.perf_counter()
                    write(votes)
                    timings[name].append(time.perf_counter() - started)
        for _write, close in writers.values():
            close()
    print(
        f"chain: {rounds * per_round} batches of {args.batch_size} new votes per variant, {rounds} alternating rounds"
    )
    print(f"{'variant':16} {'median ms':>10} {'mean ms':>9} {'p95 ms':>8} {'µs/vote':>8}")
    for name, values in timings.items():
        median, mean = statistics.median(values), statistics.fmean(values)
        p95 = statistics.quantiles(values, n=20)[-1]
        print(
            f"{name:16} {median * 1e3:10.2f} {mean * 1e3:9.2f} {p95 * 1e3:8.2f} {median * 1e6 / args.batch_size:8.1f}"
        )
    extra = statistics.median(timings["with the chain"]) / statistics.median(timings["without"]) - 1
    print(f"the chain adds {extra:+.1%} to the median batch write")


def phase_verify(args: argparse.Namespace) -> None:
    with scratch_database("bench_verify") as dbname:
        write, close = chained_writer(dbname)
        started = time.perf_counter()
        for first in range(0, args.votes, args.batch_size):
            write(batch(first, min(args.batch_size, args.votes - first)))
        close()
        print(f"verify: wrote {args.votes:,} votes in {time.perf_counter() - started:.1f}s")
        env = {**os.environ, "POSTGRES_DB": dbname}
        command = [sys.executable, str(ROOT / "aggregator.py"), "verify"]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        elapsed = time.perf_counter() - started
        print(done.stdout.splitlines()[-1] if done.stdout else done.stderr)
        print(f"verify: exit {done.returncode} in {elapsed:.2f}s ({args.votes:,} votes)")
        conn = psycopg2.connect(**db.connect_kwargs(config_for(dbname)))
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_size_pretty(pg_total_relation_size('vote_audit')), "
                    "pg_size_pretty(pg_total_relation_size('vote_chain'))"
                )
                audit, chain = cur.fetchone() or ("?", "?")
        finally:
            conn.close()
        print(f"verify: vote_audit {audit} with its indexes, vote_chain {chain}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="chain,verify")
    parser.add_argument("--batches", type=int, default=500, help="batches per variant (chain)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (chain)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--votes", type=int, default=1_000_000, help="votes in the database (verify)")
    args = parser.parse_args(argv)
    print(f"bench: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores")
    for phase in args.phases.split(","):
        {"chain": phase_chain, "verify": phase_verify}[phase](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
