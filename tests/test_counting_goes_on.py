"""End to end: the service never stops counting silently.

Whatever is raised while a batch is written, the batch is settled; a consumer
cancelled by the broker consumes again; extra fields do not stop votes; and a
service that holds votes without counting them says so (/healthz, the systemd
watchdog, a metric) instead of reporting itself healthy.
"""

from __future__ import annotations

import json
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pika.exceptions
import pytest

from tests.proxy import TcpProxy
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    RABBITMQ_PORT,
    ROOT,
    NotifyListener,
    Service,
    VoteMsg,
    amqp_connection,
    assert_all_counted_once,
    assert_invariant,
    audit_count,
    drain_queue,
    expected_totals,
    make_votes,
    publish,
    queue_state,
    results,
    wait_for,
)

pytestmark = pytest.mark.slow  # stalls, hangs and errors waited out

MakeService = Callable[..., Service]

# Loaded by the service's interpreter at start-up (PYTHONPATH): it wraps the
# statement run inside each batch's transaction so that votes of chosen citizens
# raise what a bug or a driver surprise would raise (the way a BC timestamp's
# read-back once did), inside the real service and its real flush worker.
_INJECT = """
import os, sys, time
sys.path.insert(0, {root!r})
import db

_write_batch = db._write_batch


def write_batch(cur, votes, **options):
    for vote in votes:
        if vote.citizen_id.startswith("raise-value"):
            raise ValueError("year -1 is out of range")
        if vote.citizen_id.startswith("raise-key"):
            raise KeyError(vote.citizen_id)
        if vote.citizen_id.startswith("hang-"):
            while True:  # a writer stuck outside PostgreSQL
                time.sleep(1)
    return _write_batch(cur, votes, **options)


db._write_batch = write_batch
"""


def injecting(tmp_path: Path) -> dict[str, str]:
    """Environment for a service whose database writes raise for marked votes."""
    folder = tmp_path / "inject"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(_INJECT.format(root=str(ROOT))))
    return {"PYTHONPATH": str(folder)}


def consumers(queue: str) -> int:
    """Consumers of a queue, 0 while it does not exist."""
    try:
        return queue_state(queue)[1]
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def declare_with_dead_letters(queue: str) -> str:
    """Re-declare `queue` with a dead-letter queue, as an operator would; returns the dead-letter queue."""
    dead, dlx = f"{queue}.dead", f"{queue}.dlx"
    conn = amqp_connection()
    try:
        ch = conn.channel()
        ch.queue_delete(queue)
        ch.exchange_declare(dlx, "fanout", durable=True)
        ch.queue_declare(dead, durable=True)
        ch.queue_bind(dead, dlx)
        ch.queue_declare(queue, durable=True, arguments={"x-dead-letter-exchange": dlx})
    finally:
        conn.close()
    return dead


def test_unexpected_errors_reject_only_the_offending_votes_and_counting_goes_on(
    make_service: MakeService, queue: str, dbname: str, tmp_path: Path
) -> None:
    dead = declare_with_dead_letters(queue)
    good = make_votes(1_500, laws=5)
    bad = [
        VoteMsg(f"{i:064x}", f"raise-{kind}-{i}", "law-000", "oui")
        for i, kind in enumerate(["value", "key", "value", "key", "value"], start=1)
    ]
    bodies = [v.body() for v in good]
    for i, vote in enumerate(bad):
        bodies.insert(i * 300 + 7, vote.body())
    publish(queue, bodies)

    svc = make_service({**injecting(tmp_path), "BATCH_SIZE": "200"})
    svc.expects_unexpected_errors = True
    svc.start()
    wait_for(lambda: audit_count(dbname) == len(good), timeout=60, what="good votes counted")
    wait_for(lambda: queue_state(dead)[0] == len(bad), timeout=30, what="offending votes dead-lettered")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="queue drained")
    assert svc.metric("aggregation_errors_total", error_type="unexpected") == len(bad)
    assert svc.http("/healthz")[0] == 200
    assert svc.stop() == 0

    assert results(dbname) == expected_totals(good)
    assert sorted(drain_queue(dead)) == sorted(v.body() for v in bad)
    logs = svc.logs()
    # One traceback per offending vote, naming it; none for the votes around it.
    assert logs.count("Traceback") == len(bad)
    for vote in bad:
        assert f"writing vote {vote.vote_hash}" in logs
    assert queue_state(queue) == (0, 0)
    assert_invariant(dbname)


