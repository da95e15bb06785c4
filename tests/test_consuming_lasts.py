"""Consuming lasts: a channel or consumer the broker ends, a consumer that stops receiving, a delivery
limit during database outages, and a shutdown with a broker that no longer answers.

The tests that restart, close or reconfigure a broker use a throwaway node
(tests/rabbitmq_metrics_node.py) and, for database outages, a throwaway PostgreSQL
(tests/pg_servers.py); the others use the shared servers with a queue of their own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.proxy import TcpProxy
from tests.support import (
    NotifyListener,
    Service,
    amqp_connection,
    assert_all_counted_once,
    audit_count,
    make_votes,
    publish,
    wait_for,
)

MakeService = Callable[..., Service]


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
        wait_for(lambda: svc.metric("vote_queue_ready_messages", 0) > 0, timeout=15, what="the ready count read")
        wait_for(lambda: svc.http("/healthz")[0] == 503, timeout=20, what="/healthz failing")
        _status, reason = svc.http("/healthz")
        assert "ready in the queue and none has been received" in reason
        stalled_at = time.monotonic()
        wait_for(lambda: "systemd watchdog no longer fed" in svc.logs(), timeout=10, what="the watchdog line")
        conn.process_data_events(time_limit=1.5)
        assert listener.count("WATCHDOG=1", since=stalled_at + 0.6) == 0
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
        svc.signal()
        assert svc.proc is not None
        # SHUTDOWN_TIMEOUT_SECONDS + the guard's 3 s, and room for a loaded machine.
        code = svc.proc.wait(timeout=2 + 3 + 10)
        assert code != 0
        assert "exiting now: votes not acked are redelivered" in svc.logs()
    finally:
        proxy.close()  # the broker sees the connection go: what it held is ready again
    again = make_service().start()
    wait_for(lambda: audit_count(dbname) == len(first) + len(more), timeout=60, what="every vote counted")
    assert again.stop() == 0
    assert_all_counted_once(dbname, queue, first + more)
