#!/usr/bin/env python3
"""What POSTGRES_REQUIRE_SYNC_STANDBY's per-commit check costs, on a real primary and synchronous standby.

Run from the repository root, as root (the throwaway servers of tests/pg_replication.py run as the
postgres user on free loopback ports, and are removed afterwards):

    .venv/bin/python bench/sync_commit.py                 # 200 batches of 200 votes, each way
    .venv/bin/python bench/sync_commit.py --batches 50 --batch-size 500

For the same primary and standby it prints the wall time of one batch through db.Database.write_batch
three ways: with the option off (the commit waits for the standby all the same, since the primary
names it in synchronous_standby_names), with it on (the normal path: one statement more in the
transaction and one after the commit), and with it on for batches of redeliveries only (written
again: no WAL, so the check reads the standbys' flush position instead). Each batch of new votes
is fresh; the runs alternate, so that a slower moment of a shared machine hits both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/sync_commit.py` puts bench/ on the path, not the repository
import db  # noqa: E402
from config import Config  # noqa: E402
from tests.pg_replication import pair  # noqa: E402
from tests.support import make_votes  # noqa: E402
from votes import Vote, parse_message  # noqa: E402

DB = "votes"


def _database(port: int, *, required: bool) -> db.Database:
    config = Config(
        postgres_host="127.0.0.1",
        postgres_port=port,
        postgres_db=DB,
        postgres_user="postgres",
        postgres_min_connections=1,
        postgres_require_sync_standby=required,
    )
    database = db.Database(config=config)
    database.open()
    return database


def _batch(size: int, seed: int) -> list[Vote]:
    return [parse_message(v.body(), max_bytes=4096).vote for v in make_votes(size, laws=10, seed=seed)]


def _ms(database: db.Database, votes: list[Vote]) -> float:
    started = time.perf_counter()
    database.write_batch(votes)
    return (time.perf_counter() - started) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=200, help="batches written each way (200)")
    p.add_argument("--batch-size", type=int, default=200, help="votes per batch (200)")
    args = p.parse_args(argv)

    primary, standby = pair(synchronous=True)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        off, on = _database(primary.port, required=False), _database(primary.port, required=True)
        try:
            on.ensure_schema()
            times: dict[str, list[float]] = {"off": [], "on": [], "on, redeliveries only": []}
            for i in range(args.batches):
                times["off"].append(_ms(off, _batch(args.batch_size, seed=2 * i)))
                votes = _batch(args.batch_size, seed=2 * i + 1)
                times["on"].append(_ms(on, votes))
                times["on, redeliveries only"].append(_ms(on, votes))
        finally:
            off.close()
            on.close()
    finally:
        standby.remove()
        primary.remove()

    print(f"write_batch of {args.batch_size} votes, {args.batches} batches each way, synchronous standby on loopback")
    for name, values in times.items():
        values.sort()
        print(
            f"  POSTGRES_REQUIRE_SYNC_STANDBY {name:<24} median {statistics.median(values):6.2f} ms, "
            f"p90 {values[int(len(values) * 0.9)]:6.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
