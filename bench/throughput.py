#!/usr/bin/env python3
"""Benchmark of the vote aggregation service: throughput, latency, memory, exactly-once.

Run from the repository root:

    .venv/bin/python bench/throughput.py                      # every phase, default sizes
    .venv/bin/python bench/throughput.py --votes 20000 --naive-votes 2000 --latency-seconds 5
    .venv/bin/python bench/throughput.py --phases service --service-env BATCH_SIZE=500 --json out.json

Phases, each on a fresh durable queue (and a fresh database where it writes):

- bare:    the limit. A consumer that only json.loads and acks every 100 messages.
- service: `python aggregator.py` exactly as users start it, on a backlog of --votes votes.
- naive:   the reference. One transaction and one ack per message, on --naive-votes votes.
- latency: the service running idle, then votes published at a paced --latency-rate.

Backlogs are published (by several processes, with publisher confirms) before the
consumer starts, so the publisher never limits a measured rate. Queues and databases
are deleted afterwards, also on error and Ctrl-C. The exit code is non-zero only when
an exactly-once check fails (or the bench itself cannot run), never for a missed target.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
# `python bench/throughput.py` puts bench/ on the path, not the repository the shared tools live in.
sys.path.insert(0, str(ROOT))
# One module per job, this one only wiring them: bench_settings (options), bench_votes, bench_resources
# (queues, databases, child processes), bench_publishers, reference_consumers (the bare and the
# per-message consumers), service_process (aggregator.py as a child), service_phase, latency_phase,
# bench_db (what is read from a service's database), procstat (CPU from /proc), bench_report.
from bench_db import cpu_sources  # noqa: E402
from bench_report import Report, new_report, render, write_json  # noqa: E402
from bench_resources import Resources  # noqa: E402
from bench_settings import BenchError, Settings, parse_args  # noqa: E402
from bench_votes import make_votes  # noqa: E402
from latency_phase import phase_latency  # noqa: E402
from reference_consumers import phase_bare, phase_naive  # noqa: E402
from service_phase import phase_service  # noqa: E402


def run(s: Settings, res: Resources, log_dir: Path, report: Report) -> None:
    """Run the selected phases in order, bare and service once per round, filling `report` as each one ends."""
    votes = make_votes(s.votes, laws=s.laws, seed=s.seed)
    sources = cpu_sources(s.endpoints)
    report.cpu_sources = asdict(sources)
    for rnd in range(1, s.rounds + 1):
        of = f" (round {rnd} of {s.rounds})" if s.rounds > 1 else ""
        for phase in ("bare", "service"):
            if phase not in s.phases:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {phase}{of} ...", file=sys.stderr, flush=True)
            if phase == "bare":
                report.bare_rounds.append(phase_bare(s, res, [v.body() for v in votes], sources))
            else:
                run = "service" if s.rounds == 1 else f"service {rnd}"
                report.service_rounds.append(phase_service(s, res, votes, log_dir, report, sources, run=run))
    for phase in ("naive", "latency"):
        if phase not in s.phases:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {phase} ...", file=sys.stderr, flush=True)
        if phase == "naive":
            report.naive = phase_naive(s, res, votes[: s.naive_votes], report, sources)
        else:
            report.latency = phase_latency(s, res, log_dir, report)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv, description=__doc__)
    if (ROOT / ".env").exists():
        print(f"warning: {ROOT / '.env'} exists; the service loads it for settings not given here", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="vote-bench-"))
    res = Resources(s.endpoints)
    report = new_report(s)
    code = 1
    try:
        run(s, res, log_dir, report)
        code = 0 if report.checks_ok else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for problem in res.cleanup():
            print(f"cleanup failed: {problem}", file=sys.stderr)
        if s.keep_logs or code != 0:
            report.log_dir = str(log_dir)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    if code not in (0, 1) or not report.completed(s.phases):
        print("(incomplete run: figures of the phases that finished)")
    print(render(report))
    if s.json_path is not None:
        write_json(s.json_path, report)
    return code


if __name__ == "__main__":
    sys.exit(main())
