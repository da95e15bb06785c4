#!/usr/bin/env python3
"""How long a stop takes when PostgreSQL hangs mid-query: SIGTERM to exit, against SHUTDOWN_TIMEOUT_SECONDS.

Run from the repository root, with RabbitMQ and PostgreSQL on 127.0.0.1 (TEST_* variables override
them, as for the tests):

    .venv/bin/python bench/shutdown.py                    # 3 rounds, SHUTDOWN_TIMEOUT_SECONDS=2
    .venv/bin/python bench/shutdown.py --rounds 5 --budget 5

Each round starts the service as users start it (its own database, queue and least-privilege role),
lets it count, then pauses a TCP proxy between it and PostgreSQL with a batch on its way, and sends
SIGTERM. docs/operations.md says the process exits within the budget plus about a second; this prints
each round's seconds from SIGTERM to exit and exits 1 when one took longer than the budget plus
--margin (2.5 s by default). The tests check what happens (exit 1, nothing lost), not how fast.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/shutdown.py` puts bench/ on the path, not the repository
from tests.proxy import TcpProxy  # noqa: E402
from tests.roles import service_role  # noqa: E402
from tests.support import (  # noqa: E402
    POSTGRES_HOST,
    POSTGRES_PORT,
    Service,
    audit_count,
    declare_queue,
    make_votes,
    pg_connect,
    publish,
    scratch_database,
    scratch_queues,
    wait_for,
)


def _round(budget: float, scratch: Path, n: int) -> float:
    with scratch_database(pg_connect("postgres"), prefix="agg_bench") as dbname, scratch_queues() as names:
        queue = declare_queue(names)
        with service_role(dbname) as role:
            proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
            svc = Service(
                queue=queue,
                dbname=dbname,
                log_path=scratch / f"service-{n}.log",
                env={**role.env(), "POSTGRES_PORT": str(proxy.port), "SHUTDOWN_TIMEOUT_SECONDS": str(budget)},
            )
            try:
                svc.start()
                votes = make_votes(600, laws=3, seed=n)
                publish(queue, [v.body() for v in votes[:300]])
                wait_for(lambda: audit_count(dbname) == 300, timeout=60, what="the first votes counted")
                proxy.pause()
                publish(queue, [v.body() for v in votes[300:]])
                wait_for(proxy.holding, timeout=30, interval=0.01, what="a batch's query held back")
                signalled = time.monotonic()
                svc.signal()
                assert svc.proc is not None
                code = svc.proc.wait(120)
                took = time.monotonic() - signalled
                if code != 1:
                    raise SystemExit(f"round {n}: exit code {code}, expected 1:\n{svc.logs()}")
                return took
            finally:
                proxy.close()
                if svc.proc is not None and svc.proc.poll() is None:
                    svc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument("--budget", type=float, default=2.0, help="SHUTDOWN_TIMEOUT_SECONDS (2)")
    p.add_argument("--margin", type=float, default=2.5, help="seconds allowed past the budget (2.5)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="agg-bench-shutdown-") as scratch:
        took = [_round(a.budget, Path(scratch), n) for n in range(1, a.rounds + 1)]
    for n, seconds in enumerate(took, 1):
        print(f"round {n}: exited {seconds:.2f}s after SIGTERM (SHUTDOWN_TIMEOUT_SECONDS={a.budget:g})")
    worst = max(took)
    verdict = "ok" if worst <= a.budget + a.margin else "TOO SLOW"
    print(f"stop with PostgreSQL hung mid-query: worst {worst:.2f}s, bound {a.budget + a.margin:.1f}s: {verdict}")
    return 0 if worst <= a.budget + a.margin else 1


if __name__ == "__main__":
    sys.exit(main())