def test_a_systematic_failure_stops_the_service_instead_of_dead_lettering_the_queue(
    make_service: MakeService, queue: str, dbname: str, tmp_path: Path
) -> None:
    dead = declare_with_dead_letters(queue)
    # Every write raises, as after a bug in a new release: every vote is marked to raise.
    votes = make_votes(400, laws=4, prefix="raise-value")
    publish(queue, [v.body() for v in votes])
    limit = 5
    # Batches of 4: the first is isolated into 4 refused votes and settled (dead-lettered), the
    # second refuses one more (the 5th) and then trips on the 6th, and is left unsettled.
    broken = make_service({**injecting(tmp_path), "BATCH_SIZE": "4", "MAX_UNEXPECTED_REJECTIONS": str(limit)})
    broken.expects_unexpected_errors = True
    broken.start(wait_consuming=False)
    assert broken.proc is not None
    assert broken.proc.wait(60) == 1
    logs = broken.logs()
    assert "CRITICAL" in logs
    assert "a systematic failure: 6 votes refused as unexpected within 60s" in logs
    assert "stopping (exit code 1)" in logs
    assert audit_count(dbname) == 0
    dead_lettered = drain_queue(dead)
    assert 0 < len(dead_lettered) <= limit
    # Everything else is still in RabbitMQ, none of it acked or dead-lettered.
    assert queue_state(queue) == (len(votes) - len(dead_lettered), 0)

    # The fault fixed (no injection): every vote left in the queue is counted once.
    fixed = make_service()
    fixed.start()
    left = [v for v in votes if v.body() not in set(dead_lettered)]
    wait_for(lambda: audit_count(dbname) == len(left), timeout=60, what="the votes left counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="queue drained")
    assert fixed.stop() == 0
    assert_all_counted_once(dbname, queue, left)


@pytest.mark.parametrize("declared_again_by", ["the service", "an operator"])
def test_a_consumer_cancelled_by_the_broker_consumes_again(
    make_service: MakeService, queue: str, dbname: str, declared_again_by: str
) -> None:
    svc = make_service().start()
    first = make_votes(300, laws=3, seed=1)
    publish(queue, [v.body() for v in first])
    wait_for(lambda: audit_count(dbname) == len(first), timeout=30, what="first votes counted")

    # Deleting the queue makes RabbitMQ cancel the consumer; the channel stays open.
    conn = amqp_connection()
    try:
        channel = conn.channel()
        channel.queue_delete(queue)
        if declared_again_by == "an operator":
            channel.queue_declare(queue, durable=True)  # at once: the service finds it and uses it as it is
    finally:
        conn.close()
    wait_for(lambda: "cancelled the consumer" in svc.logs(), timeout=10, what="the cancel noticed")
    # Otherwise the service declares the queue again itself, as at start-up; either way it consumes it.
    wait_for(lambda: consumers(queue) == 1, timeout=15, what="a consumer on the re-declared queue")
    after_cancel = svc.logs().split("cancelled the consumer")[1]
    assert ("declared durable queue" in after_cancel) == (declared_again_by == "the service")
    second = make_votes(300, laws=3, seed=2)
    publish(queue, [v.body() for v in second])
    wait_for(lambda: audit_count(dbname) == len(first) + len(second), timeout=30, what="second votes counted")
    assert svc.metric("aggregation_errors_total", error_type="consumer_cancelled") == 1
    assert svc.http("/readyz")[0] == 200
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, first + second)


def test_extra_fields_are_counted_and_named_once(make_service: MakeService, queue: str, dbname: str) -> None:
    votes = make_votes(400, laws=4)
    bodies = []
    for i, vote in enumerate(votes):
        doc = json.loads(vote.body())
        if i % 2:
            doc["channel"] = "mobile"
        if i % 5 == 0:
            doc["schema_version"] = 2
        bodies.append(json.dumps(doc).encode())
    publish(queue, bodies)
    svc = make_service().start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
    assert svc.metric("vote_unknown_fields_total", field="channel") == 200
    assert svc.metric("vote_unknown_fields_total", field="schema_version") == 80
    assert svc.stop() == 0
    logs = svc.logs()
    assert logs.count("ignores: 'channel'") == 1
    assert logs.count("ignores: 'schema_version'") == 1
    assert_all_counted_once(dbname, queue, votes)


