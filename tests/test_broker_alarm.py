"""A broker memory alarm while votes and refused messages arrive, on a throwaway RabbitMQ node.

RabbitMQ blocks every connection that publishes while an alarm lasts. The service publishes only
the dead-letter copies, on a connection of its own (deadletter_publisher.py): that one is blocked,
the consuming one goes on. The batch whose copies wait holds back the acks behind it, by design,
so liveness must not call that a stall (a restart would be blocked the same way), while /readyz,
a metric and a log line say what is going on. The node is tests/rabbitmq_cluster.py's; the
shared broker is never alarmed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.rabbitmq_cluster import RabbitNode, standalone_node
from tests.support import NotifyListener, Service, assert_invariant, audit_count, expected_totals, make_votes, results
from tests.support import wait_for as wait_until

pytestmark = pytest.mark.ha  # a throwaway node of the module's own

MakeService = Callable[..., Service]


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with standalone_node() as started:
        yield started


def _watermark(node: RabbitNode, value: str) -> None:
    node.ctl("set_vm_memory_high_watermark", value)


def test_a_memory_alarm_pauses_dead_lettering_without_a_restart_loop_and_counting_resumes(
    node: RabbitNode, make_service: MakeService, dbname: str, tmp_path: Path
) -> None:
    queue = f"agg.alarm.{uuid.uuid4().hex[:12]}"
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    env = {
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": str(node.port),
        "NOTIFY_SOCKET": listener.address,
        "WATCHDOG_USEC": "1000000",  # a ping every 0.5 s while alive
        "STALL_TIMEOUT_SECONDS": "3",
        # More messages than the prefetch: consumption itself waits for the alarm to clear.
        "RABBITMQ_PREFETCH_COUNT": "200",
        "BATCH_SIZE": "50",
    }
    try:
        make_service(env, queue_name=queue).start().stop()  # declares the queue and its dead-letter queue
        good = make_votes(800, laws=4, seed=31)
        invalid = [
            json.dumps({**json.loads(v.body()), "choice": "maybe"}).encode() for v in make_votes(400, laws=4, seed=32)
        ]
        bodies: list[bytes] = []
        for i, vote in enumerate(good):
            bodies.append(vote.body())
            if i % 2:
                bodies.append(invalid[i // 2])
        node.publish(queue, bodies)

        _watermark(node, "0.0001")
        try:
            svc = make_service(env, queue_name=queue).start()
            wait_until(
                lambda: svc.metric("dead_letter_publishing_blocked") == 1, timeout=30, what="the publisher blocked"
            )
            wait_until(lambda: svc.http("/readyz")[0] == 503, timeout=10, what="/readyz saying so")
            assert "blocks publishing" in svc.http("/readyz")[1]
            # Well past STALL_TIMEOUT_SECONDS with the oldest vote unacked: still alive, still pinging.
            wait_until(lambda: svc.metric("oldest_unacked_delivery_age_seconds") > 6, timeout=30, what="acks held back")
            assert svc.http("/healthz") == (200, "ok\n")
            pinged = listener.count("WATCHDOG=1")
            wait_until(lambda: listener.count("WATCHDOG=1") > pinged, timeout=30, what="a watchdog ping")
            assert "RabbitMQ blocks the dead-letter connection" in svc.logs()
            assert node.queue_state(queue)[0] > 0  # votes still waiting in the queue
        finally:
            _watermark(node, "0.4")

        wait_until(lambda: audit_count(dbname) == len(good), timeout=60, what="every vote counted")
        wait_until(lambda: node.queue_state(queue)[0] == 0, timeout=60, what="the queue drained")
        wait_until(lambda: node.queue_state(f"{queue}.dead")[0] == len(invalid), timeout=60, what="every copy")
        wait_until(lambda: svc.metric("dead_letter_publishing_blocked") == 0, timeout=10, what="unblocked")
        wait_until(lambda: svc.http("/readyz")[0] == 200, timeout=10, what="ready again")
        assert svc.stop() == 0
    finally:
        listener.close()
    logs = svc.logs()
    assert "systemd watchdog no longer fed" not in logs
    assert "RabbitMQ no longer blocks the dead-letter connection" in logs
    # Every vote counted once, every refused message copied once: nothing was cut off or resent.
    assert results(dbname) == expected_totals(good)
    assert audit_count(dbname) == len(good)
    assert_invariant(dbname)
    assert sorted(node.drain(f"{queue}.dead")) == sorted(invalid)
    assert node.queue_state(queue) == (0, 0)
    node.delete(queues=[queue, f"{queue}.dead"], exchanges=[f"{queue}.dlx"])


# Closes, on the node, every connection named "vote-aggregator-dead-letters"; prints how many.
_CLOSE_DEAD_LETTER_CONNECTIONS = """
Named = [P || P <- rabbit_networking:connections(),
    lists:keyfind(<<"connection_name">>, 1,
        proplists:get_value(client_properties, rabbit_networking:connection_info(P, [client_properties]), []))
    =:= {<<"connection_name">>, longstr, <<"vote-aggregator-dead-letters">>}],
