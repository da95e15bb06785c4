#!/usr/bin/env python3
"""What one vote costs on the write path, measured piece by piece in one process.

Run from the repository root, with PostgreSQL on 127.0.0.1:5432 (trust auth):

    .venv/bin/python bench/write_path.py                 # 200 batches of 250 votes
    .venv/bin/python bench/write_path.py --batches 50 --batch-size 500

It prints, for the same generated votes:
- validation: votes.parse_message against a bare json.loads, CPU microseconds per vote;
- pipeline: the flush worker's own work per batch around write_batch (retry wrapper, sequencer,
  metrics with RESULTS_EMBARGO on and off, summary), on a stand-in database that answers at once;
- one batch through db.Database.write_batch into a scratch database: wall time, and the part
  of it this process spent on the CPU (building the statement, reading the answer); the rest
  is PostgreSQL's work and the round trips;
- a one-row INSERT and its commit, for the cost of a commit (a WAL flush) alone;
- a batch's rows sent five ways: five arrays (unnest), a VALUES list (each row adapted by
  mogrify, as execute_values does), COPY into a temporary table, one JSON document from json.dumps
  of a dict per vote, and the same document as db.py writes it today (db._votes_document: string
  by string, the timestamp as the producer sent it): this process's CPU per vote to build them,
  and PostgreSQL's wall time to take them in and count them, round trips included.
The scratch database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import psycopg2
from prometheus_client import CollectorRegistry
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/write_path.py` puts bench/ on the path, not the repository
import db  # noqa: E402
from config import Config  # noqa: E402
from metrics import Metrics  # noqa: E402
from pipeline import Delivery, Pipeline  # noqa: E402
from summary import Summary  # noqa: E402
from votes import Vote, parse_message  # noqa: E402


def bodies(count: int, *, laws: int, salt: str) -> list[bytes]:
    out = []
    for i in range(count):
        citizen = f"citizen-{salt}-{i}"
        law = f"law-{i % laws:03d}"
        digest = hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest()
        choice = "oui" if i % 3 else "non"
        out.append(
            json.dumps(
                {
                    "vote_hash": digest,
                    "citizen_id": citizen,
                    "law_id": law,
                    "choice": choice,
                    "timestamp": "2025-11-14T12:00:00Z",
                }
            ).encode()
        )
    return out


def cpu_us_per_item(work: Callable[[], object], items: int, repeat: int = 5) -> float:
    """Median over `repeat` runs of the process CPU time of `work`, per item, in microseconds."""
    runs = []
    for _ in range(repeat):
        started = time.process_time()
        work()
        runs.append((time.process_time() - started) / items * 1e6)
    return statistics.median(runs)


class _AtOnce:
    """A stand-in database: write_batch counts the batch and returns at once, nothing else is used."""

    def write_batch(self, votes: Sequence[Vote], *, chain: str | None = None) -> db.BatchOutcome:
        outcome = db.BatchOutcome()
        for v in votes:
            outcome.counted[(v.law_id, v.choice)] = outcome.counted.get((v.law_id, v.choice), 0) + 1
            outcome.totals[v.law_id] = (1, 1)
        return outcome


def _pipeline_work(size: int, laws: int, batches: int = 400) -> None:
    """The flush worker's own work around write_batch (retry wrapper, sequencer, metrics, summary)."""
    votes = [parse_message(b, max_bytes=4096).vote for b in bodies(size * batches, laws=laws, salt="pipeline")]
    stand_in = _AtOnce()
    alone = cpu_us_per_item(lambda: [stand_in.write_batch(votes[i : i + size]) for i in range(0, len(votes), size)], 1)
    on, off = (_through_pipeline(votes, size, embargo=embargo) - alone for embargo in (True, False))
    print(
        f"pipeline     per batch of {size} around write_batch (stand-in database): {on / batches:.0f} us with "
        f"RESULTS_EMBARGO on, {off / batches:.0f} us off ({on / len(votes):.2f} / {off / len(votes):.2f} us/vote)"
    )


