#!/usr/bin/env python3
"""Where the CPU goes: the bare consumer and the service under py-spy, on the same backlog.

Run from the repository root (py-spy is a tool, not a dependency: `pip install py-spy`):

    .venv/bin/python bench/profile_service.py                     # 100,000 votes, 50 laws
    .venv/bin/python bench/profile_service.py --votes 200000 --top 25 --out /tmp/profiles

Each consumer runs on a preloaded backlog, as in bench/throughput.py, with py-spy attached by
pid (sampling without pausing the process, idle threads left out, so a sample is a thread on
the CPU). It prints, per thread:

- its own CPU time per vote from /proc/<pid>/task/<tid>/stat, and its context switches per
  vote (voluntary: it waited, for a lock, the GIL or a socket; involuntary: it was preempted);
- the functions with the most self time (the leaf frame of each sample), as a share of that
  thread's samples and in µs of CPU per vote.

The raw py-spy files (flamegraph input) are kept in --out.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python bench/profile_service.py` puts bench/ on the path, not the repository the shared tools live in.
sys.path.insert(0, str(ROOT))
from bench_db import Watcher  # noqa: E402
from bench_publishers import publish_backlog  # noqa: E402
from bench_resources import MP, Resources  # noqa: E402
from bench_settings import BenchError, Settings, parse_args  # noqa: E402
from bench_votes import BenchVote, make_votes  # noqa: E402
from procstat import CpuSources  # noqa: E402
from reference_consumers import bare_consumer_main  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

# Whose stack a sample is, by a frame only that thread runs (py-spy names threads, but pika's
# and psycopg2's helper threads have no names of their own).
_ROLES = (("_work (pipeline.py", "flush worker"), ("serve_forever", "http"), ("_loop (db.py", "db watchdog"))


@dataclass
class ThreadCpu:
    name: str
    cpu_s: float
    voluntary: int
    involuntary: int


def thread_cpu(pid: int) -> dict[int, ThreadCpu]:
    """CPU seconds and context switches of each thread of a process, by thread id."""
    out: dict[int, ThreadCpu] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        except OSError:
            continue  # the thread ended meanwhile
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out[int(task.name)] = ThreadCpu(
            (task / "comm").read_text().strip(),
            cpu,
            int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]),
        )
    return out


def spy(pid: int, path: Path, rate: int, *, gil: bool = False) -> subprocess.Popen[bytes]:
    command = ["py-spy", "record", "--pid", str(pid), "--threads", "--nonblocking", "--nolineno"]
    command += ["--rate", str(rate), "--format", "raw", "--output", str(path)]
    if gil:
        command.append("--gil")
    spy_bin = Path(sys.executable).with_name("py-spy")
    if spy_bin.exists():
        command[0] = str(spy_bin)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603 (our own argv)


def stop_spy(proc: subprocess.Popen[bytes]) -> None:
    """py-spy writes its file when the process it watches exits, or on SIGINT."""
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


def read_samples(path: Path) -> dict[str, Counter[str]]:
    """Self samples per thread role: {role: Counter(leaf function -> samples)}."""
    threads: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        role = next((name for marker, name in _ROLES if marker in stack), None)
        if role is None:
            role = "main" if "MainThread" in frames[0] else frames[0]
        threads.setdefault(role, Counter())[frames[-1]] += int(count)
    return threads


def report(title: str, path: Path, cpu: dict[int, ThreadCpu], votes: int, top: int) -> None:
    print(f"\n== {title}: {votes} votes")
    for tid, t in sorted(cpu.items(), key=lambda item: -item[1].cpu_s):
        if t.cpu_s or t.voluntary > 10:
            print(
                f"  thread {tid} ({t.name}): {1e6 * t.cpu_s / votes:.1f} us CPU/vote, "
                f"{1000 * t.voluntary / votes:.1f} voluntary + {1000 * t.involuntary / votes:.1f} involuntary "
                "context switches per 1,000 votes"
            )
    total_cpu = sum(t.cpu_s for t in cpu.values())
    for role, leaves in sorted(read_samples(path).items(), key=lambda item: -sum(item[1].values())):
        samples = sum(leaves.values())
        print(f"  -- {role}: {samples} samples; top self time (share of this thread's samples)")
        for function, n in leaves.most_common(top):
            print(f"     {100 * n / samples:5.1f}%  {function}")
    print(f"  process CPU: {1e6 * total_cpu / votes:.1f} us/vote")


def since(start: dict[int, ThreadCpu], end: dict[int, ThreadCpu]) -> dict[int, ThreadCpu]:
    """Each thread's CPU and context switches between two readings (threads started meanwhile: all of theirs)."""
    zero = ThreadCpu("", 0.0, 0, 0)
    return {
        tid: ThreadCpu(
            t.name,
            t.cpu_s - start.get(tid, zero).cpu_s,
            t.voluntary - start.get(tid, zero).voluntary,
            t.involuntary - start.get(tid, zero).involuntary,
        )
        for tid, t in end.items()
    }


