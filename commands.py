"""`--check`: the configuration, both servers and the schema, one line per problem (`--init-db` lives in
initdb.py, `results` in results.py, `verify` in verify.py)."""

from __future__ import annotations

import contextlib
import ssl
import sys
from dataclasses import dataclass

import pika
import pika.exceptions

import db
import heads
import httpauth
from amqp import amqp_parameters, describe_error, open_connection, refused_by_broker
from config import Config
from replication import describe_replication


@dataclass(frozen=True)
class Problem:
    """One line of --check; `certain` when retrying cannot fix it (exit code 2, as at start-up)."""

    text: str
    certain: bool = False


def check(config: Config) -> list[Problem]:
    """Connect to both servers and verify the schema; one line per problem (for ExecStartPre=, CI).

    Rights beyond the service's needs (a superuser, say) are `warning:` lines on stdout, not problems.
    """
    return [
        *_check_rabbitmq(config),
        *_check_postgres(config),
        *_check_metrics_port(config),
        *_check_chain_heads(config),
    ]


def _check_chain_heads(config: Config) -> list[Problem]:
    """The heads file can be appended to and the signing key read, as start-up needs them."""
    try:
        heads.check_heads_file(config.chain_heads_file)
        # Unset: the service makes a development key at start and warns there; --check makes no file.
        if config.chain_signing_key_file:
            key = heads.load_signing_key(config.chain_signing_key_file, heads_file=config.chain_heads_file)
            print(f"ok: chain heads signed by key {heads.public_hex(key)} into {config.chain_heads_file}")
    except ValueError as exc:
        return [Problem(str(exc), certain=True)]
    return []


def _check_rabbitmq(config: Config) -> list[Problem]:
    """Every node of RABBITMQ_HOST; with several, one that answers is enough (the others are warnings)."""
    nodes = config.rabbitmq_nodes
    failures = [problem for node in nodes if (problem := _check_rabbitmq_node(config, node)) is not None]
    if len(nodes) == 1:
        return failures
    if len(failures) == len(nodes):
        # As at start-up: certain (exit 2) only when every node refused for good.
        certain = all(problem.certain for problem in failures)
        return [Problem(problem.text, certain=certain) for problem in failures]
    for problem in failures:
        print(f"warning: {problem.text} (the service uses the other nodes)", file=sys.stderr)
    return []


def _check_rabbitmq_node(config: Config, node: tuple[str, int]) -> Problem | None:
    url = config.rabbitmq_url_for_logs(node)
    nodes = config.rabbitmq_nodes
    if len(nodes) > 1:
        url += f" (node {nodes.index(node) + 1} of {len(nodes)})"
    try:
        connection = open_connection(amqp_parameters(config, node))
    except (pika.exceptions.AMQPError, OSError) as exc:
        refused = refused_by_broker(exc) or isinstance(exc, ssl.SSLCertVerificationError)
        return Problem(f"RabbitMQ {url}: {describe_error(exc)}", certain=refused)
    try:
        ok = connection.channel().queue_declare(config.rabbitmq_queue, passive=True).method
        print(
            f"ok: RabbitMQ {url}, queue {config.rabbitmq_queue} "
            f"({ok.message_count} ready, {ok.consumer_count} consumers)"
        )
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            return Problem(f"RabbitMQ queue {config.rabbitmq_queue}: {exc.reply_text}")
        print(f"ok: RabbitMQ {url}, queue {config.rabbitmq_queue} does not exist yet (the service declares it)")
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):  # closing something already broken
            connection.close()
    return None


def _check_postgres(config: Config) -> list[Problem]:
    database = db.Database(config=config)
    try:
        database.open()
        missing = database.missing_schema_objects()
        version = db.SchemaState(0, 0) if missing else database.schema_state()
        warnings = [] if missing else database.privilege_warnings()
        replication = database.replication_state() if _replicated(config) else None
    except db.DatabaseError as exc:
        return [Problem(f"PostgreSQL: {exc}", certain=isinstance(exc, (db.DatabaseMissing, db.DatabaseConfigError)))]
    finally:
        database.close()
    if missing:
        return [
            Problem(
                f"PostgreSQL {config.postgres_target_for_logs()}: schema incomplete, missing {', '.join(missing)}; "
                "apply it with: python aggregator.py --init-db"
            )
        ]
    problem = version.problem()
    if problem is not None:
        # As at start-up, where the service exits 2 on it.
        return [Problem(f"PostgreSQL {config.postgres_target_for_logs()}: {problem}", certain=True)]
    primary = f" (writes go to {database.server})" if len(config.postgres_servers) > 1 else ""
    print(f"ok: PostgreSQL {config.postgres_target_for_logs()}, schema complete{primary}, version {version.version}")
    if version.warning() is not None:
        warnings = [*warnings, str(version.warning())]
    for warning in warnings:
        print(f"warning: {warning}")
    return _check_replication(config, replication)


def _check_replication(config: Config, replication: db.ReplicationState | None) -> list[Problem]:
    """What a failover could lose, when several servers are configured or a synchronous standby required."""
    if replication is None:
        return []
    said = describe_replication(replication, user=config.postgres_user)
    print(f"{'ok' if replication.failover_safe else 'warning'}: {said}")
    if config.postgres_require_sync_standby and not replication.failover_safe:
        return [
            Problem(
                "PostgreSQL: POSTGRES_REQUIRE_SYNC_STANDBY=true and no synchronous standby has every commit: "
                "the service would not consume"
            )
        ]
    return []


def _check_metrics_port(config: Config) -> list[Problem]:
    """The metrics port's TLS files and users file, read as the service reads them."""
    try:
        lock = httpauth.load(config)
    except ValueError as exc:
        return [Problem(f"metrics port: {exc}", certain=True)]
    if lock.tls is not None or lock.auth is not None:
        print(f"ok: metrics port {'TLS' if lock.tls else 'plain HTTP'}, {'basic auth' if lock.auth else 'open'}")
    return []


def _replicated(config: Config) -> bool:
    """Whether --check reports the replication state: several servers, or a standby required."""
    return len(config.postgres_servers) > 1 or config.postgres_require_sync_standby