def _through_pipeline(votes: list[Vote], size: int, *, embargo: bool) -> float:
    """Process CPU in microseconds to take `votes` through a Pipeline on the stand-in database."""
    settled: list[int] = []
    done = threading.Event()

    def settle(committed: list[Delivery], _rejected: list[Delivery]) -> None:
        settled.append(len(committed))
        if sum(settled) == len(votes):
            done.set()

    pipeline = Pipeline(
        config=Config(batch_size=size, results_embargo=embargo),
        database=cast(db.Database, _AtOnce()),
        metrics=Metrics(CollectorRegistry(), embargo=embargo),
        summary=Summary(interval_s=3600),
        settle=settle,
        on_fatal=lambda _reason: None,
    )
    deliveries = [Delivery(v, i + 1, 1, time.monotonic()) for i, v in enumerate(votes)]
    pipeline.start()
    started = time.process_time()
    pipeline.buffer.extend(deliveries)
    done.wait(60)
    # The main thread only waits meanwhile: the process's CPU is the flush worker's.
    spent = (time.process_time() - started) * 1e6
    pipeline.finish(deadline=time.monotonic() + 10, idle=lambda: time.sleep(0.01))
    return spent


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=200, help="batches written (200)")
    p.add_argument("--batch-size", type=int, default=250, help="votes per batch (250)")
    p.add_argument("--laws", type=int, default=50, help="distinct laws (50)")
    p.add_argument("--postgres-host", default="127.0.0.1")
    p.add_argument("--postgres-port", type=int, default=5432)
    p.add_argument("--postgres-user", default="postgres")
    a = p.parse_args(argv)

    sample = bodies(20_000, laws=a.laws, salt="validation")
    bare = cpu_us_per_item(lambda: [json.loads(b) for b in sample], len(sample))
    parsed = cpu_us_per_item(lambda: [parse_message(b, max_bytes=4096) for b in sample], len(sample))
    print(f"validation   json.loads {bare:.2f} us/vote, parse_message {parsed:.2f} us/vote (+{parsed - bare:.2f})")
    _pipeline_work(a.batch_size, a.laws)

    name = f"bench_write_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host=a.postgres_host, port=a.postgres_port, user=a.postgres_user, dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        config = Config(
            postgres_host=a.postgres_host,
            postgres_port=a.postgres_port,
            postgres_user=a.postgres_user,
            postgres_db=name,
        )
        database = db.Database(config=config)
        database.open()
        try:
            database.apply_schema()
            _write_batches(database, a.batches, a.batch_size, a.laws)
            dsn = {"host": a.postgres_host, "port": a.postgres_port, "user": a.postgres_user, "dbname": name}
            _commits(dsn)
            _parameters(dsn, a.batch_size, a.laws)
        finally:
            database.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()
    return 0


def _write_batches(database: db.Database, batches: int, size: int, laws: int) -> None:
    votes = [parse_message(b, max_bytes=4096).vote for b in bodies(batches * size, laws=laws, salt="write")]
    walls, cpus = [], []
    for i in range(batches):
        batch = votes[i * size : (i + 1) * size]
        wall, cpu = time.perf_counter(), time.process_time()
        database.write_batch(batch)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    wall_ms, cpu_ms = statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3
    print(
        f"batch        {size} votes: {wall_ms:.2f} ms wall (median of {batches}), {cpu_ms:.2f} ms of it this "
        f"process's CPU; the rest, {(wall_ms - cpu_ms) / size * 1e3:.1f} us/vote, is PostgreSQL and round trips"
    )


