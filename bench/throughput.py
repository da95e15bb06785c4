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

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import pika
import pika.exceptions
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
# `python bench/throughput.py` puts bench/ on the path, not the repository the shared tools live in.
sys.path.insert(0, str(ROOT))
from tools.ports import free_port  # noqa: E402
from tools.publisher import PERSISTENT, PublishError, publish_all  # noqa: E402

SCHEMA_FILE = ROOT / "init_db.sql"
PHASES = ("bare", "service", "naive", "latency")
MP = multiprocessing.get_context("fork")

# Targets are printed next to the figures; missing one does not fail the run.
TARGET_LIMIT_RATIO = 0.85
TARGET_NAIVE_RATIO = 10.0
TARGET_P99_MS = 300.0
TARGET_RSS_MB = 80.0
# The service's own CPU per vote against the bare consumer's, in the same run (issue 13).
TARGET_CPU_RATIO = 1.5
AIM_CPU_RATIO = 1.3

# Variables the service reads are removed from the inherited environment, so that
# "defaults" means the service's defaults, not whatever this shell exports.
SERVICE_ENV_PREFIXES = ("RABBITMQ_", "POSTGRES_", "BATCH_", "MAX_", "RETRY_", "SHUTDOWN_", "PROMETHEUS_", "LOG_LEVEL")

THROUGHPUT_POLL_S = 0.02
LATENCY_POLL_S = 0.01
RSS_SAMPLE_S = 0.25
TIMES = "\N{MULTIPLICATION SIGN}"
PUBLISH_WINDOW = 500  # unconfirmed messages each backlog publisher keeps in flight


class BenchError(RuntimeError):
    """The bench cannot go on (a process died, a phase timed out, a service would not start)."""


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    rabbitmq_host: str
    rabbitmq_port: int
    postgres_host: str
    postgres_port: int
    postgres_user: str

    def amqp(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host=self.rabbitmq_host,
            port=self.rabbitmq_port,
            credentials=pika.PlainCredentials("guest", "guest"),
            client_properties={"connection_name": "vote-bench"},
        )

    def pg(self, dbname: str, *, autocommit: bool = True) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(
            host=self.postgres_host,
            port=self.postgres_port,
            user=self.postgres_user,
            dbname=dbname,
            application_name="vote-bench",
        )
        conn.autocommit = autocommit
        return conn


@dataclass(frozen=True)
class Settings:
    votes: int
    laws: int
    naive_votes: int
    latency_rate: float
    latency_seconds: float
    publishers: int
    phases: tuple[str, ...]
    service_env: dict[str, str]
    instances: int
    json_path: Path | None
    seed: int
    settle_s: float
    stall_timeout_s: float
    keep_logs: bool
    endpoints: Endpoints


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {raw}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {raw}")
    return value


def _phases(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))
    unknown = [p for p in names if p not in PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"phases are a comma list of {','.join(PHASES)}, got {raw!r}")
    return tuple(p for p in PHASES if p in names)


