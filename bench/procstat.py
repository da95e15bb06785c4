"""CPU time from /proc: a process's, a server's with its children, the whole machine's."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (utime + stime of /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def busy_core_seconds(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Core-seconds the whole machine was busy between two machine_busy_jiffies() readings."""
    return (after[0] - before[0]) / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: [0] state, [1] ppid, [11:15] CPU ticks."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    """The live children of a process: /proc/<pid>/task/*/children, else a scan of every ppid."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return [int(c) for tid in tasks for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a server process and its children, including children that exited.

    Its own utime + stime, each live child's (and what that child reaped), and cutime + cstime:
    the CPU of children it has waited for. A PostgreSQL backend that ends during a run is
    reaped by the postmaster, so the difference of two readings still counts it.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    ticks = sum(int(v) for v in fields[11:15])
    for child in _children(pid):
        child_fields = _stat_fields(child)
        if child_fields is not None:
            ticks += sum(int(v) for v in child_fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def listening_pid(port: int) -> int | None:
    """The process holding a TCP socket that listens on `port` here (needs root or the same user)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    for entry in os.listdir("/proc") if inodes else ():
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                return int(entry)
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class CpuSources:
    """The server processes whose CPU a run is charged with, found once before the runs."""

    rabbitmq_pid: int | None  # beam.smp listening on the AMQP port
    postgres_pid: int | None  # the postmaster of the cluster that serves the bench's connections

    @classmethod
    def find(cls, *, amqp_port: int | None, postgres_backend_pid: int | None) -> CpuSources:
        beam = listening_pid(amqp_port) if amqp_port is not None else None
        if beam is not None and _command(beam) != "beam.smp":
            beam = None
        postmaster = None
        if postgres_backend_pid is not None:
            fields = _stat_fields(postgres_backend_pid)
            parent = int(fields[1]) if fields is not None else None
            # A server elsewhere has no such process here, or an unrelated one with that pid.
            if parent is not None and _command(parent) == "postgres" and _command(postgres_backend_pid) == "postgres":
                postmaster = parent
        return cls(beam, postmaster)


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent during one span; None where the process could not be read."""

    own_s: float | None  # the measured consumer: every instance of the service, or the bench's own child
    rabbitmq_s: float | None
    postgres_s: float | None  # the whole cluster
    backends_s: float | None  # the PostgreSQL backends serving the measured consumer, part of postgres_s
    busy_core_s: float  # the whole machine, every process included
    machine_share: float | None  # the machine's busy share of all cores
    wall_s: float


@dataclass(frozen=True)
class CpuReading:
    own: float | None
    rabbitmq: float | None
    postgres: float | None
    backends: float | None
    machine: tuple[int, int]
    at: float

    @classmethod
    def take(
        cls, sources: CpuSources, pids: Sequence[int], *, backends: Sequence[int] = (), own_first: bool
    ) -> CpuReading:
        """One reading. The own processes are read last at the start of a span and first at its end
        (`own_first`), so that a consumer reading itself does not count the reading of the servers.

        `backends`: PostgreSQL backends whose CPU is also given on its own (the same pids at both
        ends of a span; one that exits in between makes the figure unknown).
        """
        own = _sum_cpu(pids) if own_first else None
        rabbitmq = tree_cpu_seconds(sources.rabbitmq_pid) if sources.rabbitmq_pid else None
        postgres = tree_cpu_seconds(sources.postgres_pid) if sources.postgres_pid else None
        backend_cpu = _sum_cpu(backends) if backends and sources.postgres_pid else None
        machine = machine_busy_jiffies()
        if not own_first:
            own = _sum_cpu(pids)
        return cls(own, rabbitmq, postgres, backend_cpu, machine, time.monotonic())

    def until(self, end: CpuReading) -> CpuUse:
        total = end.machine[1] - self.machine[1]
        return CpuUse(
            own_s=_delta(self.own, end.own),
            rabbitmq_s=_delta(self.rabbitmq, end.rabbitmq),
            postgres_s=_delta(self.postgres, end.postgres),
            backends_s=_delta(self.backends, end.backends),
            busy_core_s=busy_core_seconds(self.machine, end.machine),
            machine_share=(end.machine[0] - self.machine[0]) / total if total else None,
            wall_s=end.at - self.at,
        )


def _sum_cpu(pids: Sequence[int]) -> float | None:
    readings = [process_cpu_seconds(pid) for pid in pids]
    return None if any(r is None for r in readings) else sum(r for r in readings if r is not None)


def _delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None