def _commits(dsn: dict[str, Any], rounds: int = 500) -> None:
    conn = psycopg2.connect(**dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE commit_probe (n integer)")
        conn.commit()
        times = []
        for n in range(rounds):
            started = time.perf_counter()
            with conn.cursor() as cur:
                cur.execute("INSERT INTO commit_probe VALUES (%s)", (n,))
            conn.commit()  # a WAL flush, as every batch's commit
            times.append(time.perf_counter() - started)
    finally:
        conn.close()
    print(f"commit       one-row INSERT + COMMIT: {statistics.median(times) * 1e3:.3f} ms (median of {rounds})")


# What the batch statement's first CTE unpacks, fed two ways (a probe: nothing is written).
_UNPACK_ARRAYS = """
SELECT count(*) FROM unnest(%(hashes)s::varchar[], %(citizens)s::varchar[], %(laws)s::varchar[],
                            %(choices)s::varchar[], %(timestamps)s::timestamptz[])
    AS t(vote_hash, citizen_id, law_id, choice, ts)
"""
_UNPACK_JSON = """
SELECT count(*) FROM json_to_recordset(%(rows)s::json)
    AS t(vote_hash varchar, citizen_id varchar, law_id varchar, choice varchar, ts timestamptz)
"""


def _array_params(votes: Sequence[Vote]) -> dict[str, Any]:
    """The parameters db.py's batch statement took before it read one JSON document."""
    return {
        "hashes": [v.vote_hash for v in votes],
        "citizens": [v.citizen_id for v in votes],
        "laws": [v.law_id for v in votes],
        "choices": [v.choice for v in votes],
        "timestamps": [v.timestamp for v in votes],
        "chain": "probe",
    }


def _dumps_params(votes: Sequence[Vote]) -> dict[str, Any]:
    """The document as json.dumps writes it from a dict per vote (db.py's first JSON version)."""
    rows = [
        {
            "vote_hash": v.vote_hash,
            "citizen_id": v.citizen_id,
            "law_id": v.law_id,
            "choice": v.choice,
            "ts": v.timestamp.isoformat(),
        }
        for v in votes
    ]
    return {"rows": json.dumps(rows), "chain": "probe"}


def _document_params(votes: Sequence[Vote]) -> dict[str, Any]:
    """The document as db.py writes it today."""
    return {"rows": db._votes_document(votes), "chain": "probe"}


_UNPACK_VALUES = "SELECT count(*) FROM (VALUES {rows}) AS t(vote_hash, citizen_id, law_id, choice, ts)"
_VALUES_ROW = "(%s::varchar, %s::varchar, %s::varchar, %s::varchar, %s::timestamptz)"
_COPY_TABLE = (
    "CREATE TEMPORARY TABLE incoming (vote_hash varchar, citizen_id varchar, law_id varchar, choice varchar, "
    "ts timestamptz)"
)
# COPY's text format: backslash, tab, newline and carriage return escaped in each field.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _values_statement(cur: psycopg2.extensions.cursor, votes: Sequence[Vote]) -> bytes:
    """A VALUES list as execute_values builds one: each row adapted by mogrify."""
    rows = b",".join(
        cur.mogrify(_VALUES_ROW, (v.vote_hash, v.citizen_id, v.law_id, v.choice, v.timestamp)) for v in votes
    )
    return _UNPACK_VALUES.encode().replace(b"{rows}", rows)


def _copy_text(votes: Sequence[Vote]) -> str:
    return "".join(
        f"{v.vote_hash}\t{v.citizen_id.translate(_COPY_ESCAPES)}\t{v.law_id.translate(_COPY_ESCAPES)}\t"
        f"{v.choice}\t{v.timestamp_text or v.timestamp.isoformat()}\n"
        for v in votes
    )


def _copy_and_count(cur: psycopg2.extensions.cursor, votes: Sequence[Vote]) -> None:
    cur.copy_expert("COPY incoming FROM STDIN", io.StringIO(_copy_text(votes)))
    cur.execute("SELECT count(*) FROM incoming")
    cur.fetchall()
    cur.execute("TRUNCATE incoming")  # what ON COMMIT DELETE ROWS would do at each commit


def _repeated(work: Callable[[], object], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            work()

    return run


def _parameters(dsn: dict[str, Any], size: int, laws: int, rounds: int = 200) -> None:
    """Five ways to get a batch's rows to PostgreSQL: client CPU to build them, and the wall time
    for PostgreSQL to take them in and count them (the round trips included)."""
    votes = [parse_message(b, max_bytes=4096).vote for b in bodies(size, laws=laws, salt="params")]
    conn = psycopg2.connect(**dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(_COPY_TABLE)

            def statement(sql_text: str | bytes, params: dict[str, Any] | None = None) -> Callable[[], None]:
                def send() -> None:
                    cur.execute(sql_text, params)
                    cur.fetchall()

                return send

            ways: list[tuple[str, Callable[[], object], Callable[[], None]]] = [
                (
                    "five arrays (unnest)",
                    lambda: cur.mogrify(_UNPACK_ARRAYS, _array_params(votes)),
                    statement(_UNPACK_ARRAYS, _array_params(votes)),
                ),
                (
                    "VALUES list (mogrify per row)",
                    lambda: _values_statement(cur, votes),
                    statement(_values_statement(cur, votes)),
                ),
                ("COPY into a temporary table", lambda: _copy_text(votes), lambda: _copy_and_count(cur, votes)),
                (
                    "json.dumps of dicts",
                    lambda: cur.mogrify(_UNPACK_JSON, _dumps_params(votes)),
                    statement(_UNPACK_JSON, _dumps_params(votes)),
                ),
                (
                    "db._votes_document (today)",
                    lambda: cur.mogrify(_UNPACK_JSON, _document_params(votes)),
                    statement(_UNPACK_JSON, _document_params(votes)),
                ),
            ]
            print(
                f"parameters   {size} votes a batch: client CPU to build them (us/vote), and PostgreSQL's wall time "
                f"to take them in and count them (ms a batch, round trips included, median of {rounds})"
            )
            for label, build, send in ways:
                client = cpu_us_per_item(_repeated(build, rounds), rounds * size)
                times = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    send()
                    times.append(time.perf_counter() - started)
                print(f"  {label:<32}{client:6.2f} us/vote {statistics.median(times) * 1e3:7.2f} ms")
        conn.rollback()
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
