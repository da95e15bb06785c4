#!/usr/bin/env python3
"""Draining refused messages against draining votes: a flood of garbage must not slow counting.

Run from the repository root, with RabbitMQ and PostgreSQL as for bench/throughput.py:

    .venv/bin/python bench/refused.py                  # 20000 messages, 3 rounds
    .venv/bin/python bench/refused.py --messages 5000 --rounds 1

One service (`python aggregator.py`, as users run it) on a queue it declares itself, a quorum
queue with its dead-letter exchange and queue, and a database of its own. Each round, with the
service stopped, a backlog is published; then the service starts and the bench times the drain:

- valid:   --messages valid votes, until every one is counted and the queue is empty;
- refused: --messages invalid messages (a choice "maybe", as a new spelling upstream would send)
           followed by 200 valid votes (one batch), until the dead-letter queue holds every invalid message,
           the 200 votes are counted and the queue is empty.

The clock starts when the queue first holds fewer messages than were published (the service
consumes) and stops at the condition above, so the start-up is not timed. CPU per message is the
service's own (utime + stime from /proc) over the same window. Printed: each round, and the median
of the rounds. Exit code 1 if a drain did not finish or a count is wrong. Everything created is
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parent.parent
# `python bench/refused.py` puts bench/ on the path, not the repository the shared tools live in.
sys.path.insert(0, str(ROOT))
from bench_db import Watcher  # noqa: E402
from bench_publishers import publish_backlog  # noqa: E402
from bench_resources import Resources, queue_consumers  # noqa: E402
from bench_settings import BenchError, Endpoints, Settings  # noqa: E402
from bench_votes import make_votes  # noqa: E402
from procstat import process_cpu_seconds  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

POLL_S = 0.02
# Valid votes behind the refused ones: one full batch (BATCH_SIZE's default), so that neither drain
# ends on a batch that waits for BATCH_TIMEOUT_SECONDS (a fixed second, not a rate).
TRAILING_VOTES = 200


@dataclass(frozen=True)
class Drain:
    kind: str
    messages: int
    seconds: float
    cpu_us_per_message: float | None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000, help="backlog per drain (20000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of both drains (3)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a drain after this long (300 s)")
    p.add_argument("--rabbitmq-host", default="127.0.0.1")
    p.add_argument("--rabbitmq-port", type=int, default=5672)
    p.add_argument("--postgres-host", default="127.0.0.1")
    p.add_argument("--postgres-port", type=int, default=5432)
    p.add_argument("--postgres-user", default="postgres")
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> Settings:
    endpoints = Endpoints(a.rabbitmq_host, a.rabbitmq_port, a.postgres_host, a.postgres_port, a.postgres_user)
    return Settings(
        votes=a.messages,
        laws=10,
        naive_votes=0,
        latency_rate=1.0,
        latency_seconds=1.0,
        publishers=2,
        phases=("service",),
        service_env={"RABBITMQ_QUEUE_TYPE": "quorum", "LOG_LEVEL": "WARNING"},
        instances=1,
        json_path=None,
        seed=7,
        settle_s=1.0,
        stall_timeout_s=a.timeout,
        keep_logs=False,
        endpoints=endpoints,
    )


def ready(endpoints: Endpoints, queue: str) -> int:
    connection = pika.BlockingConnection(endpoints.amqp())
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def wait_declared(endpoints: Endpoints, queue: str, svc: ServiceProcess, timeout_s: float = 60.0) -> None:
    """Until the service has declared its queue and consumes it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if queue_consumers(endpoints, queue) >= 1:
                return
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
        svc.check_running()
        if time.monotonic() > deadline:
            raise BenchError(f"the service did not declare {queue} within {timeout_s:.0f}s:\n{svc.log_tail()}")
        time.sleep(0.1)


def purge(endpoints: Endpoints, queue: str) -> None:
    connection = pika.BlockingConnection(endpoints.amqp())
    try:
        connection.channel().queue_purge(queue)
    finally:
        connection.close()


def drain(
    s: Settings,
    svc: ServiceProcess,
    *,
    kind: str,
    queue: str,
    published: int,
    done: Callable[[], bool],
) -> Drain:
    """Time from the first message taken to `done`, with the service's CPU over the same window."""
    endpoints = s.endpoints
    timeout_s = s.stall_timeout_s
    deadline = time.monotonic() + timeout_s
    while ready(endpoints, queue) >= published:
        svc.check_running()
        if time.monotonic() > deadline:
            raise BenchError(f"{kind}: the service took nothing within {timeout_s:.0f}s:\n{svc.log_tail()}")
        time.sleep(POLL_S)
    started, cpu_before = time.perf_counter(), process_cpu_seconds(svc.pid)
    while not (ready(endpoints, queue) == 0 and done()):
        svc.check_running()
        if time.monotonic() > deadline:
            raise BenchError(f"{kind}: not drained within {timeout_s:.0f}s:\n{svc.log_tail()}")
        time.sleep(POLL_S)
    seconds, cpu_after = time.perf_counter() - started, process_cpu_seconds(svc.pid)
    cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) * 1e6 / published
    return Drain(kind, published, seconds, cpu)


