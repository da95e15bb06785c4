"""Consuming lasts: a channel or consumer the broker ends, a consumer that stops receiving, a delivery
limit during database outages, and a shutdown with a broker that no longer answers.

The tests that restart, close or reconfigure a broker use a throwaway node
(tests/rabbitmq_cluster.py) and, for database outages, a throwaway PostgreSQL
(tests/pg_servers.py); the others use the shared servers with a queue of their own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

from tests import pg_servers
from tests.pg_servers import PgServer
from tests.proxy import TcpProxy
from tests.rabbitmq_cluster import RabbitNode, standalone_node
from tests.roles import ServiceRole, create_service_role
from tests.support import (
    NotifyListener,
    Service,
    amqp_connection,
    assert_all_counted_once,
    assert_invariant,
    audit_count,
    drain_with_headers,
    expected_totals,
    make_votes,
    pg_connect,
    publish,
    query,
    queue_state,
    results,
    run_cli,
    service_env,
    stop_all,
    wait_for,
)

pytestmark = pytest.mark.slow  # what only time brings

MakeService = Callable[..., Service]
# What the broker closes a channel for: an ack overdue by more than this (5 s). RabbitMQ checks once
# per channel_tick_interval, a minute by default; the node here checks every CHECK_MS, so that a test
# waits seconds for the close, not a minute.
CONSUMER_TIMEOUT_MS = 5000
CHECK_MS = 5000


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    """A throwaway RabbitMQ node with a short consumer_timeout, for the tests that close connections."""
    with standalone_node(config=f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n") as started:
        # Read by each channel when it sets its next check: every channel opened from now on.
        started.ctl("eval", f"application:set_env(rabbit, channel_tick_interval, {CHECK_MS}).")
        yield started


def on_node(node: RabbitNode, **extra: str) -> dict[str, str]:
    return {
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": str(node.port),
        "RABBITMQ_USER": "guest",
        "RABBITMQ_PASSWORD": "guest",
        **extra,
    }


def node_queue(node: RabbitNode, queue: str) -> tuple[int, int]:
    """(ready, unacked) of a queue on the node."""
    for line in node.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged").splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"no queue {queue} on the node")


def connections(node: RabbitNode) -> list[str]:
    return [line.strip() for line in node.ctl("list_connections", "pid").splitlines() if line.strip().startswith("<")]


# Every client connection closed in one call to the node (rabbitmqctl takes a second or more a call
# on a loaded machine, one per connection adds up over the blips); prints how many.
_CLOSE_EVERY_CONNECTION = """
Closed = rabbit_networking:connections(),
[rabbit_networking:close_connection(P, "test: network blip") || P <- Closed],
length(Closed).
"""


def close_connections(node: RabbitNode) -> int:
    """Close every client connection, as a flapping network or an operator would; returns how many."""
    return int(node.ctl("eval", _CLOSE_EVERY_CONNECTION).strip())


# -- a channel the broker closes --------------------------------------------------------------------


@pytest.mark.ha
def test_a_channel_closed_for_an_overdue_ack_leads_back_to_consuming(
    node: RabbitNode, make_service: MakeService, queue: str, dbname: str
) -> None:
    svc = make_service(on_node(node, STALL_TIMEOUT_SECONDS="600")).start()
    first = make_votes(100, laws=2, seed=184)
    node.publish(queue, [v.body() for v in first])
    wait_for(lambda: audit_count(dbname) == len(first), timeout=30, what="votes counted")

    # An ack held past consumer_timeout: vote_results locked, as a long database stall would.
    locker = pg_connect(dbname)
    locker.autocommit = False
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE vote_results IN ACCESS EXCLUSIVE MODE")
    held = make_votes(100, laws=2, seed=185)
    try:
        node.publish(queue, [v.body() for v in held])
        wait_for(
            lambda: "RabbitMQ closed the channel consuming" in svc.logs(),
            timeout=150,
            interval=0.5,
            what="the broker to close the channel for the overdue ack",
        )
    finally:
        locker.rollback()
        locker.close()
    after = make_votes(300, laws=2, seed=186)
    node.publish(queue, [v.body() for v in after])
    votes = first + held + after
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="every vote counted")
    # The votes whose acks could not be sent come back, and are absorbed.
    wait_for(lambda: node_queue(node, queue) == (0, 0), timeout=60, interval=0.5, what="the queue drained")
    assert svc.stop() == 0
    logs = svc.logs()
    closed = [line for line in logs.splitlines() if "RabbitMQ closed the channel consuming" in line]
    assert len(closed) == 1  # once, at WARNING, naming the broker's reason
    assert " WARNING " in closed[0]
    assert "PRECONDITION_FAILED" in closed[0]
    assert results(dbname) == expected_totals(votes)
    assert query(dbname, "SELECT count(*) FROM duplicate_attempts") == [(0,)]
    assert_invariant(dbname)


# -- a consumer that no longer receives fails liveness ----------------------------------------------


def test_messages_ready_and_nothing_received_fails_liveness_and_the_watchdog(
    make_service: MakeService, queue_names: list[str], dbname: str, tmp_path: Path
) -> None:
    # A cause that leaves the service connected and alive but receiving nothing: a single-active-
    # consumer queue where another client is the active consumer and never acks.
    queue = f"agg.test.sac.{uuid.uuid4().hex[:12]}"
    queue_names.append(queue)
    conn = amqp_connection()
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-single-active-consumer": True})
    votes = make_votes(40, laws=2, seed=181)
    publish(queue, [v.body() for v in votes])
    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue, on_message_callback=lambda *_args: None)
    conn.process_data_events(time_limit=0.5)

    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        svc = make_service(
            {
                "NOTIFY_SOCKET": listener.address,
                "WATCHDOG_USEC": "1000000",  # ping every 0.5 s while alive
                "STALL_TIMEOUT_SECONDS": "3",
            },
            queue_name=queue,
        ).start()
        # Declared by someone else, without a dead-letter exchange: said at start-up.
        assert (
            f"existing classic queue {queue}: refused messages are copied to '{queue}.dlx' by the service; one it "
            "cannot copy is DROPPED by RabbitMQ (no x-dead-letter-exchange); no delivery limit"
        ) in svc.logs()
        wait_for(lambda: svc.metric("vote_queue_ready_messages", 0) > 0, timeout=15, what="the ready count read")
        wait_for(lambda: svc.http("/healthz")[0] == 503, timeout=20, what="/healthz failing")
        _status, reason = svc.http("/healthz")
        assert "ready in the queue and none has been received" in reason
        wait_for(lambda: "systemd watchdog no longer fed" in svc.logs(), timeout=10, what="the watchdog line")
        # Three turns with a ping due said "not counting" instead, and none pinged.
        wait_for(lambda: listener.unfed()[1] >= 3, timeout=30, what="three turns not feeding the watchdog")
        assert listener.unfed()[0] == 0
        assert audit_count(dbname) == 0

        # The other consumer goes away: the service becomes the active one and counts.
        conn.close()
        wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
        wait_for(lambda: svc.http("/healthz")[0] == 200, timeout=10, what="/healthz ok again")
        assert svc.stop() == 0
    finally:
        listener.close()
        if conn.is_open:
            conn.close()
    assert_all_counted_once(dbname, queue, votes)


# -- shutdown with a broker that stops answering ---------------------------------------------------


def test_shutdown_is_bounded_when_the_broker_stops_answering(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    try:
        first = make_votes(300, laws=3, seed=182)
        svc = make_service(
            {
                "RABBITMQ_PORT": str(proxy.port),
                "SHUTDOWN_TIMEOUT_SECONDS": "2",
                # Heartbeats would end pika's wait only after minutes.
                "RABBITMQ_HEARTBEAT_SECONDS": "600",
            }
        ).start()
        publish(queue, [v.body() for v in first])
        wait_for(lambda: audit_count(dbname) == len(first), timeout=30, what="votes counted")
        more = make_votes(200, laws=3, seed=183)
        publish(queue, [v.body() for v in more])
        proxy.pause()  # a partition: the broker neither answers nor closes
        signalled = time.monotonic()
        svc.signal()
        assert svc.proc is not None
        # SHUTDOWN_TIMEOUT_SECONDS + the guard's 3 s, and room for a loaded machine.
        code = svc.proc.wait(timeout=2 + 3 + 10)
        print(f"\nSHUTDOWN with the broker blackholed: exited {time.monotonic() - signalled:.1f}s after SIGTERM")
        assert code != 0
        assert "exiting now: votes not acked are redelivered" in svc.logs()
    finally:
        proxy.close()  # the broker sees the connection go: what it held is ready again
    again = make_service().start()
    wait_for(lambda: audit_count(dbname) == len(first) + len(more), timeout=60, what="every vote counted")
    assert again.stop() == 0
    assert_all_counted_once(dbname, queue, first + more)


# -- a delivery limit during database outages ------------------------------------------------------


@pytest.mark.ha
@pytest.mark.skipif(pg_servers.unavailable() is not None, reason=str(pg_servers.unavailable()))
def test_database_outages_with_connection_blips_and_restarts_dead_letter_no_valid_vote(
    node: RabbitNode, tmp_path: Path, queue: str
) -> None:
    # The service's own quorum queue with a delivery limit of 3 (RabbitMQ 3.10 counts every
    # return, those of a closed connection included), PostgreSQL stopped while votes arrive, and
    # the broker closing the service's connection several times during each outage.
    server = PgServer(settings={"synchronous_commit": "on"})
    started: list[Service] = []
    db = "votes"
    roles: list[ServiceRole] = []

    def service() -> Service:
        env = on_node(
            node,
            POSTGRES_HOST="127.0.0.1",
            POSTGRES_PORT=str(server.port),
            POSTGRES_DB=db,
            **roles[0].env(),
            RABBITMQ_QUEUE_TYPE="quorum",
            RABBITMQ_DELIVERY_LIMIT="3",
            RETRY_DELAY_SECONDS="0.2",
            RETRY_MAX_DELAY_SECONDS="1",
            MAX_RETRY_ATTEMPTS="2",
        )
        svc = Service(queue=queue, dbname=db, log_path=tmp_path / f"service-{len(started)}.log", env=env)
        started.append(svc)
        return svc.start()

    def counted() -> int:
        try:
            return int(server.execute("SELECT count(*) FROM vote_audit", dbname=db)[0][0])
        except Exception:
            return -1

    def blips(svc: Service, times: int) -> None:
        for _ in range(times):
            before = connections(node)
            assert before, "the service is connected"
            close_connections(node)

            def reconnected(before: list[str] = before) -> bool:
                return bool(set(connections(node)) - set(before))

            wait_for(
                reconnected,
                timeout=30,
                interval=0.2,
                what="the service to connect again",
            )

    try:
        server.start()
        server.execute(f"CREATE DATABASE {db}")
        roles.append(create_service_role(db, server=server))  # the schema applied by an administrator
        svc = service()
        votes = make_votes(200, laws=3, seed=187)
        node.publish(queue, [v.body() for v in votes])
        wait_for(lambda: counted() == len(votes), timeout=30, what="votes counted")

        # Outage 1: four connection blips while PostgreSQL is down.
        server.stop(mode="immediate")
        more = make_votes(500, laws=3, seed=188)
        node.publish(queue, [v.body() for v in more])
        votes += more
        wait_for(lambda: "Retrying a batch" in svc.logs(), timeout=30, what="a failed write")
        blips(svc, 4)
        assert "not consuming: PostgreSQL is failing" in svc.logs()
        consumed = svc.logs().count("INFO MainThread consumer: consuming ")
        server.start()
        back = time.monotonic()
        wait_for(
            lambda: svc.logs().count("INFO MainThread consumer: consuming ") > consumed,
            timeout=30,
            interval=0.05,
            what="consuming again",
        )
        print(f"\nRESUMED consuming {time.monotonic() - back:.1f}s after PostgreSQL accepted connections again")
        wait_for(lambda: counted() == len(votes), timeout=60, what="votes counted after outage 1")

        # Outage 2: two blips, then a restart while PostgreSQL is still down, one more blip.
        server.stop(mode="immediate")
        more = make_votes(500, laws=3, seed=189)
        node.publish(queue, [v.body() for v in more])
        votes += more
        wait_for(lambda: svc.logs().count("Retrying a batch") > 2, timeout=30, what="a failed write")
        blips(svc, 2)
        svc.stop()
        svc = Service(queue=queue, dbname=db, log_path=tmp_path / "service-restarted.log", env=svc.env)
        started.append(svc)
        svc.start(wait_consuming=False)  # it waits for PostgreSQL before it consumes
        server.start()
        svc.wait_consuming()
        blips(svc, 1)
        wait_for(lambda: counted() == len(votes), timeout=60, what="votes counted after outage 2")
        # A blip can cut the acks of a committed batch: RabbitMQ redelivers it and the service settles
        # the copies as redeliveries. Stopping before they come back would return them to the queue.
        wait_for(lambda: node_queue(node, queue) == (0, 0), timeout=60, what="every delivery settled")
        assert svc.stop() == 0

        rows = server.execute("SELECT law_id, oui_count, non_count FROM vote_results", dbname=db)
        assert {law: (int(oui), int(non)) for law, oui, non in rows if oui or non} == expected_totals(votes)
        assert counted() == len(votes)
        assert server.execute("SELECT count(*) FROM duplicate_attempts", dbname=db) == [(0,)]
        assert node_queue(node, f"{queue}.dead") == (0, 0)
        assert node_queue(node, queue) == (0, 0)
    finally:
        stop_all(started)
        server.remove()


# -- reading the dead-letter queue ages nothing ----------------------------------------------------


def test_listing_dead_letters_again_and_again_neither_loses_nor_ages_a_message(
    queue_names: list[str], dbname: str
) -> None:
    queue = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(queue)
    dead = f"{queue}.dead"
    conn = amqp_connection()
    try:
        channel = conn.channel()
        # The dead-letter queue itself has a delivery limit (and nowhere to dead-letter to): a
        # message returned three times is dropped.
        channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 3})
        channel.exchange_declare(f"{queue}.dlx", "fanout", durable=True)
        channel.queue_bind(dead, f"{queue}.dlx")
        # A vote queue with a delivery limit of 1: a vote returned twice is dead-lettered by RabbitMQ.
        channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 1,
                "x-dead-letter-exchange": f"{queue}.dlx",
            },
        )
        valid = make_votes(1, laws=1, seed=190)[0]
        publish(queue, [valid.body()])
        for _ in range(2):
            method, _props, _body = channel.basic_get(queue, auto_ack=False)
            assert method is not None
            channel.basic_nack(int(method.delivery_tag or 0), requeue=True)
        refused = [
            (b"not json", {"x-rejected-reason": "invalid_json", "x-rejected-detail": "not JSON"}),
            (b'{"choice": "maybe"}', {"x-rejected-reason": "invalid_choice", "x-rejected-detail": "maybe"}),
        ]
        confirm = conn.channel()
        confirm.confirm_delivery()
        for body, headers in refused:
            confirm.basic_publish("", dead, body, pika.BasicProperties(delivery_mode=2, headers=headers))
        wait_for(lambda: queue_state(dead)[0] == 3, timeout=10, what="three dead letters")
    finally:
        conn.close()

    env = service_env(dbname=dbname, queue=queue)
    for attempt in range(5):
        listing = run_cli("dead-letters", "list", env=env)
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.splitlines()[0] == "3 messages", (attempt, listing.stdout, queue_state(dead))
        assert "      1  delivery_limit" in listing.stdout
        assert "not refused by the service: valid votes among them are NOT counted" in listing.stdout
        shown = run_cli("dead-letters", "show", "2", env=env)
        assert shown.returncode == 0, shown.stderr
        assert "x-rejected-reason: invalid_json" in shown.stdout
    # Every message is still there, in its order, its headers as they were (x-death included).
    kept = drain_with_headers(dead)
    assert [body for body, _h in kept] == [valid.body(), *(body for body, _h in refused)]
    assert kept[0][1]["x-death"][0]["reason"] in ("delivery_limit", b"delivery_limit")
    for (_body, headers), (_b, original) in zip(kept[1:], refused, strict=True):
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in headers.items()}
        assert headers.pop("x-delivery-count", 0) == 0  # never returned: not aged by the listings
        assert headers == original
    assert kept[0][1].get("x-delivery-count", 0) == 0


def test_an_existing_queue_says_what_happens_there_to_an_over_delivered_message(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    # Declared by someone else, with arguments other than the service's: a dead-letter exchange of
    # its own and a delivery limit of 5. AMQP cannot read them; the broker's 406 answers name them.
    queue = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(queue)
    conn = amqp_connection()
    try:
        conn.channel().queue_declare(
            queue,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": 5, "x-dead-letter-exchange": "elsewhere.dlx"},
        )
    finally:
        conn.close()
    votes = make_votes(20, laws=1, seed=191)
    publish(queue, [v.body() for v in votes])
    svc = make_service(queue_name=queue).start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
    assert svc.stop() == 0
    lines = [line for line in svc.logs().splitlines() if f"existing quorum queue {queue}" in line]
    assert len(lines) == 1
    assert lines[0].split(" consumer: ", 1)[1] == (
        f"existing quorum queue {queue}: refused messages are copied to '{queue}.dlx' by the service; one it "
        "cannot copy is dead-lettered by RabbitMQ to exchange 'elsewhere.dlx'; a message delivered more than 5 "
        "times is dead-lettered by RabbitMQ to exchange 'elsewhere.dlx' (policies not shown)"
    )
    assert " INFO " in lines[0]
    assert_all_counted_once(dbname, queue, votes)
