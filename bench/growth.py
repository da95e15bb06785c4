#!/usr/bin/env python3
"""Does counting slow down as the election fills the database? The service into a database already
holding N votes against an empty one, in the same run, with and without the PostgreSQL settings
docs/performance.md recommends for the referendum.

Run from the repository root, as root (the PostgreSQL server is a throwaway one, started as the
`postgres` OS user on a free port; RabbitMQ is the local one on 5672):

    .venv/bin/python bench/growth.py                          # 8,000,000 stored votes (make bench-growth)
    .venv/bin/python bench/growth.py --stored 500000 --votes 30000 --rounds 3     # a quick run
    .venv/bin/python bench/growth.py --profiles default,shared_buffers,checkpoints,wal_compression,recommended

How:
- one throwaway server (tests/pg_servers.py) with PostgreSQL's own defaults for durability (fsync,
  synchronous_commit, full_page_writes on: the test clusters' shortcuts are turned back off);
- the `full` database gets init_db.sql and N stored votes generated in SQL (indexes built after the
  load, then VACUUM ANALYZE, as autovacuum would have left it). The filler is in no hash chain: the
  service never reads another writer's chain (each instance starts a chain of its own), so its work
  does not depend on it;
- for each profile of settings (server restarted with them, the full database's indexes read into
  the cache again with pg_prewarm), `--rounds` rounds; each round runs the service on a backlog of
  `--votes` new votes into the full database and into a fresh empty one, alternating which goes
  first. Each run: votes/s from the first vote counted to the last, and CPU per vote of the whole
  machine (/proc/stat), of the service, of the PostgreSQL server (every process of the throwaway
  cluster, exited backends included) and of RabbitMQ (the beam process listening on 5672), over the
  same window; WAL bytes per vote (pg_current_wal_lsn), checkpoints and autovacuum runs meanwhile;
- each run is checked for exactly-once (audit rows, totals per law against what was published);
- the table gives the median over the rounds and the full database's difference from the empty one.

The full database grows by --votes per run: its size at each run is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import procstat  # noqa: E402
from bench_db import Watcher  # noqa: E402
from bench_publishers import publish_backlog  # noqa: E402
from bench_report import cpu_model  # noqa: E402
from bench_resources import Resources  # noqa: E402
from bench_settings import SCHEMA_FILE, BenchError, Settings, parse_args  # noqa: E402
from bench_votes import expected_totals, make_votes  # noqa: E402
from service_phase import THROUGHPUT_POLL_S  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

from tests.pg_servers import PgServer  # noqa: E402
from tests.pg_servers import unavailable as pg_unavailable  # noqa: E402

# PostgreSQL's own defaults where the test clusters take shortcuts: the figures are a real server's.
DURABLE = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "128MB",
    "max_connections": "50",
    "shared_preload_libraries": "'pg_prewarm'",
    "pg_prewarm.autoprewarm": "off",
}
# The server's defaults (PostgreSQL 15), written out so that a later profile's line is undone.
DEFAULTS = {
    "shared_buffers": "128MB",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "5min",
    "wal_compression": "off",
}
# docs/performance.md#sizing-postgresql-for-8-million-votes, one lever at a time and all together.
PROFILES: dict[str, dict[str, str]] = {
    "default": {},
    "shared_buffers": {"shared_buffers": "2GB"},
    "checkpoints": {"max_wal_size": "8GB", "checkpoint_timeout": "15min"},
    "wal_compression": {"wal_compression": "lz4"},
    "recommended": {
        "shared_buffers": "2GB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "15min",
        "wal_compression": "lz4",
    },
}
FILLER_DAY = "2025-11-14 07:00:00+00"


@dataclass
class Run:
    profile: str
    target: str  # "empty" or "full"
    stored: int  # audit rows before the run
    votes: int
    seconds: float
    machine_s: float
    service_s: float
    postgres_s: float
    rabbitmq_s: float
    wal_bytes: int
    checkpoints: int
    autovacuums: int

    def per_vote_us(self, seconds: float) -> float:
        return 1e6 * seconds / self.votes

    @property
    def rate(self) -> float:
        return self.votes / self.seconds


@dataclass
class Bench:
    args: argparse.Namespace
    server: PgServer
    settings: Settings
    res: Resources
    log_dir: Path
    runs: list[Run] = field(default_factory=list)
    next_citizen: int = 0


# -- CPU of the parts, from /proc ----------------------------------------------------------------


def cluster_cpu_seconds(server: PgServer) -> float:
    """CPU of every process of the cluster, the backends that ended included (procstat.tree_cpu_seconds)."""
    cpu = procstat.tree_cpu_seconds(int((server.data / "postmaster.pid").read_text().split()[0]))
    if cpu is None:
        raise BenchError("the PostgreSQL server is gone")
    return cpu


def pid_cpu_seconds(pid: int | None) -> float:
    return (procstat.process_cpu_seconds(pid) or 0.0) if pid else 0.0


# -- the databases -----------------------------------------------------------------------------------


def _admin(b: Bench, statement: sql.Composed) -> None:
    conn = b.server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def new_database(b: Bench, name: str) -> None:
    _admin(b, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    b.server.execute(SCHEMA_FILE.read_text(encoding="utf-8"), dbname=name)


def drop_database(b: Bench, name: str) -> None:
    _admin(b, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# The indexes are dropped for the load and rebuilt after it (minutes instead of an hour); the
# foreign key of duplicate_attempts goes with the primary key and comes back with it.
_FILL = """
SET maintenance_work_mem = '1GB';
ALTER TABLE duplicate_attempts DROP CONSTRAINT duplicate_attempts_vote_hash_fkey;
ALTER TABLE vote_audit DROP CONSTRAINT vote_audit_pkey;
DROP INDEX vote_audit_citizen_idx;
INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp", recorded_at)
SELECT encode(sha256(convert_to('filler:' || i, 'UTF8')), 'hex'),
       'filler-' || lpad(i::text, 9, '0'),
       'law-' || lpad(((hashint4(i)::bigint %% %(laws)s + %(laws)s) %% %(laws)s + 1)::text, 3, '0'),
       CASE WHEN hashint4(i + 1) %% 2 = 0 THEN 'oui' ELSE 'non' END,
       %(day)s::timestamptz + (i %% 43200000) * interval '1 millisecond',
       %(day)s::timestamptz + (i %% 43200000) * interval '1 millisecond'