def _env_pair(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {raw!r}")
    return key.strip(), value


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--votes", type=_positive_int, default=100_000, help="backlog for bare and service (100000)")
    p.add_argument("--laws", type=_positive_int, default=50, help="distinct laws voted on (50)")
    p.add_argument("--naive-votes", type=_positive_int, default=5_000, help="backlog for the naive consumer (5000)")
    p.add_argument("--latency-rate", type=_positive_float, default=1000.0, help="votes/s published (1000)")
    p.add_argument("--latency-seconds", type=_positive_float, default=10.0, help="publishing time (10)")
    p.add_argument("--publishers", type=_positive_int, default=4, help="backlog publisher processes (4)")
    p.add_argument("--phases", type=_phases, default=PHASES, help=f"subset of {','.join(PHASES)} (all)")
    p.add_argument(
        "--service-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra service setting, repeatable (e.g. BATCH_SIZE=500)",
    )
    p.add_argument(
        "--instances", type=_positive_int, default=1, help="service processes sharing the queue and database (1)"
    )
    p.add_argument("--json", type=Path, dest="json_path", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--seed", type=int, default=42, help="random seed of the generated votes (42)")
    p.add_argument("--settle", type=float, default=1.0, help="pause after publishing a backlog, seconds (1)")
    p.add_argument("--stall-timeout", type=_positive_float, default=60.0, help="give up after no progress (60 s)")
    p.add_argument("--keep-logs", action="store_true", help="keep the service logs (kept anyway on failure)")
    p.add_argument("--rabbitmq-host", default="127.0.0.1")
    p.add_argument("--rabbitmq-port", type=int, default=5672)
    p.add_argument("--postgres-host", default="127.0.0.1")
    p.add_argument("--postgres-port", type=int, default=5432)
    p.add_argument("--postgres-user", default="postgres")
    a = p.parse_args(argv)
    return Settings(
        votes=a.votes,
        laws=a.laws,
        naive_votes=a.naive_votes,
        latency_rate=a.latency_rate,
        latency_seconds=a.latency_seconds,
        publishers=a.publishers,
        phases=a.phases,
        service_env=dict(a.service_env),
        instances=a.instances,
        json_path=a.json_path,
        seed=a.seed,
        settle_s=max(a.settle, 0.0),
        stall_timeout_s=a.stall_timeout,
        keep_logs=a.keep_logs,
        endpoints=Endpoints(a.rabbitmq_host, a.rabbitmq_port, a.postgres_host, a.postgres_port, a.postgres_user),
    )


# -- votes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchVote:
    vote_hash: str
    citizen_id: str
    law_id: str
    choice: str
    timestamp: str

    def body(self) -> bytes:
        return json.dumps(
            {
                "vote_hash": self.vote_hash,
                "citizen_id": self.citizen_id,
                "law_id": self.law_id,
                "choice": self.choice,
                "timestamp": self.timestamp,
            }
        ).encode()


def make_votes(count: int, *, laws: int, seed: int, first_citizen: int = 0) -> list[BenchVote]:
    """One vote per citizen, on a random law, cast during one election day."""
    rng = random.Random(seed)
    width = max(6, len(str(first_citizen + count)))
    day = datetime(2025, 11, 14, 7, 0, tzinfo=UTC)
    votes = []
    for i in range(first_citizen, first_citizen + count):
        citizen = f"citizen-{i:0{width}d}"
        law = f"law-{rng.randrange(laws) + 1:03d}"
        cast_at = day + timedelta(milliseconds=rng.randrange(12 * 3600 * 1000))
        votes.append(
            BenchVote(
                vote_hash=hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(),
                citizen_id=citizen,
                law_id=law,
                choice=rng.choice(("oui", "non")),
                timestamp=cast_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            )
        )
    return votes


def expected_totals(votes: Iterable[BenchVote]) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = {}
    for v in votes:
        totals.setdefault(v.law_id, [0, 0])[0 if v.choice == "oui" else 1] += 1
    return {law: (oui, non) for law, (oui, non) in totals.items()}


# -- child processes ---------------------------------------------------------------------------


def _child_signals() -> None:
    """Children leave Ctrl-C to the parent, which terminates them while cleaning up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _backlog_publisher_main(endpoints: Endpoints, queue: str, bodies: Sequence[bytes]) -> None:
    _child_signals()
    try:
        publish_all(endpoints.amqp(), queue, bodies, window=PUBLISH_WINDOW)
    except PublishError as exc:
        print(f"publisher: {exc}", file=sys.stderr)
        sys.exit(1)


@dataclass(frozen=True)
class ConsumerResult:
    messages: int
    seconds: float  # first message received to last message acked
    cpu_s: float | None = None  # this process's user + system CPU over the same span
    busy_core_s: float | None = None  # the whole machine's busy CPU over the same span


@dataclass
class _Clock:
    """Wall time, own CPU and machine CPU from the first message to `finish`."""

    count: int = 0
    first: float = 0.0
    last: float = 0.0
    cpu0: float | None = None
    busy0: tuple[int, int] = (0, 0)
    cpu_s: float | None = None
    busy_core_s: float | None = None

    def tick(self) -> None:
        if self.count == 0:
            self.first = time.perf_counter()
            self.cpu0 = process_cpu_seconds(os.getpid())
            self.busy0 = machine_busy_jiffies()
        self.count += 1

    def finish(self) -> None:
        self.last = time.perf_counter()
        cpu1 = process_cpu_seconds(os.getpid())
        if self.cpu0 is not None and cpu1 is not None:
            self.cpu_s = cpu1 - self.cpu0
        self.busy_core_s = busy_core_seconds(self.busy0, machine_busy_jiffies())

    def result(self) -> ConsumerResult:
        return ConsumerResult(self.count, self.last - self.first, self.cpu_s, self.busy_core_s)


def _bare_consumer_main(endpoints: Endpoints, queue: str, expected: int, out: Connection) -> None:
    """The limit: parse each body, ack once per 100 messages, nothing else."""
    _child_signals()
    connection = pika.BlockingConnection(endpoints.amqp())
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1000)
    clock = _Clock()

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


def _naive_consumer_main(endpoints: Endpoints, queue: str, dbname: str, expected: int, out: Connection) -> None:
    """The reference: per message, one transaction (audit row, then totals), commit, ack."""
    _child_signals()
    db = endpoints.pg(dbname, autocommit=False)
    connection = pika.BlockingConnection(endpoints.amqp())
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    clock = _Clock()

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


def _paced_publisher_main(
    endpoints: Endpoints, queue: str, bodies: Sequence[bytes], rate: float, start_at: float, out: Connection
) -> None:
    """Publishes body i at start_at + i/rate (time.monotonic) and reports when each went out.

    No publisher confirms here: a confirm costs a broker round trip and an fsync,
    which would break the pacing; the exactly-once checks afterwards prove that
    every vote arrived.
    """
    _child_signals()
    connection = pika.BlockingConnection(endpoints.amqp())
    channel = connection.channel()
    published = [0.0] * len(bodies)
    for i, body in enumerate(bodies):
        delay = start_at + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        published[i] = time.monotonic()
        channel.basic_publish("", queue, body, PERSISTENT)
        if i % 100 == 0:
            connection.process_data_events(time_limit=0)
    connection.close()  # flushes what is still buffered
    out.send(published)


# -- resources -------------------------------------------------------------------------------------


class Resources:
    """Every queue, database and process the bench creates, removed by cleanup()."""

    def __init__(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints
        self._queues: list[str] = []
        self._databases: list[str] = []
        self._children: list[BaseProcess] = []
        self._services: list[ServiceProcess] = []

    def new_queue(self) -> str:
        name = f"bench.{uuid.uuid4().hex}"
        self._queues.append(name)
        connection = pika.BlockingConnection(self._endpoints.amqp())
        try:
            connection.channel().queue_declare(name, durable=True)
        finally:
            connection.close()
        return name

    def delete_queue(self, name: str) -> None:
        connection = pika.BlockingConnection(self._endpoints.amqp())
        try:
            connection.channel().queue_delete(name)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
        finally:
            if connection.is_open:
                connection.close()
        self._queues.remove(name)

    def new_database(self, *, schema: bool) -> str:
        name = f"bench_{uuid.uuid4().hex[:16]}"
        self._databases.append(name)
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if schema:
            conn = self._endpoints.pg(name)
            try:
                with conn.cursor() as cur:
                    cur.execute(SCHEMA_FILE.read_text(encoding="utf-8"))
            finally:
                conn.close()
        return name

    def drop_database(self, name: str) -> None:
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self._databases.remove(name)

    def _admin(self, statement: sql.Composed) -> None:
        conn = self._endpoints.pg("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def child(self, target: Callable[..., None], *args: Any) -> BaseProcess:
        proc = MP.Process(target=target, args=args, daemon=True)
        self._children.append(proc)
        proc.start()
        return proc

    def service(self, service: ServiceProcess) -> ServiceProcess:
        self._services.append(service)
        return service

    def cleanup(self) -> list[str]:
        """Stop what runs, delete what was created; returns what could not be cleaned."""
        problems: list[str] = []
        for svc in self._services:
            svc.stop(timeout_s=5)
        for proc in self._children:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
        for queue in list(self._queues):
            try:
                self.delete_queue(queue)
            except Exception as exc:
                problems.append(f"queue {queue}: {exc}")
        for dbname in list(self._databases):
            try:
                self.drop_database(dbname)
            except Exception as exc:
                problems.append(f"database {dbname}: {exc}")
        return problems


def _queue_state(endpoints: Endpoints, queue: str) -> Any:
    connection = pika.BlockingConnection(endpoints.amqp())
    try:
        return connection.channel().queue_declare(queue, passive=True).method
    finally:
        connection.close()


def queue_depth(endpoints: Endpoints, queue: str) -> int:
    """Messages ready in a queue (unacked ones are not counted)."""
    return int(_queue_state(endpoints, queue).message_count)


def queue_consumers(endpoints: Endpoints, queue: str) -> int:
    return int(_queue_state(endpoints, queue).consumer_count)


def publish_backlog(s: Settings, res: Resources, queue: str, bodies: Sequence[bytes]) -> float:
    """Publish every body into `queue` with confirms; returns the messages/s achieved."""
    started = time.perf_counter()
    workers = min(s.publishers, len(bodies))
    per = math.ceil(len(bodies) / workers)
    procs = [
        res.child(_backlog_publisher_main, s.endpoints, queue, bodies[i * per : (i + 1) * per]) for i in range(workers)
    ]
    deadline = time.monotonic() + 120 + len(bodies) / 500
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.1))
    if any(proc.exitcode != 0 for proc in procs):
        raise BenchError(f"backlog publishers exited with {[proc.exitcode for proc in procs]}")
    rate = len(bodies) / (time.perf_counter() - started)
    ready = queue_depth(s.endpoints, queue)
    if ready != len(bodies):
        raise BenchError(f"published {len(bodies)} messages but queue {queue} holds {ready}")
    time.sleep(s.settle_s)  # let the broker finish writing before anything is timed
    return rate


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


# -- the service -------------------------------------------------------------------------------------


class ServiceProcess:
    """`python aggregator.py` as users run it, configured through the environment."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    def start(cls, s: Settings, *, queue: str, dbname: str, log_path: Path) -> ServiceProcess:
        e = s.endpoints
        env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_ENV_PREFIXES)}
        env.update(
            RABBITMQ_HOST=e.rabbitmq_host,
            RABBITMQ_PORT=str(e.rabbitmq_port),
            RABBITMQ_QUEUE=queue,
            POSTGRES_HOST=e.postgres_host,
            POSTGRES_PORT=str(e.postgres_port),
            POSTGRES_USER=e.postgres_user,
            POSTGRES_DB=dbname,
            PROMETHEUS_PORT=str(free_port()),
            PYTHONUNBUFFERED="1",
        )
        env.update(s.service_env)
        with log_path.open("ab") as log:
            # A session of its own: a Ctrl-C on the bench must not reach it (the bench stops it).
            proc = subprocess.Popen(
                [sys.executable, "aggregator.py"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the service exited with {self.proc.returncode}:\n{self.log_tail()}")

    def wait_consuming(self, endpoints: Endpoints, queue: str, timeout_s: float = 30.0) -> None:
        """Until the service is a consumer of `queue` (asked of RabbitMQ, not read from the log)."""
        deadline = time.monotonic() + timeout_s
        while queue_consumers(endpoints, queue) < 1:
            self.check_running()
            if time.monotonic() > deadline:
                raise BenchError(f"the service did not start consuming within {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def status_kb(self, key: str) -> int | None:
        """A `VmRSS`/`VmHWM`-style line of /proc/<pid>/status, in kB."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the service process (all its threads)."""
        return process_cpu_seconds(self.pid)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as systemd or docker would; returns the exit code (-9 if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_levels(self) -> dict[str, int]:
        text = self.log_text()
        return {level: text.count(f" {level} ") for level in ("WARNING", "ERROR", "CRITICAL")}


class Watcher:
    """Read-only queries on a service's database, on one autocommit connection."""

    def __init__(self, endpoints: Endpoints, dbname: str) -> None:
        self._conn = endpoints.pg(dbname)

    def close(self) -> None:
        self._conn.close()

    def counted(self) -> int:
        """Votes counted so far: the sum of vote_results (about 50 rows).

        The service increments vote_results in the same transaction that inserts
        the audit rows, so at any snapshot this equals count(*) of vote_audit; it
        costs a fraction of a millisecond where count(*) over 100,000 audit rows
        costs several, which would steal CPU from the service at this poll rate.
        count(*) itself is checked once at the end.
        """
        try:
            with self._conn.cursor() as cur:
                cur.execute("SELECT coalesce(sum(oui_count + non_count), 0) FROM vote_results")
                row = cur.fetchone()
        except psycopg2.errors.UndefinedTable:  # the service has not applied the schema yet
            return 0
        return int(row[0]) if row else 0

    def audit_span(self) -> tuple[int, datetime | None, datetime | None]:
        with self._conn.cursor() as cur:
            cur.execute("SELECT count(*), min(recorded_at), max(recorded_at) FROM vote_audit")
            row = cur.fetchone()
        assert row is not None
        return int(row[0]), row[1], row[2]

    def visible(self, hashes: list[str]) -> list[str]:
        """Which of `hashes` are in vote_audit (primary-key lookups)."""
        with self._conn.cursor() as cur:
            cur.execute("SELECT vote_hash FROM vote_audit WHERE vote_hash = ANY(%s)", (hashes,))
            return [str(row[0]) for row in cur.fetchall()]


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


# -- checks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    run: str
    name: str
    ok: bool
    detail: str


def exactly_once_checks(
    endpoints: Endpoints, run: str, dbname: str, expected: dict[str, tuple[int, int]]
) -> list[Check]:
    """Every vote counted once: audit rows, totals per law, and both against what was published."""
    n = sum(oui + non for oui, non in expected.values())
    conn = endpoints.pg(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM vote_audit")
            audit_rows = int(_one(cur.fetchone()))
            cur.execute("SELECT law_id, choice, count(*) FROM vote_audit GROUP BY 1, 2")
            grouped: dict[str, list[int]] = {}
            for law, choice, count in cur.fetchall():
                grouped.setdefault(law, [0, 0])[0 if choice == "oui" else 1] = int(count)
            cur.execute("SELECT law_id, oui_count, non_count FROM vote_results")
            results = {law: (int(oui), int(non)) for law, oui, non in cur.fetchall() if oui or non}
            cur.execute("SELECT count(*) FROM duplicate_attempts")
            attempts = int(_one(cur.fetchone()))
    finally:
        conn.close()
    audit = {law: (oui, non) for law, (oui, non) in grouped.items()}
    total = sum(oui + non for oui, non in results.values())
    return [
        Check(run, "count(*) vote_audit == N", audit_rows == n, f"{audit_rows} rows, N={n}"),
        Check(run, "vote_results == vote_audit by law/choice", results == audit, _diff(results, audit)),
        Check(run, "sum(vote_results) == N", total == n, f"{total}, N={n}"),
        Check(run, "vote_results == published totals", results == expected, _diff(results, expected)),
        Check(run, "no duplicate_attempts", attempts == 0, f"{attempts} rows"),
    ]


def _one(row: tuple[Any, ...] | None) -> Any:
    assert row is not None
    return row[0]


def _diff(got: dict[str, tuple[int, int]], want: dict[str, tuple[int, int]]) -> str:
    wrong = sorted(law for law in got.keys() | want.keys() if got.get(law) != want.get(law))
    if not wrong:
        return f"{len(want)} laws equal"
    shown = ", ".join(f"{law}: {got.get(law)} vs {want.get(law)}" for law in wrong[:3])
    return f"{len(wrong)} laws differ ({shown})"


def service_checks(run: str, exit_code: int, queue_left: int) -> list[Check]:
    return [
        Check(run, "service exited 0 on SIGTERM", exit_code == 0, f"exit code {exit_code}"),
        Check(run, "queue drained (all acked)", queue_left == 0, f"{queue_left} messages left"),
    ]


# -- phases ----------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    votes: int
    seconds: float | None
    publish_rate: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Own CPU (every instance summed) and the machine's busy CPU, over `cpu_votes` votes.
    cpu_s: float | None = None
    busy_core_s: float | None = None
    cpu_votes: int = 0

    @property
    def rate(self) -> float | None:
        return self.votes / self.seconds if self.seconds else None

    @property
    def cpu_us_per_vote(self) -> float | None:
        return 1e6 * self.cpu_s / self.cpu_votes if self.cpu_s is not None and self.cpu_votes else None

    @property
    def machine_us_per_vote(self) -> float | None:
        """Busy CPU of the whole machine (RabbitMQ, PostgreSQL, the bench) per vote."""
        return 1e6 * self.busy_core_s / self.cpu_votes if self.busy_core_s and self.cpu_votes else None

    @property
    def votes_per_busy_core_s(self) -> float | None:
        return self.cpu_votes / self.busy_core_s if self.busy_core_s else None


def _consumer_throughput(result: ConsumerResult, publish_rate: float) -> Throughput:
    return Throughput(
        result.messages,
        result.seconds,
        publish_rate,
        cpu_s=result.cpu_s,
        busy_core_s=result.busy_core_s,
        cpu_votes=result.messages,
    )


@dataclass
class Latency:
    published: int
    seen: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    publish_rate: float
    poll_period_ms: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    bare: Throughput | None = None
    service: Throughput | None = None
    naive: Throughput | None = None
    latency: Latency | None = None
    checks: list[Check] = field(default_factory=list)
    log_dir: str | None = None

    @property
    def checks_ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def completed(self, phases: Sequence[str]) -> bool:
        return all(getattr(self, phase) is not None for phase in phases)


def phase_bare(s: Settings, res: Resources, bodies: Sequence[bytes]) -> Throughput:
    queue = res.new_queue()
    publish_rate = publish_backlog(s, res, queue, bodies)
    result = run_consumer(res, "bare consumer", _bare_consumer_main, (s.endpoints, queue, len(bodies)), _budget(s))
    res.delete_queue(queue)
    return _consumer_throughput(result, publish_rate)


def phase_naive(s: Settings, res: Resources, votes: Sequence[BenchVote], report: Report) -> Throughput:
    queue = res.new_queue()
    dbname = res.new_database(schema=True)
    publish_rate = publish_backlog(s, res, queue, [v.body() for v in votes])
    args = (s.endpoints, queue, dbname, len(votes))
    result = run_consumer(res, "per-message consumer", _naive_consumer_main, args, _budget(s, per_s=50))
    report.checks += exactly_once_checks(s.endpoints, "naive", dbname, expected_totals(votes))
    res.delete_queue(queue)
    res.drop_database(dbname)
    return _consumer_throughput(result, publish_rate)


def _budget(s: Settings, per_s: float = 500) -> float:
    return s.stall_timeout_s + s.votes / per_s


def phase_service(s: Settings, res: Resources, votes: Sequence[BenchVote], log_dir: Path, report: Report) -> Throughput:
    """The service on a preloaded backlog.

    How the rate is measured: recorded_at (default now()) is the start time of the
    batch transaction that inserted the row. min(recorded_at) is therefore when
    the first batch began to be written, a few milliseconds after the service
    received its first message: that is the start. max(recorded_at) would miss
    the last batch's own write and commit, so the end is the wall-clock time at
    which a poll (every 20 ms) first sees all N votes committed: the rate is
    slightly underestimated, by at most one poll period plus one query. Both
    clocks are this machine's (PostgreSQL runs here), so they compare directly.
    The DB-only span max - min is reported in the JSON too.
    """
    queue = res.new_queue()
    dbname = res.new_database(schema=False)  # the service applies init_db.sql itself, as at a first start
    publish_rate = publish_backlog(s, res, queue, [v.body() for v in votes])
    # With --instances, every process consumes the same queue into the same database;
    # CPU is summed over them, RSS is the largest.
    svcs = [
        res.service(ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=log_dir / f"service-{i}.log"))
        for i in range(s.instances)
    ]
    started = time.time()
    watcher = Watcher(s.endpoints, dbname)
    try:
        progress = _follow_progress(s, svcs, watcher, len(votes))
        count, first, last = watcher.audit_span()
    finally:
        watcher.close()
    hwm_kb = max((other.status_kb("VmHWM") or 0 for other in svcs), default=0)
    exit_codes = [other.stop() for other in svcs]
    exit_code = max(exit_codes, key=abs)
    report.checks += exactly_once_checks(s.endpoints, "service", dbname, expected_totals(votes))
    report.checks += service_checks("service", exit_code, queue_depth(s.endpoints, queue))
    seconds = progress.done_at - first.timestamp() if progress.done_at and first else None
    details: dict[str, Any] = {
        "start_to_first_vote_s": first.timestamp() - started if first else None,
        "db_span_s": (last - first).total_seconds() if first and last else None,
        "audit_rows_when_done": count,
        "peak_rss_mb": hwm_kb / 1024 if hwm_kb else None,
        "max_sampled_rss_mb": progress.max_rss_kb / 1024,
        "service_cpu_s": progress.cpu_s,
        "service_cpu_share": progress.cpu_s / progress.wall_s if progress.wall_s else None,
        "machine_busy_share": progress.machine_busy,
        "poller_cpu_share": progress.poller_cpu_share,
        "exit_code": exit_code,
        "log_levels": svcs[0].log_levels(),
    }
    res.delete_queue(queue)
    res.drop_database(dbname)
    return Throughput(
        len(votes),
        seconds,
        publish_rate,
        details,
        cpu_s=progress.cpu_s if progress.window_votes else None,
        busy_core_s=progress.busy_core_s,
        cpu_votes=progress.window_votes,
    )


@dataclass
class Progress:
    done_at: float | None = None  # time.time() of the first poll that saw every vote
    max_rss_kb: int = 0
    # Between the first poll that saw votes counted and the one that saw them all:
    cpu_s: float = 0.0  # the services' CPU, every instance summed
    busy_core_s: float | None = None  # the whole machine's busy CPU
    window_votes: int = 0  # votes counted in that window
    wall_s: float = 0.0
    machine_busy: float | None = None
    poller_cpu_share: float = 0.0  # CPU of this process while polling, per second of wall time


def _services_cpu(svcs: Sequence[ServiceProcess]) -> float:
    return sum(svc.cpu_seconds() or 0.0 for svc in svcs)


def _follow_progress(s: Settings, svcs: Sequence[ServiceProcess], watcher: Watcher, target: int) -> Progress:
    """Poll until every vote is counted. CPU is read from the first poll that sees votes counted.

    That window misses the receiving of the votes buffered (at most the prefetch
    of each instance) when it opens, a percent of a 100,000-vote backlog, and
    leaves out start-up (imports, schema), which has nothing to do with votes.
    """
    progress = Progress()
    last_count, last_change = 0, time.monotonic()
    next_rss = 0.0
    cpu0: float | None = None
    count0 = 0
    wall0 = 0.0
    busy0 = (0, 0)
    cpu_began, began = time.process_time(), time.monotonic()
    while True:
        count = watcher.counted()
        now = time.time()
        if count and cpu0 is None:
            cpu0, count0, wall0, busy0 = _services_cpu(svcs), count, time.monotonic(), machine_busy_jiffies()
        if time.monotonic() >= next_rss:
            rss = max(svc.status_kb("VmRSS") or 0 for svc in svcs)
            progress.max_rss_kb = max(progress.max_rss_kb, rss)
            next_rss = time.monotonic() + RSS_SAMPLE_S
        if count >= target:
            progress.done_at = now
            break
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > s.stall_timeout_s:
            print(f"  no progress for {s.stall_timeout_s:.0f}s at {count}/{target} votes", file=sys.stderr)
            break
        for svc in svcs:
            svc.check_running()
        time.sleep(THROUGHPUT_POLL_S)
    progress.poller_cpu_share = (time.process_time() - cpu_began) / (time.monotonic() - began)
    if cpu0 is not None:
        progress.cpu_s = _services_cpu(svcs) - cpu0
        progress.wall_s = time.monotonic() - wall0
        busy1 = machine_busy_jiffies()
        total = busy1[1] - busy0[1]
        progress.machine_busy = (busy1[0] - busy0[0]) / total if total else None
        progress.busy_core_s = busy_core_seconds(busy0, busy1)
        progress.window_votes = min(count, target) - count0
    return progress


def phase_latency(s: Settings, res: Resources, log_dir: Path, report: Report) -> Latency:
    """Visibility latency of votes published at a steady rate to an idle, running service.

    Method: the publisher (its own process) records time.monotonic() just before
    each basic_publish; CLOCK_MONOTONIC is system-wide on Linux, so the sampler
    here can compare. Every LATENCY_POLL_S the sampler reads the cheap total of
    vote_results (see Watcher.counted); only when it changed does it ask which
    of the published-but-unseen hashes are now in vote_audit (primary-key
    lookups, a few hundred at most while the service keeps up). A vote's visible
    time is the end of the query that first returned it: it committed after the
    previous poll's snapshot and before this one's, so the figure errs late by
    at most one poll period plus two queries (the resolution, printed). Polling
    cost: about 100 tiny queries/s plus one lookup per committed batch.
    """
    queue = res.new_queue()
    dbname = res.new_database(schema=False)
    svc = res.service(ServiceProcess.start(s, queue=queue, dbname=dbname, log_path=log_dir / "latency.log"))
    svc.wait_consuming(s.endpoints, queue)
    count = max(1, round(s.latency_rate * s.latency_seconds))
    votes = make_votes(count, laws=s.laws, seed=s.seed + 1, first_citizen=s.votes)
    receiver, sender = MP.Pipe(duplex=False)
    start_at = time.monotonic() + 0.5
    bodies = [v.body() for v in votes]
    res.child(_paced_publisher_main, s.endpoints, queue, bodies, s.latency_rate, start_at, sender)
    sender.close()
    watcher = Watcher(s.endpoints, dbname)
    try:
        sampling = _sample_visibility(s, svc, watcher, [v.vote_hash for v in votes], start_at, receiver)
    finally:
        watcher.close()
        receiver.close()
    exit_code = svc.stop()
    report.checks += exactly_once_checks(s.endpoints, "latency", dbname, expected_totals(votes))
    report.checks += service_checks("latency", exit_code, queue_depth(s.endpoints, queue))
    res.delete_queue(queue)
    res.drop_database(dbname)
    return _latency_figures(sampling, svc)


@dataclass
class Sampling:
    published: list[float]
    seen: list[float | None]
    polls: int
    seconds: float
    sampler_cpu_share: float  # CPU of this process while sampling, per second of wall time
    hwm_kb: int | None = None


def _sample_visibility(
    s: Settings, svc: ServiceProcess, watcher: Watcher, hashes: list[str], start_at: float, publisher: Connection
) -> Sampling:
    seen: list[float | None] = [None] * len(hashes)
    unseen: dict[str, int] = {}
    published: list[float] | None = None
    scheduled = last_count = polls = 0
    last_change = began = time.monotonic()
    cpu_began = time.process_time()
    while True:
        tick = time.monotonic()
        # Every vote whose publishing time has come (a superset of those published).
        due = min(len(hashes), max(0, int((tick - start_at) * s.latency_rate) + 2))
        for i in range(scheduled, due):
            unseen[hashes[i]] = i
        scheduled = max(scheduled, due)
        count = watcher.counted()
        polls += 1
        if count != last_count and unseen:
            found = watcher.visible(list(unseen))
            visible_at = time.monotonic()
            for vote_hash in found:
                seen[unseen.pop(vote_hash)] = visible_at
            last_count, last_change = count, visible_at
        if published is None and publisher.poll():
            try:
                published = publisher.recv()
            except EOFError:
                raise BenchError("the paced publisher died") from None
        if published is not None and scheduled == len(hashes) and not unseen:
            break
        if time.monotonic() - last_change > s.stall_timeout_s:
            print(f"  latency: no progress for {s.stall_timeout_s:.0f}s, {len(unseen)} votes unseen", file=sys.stderr)
            break
        svc.check_running()
        time.sleep(max(0.0, tick + LATENCY_POLL_S - time.monotonic()))
    if published is None:
        raise BenchError("the paced publisher did not report")
    seconds = time.monotonic() - began
    return Sampling(
        published, seen, polls, seconds, (time.process_time() - cpu_began) / seconds, svc.status_kb("VmHWM")
    )


def _latency_figures(sampling: Sampling, svc: ServiceProcess) -> Latency:
    delays = sorted(
        (seen - pub) * 1000 for pub, seen in zip(sampling.published, sampling.seen, strict=True) if seen is not None
    )
    pub = sampling.published
    span = pub[-1] - pub[0] if len(pub) > 1 else 0.0
    return Latency(
        published=len(pub),
        seen=len(delays),
        p50_ms=percentile(delays, 50),
        p99_ms=percentile(delays, 99),
        max_ms=delays[-1] if delays else None,
        publish_rate=(len(pub) - 1) / span if span else 0.0,
        poll_period_ms=1000 * sampling.seconds / max(sampling.polls, 1),
        details={
            "peak_rss_mb": sampling.hwm_kb / 1024 if sampling.hwm_kb else None,
            "sampler_cpu_share": sampling.sampler_cpu_share,
            "log_levels": svc.log_levels(),
        },
    )


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(pct / 100 * len(sorted_values))) - 1]


# -- output -------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _target(ok: bool | None) -> str:
    return "" if ok is None else (" ok" if ok else " MISSED")


def render(report: Report) -> str:
    s, m = report.settings, report.machine
    lines = [
        f"bench: N={s['votes']} votes, {s['laws']} laws, {m['date']}, {m['cores']} cores, {m['cpu']}",
        f"{'phase':<24}{'votes':>8}{'seconds':>10}{'votes/s':>10}{'own CPU':>10}{'machine':>10}",
        f"{'':<52}{'us/vote':>10}{'us/vote':>10}",
    ]
    label = "service (defaults)" if not s["service_env"] else "service (--service-env)"
    if s.get("instances", 1) > 1:
        label = f"service x{s['instances']}" + ("" if not s["service_env"] else " (env)")
    for name, result in (("bare consumer (limit)", report.bare), (label, report.service)):
        if result is not None:
            lines.append(_row(name, result))
    if report.naive is not None:
        lines.append(_row("per-message consumer", report.naive))
    lines += _ratios(report)
    lines += _latency_lines(report.latency)
    lines += _rss_lines(report)
    lines += _check_lines(report.checks)
    lines += _notes(report)
    return "\n".join(lines)


def _row(name: str, t: Throughput) -> str:
    return (
        f"{name:<24}{t.votes:>8}{_fmt(t.seconds, '.2f'):>10}{_fmt(t.rate, '.0f'):>10}"
        f"{_fmt(t.cpu_us_per_vote, '.1f'):>10}{_fmt(t.machine_us_per_vote, '.1f'):>10}"
    )


def cpu_ratio(report: Report) -> float | None:
    """The service's own CPU per vote (every instance) over the bare consumer's, same run."""
    svc = report.service.cpu_us_per_vote if report.service else None
    bare = report.bare.cpu_us_per_vote if report.bare else None
    return svc / bare if svc and bare else None


def _ratios(report: Report) -> list[str]:
    lines = []
    svc = report.service.rate if report.service else None
    bare = report.bare.rate if report.bare else None
    naive = report.naive.rate if report.naive else None
    if svc and bare:
        ratio = svc / bare
        target = f"(target >= {TARGET_LIMIT_RATIO:g}{_target(ratio >= TARGET_LIMIT_RATIO)})"
        lines.append(f"{'service / limit':<42}{ratio:>10.2f}   {target}")
    cpu = cpu_ratio(report)
    if cpu is not None:
        target = f"(target <= {TARGET_CPU_RATIO:g}{_target(cpu <= TARGET_CPU_RATIO)}, aim {AIM_CPU_RATIO:g})"
        lines.append(f"{'service CPU/vote / bare CPU/vote':<42}{cpu:>10.2f}   {target}")
    if svc and naive:
        ratio = svc / naive
        target = f"(target >= {TARGET_NAIVE_RATIO:g}{_target(ratio >= TARGET_NAIVE_RATIO)})"
        lines.append(f"{'service / per-message':<42}{ratio:>9.1f}{TIMES}   {target}")
    return lines


def _latency_lines(lat: Latency | None) -> list[str]:
    if lat is None:
        return []
    ok = lat.p99_ms is not None and lat.p99_ms <= TARGET_P99_MS and lat.seen == lat.published
    return [
        f"{f'latency @{lat.publish_rate:.0f}/s':<24}p50 {_fmt(lat.p50_ms, '.0f')} ms   "
        f"p99 {_fmt(lat.p99_ms, '.0f')} ms  (target p99 <= {TARGET_P99_MS:g} ms{_target(ok)})"
    ]


def _rss_lines(report: Report) -> list[str]:
    peaks = [r.details.get("peak_rss_mb") for r in (report.service, report.latency) if r is not None and r.details]
    known = [p for p in peaks if p is not None]
    if not known:
        return []
    peak = max(known)
    return [
        f"{'service peak RSS':<24}{peak:.1f} MB (VmHWM; target <= {TARGET_RSS_MB:g} MB{_target(peak <= TARGET_RSS_MB)})"
    ]


def _check_lines(checks: list[Check]) -> list[str]:
    if not checks:
        return []
    failed = [c for c in checks if not c.ok]
    if not failed:
        return [f"{'exactly-once checks':<24}OK ({len(checks)} checks over {len({c.run for c in checks})} runs)"]
    lines = [f"{'exactly-once checks':<24}FAILED ({len(failed)} of {len(checks)})"]
    lines += [f"    {c.run}: {c.name}: {c.detail}" for c in failed]
    return lines


def _notes(report: Report) -> list[str]:
    load = ", ".join(f"{x:.2f}" for x in report.machine["loadavg_at_start"])
    lines = ["", "notes:", f"  load average at start: {load} (other work on the machine skews every figure)"]
    if report.settings["service_env"]:
        env = " ".join(f"{k}={v}" for k, v in report.settings["service_env"].items())
        lines.append(f"  service env: {env}")
    pubs = [f"{n} {t.publish_rate:.0f}/s" for n, t in _throughputs(report) if t.publish_rate]
    if pubs:
        lines.append(f"  backlog publishing (confirmed, not timed in any rate): {', '.join(pubs)}")
    svc = report.service
    if svc is not None and svc.details:
        d = svc.details
        lines.append(
            f"  service run: first vote {_fmt(d['start_to_first_vote_s'], '.2f')} s after start; "
            f"DB span max-min(recorded_at) {_fmt(d['db_span_s'], '.2f')} s; "
            f"service CPU {d['service_cpu_s']:.1f} s = {_fmt(_pct(d['service_cpu_share']), '.0f')}% of one core; "
            f"machine busy {_fmt(_pct(d['machine_busy_share']), '.0f')}% of {report.machine['cores']} cores; "
            f"poller CPU {100 * d['poller_cpu_share']:.0f}% of a core"
        )
        lines.append(f"  service log lines: {_levels(d['log_levels'])}")
    lat = report.latency
    if lat is not None:
        lines.append(
            f"  latency run: {lat.seen}/{lat.published} votes seen, max {_fmt(lat.max_ms, '.0f')} ms, "
            f"resolution ~{lat.poll_period_ms:.0f} ms (poll period), sampler CPU "
            f"{100 * lat.details['sampler_cpu_share']:.0f}% of a core, log lines: {_levels(lat.details['log_levels'])}"
        )
    per_core = [f"{n} {t.votes_per_busy_core_s:.0f}" for n, t in _throughputs(report) if t.votes_per_busy_core_s]
    if per_core:
        lines.append(
            f"  votes per busy core-second of the whole machine (/proc/stat; RabbitMQ, PostgreSQL and the bench "
            f"included): {', '.join(per_core)}"
        )
    if report.log_dir:
        lines.append(f"  service logs kept in {report.log_dir}")
    return lines


def _throughputs(report: Report) -> list[tuple[str, Throughput]]:
    named = (("bare", report.bare), ("service", report.service), ("naive", report.naive))
    return [(n, t) for n, t in named if t is not None]


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _levels(levels: dict[str, int]) -> str:
    return ", ".join(f"{n} {level}" for level, n in levels.items())


def write_json(path: Path, report: Report) -> None:
    data = asdict(report)
    for name, t in _throughputs(report):
        data[name]["votes_per_s"] = t.rate
        data[name]["cpu_us_per_vote"] = t.cpu_us_per_vote
        data[name]["machine_us_per_vote"] = t.machine_us_per_vote
        data[name]["votes_per_busy_core_s"] = t.votes_per_busy_core_s
    data["service_cpu_ratio"] = cpu_ratio(report)
    data["checks_ok"] = report.checks_ok
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


# -- main -----------------------------------------------------------------------------------------------------


def new_report(s: Settings) -> Report:
    return Report(
        settings={k: v for k, v in asdict(s).items() if k not in ("endpoints", "json_path")},
        machine={
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": os.cpu_count(),
            "cpu": cpu_model(),
            "python": sys.version.split()[0],
            "loadavg_at_start": os.getloadavg(),
        },
    )


def run(s: Settings, res: Resources, log_dir: Path, report: Report) -> None:
    """Run the selected phases in order, filling `report` as each one ends."""
    votes = make_votes(s.votes, laws=s.laws, seed=s.seed)
    for phase in s.phases:
        print(f"[{time.strftime('%H:%M:%S')}] {phase} ...", file=sys.stderr, flush=True)
        if phase == "bare":
            report.bare = phase_bare(s, res, [v.body() for v in votes])
        elif phase == "service":
            report.service = phase_service(s, res, votes, log_dir, report)
        elif phase == "naive":
            report.naive = phase_naive(s, res, votes[: s.naive_votes], report)
        elif phase == "latency":
            report.latency = phase_latency(s, res, log_dir, report)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
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
