"""The references the service is measured against: the bare consumer (the limit) and the per-message consumer."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pika
from bench_db import exactly_once_checks
from bench_publishers import publish_backlog
from bench_report import Report, Throughput
from bench_resources import MP, Resources, child_signals
from bench_settings import BenchError, Endpoints, Settings
from bench_votes import BenchVote, expected_totals
from procstat import CpuReading, CpuSources, CpuUse


@dataclass(frozen=True)
class ConsumerResult:
    messages: int
    seconds: float  # first message received to last message acked
    cpu: CpuUse | None = None  # this process's, the servers' and the machine's CPU over the same span


class _Clock:
    """Wall time and CPU (own, the servers', the machine's) from the first message to `finish`."""

    def __init__(self, sources: CpuSources, backends: Sequence[int] = ()) -> None:
        self._sources = sources
        self._backends = backends
        self.count = 0
        self.first = self.last = 0.0
        self._start: CpuReading | None = None
        self._cpu: CpuUse | None = None

    def tick(self) -> None:
        if self.count == 0:
            self.first = time.perf_counter()
            self._start = CpuReading.take(self._sources, [os.getpid()], backends=self._backends, own_first=False)
        self.count += 1

    def finish(self) -> None:
        self.last = time.perf_counter()
        end = CpuReading.take(self._sources, [os.getpid()], backends=self._backends, own_first=True)
        self._cpu = self._start.until(end) if self._start is not None else None

    def result(self) -> ConsumerResult:
        return ConsumerResult(self.count, self.last - self.first, self._cpu)


def bare_consumer_main(endpoints: Endpoints, queue: str, expected: int, sources: CpuSources, out: Connection) -> None:
    """The limit: parse each body, ack once per 100 messages, nothing else."""
    child_signals()
    connection = pika.BlockingConnection(endpoints.amqp())
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1000)
    clock = _Clock(sources)

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        clock.tick()
        json.loads(body)
        if clock.count % 100 == 0 or clock.count == expected:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if clock.count == expected:
            clock.finish()
            ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    out.send(clock.result())
    connection.close()


_NAIVE_AUDIT = (
    'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") '
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (vote_hash) DO NOTHING"
)
_NAIVE_RESULTS = (
    "INSERT INTO vote_results AS r (law_id, oui_count, non_count) VALUES (%s, %s, %s) "
    "ON CONFLICT (law_id) DO UPDATE SET oui_count = r.oui_count + EXCLUDED.oui_count, "
    "non_count = r.non_count + EXCLUDED.non_count, updated_at = now()"
)


def naive_consumer_main(
    endpoints: Endpoints, queue: str, dbname: str, expected: int, sources: CpuSources, out: Connection
) -> None:
    """The reference: per message, one transaction (audit row, then totals), commit, ack."""
    child_signals()
    db = endpoints.pg(dbname, autocommit=False)
    connection = pika.BlockingConnection(endpoints.amqp())
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    clock = _Clock(sources, [db.get_backend_pid()])

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        clock.tick()
        v = json.loads(body)
        with db.cursor() as cur:
            cur.execute(_NAIVE_AUDIT, (v["vote_hash"], v["citizen_id"], v["law_id"], v["choice"], v["timestamp"]))
            if cur.rowcount == 1:  # counted only when the audit row is new
                oui = int(v["choice"] == "oui")
                cur.execute(_NAIVE_RESULTS, (v["law_id"], oui, 1 - oui))
        db.commit()
        ch.basic_ack(method.delivery_tag)
        if clock.count == expected:
            clock.finish()
            ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    out.send(clock.result())
    connection.close()
    db.close()


def _consumer_throughput(result: ConsumerResult, publish_rate: float) -> Throughput:
    return Throughput.measured(result.messages, result.seconds, publish_rate, result.cpu, result.messages)


def run_consumer(
    res: Resources, name: str, target: Callable[..., None], args: tuple[Any, ...], timeout_s: float
) -> ConsumerResult:
    receiver, sender = MP.Pipe(duplex=False)
    proc = res.child(target, *args, sender)
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise BenchError(f"{name} did not finish within {timeout_s:.0f}s")
        result = receiver.recv()
    except EOFError:
        proc.join(5)
        raise BenchError(f"{name} died (exit code {proc.exitcode})") from None
    finally:
        receiver.close()
    proc.join(10)
    assert isinstance(result, ConsumerResult)
    return result


def phase_bare(s: Settings, res: Resources, bodies: Sequence[bytes], sources: CpuSources) -> Throughput:
    queue = res.new_queue()
    publish_rate = publish_backlog(s, res, queue, bodies)
    args = (s.endpoints, queue, len(bodies), sources)
    result = run_consumer(res, "bare consumer", bare_consumer_main, args, _budget(s))
    res.delete_queue(queue)
    return _consumer_throughput(result, publish_rate)


def phase_naive(
    s: Settings, res: Resources, votes: Sequence[BenchVote], report: Report, sources: CpuSources
) -> Throughput:
    queue = res.new_queue()
    dbname = res.new_database(schema=True)
    publish_rate = publish_backlog(s, res, queue, [v.body() for v in votes])
    args = (s.endpoints, queue, dbname, len(votes), sources)
    result = run_consumer(res, "per-message consumer", naive_consumer_main, args, _budget(s, per_s=50))
    report.checks += exactly_once_checks(s.endpoints, "naive", dbname, expected_totals(votes))
    res.delete_queue(queue)
    res.drop_database(dbname)
    return _consumer_throughput(result, publish_rate)


def _budget(s: Settings, per_s: float = 500) -> float:
    return s.stall_timeout_s + s.votes / per_s
