"""High availability against the shared servers: host lists in the configuration, each broker
node's own TLS name, the queue types and the delivery limit, which nodes refuse for good, and what
the service says about the primary's replication.

The failovers themselves, on throwaway servers, are in tests/test_ha_rabbitmq.py and
tests/test_ha_postgres.py.
"""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Callable

import pika
import pika.exceptions
import pytest

import db
import replication
from amqp import declare_queues
from config import Config, ConfigError, load_config
from replication import describe_replication
from tests.support import (
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    Service,
    amqp_connection,
    audit_count,
    drain_queue,
    make_votes,
    pg_connect,
    publish,
    queue_state,
    run_cli,
    service_env,
    wait_for,
)
from tests.tls_support import Authority, KeyPair, TlsProxy
from tools.ports import free_port

MakeService = Callable[..., Service]

# -- configuration -------------------------------------------------------------------------------


def test_one_host_is_read_exactly_as_before() -> None:
    config = load_config({"RABBITMQ_HOST": "broker", "RABBITMQ_PORT": "5673", "POSTGRES_HOST": "db"})
    assert config.rabbitmq_nodes == (("broker", 5673),)
    assert config.rabbitmq_url_for_logs() == "amqp://guest@broker:5673/"
    assert config.postgres_port == 5432
    assert config.postgres_target_for_logs() == "postgresql://postgres@db:5432/election_votes"


def test_broker_nodes_take_their_own_port_or_rabbitmq_port() -> None:
    config = load_config({"RABBITMQ_HOST": " rabbit1, rabbit2:5673 ,[::1]:5674,10.0.0.4", "RABBITMQ_PORT": "5671"})
    assert config.rabbitmq_nodes == (("rabbit1", 5671), ("rabbit2", 5673), ("::1", 5674), ("10.0.0.4", 5671))
    assert config.rabbitmq_url_for_logs(("::1", 5674)) == "amqp://guest@[::1]:5674/"