def profile_bare(s: Settings, res: Resources, bodies: list[bytes], out: Path, rate: int, top: int, gil: bool) -> None:
    queue = res.new_queue()
    publish_backlog(s, res, queue, bodies)
    receiver, sender = MP.Pipe(duplex=False)
    child = res.child(bare_consumer_main, s.endpoints, queue, len(bodies), CpuSources(None, None), sender)
    sender.close()
    assert child.pid is not None
    spy_proc = spy(child.pid, out / "bare.txt", rate, gil=gil)
    if not receiver.poll(s.stall_timeout_s + len(bodies) / 500):
        raise BenchError("the bare consumer did not finish")
    result = receiver.recv()
    cpu = thread_cpu(child.pid)  # still alive: it closes its connection after reporting
    child.join(10)
    stop_spy(spy_proc)
    res.delete_queue(queue)
    report(f"bare consumer ({result.seconds:.2f} s)", out / "bare.txt", cpu, len(bodies), top)


def profile_service(
    s: Settings, res: Resources, votes: list[BenchVote], out: Path, rate: int, top: int, gil: bool
) -> None:
    """Sampled and measured from the first vote counted to the last, as bench/throughput.py measures
    the service's CPU: start-up (imports, the schema) is left out."""
    queue = res.new_queue()
    dbname = res.new_database(schema=False)
    publish_backlog(s, res, queue, [v.body() for v in votes])
    svc = res.service(ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=out / "service.log"))
    spy_proc: subprocess.Popen[bytes] | None = None
    watcher = Watcher(s.endpoints, dbname)
    started = time.monotonic()
    first = 0
    at_first: dict[int, ThreadCpu] = {}
    try:
        while (counted := watcher.counted()) < len(votes):
            if counted and spy_proc is None:
                first, at_first = counted, thread_cpu(svc.pid)
                spy_proc = spy(svc.pid, out / "service.txt", rate, gil=gil)
            svc.check_running()
            if time.monotonic() - started > s.stall_timeout_s + len(votes) / 500:
                raise BenchError("the service did not count the backlog in time")
            time.sleep(0.05)
    finally:
        watcher.close()
    seconds = time.monotonic() - started
    cpu = since(at_first, thread_cpu(svc.pid))
    svc.stop()
    if spy_proc is None:
        raise BenchError("the service counted the whole backlog before the first poll: use more --votes")
    stop_spy(spy_proc)
    res.delete_queue(queue)
    res.drop_database(dbname)
    report(
        f"service, defaults ({seconds:.2f} s from start; from the first vote counted, {first} then)",
        out / "service.txt",
        cpu,
        len(votes) - first,
        top,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--votes", type=int, default=100_000)
    p.add_argument("--laws", type=int, default=50)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (250)")
    p.add_argument("--top", type=int, default=15, help="functions listed per thread (15)")
    p.add_argument("--out", type=Path, help="directory for the raw py-spy files (a new temporary one)")
    p.add_argument("--gil", action="store_true", help="only samples of the thread holding the GIL (py-spy --gil)")
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="vote-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    s = parse_args(["--votes", str(a.votes), "--laws", str(a.laws)])
    res = Resources(s.endpoints)
    votes = make_votes(s.votes, laws=s.laws, seed=s.seed)
    print(f"load average at start: {os.getloadavg()}; py-spy files in {out}")
    try:
        profile_bare(s, res, [v.body() for v in votes], out, a.rate, a.top, a.gil)
        profile_service(s, res, votes, out, a.rate, a.top, a.gil)
    finally:
        for problem in res.cleanup():
            print(f"cleanup failed: {problem}", file=sys.stderr)
    if a.out is None:
        print(f"(raw files: {out}; remove with rm -r)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
