#!/usr/bin/env python3
"""How fast tools/publish_votes.py publishes, unpaced, with publisher confirms, to the local RabbitMQ.

Run from the repository root, with RabbitMQ on 127.0.0.1:5672 (TEST_RABBITMQ_* override it, as for
the tests):

    .venv/bin/python bench/publisher.py                  # 3 runs of 20,000 messages
    .venv/bin/python bench/publisher.py --count 50000 --runs 5 --floor 2000

Each run publishes to a fresh durable queue (deleted afterwards) through the command line users run,
`python -m tools.publish_votes --json`, and reads its own summary. It prints the rate of each run and
the median, and exits 1 when the median is below --floor: a load test at the service's design rate
needs a publisher that is not the bottleneck (docs/tools.md). About 13,000 messages/s on an idle
2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/publisher.py` puts bench/ on the path, not the repository
from tests.support import RABBITMQ_HOST, RABBITMQ_PORT, amqp_connection, outside_checkout, tool_command, tool_env  # noqa: E402


def _run(count: int) -> float:
    queue = f"bench.publisher.{uuid.uuid4().hex[:12]}"
    try:
        result = subprocess.run(  # noqa: S603 (our own argv)
            tool_command(
                f"--host={RABBITMQ_HOST}",
                f"--port={RABBITMQ_PORT}",
                f"--count={count}",
                f"--queue={queue}",
                "--declare",
                "--json",
            ),
            cwd=outside_checkout(),
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise SystemExit(f"publish_votes exited {result.returncode}: {result.stderr.strip()}")
        summary = json.loads(result.stdout[result.stdout.index("{") :])
        if summary["confirmed"] != count:
            raise SystemExit(f"only {summary['confirmed']} of {count} confirmed: {result.stderr.strip()}")
        return float(summary["rate"])
    finally:
        conn = amqp_connection()
        try:
            conn.channel().queue_delete(queue)
        finally:
            conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--count", type=int, default=20_000, help="messages per run (20000)")
    p.add_argument("--runs", type=int, default=3, help="runs (3)")
    p.add_argument("--floor", type=float, default=2_000.0, help="lowest acceptable median, messages/s (2000)")
    a = p.parse_args()
    rates = []
    for i in range(a.runs):
        rates.append(_run(a.count))
        print(f"run {i + 1}: {a.count} messages, {rates[-1]:,.0f} messages/s")
    median = statistics.median(rates)
    verdict = "ok" if median >= a.floor else "BELOW"
    print(f"publisher, unpaced: median {median:,.0f} messages/s (floor {a.floor:,.0f}: {verdict})")
    return 0 if median >= a.floor else 1


if __name__ == "__main__":
    sys.exit(main())