def test_database_hosts_and_ports_are_libpq_lists() -> None:
    one_port = load_config({"POSTGRES_HOST": "db1, db2", "POSTGRES_PORT": "5433"})
    assert one_port.postgres_servers == (("db1", 5433), ("db2", 5433))
    each = load_config({"POSTGRES_HOST": "db1,db2", "POSTGRES_PORT": "5451, 5452"})
    assert each.postgres_servers == (("db1", 5451), ("db2", 5452))
    assert each.postgres_libpq_port == "5451,5452"
    assert each.postgres_target_for_logs() == "postgresql://postgres@db1:5451,db2:5452/election_votes"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RABBITMQ_HOST": "rabbit1,,rabbit3"}, "RABBITMQ_HOST"),
        ({"RABBITMQ_HOST": "rabbit1:99999"}, "rabbit1:99999"),
        ({"RABBITMQ_HOST": "rabbit1:amqp"}, "rabbit1:amqp"),
        ({"RABBITMQ_HOST": "rabbit 1"}, "rabbit 1"),
        ({"POSTGRES_HOST": "db1:5433,db2"}, "db1:5433"),
        ({"POSTGRES_HOST": "db1,,db2"}, "POSTGRES_HOST"),
        ({"POSTGRES_PORT": "5451,x"}, "5451,x"),
        ({"POSTGRES_PORT": "5451,70000"}, "5451,70000"),
        ({"POSTGRES_HOST": "db1,db2", "POSTGRES_PORT": "1,2,3"}, "1,2,3"),
        ({"RABBITMQ_QUEUE_TYPE": "stream"}, "stream"),
        ({"RABBITMQ_DELIVERY_LIMIT": "0"}, "RABBITMQ_DELIVERY_LIMIT"),
        (
            {"POSTGRES_REQUIRE_SYNC_STANDBY": "true", "POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS": "30"},
            "POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS",
        ),
    ],
)
def test_bad_lists_are_refused_naming_the_value(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(environ)


def test_a_bad_list_stops_start_up_with_one_line() -> None:
    result = run_cli(env=service_env(dbname="postgres", POSTGRES_HOST="db1,db2", POSTGRES_PORT="1,2,3"), timeout=30)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "POSTGRES_PORT" in line
    assert "'1,2,3'" in line


def test_the_replication_check_may_be_slower_without_the_requirement() -> None:
    config = load_config({"POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS": "60"})
    assert config.postgres_replication_check_interval_s == 60


# -- RabbitMQ nodes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, KeyPair]:
    ca = Authority.create(tmp_path_factory.mktemp("ha-pki"), "ha")
    return ca, ca.issue("server", common_name="localhost", dns_names=("localhost",))


def test_each_broker_node_is_checked_against_its_own_name(
    make_service: MakeService, queue: str, dbname: str, certificates: tuple[Authority, KeyPair]
) -> None:
    ca, server = certificates
    # Both proxies front the shared broker with a certificate for "localhost": reached as 127.0.0.1 the
    # first is refused, reached as localhost the second is accepted. One name for both would fail both
    # or pass both.
    with (
        TlsProxy((RABBITMQ_HOST, RABBITMQ_PORT), server=server) as first,
        TlsProxy((RABBITMQ_HOST, RABBITMQ_PORT), server=server) as second,
    ):
        hosts = f"127.0.0.1:{first.port},localhost:{second.port}"
        svc = make_service({"RABBITMQ_TLS": "true", "RABBITMQ_TLS_CA_FILE": str(ca.cert), "RABBITMQ_HOST": hosts})
        svc.start()
        logs = svc.logs()
        assert f"RabbitMQ at amqp://guest@127.0.0.1:{first.port}/: TLS certificate not accepted" in logs
        assert f"consuming {queue} on amqp://guest@localhost:{second.port}/ (node 2 of 2," in logs
        assert svc.metric("rabbitmq_node_connected", node=f"localhost:{second.port}") == 1
        assert svc.metric("rabbitmq_node_connected", node=f"127.0.0.1:{first.port}") == 0
        votes = make_votes(100, laws=2, seed=81)
        publish(queue, [v.body() for v in votes])
        wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted over TLS")
        assert svc.stop() == 0

        # RABBITMQ_TLS_SERVER_NAME is the name expected of every node.
        named = make_service(
            {
                "RABBITMQ_TLS": "true",
                "RABBITMQ_TLS_CA_FILE": str(ca.cert),
                "RABBITMQ_HOST": f"127.0.0.1:{first.port},127.0.0.1:{second.port}",
                "RABBITMQ_TLS_SERVER_NAME": "localhost",
            }
        ).start()
        assert f"consuming {queue} on amqp://guest@127.0.0.1:{first.port}/ (node 1 of 2," in named.logs()
        assert named.stop() == 0


def test_every_node_refusing_the_login_exits_2_and_one_down_node_is_retried(
    make_service: MakeService, queue: str
) -> None:
    both = f"127.0.0.1:{RABBITMQ_PORT},localhost:{RABBITMQ_PORT}"
    refused = make_service({"RABBITMQ_HOST": both, "RABBITMQ_PASSWORD": "wrong"}).start(wait_consuming=False)
    assert refused.proc is not None
    assert refused.proc.wait(30) == 2
    assert refused.logs().count("RabbitMQ refused amqp://guest@") == 2

    # One node refuses, the other does not answer (yet): that may change, so the service waits and retries.
    down = f"127.0.0.1:{RABBITMQ_PORT},127.0.0.1:{free_port()}"
    waiting = make_service(
        {"RABBITMQ_HOST": down, "RABBITMQ_PASSWORD": "wrong", "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": "1"}
    )
    waiting.start(wait_consuming=False)
    wait_for(lambda: waiting.logs().count("no RabbitMQ node answered (2 tried)") >= 2, timeout=30, what="two rounds")
    assert waiting.proc is not None
    assert waiting.proc.poll() is None
    waiting.signal(signal.SIGTERM)
    assert waiting.proc.wait(30) == 0


# -- queue types --------------------------------------------------------------------------------------


def test_classic_queues_are_declared_as_before(make_service: MakeService, queue_names: list[str]) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    svc = make_service({"RABBITMQ_QUEUE_TYPE": "classic"}, queue_name=name).start()
    assert f"declared durable queue {name} (classic) dead-lettering to {name}.dlx -> {name}.dead" in svc.logs()
    assert svc.stop() == 0
    conn = amqp_connection()
    try:
        # The arguments of a classic queue declared by earlier versions: a plain redeclaration matches.
        conn.channel().queue_declare(name, durable=True, arguments={"x-dead-letter-exchange": f"{name}.dlx"})
        conn.channel().queue_declare(f"{name}.dead", durable=True)
    finally:
        conn.close()


def test_an_existing_dead_letter_queue_is_used_as_it_is(queue_names: list[str]) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    conn = amqp_connection()
    try:
        conn.channel().queue_declare(f"{name}.dead", durable=True)  # classic, from an earlier deployment
        declare_queues(conn, Config(rabbitmq_queue=name))
        publish(name, [b"not a vote"])
        ch = conn.channel()
        method, _props, _body = ch.basic_get(name, auto_ack=False)
        assert method is not None
        assert method.delivery_tag is not None
        ch.basic_reject(method.delivery_tag, requeue=False)
    finally:
        conn.close()
    wait_for(lambda: queue_state(f"{name}.dead")[0] == 1, timeout=10, what="dead-lettered into the old queue")


@pytest.fixture
def held_vote_env() -> dict[str, str]:
    # A vote waits in the buffer (unacked) for a whole minute: a kill then returns it to the queue,
    # as a message that kills its consumer would be.
    return {"RABBITMQ_DELIVERY_LIMIT": "1", "BATCH_SIZE": "1000", "BATCH_TIMEOUT_SECONDS": "60"}


def test_a_message_that_keeps_killing_consumers_ends_in_the_dead_letter_queue(
    make_service: MakeService, queue_names: list[str], dbname: str, held_vote_env: dict[str, str]
) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    poison = make_votes(1, laws=1, seed=82)[0]
    make_service(held_vote_env, queue_name=name).start().stop()  # declares the quorum queue, limit 1
    publish(name, [poison.body()])
    for _ in range(2):  # the first delivery and one more are allowed; the third is not
        svc = make_service(held_vote_env, queue_name=name).start()
        wait_for(lambda s=svc: s.metric("vote_buffer_depth") == 1, timeout=15, what="the vote received")  # type: ignore[misc]
        svc.kill()
    wait_for(lambda: queue_state(f"{name}.dead")[0] == 1, timeout=15, what="the message dead-lettered")
    assert queue_state(name) == (0, 0)
    assert drain_queue(f"{name}.dead") == [poison.body()]
    assert audit_count(dbname) == 0


def test_quorum_without_dead_lettering_sets_no_delivery_limit(
    make_service: MakeService, queue_names: list[str]
) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    svc = make_service({"RABBITMQ_DEAD_LETTERING": "false"}, queue_name=name).start()
    assert "has no delivery limit (RABBITMQ_DEAD_LETTERING=false)" in svc.logs()
    assert svc.stop() == 0
    conn = amqp_connection()
    try:
        conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            conn.channel().queue_declare(
                name, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 20}
            )
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            conn.close()