def test_a_stuck_writer_fails_liveness_and_stops_feeding_the_watchdog(
    make_service: MakeService, queue: str, dbname: str, tmp_path: Path
) -> None:
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        svc = make_service(
            {
                **injecting(tmp_path),
                "NOTIFY_SOCKET": listener.address,
                "WATCHDOG_USEC": "1000000",  # ping every 0.5 s while alive
                "STALL_TIMEOUT_SECONDS": "3",
                "BATCH_TIMEOUT_SECONDS": "0.2",
            }
        ).start()
        votes = make_votes(50, laws=2)
        publish(queue, [v.body() for v in votes])
        wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
        assert svc.http("/healthz") == (200, "ok\n")
        pinged = listener.count("WATCHDOG=1")
        wait_for(lambda: listener.count("WATCHDOG=1") > pinged, timeout=30, what="a watchdog ping while counting")

        publish(queue, [VoteMsg("f" * 64, "hang-1", "law-000", "non").body()])
        wait_for(lambda: svc.metric("oldest_unacked_delivery_age_seconds") > 1, timeout=10, what="a vote held")
        wait_for(lambda: svc.http("/healthz")[0] == 503, timeout=10, what="/healthz failing")
        _status, reason = svc.http("/healthz")
        assert "waited" in reason
        assert "STALL_TIMEOUT_SECONDS" in reason
        assert svc.http("/readyz")[0] == 503
        assert svc.metric("oldest_unacked_delivery_age_seconds") > 3
        # No more pings: systemd's WatchdogSec= would now restart the service. Three turns with a
        # ping due said "not counting" instead, and none pinged.
        wait_for(lambda: listener.unfed()[1] >= 3, timeout=30, what="three turns not feeding the watchdog")
        assert listener.unfed()[0] == 0
        assert "systemd watchdog no longer fed" in svc.logs()
    finally:
        listener.close()
    # The stuck vote was never acked: it is still in RabbitMQ for the next instance.
    svc.kill()
    wait_for(lambda: queue_state(queue) == (1, 0), timeout=10, what="the held vote back in the queue")
    assert results(dbname) == expected_totals(votes)


def test_a_broker_dropping_the_handshake_is_retried_not_a_configuration_error(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    # A node that stops while the service logs in closes the socket after
    # Connection.Start; pika calls that a "probable authentication error".
    start_frame = _connection_start_frame()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            client.recv(8)
            client.sendall(start_frame)
            time.sleep(0.1)
            client.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        svc = make_service({"RABBITMQ_PORT": str(port), "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": "1"})
        svc.start(wait_consuming=False)
        wait_for(lambda: len(accepted) >= 3, timeout=20, what="three connection attempts")
        assert svc.proc is not None
        assert svc.proc.poll() is None, svc.logs()
        assert "failed during the handshake" in svc.logs()
        assert svc.stop() == 0
    finally:
        listener.close()


def _connection_start_frame() -> bytes:
    """The real broker's first frame (Connection.Start), to replay from a fake node."""
    with socket.create_connection(("127.0.0.1", RABBITMQ_PORT), timeout=5) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        header = _recv_exactly(sock, 7)
        size = int.from_bytes(header[3:7], "big")
        return header + _recv_exactly(sock, size + 1)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError("the broker closed the connection")
        data += chunk
    return data


def test_the_oldest_unacked_age_is_zero_when_idle(make_service: MakeService, queue: str, dbname: str) -> None:
    svc = make_service({"BATCH_TIMEOUT_SECONDS": "0.2"}).start()
    assert svc.metric("oldest_unacked_delivery_age_seconds") == 0
    votes = make_votes(20, laws=1)
    publish(queue, [v.body() for v in votes])
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=20, what="votes counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=10, what="acked")
    wait_for(lambda: svc.metric("oldest_unacked_delivery_age_seconds") == 0, timeout=5, what="nothing held")
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes)


def test_shutdown_is_bounded_when_postgres_hangs_mid_query(make_service: MakeService, queue: str, dbname: str) -> None:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    try:
        svc = make_service({"POSTGRES_PORT": str(proxy.port), "SHUTDOWN_TIMEOUT_SECONDS": "2"}).start()
        votes = make_votes(600, laws=3)
        publish(queue, [v.body() for v in votes[:300]])
        wait_for(lambda: audit_count(dbname) == 300, timeout=30, what="the first votes counted")
        proxy.pause()  # PostgreSQL stops answering with a batch on the way
        publish(queue, [v.body() for v in votes[300:]])
        wait_for(proxy.holding, timeout=10, interval=0.01, what="a batch's query sent and held back")
        svc.signal()
        assert svc.proc is not None
        # It exits although the query never returns (the proxy stays paused): the shutdown budget
        # ends it. How long that takes, bench/shutdown.py measures; this wait only guards a hang.
        code = svc.proc.wait(60)
    finally:
        proxy.close()
    assert code == 1  # not everything was written: said by the exit code
    assert "shutdown budget" in svc.logs()
    # Nothing was lost: the next instance counts what the first could not.
    again = make_service().start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="every vote counted")
    assert again.stop() == 0
    assert_all_counted_once(dbname, queue, votes)
