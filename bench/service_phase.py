"""The service on a preloaded backlog: rate, CPU and memory."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_db import Watcher, exactly_once_checks, service_checks
from bench_publishers import publish_backlog
from bench_report import Report, Throughput
from bench_resources import Resources, queue_depth
from bench_settings import Settings
from bench_votes import BenchVote, expected_totals
from procstat import CpuReading, CpuSources, CpuUse
from service_process import ServiceProcess

THROUGHPUT_POLL_S = 0.02
RSS_SAMPLE_S = 0.25


def phase_service(
    s: Settings,
    res: Resources,
    votes: Sequence[BenchVote],
    log_dir: Path,
    report: Report,
    sources: CpuSources,
    *,
    run: str = "service",
) -> Throughput:
    """The service on a preloaded backlog.

    How the rate is measured: recorded_at (default now()) is the start time of the
    batch transaction that inserted the row. min(recorded_at) is therefore when
    the first batch began to be written, a few milliseconds after the service
    received its first message: that is the start. max(recorded_at) would miss
    the last batch's own write and commit, so the end is the wall-clock time at
    which a poll (every 20 ms) first sees all N votes committed: the rate is
    slightly underestimated, by at most one poll period plus one query. Both
    clocks are this machine's (PostgreSQL runs here), so they compare directly.
    The DB-only span max - min is reported in the JSON too.
    """
    queue = res.new_queue()
    dbname = res.new_database(schema=False)  # the service applies init_db.sql itself, as at a first start
    publish_rate = publish_backlog(s, res, queue, [v.body() for v in votes])
    # With --instances, every process consumes the same queue into the same database;
    # CPU is summed over them, RSS is the largest.
    svcs = [
        res.service(
            ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=log_dir / f"{run.replace(' ', '-')}-{i}.log")
        )
        for i in range(s.instances)
    ]
    started = time.time()
    watcher = Watcher(s.endpoints, dbname)
    try:
        progress = _follow_progress(s, svcs, watcher, len(votes), sources)
        count, first, last = watcher.audit_span()
    finally:
        watcher.close()
    hwm_kb = max((other.status_kb("VmHWM") or 0 for other in svcs), default=0)
    exit_codes = [other.stop() for other in svcs]
    exit_code = max(exit_codes, key=abs)
    report.checks += exactly_once_checks(s.endpoints, run, dbname, expected_totals(votes))
    report.checks += service_checks(run, exit_code, queue_depth(s.endpoints, queue))
    seconds = progress.done_at - first.timestamp() if progress.done_at and first else None
    cpu = progress.cpu
    details: dict[str, Any] = {
        "start_to_first_vote_s": first.timestamp() - started if first else None,
        "db_span_s": (last - first).total_seconds() if first and last else None,
        "audit_rows_when_done": count,
        "peak_rss_mb": hwm_kb / 1024 if hwm_kb else None,
        "max_sampled_rss_mb": progress.max_rss_kb / 1024,
        "service_cpu_s": cpu.own_s if cpu else None,
        "service_cpu_share": cpu.own_s / cpu.wall_s if cpu and cpu.own_s is not None and cpu.wall_s else None,
        "machine_busy_share": cpu.machine_share if cpu else None,
        "poller_cpu_share": progress.poller_cpu_share,
        "exit_code": exit_code,
        "log_levels": svcs[0].log_levels(),
    }
    res.delete_queue(queue)
    res.drop_database(dbname)
    return Throughput.measured(len(votes), seconds, publish_rate, cpu, progress.window_votes, details)


@dataclass
class Progress:
    done_at: float | None = None  # time.time() of the first poll that saw every vote
    max_rss_kb: int = 0
    # Between the first poll that saw votes counted and the one that saw them all: the CPU
    # (the services' every instance summed, the servers', the machine's) and the votes counted.
    cpu: CpuUse | None = None
    window_votes: int = 0
    poller_cpu_share: float = 0.0  # CPU of this process while polling, per second of wall time


def _follow_progress(
    s: Settings, svcs: Sequence[ServiceProcess], watcher: Watcher, target: int, sources: CpuSources
) -> Progress:
    """Poll until every vote is counted. CPU is read from the first poll that sees votes counted.

    That window misses the receiving of the votes buffered (at most the prefetch
    of each instance) when it opens, a percent of a 100,000-vote backlog, and
    leaves out start-up (imports, schema), which has nothing to do with votes.
    """
    progress = Progress()
    last_count, last_change = 0, time.monotonic()
    next_rss = 0.0
    start: CpuReading | None = None
    count0 = 0
    pids = [svc.pid for svc in svcs]
    backends: list[int] = []
    cpu_began, began = time.process_time(), time.monotonic()
    while True:
        count = watcher.counted()
        now = time.time()
        if count and start is None:
            # The services' pools are connected once votes are counted: these backends write them.
            backends = watcher.backend_pids()
            start, count0 = CpuReading.take(sources, pids, backends=backends, own_first=True), count
        if time.monotonic() >= next_rss:
            rss = max(svc.status_kb("VmRSS") or 0 for svc in svcs)
            progress.max_rss_kb = max(progress.max_rss_kb, rss)
            next_rss = time.monotonic() + RSS_SAMPLE_S
        if count >= target:
            progress.done_at = now
            break
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > s.stall_timeout_s:
            print(f"  no progress for {s.stall_timeout_s:.0f}s at {count}/{target} votes", file=sys.stderr)
            break
        for svc in svcs:
            svc.check_running()
        time.sleep(THROUGHPUT_POLL_S)
    progress.poller_cpu_share = (time.process_time() - cpu_began) / (time.monotonic() - began)
    if start is not None:
        progress.cpu = start.until(CpuReading.take(sources, pids, backends=backends, own_first=True))
        progress.window_votes = min(count, target) - count0
    return progress
