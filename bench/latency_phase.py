"""Visibility latency: votes published at a steady rate to an idle, running service."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from bench_db import Watcher, exactly_once_checks, service_checks
from bench_publishers import paced_publisher_main
from bench_report import Latency, Report
from bench_resources import MP, Resources, queue_depth
from bench_settings import BenchError, Settings
from bench_votes import expected_totals, make_votes
from service_process import ServiceProcess

LATENCY_POLL_S = 0.01


def phase_latency(s: Settings, res: Resources, log_dir: Path, report: Report) -> Latency:
    """Visibility latency of votes published at a steady rate to an idle, running service.

    Method: the publisher (its own process) records time.monotonic() just before
    each basic_publish; CLOCK_MONOTONIC is system-wide on Linux, so the sampler
    here can compare. Every LATENCY_POLL_S the sampler reads the cheap total of
    vote_results (see Watcher.counted); only when it changed does it ask which
    of the published-but-unseen hashes are now in vote_audit (primary-key
    lookups, a few hundred at most while the service keeps up). A vote's visible
    time is the end of the query that first returned it: it committed after the
    previous poll's snapshot and before this one's, so the figure errs late by
    at most one poll period plus two queries (the resolution, printed). Polling
    cost: about 100 tiny queries/s plus one lookup per committed batch.
    """
    queue = res.new_queue()
    dbname = res.new_database(schema=False)
    svc = res.service(ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=log_dir / "latency.log"))
    svc.wait_consuming(s.endpoints, queue)
    count = max(1, round(s.latency_rate * s.latency_seconds))
    votes = make_votes(count, laws=s.laws, seed=s.seed + 1, first_citizen=s.votes)
    receiver, sender = MP.Pipe(duplex=False)
    start_at = time.monotonic() + 0.5
    bodies = [v.body() for v in votes]
    res.child(paced_publisher_main, s.endpoints, queue, bodies, s.latency_rate, start_at, sender)
    sender.close()
    watcher = Watcher(s.endpoints, dbname)
    try:
        sampling = _sample_visibility(s, svc, watcher, [v.vote_hash for v in votes], start_at, receiver)
    finally:
        watcher.close()
        receiver.close()
    exit_code = svc.stop()
    report.checks += exactly_once_checks(s.endpoints, "latency", dbname, expected_totals(votes))
    report.checks += service_checks("latency", exit_code, queue_depth(s.endpoints, queue))
    res.delete_queue(queue)
    res.drop_database(dbname)
    return _latency_figures(sampling, svc)


@dataclass
class Sampling:
    published: list[float]
    seen: list[float | None]
    polls: int
    seconds: float
    sampler_cpu_share: float  # CPU of this process while sampling, per second of wall time
    hwm_kb: int | None = None


def _sample_visibility(
    s: Settings, svc: ServiceProcess, watcher: Watcher, hashes: list[str], start_at: float, publisher: Connection
) -> Sampling:
    seen: list[float | None] = [None] * len(hashes)
    unseen: dict[str, int] = {}
    published: list[float] | None = None
    scheduled = last_count = polls = 0
    last_change = began = time.monotonic()
    cpu_began = time.process_time()
    while True:
        tick = time.monotonic()
        # Every vote whose publishing time has come (a superset of those published).
        due = min(len(hashes), max(0, int((tick - start_at) * s.latency_rate) + 2))
        for i in range(scheduled, due):
            unseen[hashes[i]] = i
        scheduled = max(scheduled, due)
        count = watcher.counted()
        polls += 1
        if count != last_count and unseen:
            found = watcher.visible(list(unseen))
            visible_at = time.monotonic()
            for vote_hash in found:
                seen[unseen.pop(vote_hash)] = visible_at
            last_count, last_change = count, visible_at
        if published is None and publisher.poll():
            try:
                published = publisher.recv()
            except EOFError:
                raise BenchError("the paced publisher died") from None
        if published is not None and scheduled == len(hashes) and not unseen:
            break
        if time.monotonic() - last_change > s.stall_timeout_s:
            print(f"  latency: no progress for {s.stall_timeout_s:.0f}s, {len(unseen)} votes unseen", file=sys.stderr)
            break
        svc.check_running()
        time.sleep(max(0.0, tick + LATENCY_POLL_S - time.monotonic()))
    if published is None:
        raise BenchError("the paced publisher did not report")
    seconds = time.monotonic() - began
    return Sampling(
        published, seen, polls, seconds, (time.process_time() - cpu_began) / seconds, svc.status_kb("VmHWM")
    )


def _latency_figures(sampling: Sampling, svc: ServiceProcess) -> Latency:
    delays = sorted(
        (seen - pub) * 1000 for pub, seen in zip(sampling.published, sampling.seen, strict=True) if seen is not None
    )
    pub = sampling.published
    span = pub[-1] - pub[0] if len(pub) > 1 else 0.0
    return Latency(
        published=len(pub),
        seen=len(delays),
        p50_ms=percentile(delays, 50),
        p99_ms=percentile(delays, 99),
        max_ms=delays[-1] if delays else None,
        publish_rate=(len(pub) - 1) / span if span else 0.0,
        poll_period_ms=1000 * sampling.seconds / max(sampling.polls, 1),
        details={
            "peak_rss_mb": sampling.hwm_kb / 1024 if sampling.hwm_kb else None,
            "sampler_cpu_share": sampling.sampler_cpu_share,
            "log_levels": svc.log_levels(),
        },
    )


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(pct / 100 * len(sorted_values))) - 1]