def invalid_bodies(count: int, *, first_citizen: int) -> list[bytes]:
    bodies = []
    for vote in make_votes(count, laws=10, seed=first_citizen, first_citizen=first_citizen):
        fields = json.loads(vote.body())
        fields["choice"] = "maybe"
        bodies.append(json.dumps(fields).encode())
    return bodies


def one_round(s: Settings, res: Resources, queue: str, dbname: str, log: Path, n: int, rnd: int) -> list[Drain]:
    watcher = Watcher(s.endpoints, dbname)
    drains = []
    try:
        # Valid votes: a fresh range of citizens each round, so the database counts every one.
        first = rnd * 10 * n
        counted_before = watcher.counted()
        publish_backlog(s, res, queue, [v.body() for v in make_votes(n, laws=10, seed=rnd, first_citizen=first)])
        svc = res.service(ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=log))
        target = counted_before + n
        drains.append(drain(s, svc, kind="valid", queue=queue, published=n, done=lambda: watcher.counted() == target))
        if svc.stop() != 0:
            raise BenchError(f"the service exited uncleanly:\n{svc.log_tail()}")

        # Refused messages, then a few votes that must not wait behind them for long.
        purge(s.endpoints, f"{queue}.dead")
        bodies = invalid_bodies(n, first_citizen=first + n)
        trailing = make_votes(TRAILING_VOTES, laws=10, seed=rnd, first_citizen=first + 3 * n)
        counted_before = watcher.counted()
        publish_backlog(s, res, queue, bodies + [v.body() for v in trailing])
        svc = res.service(ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=log))
        target = counted_before + TRAILING_VOTES

        def refused_done() -> bool:
            return watcher.counted() == target and ready(s.endpoints, f"{queue}.dead") >= n

        drains.append(drain(s, svc, kind="refused", queue=queue, published=n + TRAILING_VOTES, done=refused_done))
        if svc.stop() != 0:
            raise BenchError(f"the service exited uncleanly:\n{svc.log_tail()}")
        dead = ready(s.endpoints, f"{queue}.dead")
        if dead != n:
            raise BenchError(f"the dead-letter queue holds {dead} messages, not {n}")
        if watcher.counted() != target:
            raise BenchError(f"counted {watcher.counted()} votes, not {target}")
    finally:
        watcher.close()
    return drains


def delete(endpoints: Endpoints, queue: str) -> None:
    connection = pika.BlockingConnection(endpoints.amqp())
    try:
        channel = connection.channel()
        for name in (queue, f"{queue}.dead"):
            channel.queue_delete(name)
        channel.exchange_delete(f"{queue}.dlx")
    finally:
        if connection.is_open:
            connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    s = settings(a)
    res = Resources(s.endpoints)
    queue = f"bench.refused.{uuid.uuid4().hex[:12]}"
    drains: list[Drain] = []
    code = 0
    with tempfile.TemporaryDirectory(prefix="vote-refused-") as tmp:
        log = Path(tmp) / "service.log"
        try:
            dbname = res.new_database(schema=True)
            # The service declares its queue (quorum, with the dead-letter exchange and queue), as in production.
            svc = res.service(ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=log))
            wait_declared(s.endpoints, queue, svc)
            svc.stop()
            for rnd in range(1, a.rounds + 1):
                print(f"round {rnd} ...", file=sys.stderr)
                drains += one_round(s, res, queue, dbname, log, a.messages, rnd)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            code = 1
        finally:
            problems = res.cleanup()
            try:
                delete(s.endpoints, queue)
            except (pika.exceptions.AMQPError, OSError) as exc:
                problems.append(f"queue {queue}: {exc}")
            for problem in problems:
                print(f"cleanup: {problem}", file=sys.stderr)
    print(f"refused: {a.messages} messages per drain, quorum queue, {a.rounds} rounds")
    print("| drain | messages/s per round | median messages/s | median CPU µs/message |")
    print("|---|---|---|---|")
    for kind in ("valid", "refused"):
        mine = [d for d in drains if d.kind == kind]
        if not mine:
            continue
        cpus = [d.cpu_us_per_message for d in mine if d.cpu_us_per_message is not None]
        print(
            f"| {kind} | {' / '.join(f'{d.rate:,.0f}' for d in mine)} | {statistics.median(d.rate for d in mine):,.0f} "
            f"| {statistics.median(cpus):.0f} |"
            if cpus
            else f"| {kind} | {' / '.join(f'{d.rate:,.0f}' for d in mine)} | n/a | n/a |"
        )
    valid = [d.rate for d in drains if d.kind == "valid"]
    refused = [d.rate for d in drains if d.kind == "refused"]
    if valid and refused:
        print(f"refused / valid drain rate (medians): {statistics.median(refused) / statistics.median(valid):.2f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
