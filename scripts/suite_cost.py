#!/usr/bin/env python3
"""What `make test-fast` spends its CPU on, against the 30 s on two cores it should take.

Run from the repository root on an otherwise idle machine, after `make test-tools`:

    .venv/bin/python scripts/suite_cost.py              # the run, then each unit 5 times
    .venv/bin/python scripts/suite_cost.py --rounds 9

First it runs the fast part of the suite once, as `make test-fast` does (the Makefile's
PYTEST_PARALLEL, `-m "not ha and not slow"`), with a plugin (tests/suite_counter.py) that counts
what the tests start before they check anything: pytest processes, service runs, aggregator.py
commands, other Python processes and programs, test databases, service roles made with their
schema. It reads the whole machine's CPU over the run from /proc/stat, and PostgreSQL's and
RabbitMQ's (bench/procstat.py).

Then it measures each unit alone, one after the other, `--rounds` times, on the same servers: the
machine's CPU from the unit's start to its end, median over the rounds. A unit measured alone on an
idle machine costs no more than it does among the run's others, so count x cost summed is a floor:
what the run spends before its tests publish a vote or check a count. The budget is what two cores
give in 30 s; the run fits it only if its CPU does, with every core busy from start to end.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from procstat import CpuReading, CpuSources, busy_core_seconds, machine_busy_jiffies  # noqa: E402

from tests.roles import create_service_role, drop_role  # noqa: E402
from tests.support import (  # noqa: E402
    RABBITMQ_PORT,
    Service,
    clean_env,
    declare_queue,
    pg_connect,
    run_cli,
    scratch_database,
    scratch_queues,
    service_env,
    tool_command,
    tool_env,
)

BUDGET_S = 30.0
MARKERS = "not ha and not slow"
UNITS = (
    "pytest process",
    "service run",
    "aggregator.py command",
    "other Python process",
    "other program",
    "test database",
    "service role with its schema",
)


def pytest_parallel() -> list[str]:
    """The xdist options `make test-fast` runs with: PYTEST_PARALLEL in the Makefile."""
    found = re.search(r"^PYTEST_PARALLEL \?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    if found is None:
        raise SystemExit("PYTEST_PARALLEL not found in the Makefile")
    return shlex.split(found.group(1))


def test_env(**extra: str) -> dict[str, str]:
    """The environment `make test-fast` gives pytest: the test tools' bin/ first on PATH."""
    tools = ROOT / ".venv" / "tools" / "bin"
    return {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def cpu_sources() -> CpuSources:
    conn = pg_connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            row = cur.fetchone()
        return CpuSources.find(amqp_port=RABBITMQ_PORT, postgres_backend_pid=row[0] if row else None)
    finally:
        conn.close()


def run_suite(sources: CpuSources) -> tuple[Counter[str], str]:
    """Run test-fast once, counting units; returns the counts and a line on the run."""
    with tempfile.TemporaryDirectory(prefix="suite-cost-") as counts_dir:
        command = [sys.executable, "-m", "pytest", *pytest_parallel(), "-m", MARKERS, "-q"]
        command += ["-p", "tests.suite_counter", "-p", "no:cacheprovider"]
        start = CpuReading.take(sources, [], own_first=False)
        done = subprocess.run(  # noqa: S603 - this interpreter running pytest, a fixed argument list
            command, cwd=ROOT, env=test_env(SUITE_COUNTER_DIR=counts_dir), capture_output=True, text=True, check=False
        )
        use = start.until(CpuReading.take(sources, [], own_first=False))
        counts: Counter[str] = Counter()
        for path in Path(counts_dir).iterdir():
            counts.update(path.read_text().split("\n")[:-1])
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "(no output)"
    if done.returncode != 0:
        raise SystemExit(f"the run failed ({done.returncode}): {summary}\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    line = (
        f"the run: {summary}; wall {use.wall_s:.1f} s, machine CPU {use.busy_core_s:.1f} s "
        f"(PostgreSQL {_s(use.postgres_s)}, RabbitMQ {_s(use.rabbitmq_s)})"
    )
    return counts, line


def _s(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} s"


def machine_cpu(action: Callable[[], object]) -> float:
    """Core-seconds the whole machine was busy while `action` ran."""
    before = machine_busy_jiffies()
    action()
    return busy_core_seconds(before, machine_busy_jiffies())


class Units:
    """Each unit on its own, against the shared servers, in a database and a queue of the script's."""

    def __init__(self, workdir: Path, dbname: str, queue: str) -> None:
        self.workdir = workdir
        self.dbname = dbname
        self.queue = queue
        self.role = create_service_role(dbname)
        self.runs = 0

    def close(self) -> None:
        drop_role(self.role.name, self.dbname)

    def actions(self) -> dict[str, Callable[[], None]]:
        """The action that is one of each unit."""
        return {
            "pytest process": self.pytest_process,
            "service run": self.service_run,
            "aggregator.py command": self.aggregator_command,
            "other Python process": self.other_python_process,
            "other program": self.other_program,
            "test database": self.test_database,
            "service role with its schema": self.service_role_with_its_schema,
        }

    def pytest_process(self) -> None:
        """What every pytest process does before its first test: start and collect the tests."""
        command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", MARKERS, "-p", "no:xdist"]
        command += ["-p", "no:cacheprovider"]
        subprocess.run(command, cwd=ROOT, env=test_env(), capture_output=True, check=True)  # noqa: S603 - fixed list

    def service_run(self) -> None:
        """The service started as the tests start it, consuming, then stopped with SIGTERM."""
        self.runs += 1
        log = self.workdir / f"service-{self.runs}.log"
        service = Service(queue=self.queue, dbname=self.dbname, log_path=log, env=self.role.env())
        code = service.start().stop()
        if code != 0:
            raise SystemExit(f"the service exited with {code}:\n{service.logs()}")

    def aggregator_command(self) -> None:
        """`aggregator.py results --polls-closed` on the schema without votes: a command that
        connects and reads (the cheapest of those the tests run)."""
        done = run_cli("results", "--polls-closed", env=service_env(dbname=self.dbname, queue=self.queue))
        if done.returncode != 0:
            raise SystemExit(f"results exited with {done.returncode}: {done.stderr}")

    def other_python_process(self) -> None:
        """The load publisher's --help: a Python process that imports pika and the tool."""
        command = tool_command("--help")
        subprocess.run(command, env=tool_env(), cwd=self.workdir, capture_output=True, check=True)  # noqa: S603 - fixed

    def other_program(self) -> None:
        """A program that does nothing: what starting a process costs (promtool and the like cost more)."""
        subprocess.run(["/bin/true"], env=clean_env(), check=True)

    def test_database(self) -> None:
        """CREATE DATABASE and DROP DATABASE of a test's database."""
        name = f"agg_test_cost_{uuid.uuid4().hex[:12]}"
        admin = pg_connect("postgres")
        try:
            with admin.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            admin.close()

    def service_role_with_its_schema(self) -> None:
        """A role made by service_role.sql after init_db.sql in a new database, then dropped: the
        database's own cost is the unit above, so it is taken off."""
        name = f"agg_test_cost_{uuid.uuid4().hex[:12]}"
        admin = pg_connect("postgres")
        try:
            with admin.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            role = create_service_role(name)
            drop_role(role.name, name)
            with admin.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            admin.close()


def measure_units(rounds: int) -> dict[str, float]:
    """Median core-seconds of each unit over `rounds`, one unit after the other in each round."""
    spent: dict[str, list[float]] = {unit: [] for unit in UNITS}
    with (
        scratch_database(pg_connect("postgres"), prefix="agg_test_cost") as dbname,
        tempfile.TemporaryDirectory(prefix="suite-cost-") as workdir,
        scratch_queues() as queues,
    ):
        units = Units(Path(workdir), dbname, declare_queue(queues))
        try:
            actions = units.actions()
            for _ in range(rounds):
                for unit in UNITS:
                    time.sleep(0.5)  # what the previous unit left to the servers (a checkpoint) ends first
                    spent[unit].append(machine_cpu(actions[unit]))
        finally:
            units.close()
    each = {unit: statistics.median(values) for unit, values in spent.items()}
    # The role's database was created and dropped with it: the database's own cost is its unit's.
    each["service role with its schema"] = max(0.0, each["service role with its schema"] - each["test database"])
    return each


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="times each unit is measured (median); default 5")
    args = parser.parse_args()
    admin = pg_connect("postgres")
    admin.close()
    sources = cpu_sources()
    counts, run_line = run_suite(sources)
    each = measure_units(args.rounds)
    cores = os.cpu_count() or 1
    print(f"{'unit':<30} {'count':>6} {'CPU each':>10} {'CPU in all':>11}")
    floor = 0.0
    for unit in UNITS:
        total = counts[unit] * each[unit]
        floor += total
        print(f"{unit:<30} {counts[unit]:>6} {each[unit] * 1000:>7.0f} ms {total:>9.1f} s")
    print(f"{'floor: the units alone':<30} {'':>6} {'':>10} {floor:>9.1f} s")
    print(run_line)
    print(f"budget: {cores} cores x {BUDGET_S:.0f} s = {cores * BUDGET_S:.0f} s of CPU, every core busy throughout")
    when = time.strftime("%F %H:%M %Z")
    print(f"units measured alone, {args.rounds} rounds, median; machine CPU from /proc/stat ({when})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