FROM generate_series(1, %(n)s) AS i;
ALTER TABLE vote_audit ADD CONSTRAINT vote_audit_pkey PRIMARY KEY (vote_hash);
ALTER TABLE duplicate_attempts ADD CONSTRAINT duplicate_attempts_vote_hash_fkey
    FOREIGN KEY (vote_hash) REFERENCES vote_audit (vote_hash);
"""
# The totals the filler adds up to, so that the invariant holds on the full database too.
_FILL_TOTALS = """
INSERT INTO vote_results (law_id, oui_count, non_count)
SELECT law_id, count(*) FILTER (WHERE choice = 'oui'), count(*) FILTER (WHERE choice = 'non')
FROM vote_audit GROUP BY law_id
"""


def fill(server: PgServer, name: str, n: int, *, laws: int) -> float:
    """N stored votes in `name` (which has init_db.sql already); returns the seconds it took."""
    started = time.monotonic()
    conn = server.connect(name)
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(_FILL, {"day": FILLER_DAY, "n": n, "laws": laws})
            cur.execute(_FILL_TOTALS)
        conn.commit()
    finally:
        conn.close()
    # The indexes of init_db.sql, as it defines them, then what autovacuum would have done.
    server.execute(SCHEMA_FILE.read_text(encoding="utf-8"), dbname=name)
    server.execute("VACUUM ANALYZE", dbname=name)
    server.execute("CHECKPOINT")
    return time.monotonic() - started


def prewarm(b: Bench, name: str) -> None:
    """Read the full database's table and indexes into the cache, as a server that has been
    counting for a while would have them (as much as shared_buffers holds)."""
    b.server.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm", dbname=name)
    b.server.execute(
        "SELECT pg_prewarm(c.oid) FROM pg_class c WHERE c.relname IN "
        "('vote_audit_pkey', 'vote_audit_citizen_idx', 'vote_audit')",
        dbname=name,
    )


def restart_with(b: Bench, profile: str) -> None:
    b.server.stop()
    with (b.server.data / "postgresql.conf").open("a") as conf:
        conf.write(f"# profile {profile}\n")
        conf.writelines(f"{k} = {v}\n" for k, v in {**DEFAULTS, **PROFILES[profile]}.items())
    b.server.start()


# -- one run ---------------------------------------------------------------------------------------------


def server_counters(b: Bench, dbname: str) -> tuple[int, int, int]:
    """(WAL position in bytes, checkpoints so far, autovacuum runs of vote_audit so far)."""
    rows = b.server.execute(
        "SELECT pg_current_wal_lsn() - '0/0', "
        "(SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter), "
        "(SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_user_tables "
        " WHERE relname = 'vote_audit')",
        dbname=dbname,
    )
    wal, checkpoints, autovacuums = rows[0]
    return int(wal), int(checkpoints), int(autovacuums)


def run_service(b: Bench, profile: str, target: str, dbname: str, count: int | None = None) -> Run:
    votes = make_votes(count or b.args.votes, laws=b.args.laws, seed=b.next_citizen, first_citizen=b.next_citizen)
    b.next_citizen += len(votes)
    stored = int(b.server.execute("SELECT count(*) FROM vote_audit", dbname=dbname)[0][0])
    expected = expected_totals(votes)
    before = {
        law: (int(oui), int(non))
        for law, oui, non in b.server.execute("SELECT law_id, oui_count, non_count FROM vote_results", dbname=dbname)
    }
    queue = b.res.new_queue()
    publish_backlog(b.settings, b.res, queue, [v.body() for v in votes])
    log_path = b.log_dir / f"{profile}-{target}-{len(b.runs)}.log"
    svc = b.res.service(ServiceProcess.start(b.settings, queue=queue, dbname=dbname, log_path=log_path))
    beam = procstat.listening_pid(b.settings.endpoints.rabbitmq_port)
    watcher = Watcher(b.settings.endpoints, dbname)
    target_total = sum(oui + non for oui, non in before.values()) + len(votes)
    try:
        # The window opens at the first vote counted (start-up left out) and closes when all are.
        deadline = time.monotonic() + b.settings.stall_timeout_s + len(votes) / 200
        while (counted := watcher.counted()) <= target_total - len(votes):
            svc.check_running()
            if time.monotonic() > deadline:
                raise BenchError(f"the service counted nothing in time:\n{svc.log_tail()}")
            time.sleep(THROUGHPUT_POLL_S)
        first_count = counted
        t0, m0 = time.monotonic(), procstat.machine_busy_jiffies()
        s0, p0, r0 = svc.cpu_seconds() or 0.0, cluster_cpu_seconds(b.server), pid_cpu_seconds(beam)
        c0 = server_counters(b, dbname)
        while watcher.counted() < target_total:
            svc.check_running()
            if time.monotonic() > deadline:
                raise BenchError(f"the service did not count the backlog in time:\n{svc.log_tail()}")
            time.sleep(THROUGHPUT_POLL_S)
        t1, m1 = time.monotonic(), procstat.machine_busy_jiffies()
        s1, p1, r1 = svc.cpu_seconds() or 0.0, cluster_cpu_seconds(b.server), pid_cpu_seconds(beam)
        c1 = server_counters(b, dbname)
    finally:
        watcher.close()
    exit_code = svc.stop()
    b.res.delete_queue(queue)
    if exit_code != 0:
        raise BenchError(f"the service exited with {exit_code}:\n{svc.log_tail()}")
    check_counted(b, dbname, stored + len(votes), before, expected)
    window_votes = target_total - first_count
    return Run(
        profile,
        target,
        stored,
        window_votes,
        t1 - t0,
        procstat.busy_core_seconds(m0, m1),
        s1 - s0,
        p1 - p0,
        r1 - r0,
        c1[0] - c0[0],
        c1[1] - c0[1],
        c1[2] - c0[2],
    )


def check_counted(
    b: Bench,
    dbname: str,
    rows: int,
    before: dict[str, tuple[int, int]],
    published: dict[str, tuple[int, int]],
) -> None:
    """Exactly once: the audit rows and the totals per law are what was there plus what was published."""
    audit = int(b.server.execute("SELECT count(*) FROM vote_audit", dbname=dbname)[0][0])
    totals = {
        law: (int(oui), int(non))
        for law, oui, non in b.server.execute("SELECT law_id, oui_count, non_count FROM vote_results", dbname=dbname)
    }
    want = dict(before)
    for law, (oui, non) in published.items():
        had = want.get(law, (0, 0))
        want[law] = (had[0] + oui, had[1] + non)
    if audit != rows or totals != want:
        raise BenchError(f"not counted exactly once in {dbname}: {audit} audit rows for {rows}")


# -- the report ---------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_run(r: Run) -> None:
    print(
        f"  {r.profile:16} {r.target:7} stored {r.stored:>10,}: {r.rate:8.0f} votes/s, "
        f"machine {r.per_vote_us(r.machine_s):6.1f} us/vote (service {r.per_vote_us(r.service_s):5.1f}, "
        f"PostgreSQL {r.per_vote_us(r.postgres_s):5.1f}, RabbitMQ {r.per_vote_us(r.rabbitmq_s):5.1f}), "
        f"WAL {r.wal_bytes / r.votes:6.0f} B/vote, {r.checkpoints} checkpoints, {r.autovacuums} autovacuum/analyze",
        flush=True,
    )


def render(b: Bench) -> str:
    lines = [
        f"growth: {b.args.stored:,} stored votes against an empty database, {b.args.votes:,} votes per run, "
        f"median of {b.args.rounds} rounds; {datetime.now(UTC):%Y-%m-%d} UTC, {os.cpu_count()} cores "
        f"({cpu_model()}), load average at the end {os.getloadavg()[0]:.2f}",
        "",
        f"{'settings':16} {'database':13} {'votes/s':>8} {'machine':>8} {'service':>8} {'postgres':>8} "
        f"{'svc+pg':>8} {'rabbitmq':>8} {'WAL':>6}",
        f"{'':16} {'':13} {'':>8} {'us/vote':>8} {'us/vote':>8} {'us/vote':>8} {'us/vote':>8} {'us/vote':>8} "
        f"{'B/vote':>6}",
    ]
    for profile in b.args.profiles:
        med: dict[str, dict[str, float]] = {}
        for target in ("empty", "full"):
            runs = [r for r in b.runs if r.profile == profile and r.target == target]
            if not runs:
                continue
            med[target] = {
                "rate": median([r.rate for r in runs]),
                "machine": median([r.per_vote_us(r.machine_s) for r in runs]),
                "service": median([r.per_vote_us(r.service_s) for r in runs]),
                "postgres": median([r.per_vote_us(r.postgres_s) for r in runs]),
                "both": median([r.per_vote_us(r.service_s + r.postgres_s) for r in runs]),
                "rabbitmq": median([r.per_vote_us(r.rabbitmq_s) for r in runs]),
                "wal": median([r.wal_bytes / r.votes for r in runs]),
            }
            m = med[target]
            name = f"{target} ({median([r.stored for r in runs]) / 1e6:.1f} M)" if target == "full" else target
            lines.append(
                f"{profile:16} {name:13} {m['rate']:8.0f} {m['machine']:8.1f} {m['service']:8.1f} "
                f"{m['postgres']:8.1f} {m['both']:8.1f} {m['rabbitmq']:8.1f} {m['wal']:6.0f}"
            )
        if len(med) == 2:
            slower = 1 - med["full"]["rate"] / med["empty"]["rate"]
            more_cpu = med["full"]["machine"] / med["empty"]["machine"] - 1
            more_parts = med["full"]["both"] / med["empty"]["both"] - 1
            verdict = "ok" if slower <= 0.10 and more_cpu <= 0.10 else "MISSED"
            lines.append(
                f"{profile:16} {'full vs empty':13} {slower:+.1%} slower, {more_cpu:+.1%} machine CPU per vote "
                f"(target <= 10 % each: {verdict}); service + PostgreSQL {more_parts:+.1%}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stored", type=int, default=8_000_000, help="votes stored in the full database (8000000)")
    p.add_argument("--votes", type=int, default=100_000, help="votes counted per run (100000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per profile; the table gives the median (3)")
    p.add_argument(
        "--warmup", type=int, default=100_000, help="votes counted into the full database after each restart, untimed"
    )
    p.add_argument("--laws", type=int, default=50)
    p.add_argument(
        "--profiles",
        type=lambda raw: raw.split(","),
        default=["default", "recommended"],
        help=f"settings to compare, in order, from {','.join(PROFILES)} (default,recommended)",
    )
    args = p.parse_args(argv)
    unknown = [name for name in args.profiles if name not in PROFILES]
    if unknown:
        p.error(f"unknown profile(s) {', '.join(unknown)}")
    why = pg_unavailable()
    if why:
        print(f"growth: cannot start a throwaway PostgreSQL server: {why}", file=sys.stderr)
        return 2
    server = PgServer(settings=DURABLE).start()
    settings = parse_args(["--postgres-port", str(server.port), "--votes", str(args.votes)])
    b = Bench(args, server, settings, Resources(settings.endpoints), Path(tempfile.mkdtemp(prefix="vote-growth-")))
    began = time.monotonic()
    try:
        new_database(b, "full")
        print(f"[{datetime.now(UTC):%H:%M:%S}] loading {args.stored:,} stored votes ...", flush=True)
        seconds = fill(b.server, "full", args.stored, laws=args.laws)
        size = b.server.execute("SELECT pg_size_pretty(pg_database_size('full'))")[0][0]
        print(f"[{datetime.now(UTC):%H:%M:%S}] loaded in {seconds:.0f} s: database {size}", flush=True)
        for profile in args.profiles:
            restart_with(b, profile)
            prewarm(b, "full")
            if args.warmup:
                # The restart checkpointed: the first touch of each index page since then writes it
                # whole to the WAL. A server that has been counting has touched many already.
                print_run(run_service(b, profile, "warm-up", "full", args.warmup))
            for r in range(args.rounds):
                for target in ("empty", "full") if r % 2 == 0 else ("full", "empty"):
                    name = "full"
                    if target == "empty":
                        name = f"empty_{len(b.runs)}"
                        new_database(b, name)
                    run = run_service(b, profile, target, name)
                    b.runs.append(run)
                    print_run(run)
                    if target == "empty":
                        drop_database(b, name)
        print()
        print(render(b))
        print(f"\ntotal time {time.monotonic() - began:.0f} s (load {seconds:.0f} s); service logs in {b.log_dir}")
    except BenchError as exc:
        print(f"growth: {exc}", file=sys.stderr)
        return 1
    finally:
        for problem in b.res.cleanup():
            print(f"cleanup failed: {problem}", file=sys.stderr)
        server.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
