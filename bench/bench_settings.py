"""What every part of the benchmark shares: its settings, read from the command line, and its error."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pika
import psycopg2
import psycopg2.extensions

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "init_db.sql"
PHASES = ("bare", "service", "naive", "latency")


class BenchError(RuntimeError):
    """The bench cannot go on (a process died, a phase timed out, a service would not start)."""


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
    rounds: int = 1  # of the bare and service phases, whose medians are reported


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


def parse_args(argv: Sequence[str] | None, *, description: str | None = None) -> Settings:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--rounds", type=_positive_int, default=3, help="runs of bare and service, median reported (3)")
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
        rounds=a.rounds,
    )
