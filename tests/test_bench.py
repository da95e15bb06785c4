"""bench/: CPU from /proc and the medians and ratios `make bench` prints (no broker, no database)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ is a directory of scripts, not a package: its modules import each other by name.
sys.path.append(str(ROOT / "bench"))

from bench_report import Report, Throughput, render  # noqa: E402
from procstat import CpuReading, CpuSources, CpuUse, process_cpu_seconds, tree_cpu_seconds  # noqa: E402

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def test_a_server_is_charged_with_the_cpu_of_children_that_exited_during_the_span() -> None:
    """As a PostgreSQL backend that ends mid-run: alive at the first reading, reaped before the second."""
    child = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=1.0)])
    try:
        _wait_for_cpu(child.pid, 0.2)
        before = tree_cpu_seconds(os.getpid())
        spent_before = process_cpu_seconds(child.pid)
    finally:
        child.wait(60)  # reaped here: its CPU moves to this process's cutime + cstime
    after = tree_cpu_seconds(os.getpid())
    assert before is not None
    assert after is not None
    assert spent_before is not None
    # What the child burnt after the first reading (up to its 1.0 s), less a clock tick or two.
    assert after - before >= 1.0 - spent_before - 0.05, (before, after, spent_before)


def test_a_span_charges_the_measured_processes_with_their_own_cpu() -> None:
    sources = CpuSources(rabbitmq_pid=None, postgres_pid=None)
    burner = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=30.0)])
    try:
        _wait_for_cpu(burner.pid, 0.05)
        start = CpuReading.take(sources, [burner.pid], own_first=False)
        assert start.own is not None
        _wait_for_cpu(burner.pid, start.own + 0.3)
        use = start.until(CpuReading.take(sources, [burner.pid], own_first=True))
        spent = process_cpu_seconds(burner.pid)
    finally:
        burner.kill()
        burner.wait(10)
    assert use.own_s is not None
    assert spent is not None
    assert 0.3 <= use.own_s <= spent - start.own + 0.02
    assert use.busy_core_s >= use.own_s - 0.02  # the machine's busy time includes the burner's
    assert use.rabbitmq_s is None  # no server given: unknown, not zero
    assert use.postgres_s is None
    assert use.backends_s is None


def _wait_for_cpu(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + 60
    while (process_cpu_seconds(pid) or 0.0) < seconds:
        assert time.monotonic() < deadline, f"process {pid} never reached {seconds} s of CPU"
        time.sleep(0.01)


def _run(votes: int, own_us: float, machine_us: float, rabbitmq_us: float, postgres_us: float) -> Throughput:
    use = CpuUse(
        own_s=own_us * votes / 1e6,
        rabbitmq_s=rabbitmq_us * votes / 1e6,
        postgres_s=postgres_us * votes / 1e6,
        backends_s=None,
        busy_core_s=machine_us * votes / 1e6,
        machine_share=1.0,
        wall_s=1.0,
    )
    return Throughput.measured(votes, votes / 10_000, 5_000.0, use, votes)


def test_the_table_prints_each_round_then_the_medians_and_the_ratios_against_their_targets() -> None:
    report = Report(
        settings={"votes": 1000, "laws": 5, "service_env": {}, "instances": 1, "rounds": 3},
        machine={"date": "2026-12-06 08:00 UTC", "cores": 2, "cpu": "test", "loadavg_at_start": (0.5, 0.5, 0.5)},
        cpu_sources={"rabbitmq_pid": 11, "postgres_pid": 22},
    )
    # Own CPU per vote: bare 20 each round, service 30, 26, 40: ratios 1.5, 1.3, 2.0, median 1.5.
    # Machine: bare 50, service 70, 90, 80: ratios 1.4, 1.8, 1.6, median 1.6 (the target, met).
    for own, machine in ((30.0, 70.0), (26.0, 90.0), (40.0, 80.0)):
        report.bare_rounds.append(_run(1000, 20.0, 50.0, 10.0, 5.0))
        report.service_rounds.append(_run(1000, own, machine, 15.0, 25.0))
    text = render(report)
    lines = text.splitlines()
    assert [line.split()[:3] for line in lines if line.startswith("round ")] == [
        ["round", "1", "bare"],
        ["round", "1", "service"],
        ["round", "2", "bare"],
        ["round", "2", "service"],
        ["round", "3", "bare"],
        ["round", "3", "service"],
    ]
    service_median = next(line for line in lines if line.startswith("service (defaults)"))
    # votes, seconds, votes/s, own, machine, RabbitMQ, PostgreSQL, its DB, rest: each column's median,
    # the rest too (the rounds' rests are 0, 24 and 0; 80 - 30 - 15 - 25 would mix rounds).
    assert service_median.split()[2:] == ["1000", "0.10", "10000", "30.0", "80.0", "15.0", "25.0", "-", "0.0"]
    own_line = next(line for line in lines if line.startswith("service CPU/vote / bare CPU/vote"))
    assert "1.50   (target <= 1.4 MISSED)" in own_line
    assert "rounds: 1.50, 1.30, 2.00" in own_line
    machine_line = next(line for line in lines if line.startswith("machine CPU/vote, service run / bare run"))
    assert "1.60   (target <= 1.6 ok)" in machine_line
    assert "rounds: 1.40, 1.80, 1.60" in machine_line
    assert "beam.smp pid 11" in text
    assert "postmaster pid 22" in text