[rabbit_networking:close_connection(P, "closed by the test") || P <- Named],
length(Named).
"""


def _close_dead_letter_connections(node: RabbitNode) -> int:
    """Close the service's dead-letter connections from the broker's side, as a node restart or a
    network fault would; returns how many were closed."""
    return int(node.ctl("eval", _CLOSE_DEAD_LETTER_CONNECTIONS).strip() or 0)


def test_copies_in_flight_when_the_dead_letter_connection_drops_are_sent_again(
    node: RabbitNode, make_service: MakeService, dbname: str
) -> None:
    # The copies are certainly in flight and unconfirmed while an alarm blocks the connection: the
    # broker reads nothing from it. Closed from the broker's side then, those copies are gone and
    # only sending them again puts them in the dead-letter queue.
    queue = f"agg.dlconn.{uuid.uuid4().hex[:12]}"
    env = {"RABBITMQ_HOST": "127.0.0.1", "RABBITMQ_PORT": str(node.port), "BATCH_SIZE": "50"}
    make_service(env, queue_name=queue).start().stop()  # declares the queue and its dead-letter queue
    good = make_votes(600, laws=4, seed=41)
    invalid = [
        json.dumps({**json.loads(v.body()), "choice": "maybe"}).encode() for v in make_votes(600, laws=4, seed=42)
    ]
    bodies: list[bytes] = []
    for vote, refused in zip(good, invalid, strict=True):
        bodies += [refused, vote.body()]
    node.publish(queue, bodies)

    _watermark(node, "0.0001")
    try:
        svc = make_service(env, queue_name=queue).start()
        for _cut in range(2):
            wait_until(
                lambda: svc.metric("dead_letter_publishing_blocked") == 1, timeout=30, what="copies held by the alarm"
            )
            assert _close_dead_letter_connections(node) == 1
            wait_until(
                lambda: svc.metric("dead_letter_publishing_blocked") == 0, timeout=30, what="the connection gone"
            )
    finally:
        _watermark(node, "0.4")

    wait_until(lambda: audit_count(dbname) == len(good), timeout=60, what="every vote counted")
    wait_until(lambda: node.queue_state(queue)[0] == 0, timeout=60, what="the queue drained")
    wait_until(lambda: node.queue_state(f"{queue}.dead")[0] >= len(invalid), timeout=60, what="every copy")
    assert svc.stop() == 0
    logs = svc.logs()
    assert logs.count("dead-letter publisher: RabbitMQ connection to") == 2
    assert logs.count("unconfirmed copies again on the next connection") == 2
    # Each refused message at least once: the copies cut off never reached the broker and were sent
    # again (one the broker took just before the cut may be there twice).
    dead = node.drain(f"{queue}.dead")
    assert set(dead) == set(invalid)
    assert len(dead) < len(invalid) + 100
    assert results(dbname) == expected_totals(good)
    assert audit_count(dbname) == len(good)
    assert_invariant(dbname)
    assert node.queue_state(queue) == (0, 0)
    node.delete(queues=[queue, f"{queue}.dead"], exchanges=[f"{queue}.dlx"])


def test_a_stop_during_an_alarm_is_bounded_and_keeps_the_final_heads(
    node: RabbitNode, make_service: MakeService, dbname: str
) -> None:
    # The alarm blocks every connection that publishes: the final chain heads' too. The stop must
    # not wait for the alarm to clear (pika gives a blocked connection 300 s): the guard ends it
    # within SHUTDOWN_TIMEOUT_SECONDS and its margin, with the final heads already in the file.
    queue = f"agg.alarmstop.{uuid.uuid4().hex[:12]}"
    env = {"RABBITMQ_HOST": "127.0.0.1", "RABBITMQ_PORT": str(node.port), "SHUTDOWN_TIMEOUT_SECONDS": "2"}
    svc = make_service(env, queue_name=queue).start()
    good = make_votes(300, laws=3, seed=51)
    node.publish(queue, [v.body() for v in good])
    wait_until(lambda: audit_count(dbname) == len(good), timeout=30, what="votes counted")
    wait_until(lambda: svc.heads_path.exists(), timeout=30, what="the first chain heads recorded")
    _watermark(node, "0.0001")
    try:
        signalled = time.monotonic()
        svc.signal()
        assert svc.proc is not None
        svc.proc.wait(timeout=2 + 3 + 10)  # SHUTDOWN_TIMEOUT_SECONDS + the guard's 3 s + a loaded machine
        print(f"\nSTOP during a memory alarm: exited {time.monotonic() - signalled:.1f}s after SIGTERM")
    finally:
        _watermark(node, "0.4")
    records = [json.loads(line) for line in svc.heads_path.read_text().splitlines()]
    finals = {r["chain_id"] for r in records if r["final"]}
    assert finals, records
    assert finals == {r["chain_id"] for r in records}
    assert results(dbname) == expected_totals(good)
    assert node.queue_state(queue) == (0, 0)
    node.delete(queues=[queue, f"{queue}.dead"], exchanges=[f"{queue}.dlx"])