# -- what a failover could lose -------------------------------------------------------------------------


def state(names: str, commit: str = "on", *standbys: tuple[str, str | None]) -> db.ReplicationState:
    return db.ReplicationState("db1:5432", names, commit, tuple((n, s, 0) for n, s in standbys))


@pytest.mark.parametrize(
    ("replication", "safe", "said"),
    [
        (
            state("standby1", "on", ("standby1", "sync")),
            True,
            "a failover to a synchronous standby loses no acked vote",
        ),
        (state("FIRST 2 (a, b, c)", "on", ("a", "sync"), ("b", "sync"), ("c", "potential")), True, "until 2 of"),
        (state("ANY 1 (a, b)", "remote_apply", ("a", "quorum"), ("b", "quorum")), True, "loses no acked vote"),
        (state("FIRST 2 (a, b)", "on", ("a", "sync"), ("b", "potential")), False, "and 1 attached"),
        (state("standby1", "on"), False, "writing stalls until one attaches"),
        (state("standby1", "local", ("standby1", "sync")), False, "synchronous_commit=local"),
        (state("", "on", ("standby1", "async")), False, "asynchronous to standby1"),
        (state("", "on"), False, "no standby"),
        (state("standby1", "on", ("standby1", None)), False, "apply init_db.sql and service_role.sql again"),
    ],
)
def test_what_a_failover_could_lose_is_said_in_one_line(
    replication: db.ReplicationState, safe: bool, said: str
) -> None:
    assert replication.failover_safe is safe
    line = describe_replication(replication, user="aggregator")
    assert said in line
    assert "\n" not in line


def test_the_service_reports_the_shared_servers_replication(make_service: MakeService) -> None:
    svc = make_service().start()
    # What the shared server's replication is, read here as a superuser: safe (1) only with a
    # synchronous standby every commit waits for; a server on its own, as tests run, says 0.
    conn = pg_connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('synchronous_standby_names'), current_setting('synchronous_commit')")
            names, commit = cur.fetchone() or ("", "")
            standbys = replication.read_standbys(cur)
    finally:
        conn.close()
    expected = replication.ReplicationState("shared", names, commit, standbys)
    assert "PostgreSQL replication on " in svc.logs()
    assert svc.metric("database_failover_safe") == (1 if expected.failover_safe else 0)
    assert svc.metric("rabbitmq_node_connected", node=f"{RABBITMQ_HOST}:{RABBITMQ_PORT}") == 1
    assert svc.stop() == 0
