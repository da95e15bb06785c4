#!/usr/bin/env python3
"""How throughput and CPU per vote scale with instances: bench/throughput.py over a grid.

Run from the repository root, with RabbitMQ and PostgreSQL as for bench/throughput.py:

    .venv/bin/python bench/scaling.py                        # 1, 2, 3 instances x 1 and 50 laws, 2 rounds
    .venv/bin/python bench/scaling.py --instances 1,2 --laws 1 --rounds 1 --votes 20000

Each cell is one run of `bench/throughput.py --phases bare,service --rounds 1 --instances N --laws L`
(a bare consumer and N service instances sharing one queue and one database, on the same
backlog), so the bare consumer is measured in the same run as the instances it is compared
with. Rounds go over the whole grid in turn, so a noisy minute spoils one cell of a round,
not a whole row. The table gives, per cell, one figure per round:

- service votes/s (first vote written to last), every instance's own CPU per vote summed,
  the whole machine's busy CPU per vote, the bare consumer's CPU per message, their ratio,
  and how busy the machine was during the service run;
- whether every exactly-once check passed.

The exit code is 1 if any run failed or any check did not pass.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Cell:
    laws: int
    instances: int


def _numbers(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=_numbers, default=[1, 2, 3], help="instance counts (1,2,3)")
    p.add_argument("--laws", type=_numbers, default=[1, 50], help="numbers of laws (1,50)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the grid (2)")
    p.add_argument("--votes", type=int, default=50_000, help="backlog per run (50000)")
    return p.parse_args(argv)


def run_cell(cell: Cell, votes: int, out: Path) -> dict[str, Any] | None:
    """One bench/throughput.py run; its JSON report, or None if it wrote none."""
    command = [
        sys.executable,
        str(ROOT / "bench" / "throughput.py"),
        "--phases",
        "bare,service",
        "--rounds",
        "1",
        "--votes",
        str(votes),
        "--laws",
        str(cell.laws),
        "--instances",
        str(cell.instances),
        "--json",
        str(out),
    ]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603 (our own argv)
    if finished.returncode not in (0, 1) or not out.exists():
        print(finished.stdout + finished.stderr, file=sys.stderr)
        return None
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def row(cell: Cell, reports: list[dict[str, Any] | None]) -> str:
    def each(pick: Any, spec: str) -> str:
        values = []
        for r in reports:
            try:
                values.append(_fmt(pick(r), spec) if r is not None else "failed")
            except (KeyError, TypeError):
                values.append("n/a")
        return " / ".join(values)

    def busy(r: dict[str, Any]) -> float | None:
        share = r["service"]["details"].get("machine_busy_share")
        return None if share is None else 100 * share

    return (
        f"| {cell.laws} | {cell.instances} "
        f"| {each(lambda r: r['service']['votes_per_s'], ',.0f')} "
        f"| {each(lambda r: r['service']['cpu_us_per_vote'], '.1f')} "
        f"| {each(lambda r: r['service']['machine_us_per_vote'], '.1f')} "
        f"| {each(lambda r: r['bare']['cpu_us_per_vote'], '.1f')} "
        f"| {each(lambda r: r['service_cpu_ratio'], '.2f')} "
        f"| {each(busy, '.0f')} % "
        f"| {each(lambda r: 'ok' if r['checks_ok'] else 'FAILED', 's')} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    cells = [Cell(laws, n) for laws in a.laws for n in a.instances]
    results: dict[Cell, list[dict[str, Any] | None]] = {cell: [] for cell in cells}
    loads = []
    with tempfile.TemporaryDirectory(prefix="vote-scaling-") as tmp:
        for round_no in range(1, a.rounds + 1):
            for cell in cells:
                started = datetime.now(UTC).strftime("%H:%M:%S")
                print(
                    f"[{started}] round {round_no}: {cell.laws} laws, {cell.instances} instances ...", file=sys.stderr
                )
                report = run_cell(cell, a.votes, Path(tmp) / f"r{round_no}-{cell.laws}-{cell.instances}.json")
                results[cell].append(report)
                if report is not None:
                    loads.append(report["machine"]["loadavg_at_start"][0])
    first = next((r for rs in results.values() for r in rs if r is not None), None)
    machine = first["machine"] if first else {}
    print(
        f"scaling: {a.votes} votes per run, {a.rounds} rounds, {machine.get('cores')} cores, {machine.get('cpu')}, "
        f"ended {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; load average at the starts "
        f"{_fmt(min(loads, default=None), '.2f')}-{_fmt(max(loads, default=None), '.2f')}"
    )
    print(
        "| laws | instances | service votes/s | service CPU µs/vote | machine µs/vote | bare CPU µs/vote "
        "| CPU ratio | busy | exactly-once |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        print(row(cell, results[cell]))
    ok = all(r is not None and r["checks_ok"] for rs in results.values() for r in rs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
