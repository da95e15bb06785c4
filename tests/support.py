"""Test helpers: the service as a subprocess, the broker and database as a user sees them.

The servers are the ones TEST_RABBITMQ_HOST, TEST_RABBITMQ_PORT, TEST_RABBITMQ_USER,
TEST_RABBITMQ_PASSWORD, TEST_POSTGRES_HOST, TEST_POSTGRES_PORT, TEST_POSTGRES_USER and
TEST_POSTGRES_PASSWORD name (default: both on 127.0.0.1, guest/guest, postgres without a
password). Subprocesses get only these settings: none of the service's variables from the shell
that runs the tests, and a working directory of their own, so no checkout's `.env` reaches them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pika
import pika.exceptions
import psycopg2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql

from config import Config, variables
from tools.ports import free_port
from tools.publisher import publish_all

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_HOST = os.environ.get("TEST_RABBITMQ_HOST", "127.0.0.1")
RABBITMQ_PORT = int(os.environ.get("TEST_RABBITMQ_PORT", "5672"))
POSTGRES_HOST = os.environ.get("TEST_POSTGRES_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("TEST_POSTGRES_PORT", "5432"))
POSTGRES_USER = os.environ.get("TEST_POSTGRES_USER", "postgres")
POSTGRES_PASSWORD = os.environ.get("TEST_POSTGRES_PASSWORD", "")
RABBITMQ_USER = os.environ.get("TEST_RABBITMQ_USER", "guest")
RABBITMQ_PASSWORD = os.environ.get("TEST_RABBITMQ_PASSWORD", "guest")
# systemd's, read by the service too; the tests that need them set them.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def alive(pid: int) -> bool:
    """Whether process `pid` exists (a throwaway server's, or the test run that started it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rabbitmq_node_of(pid: int, directory: Path) -> bool:
    """Whether process `pid` is a RabbitMQ node whose data lives under `directory` (a pid may be reused)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"RABBITMQ_MNESIA_BASE={directory / 'mnesia'}".encode() in environ


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- votes ---------------------------------------------------------------------


@dataclass(frozen=True)
class VoteMsg:
    vote_hash: str
    citizen_id: str
    law_id: str
    choice: str
    timestamp: str = "2025-11-14T12:00:00Z"

    def body(self) -> bytes:
        return json.dumps(self.__dict__).encode()


def make_votes(count: int, *, laws: int, seed: int = 1, prefix: str = "citizen") -> list[VoteMsg]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        citizen = f"{prefix}-{seed}-{i}"
        law = f"law-{rng.randrange(laws):03d}"
        out.append(
            VoteMsg(
                vote_hash=hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(),
                citizen_id=citizen,
                law_id=law,
                choice=rng.choice(("oui", "non")),
            )
        )
    return out


def expected_totals(votes: Iterable[VoteMsg]) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = {}
    for v in votes:
        t = totals.setdefault(v.law_id, [0, 0])
        t[0 if v.choice == "oui" else 1] += 1
    return {law: (oui, non) for law, (oui, non) in totals.items()}


# -- RabbitMQ --------------------------------------------------------------------


def amqp_params() -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        RABBITMQ_HOST, RABBITMQ_PORT, credentials=pika.PlainCredentials(RABBITMQ_USER, RABBITMQ_PASSWORD)
    )


def amqp_connection() -> pika.BlockingConnection:
    return pika.BlockingConnection(amqp_params())


def publish(queue: str, bodies: Iterable[bytes]) -> int:
    """Publish in order with confirms, so every body is in the queue when this returns.

    Confirms are awaited a window at a time (tools/publisher.py), not one per message.
    """
    messages = list(bodies)
    publish_all(amqp_params(), queue, messages)
    return len(messages)


def declare_queue(names: list[str]) -> str:
    """A fresh durable queue, declared the way upstream would declare it; its name is added to `names`."""
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    names.append(name)
    conn = amqp_connection()
    try:
        conn.channel().queue_declare(name, durable=True)
    finally:
        conn.close()
    return name


@contextmanager
def scratch_queues() -> Iterator[list[str]]:
    """Queues whose names are added to the list are deleted from RabbitMQ afterwards, with the
    dead-letter queue and exchange the service names after them."""
    names: list[str] = []
    try:
        yield names
    finally:
        conn = amqp_connection()
        try:
            for name in names:
                for queue_name in (name, f"{name}.dead"):
                    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                        conn.channel().queue_delete(queue_name)
                with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                    conn.channel().exchange_delete(f"{name}.dlx")
        finally:
            conn.close()


def queue_state(queue: str, params: pika.ConnectionParameters | None = None) -> tuple[int, int]:
    """(messages ready, consumers) of a queue on the shared broker, or on the node `params` name.

    Asked on a channel kept for the test (tests poll this every few milliseconds); a connection the
    broker closed, or a node that was killed, is replaced by a new one and the question asked again
    (a passive declare changes nothing, so asking twice is safe).
    """
    params = params or amqp_params()
    for attempt in (1, 2):
        channel = _amqp_channel(params)
        try:
            ok = channel.queue_declare(queue, passive=True).method
            return int(ok.message_count), int(ok.consumer_count)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionClosed, pika.exceptions.StreamLostError):
            _forget_amqp(params)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_amqp_open: dict[tuple[str, int, int], tuple[pika.BlockingConnection, Any]] = {}
_amqp_lock = threading.Lock()


def _amqp_channel(params: pika.ConnectionParameters) -> Any:
    """A channel on the test's open connection to the broker `params` names: a new connection if
    there is none or it died, a new channel if the broker closed the last one (a passive declare of
    a queue that does not exist closes it). One per thread: pika's connections are not shared."""
    key = (str(params.host), int(params.port), threading.get_ident())
    with _amqp_lock:
        conn, channel = _amqp_open.get(key, (None, None))
        if conn is not None and conn.is_open:
            try:
                conn.process_data_events(0)  # heartbeats, and a close the broker sent meanwhile
            except pika.exceptions.AMQPError:
                conn = None
        if conn is None or not conn.is_open:
            conn, channel = pika.BlockingConnection(params), None
        if channel is None or not channel.is_open:
            channel = conn.channel()
        _amqp_open[key] = (conn, channel)
        return channel


def _forget_amqp(params: pika.ConnectionParameters) -> None:
    with _amqp_lock:
        conn, _channel = _amqp_open.pop((str(params.host), int(params.port), threading.get_ident()), (None, None))
    if conn is not None:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            conn.close()


def drain_queue(queue: str) -> list[bytes]:
    """Take every ready message off a queue (for dead-letter checks)."""
    return [body for body, _headers in drain_with_headers(queue)]


def drain_with_headers(
    queue: str, params: pika.ConnectionParameters | None = None
) -> list[tuple[bytes, dict[str, Any]]]:
    """Take every ready message off a queue (of the shared broker, or of the node `params` name),
    with its headers."""
    conn = pika.BlockingConnection(params or amqp_params())
    try:
        channel = conn.channel()
        out: list[tuple[bytes, dict[str, Any]]] = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None or properties is None or body is None:
                return out
            out.append((body, dict(properties.headers or {})))
    finally:
        conn.close()


# -- PostgreSQL ----------------------------------------------------------------------


def pg_connect(dbname: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(
        host=POSTGRES_HOST, port=POSTGRES_PORT, user=POSTGRES_USER, password=POSTGRES_PASSWORD, dbname=dbname
    )
    conn.autocommit = True
    return conn


@contextmanager
def scratch_database(admin: psycopg2.extensions.connection, *, prefix: str) -> Iterator[str]:
    """A new, empty database on `admin`'s server (autocommit), dropped afterwards; closes `admin`."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield name
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        admin.close()


_pg_open: dict[tuple[str, int, str, int], psycopg2.extensions.connection] = {}
_pg_lock = threading.Lock()


def _idle_and_alive(conn: psycopg2.extensions.connection) -> bool:
    """Whether a kept connection can be used again. An idle session is told nothing unasked (no
    LISTEN here): data waiting on its socket is the server ending it (a terminated backend, a
    shutdown, a crash's EOF), so it is replaced before a statement is sent on it. A session being
    ended at this very moment may still look alive: the statement then fails, as it would on a new
    connection to a server going down; pg_ctl stop, a kill waited for and DROP DATABASE ... WITH
    (FORCE) return once the sessions are gone."""
    if conn.closed or conn.status != psycopg2.extensions.STATUS_READY:
        return False
    readable, _, _ = select.select([conn], [], [], 0)
    return not readable


def reused_connection(
    host: str, port: int, dbname: str, connect: Callable[[], psycopg2.extensions.connection]
) -> psycopg2.extensions.connection:
    """The test's open autocommit connection to `dbname` on host:port, made by `connect` when there
    is none or the one kept was ended (see _idle_and_alive). One per thread: a watcher thread's
    answer arriving must not be taken for the server ending the main thread's session.
    close_reused_connections() ends them."""
    key = (host, port, dbname, threading.get_ident())
    with _pg_lock:
        conn = _pg_open.get(key)
        if conn is None or not _idle_and_alive(conn):
            if conn is not None:
                conn.close()
            conn = _pg_open[key] = connect()
        return conn


def close_reused_connections() -> None:
    """End the connections query(), PgServer.execute() and queue_state() kept (after each test)."""
    with _pg_lock:
        pg = list(_pg_open.values())
        _pg_open.clear()
    for conn in pg:
        conn.close()
    with _amqp_lock:
        amqp = [broker for broker, _channel in _amqp_open.values()]
        _amqp_open.clear()
    for broker in amqp:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            broker.close()


def execute(
    conn: psycopg2.extensions.connection, statement: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """One statement on `conn`; its rows, if it returns any."""
    with conn.cursor() as cur:
        cur.execute(statement, params or None)
        return list(cur.fetchall()) if cur.description else []


def query(dbname: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement on the shared server, as the administrator, on the test's kept connection."""
    conn = reused_connection(POSTGRES_HOST, POSTGRES_PORT, dbname, lambda: pg_connect(dbname))
    return execute(conn, statement, params)


class SharedPostgres:
    """The shared server as the helpers below read a database: `execute(statement, params, dbname=)`,
    as tests.pg_servers.PgServer and tests.patroni_cluster.Member do for theirs."""

    def execute(
        self, statement: str, params: tuple[Any, ...] = (), *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        return query(dbname, statement, params)


class Sql(Protocol):
    def execute(
        self, statement: str, params: tuple[Any, ...] = (), *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]: ...


SHARED_POSTGRES = SharedPostgres()


@contextmanager
def holding_back(connect: Callable[[], psycopg2.extensions.connection]) -> Iterator[None]:
    """The service cannot commit while this lasts: an exclusive lock on vote_results (taken once
    a transaction of the service's in progress has ended), on a connection `connect` makes as an
    administrator; the service retries. A server that crashes meanwhile ends the lock with it."""
    conn = connect()
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE vote_results IN EXCLUSIVE MODE")
        yield
    finally:
        with contextlib.suppress(psycopg2.Error):  # gone with a crashed server
            conn.rollback()
        conn.close()


# Votes sent while holding_back() keeps the service from committing, just before a failure the test
# brings about: twice the prefetch window (1000 by default), so that the failure finds a full window
# in the service's hands (a batch being written, more buffered) and as many votes still in the
# queue, however fast this machine counts. A failover test needs that, not a large backlog.
BACKLOG = 2 * Config().rabbitmq_prefetch_count


@contextmanager
def backlog_held_back(
    connect: Callable[[], psycopg2.extensions.connection],
    queue: str,
    votes: list[VoteMsg],
    *,
    seed: int,
    laws: int,
    broker: pika.ConnectionParameters | None = None,
) -> Iterator[None]:
    """holding_back(connect), with BACKLOG more votes published to `queue` (on the shared broker,
    or on the node `broker` names) and added to `votes` first: the failure the block brings about
    (a kill, a crash, a stop) comes with work in hand and work left."""
    backlog = make_votes(BACKLOG, laws=laws, seed=seed)
    with holding_back(connect):
        publish_all(broker or amqp_params(), queue, [v.body() for v in backlog])
        votes += backlog
        yield


def set_database_default(dbname: str, setting: str, value: str) -> None:
    """ALTER DATABASE `dbname` SET `setting` = `value`: for every session that connects afterwards."""
    admin = pg_connect(dbname)
    try:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("ALTER DATABASE {} SET {} = %s").format(sql.Identifier(dbname), sql.Identifier(setting)),
                (value,),
            )
    finally:
        admin.close()


def deadlock_partner(dbname: str) -> psycopg2.extensions.connection:
    """A connection (in a transaction once used) that will close a lock cycle with a batch.

    PostgreSQL looks for a cycle once per lock wait, deadlock_timeout after the wait began, in
    the waiting session. The batch waits first; with the default (1 s each) a loaded machine can
    let that second pass before this session closes the cycle, and this session is then the one
    aborted. So every later session of `dbname` (the service's) checks 5 s into its wait, and
    this one never does. Call it before the service connects.
    """
    set_database_default(dbname, "deadlock_timeout", "5s")
    other = pg_connect(dbname)
    with other.cursor() as cur:
        cur.execute("SET deadlock_timeout = '10min'")
    other.autocommit = False
    return other


def waiting_on(dbname: str, blocker: psycopg2.extensions.connection) -> bool:
    """True once one of the service's backends in `dbname` waits for a lock `blocker` holds
    (its own database and backends only: another test's lock cannot satisfy it)."""
    rows = query(
        dbname,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'vote-aggregator' AND %s = ANY(pg_blocking_pids(pid))",
        (blocker.get_backend_pid(),),
    )
    return bool(rows[0][0])


def audit_count(dbname: str, server: Sql = SHARED_POSTGRES) -> int:
    """Votes in `dbname`'s audit table (on the shared server unless `server`); 0 before the schema."""
    try:
        return int(server.execute("SELECT count(*) FROM vote_audit", dbname=dbname)[0][0])
    except psycopg2.errors.UndefinedTable:
        return 0


def results(dbname: str, server: Sql = SHARED_POSTGRES) -> dict[str, tuple[int, int]]:
    rows = server.execute("SELECT law_id, oui_count, non_count FROM vote_results", dbname=dbname)
    return {law: (int(oui), int(non)) for law, oui, non in rows if oui or non}


def assert_invariant(dbname: str, server: Sql = SHARED_POSTGRES) -> None:
    """For every law, vote_results equals vote_audit grouped by law and choice."""
    audit: dict[str, list[int]] = {}
    grouped = "SELECT law_id, choice, count(*) FROM vote_audit GROUP BY 1, 2"
    for law, choice, n in server.execute(grouped, dbname=dbname):
        audit.setdefault(law, [0, 0])[0 if choice == "oui" else 1] = int(n)
    assert results(dbname, server) == {law: (oui, non) for law, (oui, non) in audit.items()}


def assert_all_counted_once(
    dbname: str,
    queue: str,
    votes: list[VoteMsg],
    *,
    server: Sql = SHARED_POSTGRES,
    broker: pika.ConnectionParameters | None = None,
) -> None:
    """Every vote counted once, no duplicate attempt, the queue empty, and the invariant: in
    `dbname` on the shared server or on `server`, for `queue` on the shared broker or on the node
    `broker` names."""
    assert results(dbname, server) == expected_totals(votes)
    assert audit_count(dbname, server) == len(votes)
    assert server.execute("SELECT count(*) FROM duplicate_attempts", dbname=dbname) == [(0,)]
    assert queue_state(queue, broker) == (0, 0)
    assert_invariant(dbname, server)


# -- the service --------------------------------------------------------------------


@functools.cache
def outside_checkout() -> Path:
    """An empty directory, removed at exit, for subprocesses to run in: python-dotenv looks for
    `.env` from the working directory up, and a developer's `.env` must not configure a test."""
    path = Path(tempfile.mkdtemp(prefix="agg-test-cwd-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without a variable the service or the tools read; `overrides` win."""
    read = set(variables()) | set(SYSTEMD_VARIABLES)
    inherited = {k: v for k, v in os.environ.items() if k not in read and not k.startswith(("RABBITMQ_", "POSTGRES_"))}
    return {**inherited, **overrides}


def service_env(*, dbname: str, queue: str = "votes.aggregation", **overrides: str) -> dict[str, str]:
    """The environment of a run against the test servers; `overrides` win."""
    return clean_env(
        **{
            "RABBITMQ_HOST": RABBITMQ_HOST,
            "RABBITMQ_PORT": str(RABBITMQ_PORT),
            "RABBITMQ_USER": RABBITMQ_USER,
            "RABBITMQ_PASSWORD": RABBITMQ_PASSWORD,
            "RABBITMQ_QUEUE": queue,
            "POSTGRES_HOST": POSTGRES_HOST,
            "POSTGRES_PORT": str(POSTGRES_PORT),
            "POSTGRES_USER": POSTGRES_USER,
            "POSTGRES_PASSWORD": POSTGRES_PASSWORD,
            "POSTGRES_DB": dbname,
            **overrides,
        }
    )


def aggregator_command(*args: str) -> list[str]:
    """`python <checkout>/aggregator.py <args>`, to be run outside the checkout."""
    return [sys.executable, str(ROOT / "aggregator.py"), *args]


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python aggregator.py <args>` as an operator runs it (from an empty directory unless `cwd`)."""
    return subprocess.run(
        aggregator_command(*args),
        cwd=cwd or outside_checkout(),
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tool_command(*args: str) -> list[str]:
    """`python -m tools.publish_votes <args>`, to be run outside the checkout with tool_env()."""
    return [sys.executable, "-m", "tools.publish_votes", *args]


def tool_env(**overrides: str) -> dict[str, str]:
    """The publishing tool's environment: the test broker's credentials, the checkout on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return clean_env(
        **{"PYTHONPATH": path, "RABBITMQ_USER": RABBITMQ_USER, "RABBITMQ_PASSWORD": RABBITMQ_PASSWORD, **overrides}
    )


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The `problem:` lines of a --check run."""
    return [line for line in result.stderr.splitlines() if line.startswith("problem: ")]


TEST_BATCH_TIMEOUT_S = "0.2"


# For the tests whose subject is the per-law series: the results embargo (on by default, as in
# production, for every other test) lifted.
PER_LAW_METRICS = {"RESULTS_EMBARGO": "false"}


class Service:
    """The service as users run it: `python aggregator.py` with environment variables.

    Production's defaults, the results embargo included, except what the test sets.
    """

    def __init__(
        self,
        *,
        queue: str,
        dbname: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        checkout: Path = ROOT,
    ) -> None:
        # Another checkout's aggregator.py: a previous release, for the rolling-upgrade test.
        self.checkout = checkout
        self.queue = queue
        self.dbname = dbname
        self.log_path = log_path
        self.metrics_port = free_port()
        self.env = service_env(
            dbname=dbname,
            queue=queue,
            **{
                "PROMETHEUS_PORT": str(self.metrics_port),
                "PYTHONUNBUFFERED": "1",
                # The last, partial batch of a test is written 0.2 s after its first vote, not 1 s.
                "BATCH_TIMEOUT_SECONDS": TEST_BATCH_TIMEOUT_S,
                # Each run's signed chain heads in a file of its own, next to its log.
                "CHAIN_HEADS_FILE": str(log_path.with_name(f"{log_path.stem}.heads.jsonl")),
                **(env or {}),
            },
        )
        self.heads_path = Path(self.env["CHAIN_HEADS_FILE"])
        self.proc: subprocess.Popen[bytes] | None = None
        # A test that provokes unexpected errors on purpose says so; any other
        # test fails when the service logged a traceback or counted one.
        self.expects_unexpected_errors = False
        self._unexpected = 0.0

    def start(self, *, wait_consuming: bool = True) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.checkout / "aggregator.py")],
            cwd=outside_checkout(),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_consuming:
            self.wait_consuming()
        return self

    def wait_consuming(self, timeout: float = 30) -> None:
        def consuming() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.logs()}")
            return "consuming " in self.logs()

        wait_for(consuming, timeout=timeout, what="the service to start consuming")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, *, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.proc is not None
        self.note_unexpected()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def running(self) -> bool:
        """Started and not exited."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.note_unexpected()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http(self, path: str) -> tuple[int, str]:
        """Status and body of GET `path` on the metrics port (/healthz, /readyz, ...)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        """One sample's value. A sample that does not exist fails, unless a `default` is given
        (for a labelled series that appears with its first value)."""
        samples = self.metrics()
        value = samples.get((name, tuple(sorted(labels.items()))), default)
        if value is None:
            similar = sorted({f"{n}{dict(lbl)}" for n, lbl in samples if n == name})[:10]
            raise AssertionError(f"no sample {name}{labels} on /metrics (samples of {name}: {similar or 'none'})")
        return value

    # -- what no test may leave unnoticed ------------------------------------------------

    def note_unexpected(self) -> None:
        """Remember aggregation_errors_total{error_type="unexpected"} while the service still answers."""
        if self.proc is not None and self.proc.poll() is None:
            # Not serving yet (starting), or already gone: nothing to read.
            with contextlib.suppress(OSError, AssertionError):
                self._unexpected = self.metric("aggregation_errors_total", error_type="unexpected")

    def unnoticed_failures(self) -> list[str]:
        """Tracebacks in the log and unexpected errors counted, for a test that did not expect any."""
        if self.expects_unexpected_errors:
            return []
        found = []
        tracebacks = self.logs().count("Traceback (most recent call last)")
        if tracebacks:
            found.append(f"{self.log_path.name}: {tracebacks} traceback(s) logged")
        if self._unexpected:
            counted = f'aggregation_errors_total{{error_type="unexpected"}} = {self._unexpected:g}'
            found.append(f"{self.log_path.name}: {counted}")
        return found


def stop_all(services: Iterable[Service]) -> None:
    """Kill what is still running; fail the test if any service hit an unexpected error it did not expect."""
    failures: list[str] = []
    for svc in services:
        svc.kill()
        failures += svc.unnoticed_failures()
    if failures:
        pytest.fail("the service under test hit unexpected errors: " + "; ".join(failures), pytrace=False)


def apply_schema(dbname: str) -> None:
    done = run_cli("--init-db", env=service_env(dbname=dbname))
    assert done.returncode == 0, done.stderr


class NotifyListener:
    """Receives sd_notify datagrams on a filesystem path or an abstract name ("@...")."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self.messages: list[list[str]] = []
        self._arrived: list[float] = []  # time.monotonic() of each message
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode().split("\n"))
                self._arrived.append(time.monotonic())

    def received(self) -> list[list[str]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, state: str, *, timeout: float) -> list[str]:
        """The first message carrying `state` (e.g. "READY=1")."""

        def found() -> list[str] | None:
            return next((m for m in self.received() if state in m), None)

        message: list[str] = wait_for(found, timeout=timeout, interval=0.02, what=state)
        return message

    def unfed(self) -> tuple[int, int]:
        """(watchdog pings, turns that said "not counting" instead), from the first such turn on.

        Once liveness fails, each turn a ping is due sends `STATUS=not counting: ...` in its place:
        the second figure counts turns, so that "no ping since" needs no clock.
        """

        def not_counting(message: list[str]) -> bool:
            return any(state.startswith("STATUS=not counting") for state in message)

        messages = self.received()
        first = next((i for i, message in enumerate(messages) if not_counting(message)), len(messages))
        later = messages[first:]
        return sum("WATCHDOG=1" in m for m in later), sum(not_counting(m) for m in later)

    def count(self, state: str, *, since: float = 0.0) -> int:
        """Messages carrying `state`, received at or after `since` (time.monotonic())."""
        with self._lock:
            return sum(state in m for m, at in zip(self.messages, self._arrived, strict=True) if at >= since)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._sock.close()


def key_files(directory: Path, name: str = "instance") -> tuple[Ed25519PrivateKey, Path]:
    """An Ed25519 signing key, and the PEM file of its public key (what `verify --keys` takes)."""
    key = Ed25519PrivateKey.generate()
    public = directory / f"{name}.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, public


def private_key_file(key: Ed25519PrivateKey, path: Path) -> Path:
    """`key` as the PEM file CHAIN_SIGNING_KEY_FILE names."""
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path
