"""An election day in a few minutes, on servers of the test's own: every promise kept at once.

A RabbitMQ node with a short `consumer_timeout` (5 s), the service's quorum queue with a delivery
limit of 3, and a PostgreSQL server; three instances count while a publisher sends valid votes
mixed with floods of invalid messages. Meanwhile: a database outage longer than the broker's
consumer-timeout check (the broker closes channels whose acks are overdue), the broker closing
every connection of the service several times, an instance restarted during the outage, a memory
alarm longer than STALL_TIMEOUT_SECONDS, an instance killed with -9 and one stopped with SIGTERM,
and a crash of the database.

At the end every valid vote is counted exactly once, the dead-letter queue holds exactly the
invalid messages (each with its reason; none dead-lettered by the broker for its delivery count),
and no running instance ever said it was not alive. The timeline is printed (`-s`).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import pg_servers, rabbitmq_cluster
from tests.pg_servers import PgServer
from tests.rabbitmq_cluster import RabbitNode, RabbitNodes
from tests.roles import INIT_DB, SERVICE_ROLE
from tests.support import Service, VoteMsg, drain_with_headers, expected_totals, make_votes, stop_all, wait_for
from tools.publisher import ConfirmedPublisher

pytestmark = [
    pytest.mark.skipif(rabbitmq_cluster.unavailable() is not None, reason=str(rabbitmq_cluster.unavailable())),
    pytest.mark.skipif(pg_servers.unavailable() is not None, reason=str(pg_servers.unavailable())),
]

DB = "soak"
ROLE = "agg_soak_service"
DELIVERY_LIMIT = 3
STALL_TIMEOUT_S = 30.0
    pytest.mark.ha,
    pytest.mark.slow,
RATE = 400.0  # messages a second, valid and invalid together
SECONDS = 150.0  # of publishing
INVALID_SHARE = 0.15  # of the messages, in floods


@pytest.fixture(scope="module")
def broker() -> Iterator[RabbitNode]:
    nodes = RabbitNodes(1, clustered=1, config="consumer_timeout = 5000\n")
    try:
        yield nodes.start().nodes[0]
    finally:
        nodes.remove()


@pytest.fixture
def database() -> Iterator[PgServer]:
    server = PgServer(settings={"synchronous_commit": "on"})  # a crash must not lose acknowledged commits
    try:
        server.start()
        server.execute(f"CREATE DATABASE {DB}")
        server.execute(f"CREATE ROLE {ROLE} LOGIN")
        conn = server.connect(DB)
        try:
            with conn.cursor() as cur:
                cur.execute(INIT_DB.read_text())
                cur.execute("SET vote_aggregator.service_role = %s", (ROLE,))
                cur.execute(SERVICE_ROLE.read_text())
        finally:
            conn.close()
        yield server
    finally:
        server.remove()


def messages(seed: int) -> tuple[list[bytes], list[VoteMsg], list[bytes]]:
    """The publishing order (valid votes with floods of invalid messages), the votes, the invalid bodies."""
    rng = random.Random(seed)
    total = int(RATE * SECONDS)
    invalid_count = int(total * INVALID_SHARE)
    votes = make_votes(total - invalid_count, laws=12, seed=seed)
    invalid: list[bytes] = []
    for i in range(invalid_count):
        if i % 3 == 0:
            invalid.append(f"not json {seed}-{i}".encode())
        else:
            fields = {"vote_hash": uuid.uuid4().hex * 2, "citizen_id": f"bad-{seed}-{i}", "law_id": "law-001"}
            invalid.append(json.dumps({**fields, "choice": "peut-etre", "timestamp": "2025-11-14T12:00:00Z"}).encode())
    order: list[bytes] = []
    valid_left, invalid_left = [v.body() for v in votes], list(invalid)
    while valid_left or invalid_left:
        # Floods: a few hundred invalid messages in a row, then valid votes.
        take = rng.randint(200, 600)
        order += valid_left[:take]
        del valid_left[:take]
        flood = rng.randint(50, 250)
        order += invalid_left[:flood]
        del invalid_left[:flood]
    return order, votes, invalid


class Timeline:
    """What happened when, printed at the end."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.events: list[str] = []

    def __call__(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.start:6.1f}s  {what}")
        print(self.events[-1], flush=True)

    def until(self, second: float) -> None:
        time.sleep(max(0.0, self.start + second - time.monotonic()))


class Watch:
    """Polls /healthz of the running instances once a second; remembers every failure."""

    def __init__(self, running: Callable[[], list[Service]]) -> None:
        self._running = running
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="healthz-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for svc in self._running():
                try:
                    status, body = svc.http("/healthz")
                except OSError:
                    continue  # starting or stopping: not listening yet or any more
                if status != 200:
                    self.failures.append(f"{svc.log_path.name}: {status} {body.strip()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def service_connections(node: RabbitNode) -> list[str]:
    """The pids of the connections the service's instances hold on the node (as close_connection takes them)."""
    rows = node.ctl("list_connections", "pid", "client_properties").splitlines()[1:]
    return [row.split("\t", 1)[0] for row in rows if '"vote-aggregator' in row]


@pytest.mark.timeout(900)  # several minutes of election day, by design
def test_an_election_day_of_faults_counts_every_vote_once(
    broker: RabbitNode, database: PgServer, tmp_path: Path
) -> None:
    queue = f"soak.{uuid.uuid4().hex[:8]}"
    env = {
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": str(broker.port),
        "RABBITMQ_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(database.port),
        "POSTGRES_USER": ROLE,
        "POSTGRES_PASSWORD": "",
        "STALL_TIMEOUT_SECONDS": str(STALL_TIMEOUT_S),
        "RESULTS_EMBARGO": "true",  # the production default
    }
    services: list[Service] = []
    running: list[Service] = []

    def start(name: str) -> Service:
        svc = Service(queue=queue, dbname=DB, log_path=tmp_path / f"{name}-{len(services)}.log", env=env)
        services.append(svc)
        svc.start(wait_consuming=False)
        running.append(svc)
        return svc

    order, votes, invalid = messages(seed=91)
    timeline = Timeline()
    watch = Watch(lambda: list(running))
    try:
        first = start("a")
        first.wait_consuming()  # it declares the queue with the delivery limit and the dead-letter queue
        start("b").wait_consuming()
        start("c").wait_consuming()
        bodies = iter(order)
        publisher = ConfirmedPublisher(broker.params(), queue, bodies.__next__, len(order), rate=RATE)
        published = threading.Thread(target=publisher.run, name="publisher", daemon=True)
        published.start()
        timeline(f"3 instances consuming; publishing {len(order)} messages at {RATE:.0f}/s")

        timeline.until(15)
        database.stop(mode="fast")
        timeline("PostgreSQL stopped: an outage longer than the broker's consumer-timeout check (once a minute)")
        # Nothing else happens for 70 s: the instances hold the votes they had, unacked, and the
        # broker closes their channels for the overdue acks.
        timeline.until(88)
        for pid in service_connections(broker):
            broker.ctl("close_connection", pid, "soak: a flapping network")
        timeline("the broker closed every connection of the service")
        timeline.until(94)
        restarted = running.pop(0)
        code = restarted.stop()
        # Exit 1 says that votes in hand could not be written within SHUTDOWN_TIMEOUT_SECONDS.
        assert code == 0 or (code == 1 and "shutdown budget" in restarted.logs()), restarted.logs()[-3000:]
        start("a")
        timeline(f"instance a restarted during the outage (SIGTERM, exit {code})")
        for pid in service_connections(broker):
            broker.ctl("close_connection", pid, "soak: a flapping network")
        timeline("the broker closed every connection of the service again")
        timeline.until(125)
        database.start()
        timeline("PostgreSQL back")

        timeline.until(135)
        broker.ctl("set_vm_memory_high_watermark", "0.0001")
        timeline("memory alarm raised")
        timeline.until(135 + STALL_TIMEOUT_S + 10)
        broker.ctl("set_vm_memory_high_watermark", "0.4")
        timeline("memory alarm cleared")

        killed = running.pop(0)
        killed.kill()
        start("b")
        timeline("an instance killed with -9 and started again")
        timeline.until(190)
        database.stop(mode="immediate")
        timeline("PostgreSQL crashed")
        timeline.until(197)
        database.start()
        timeline("PostgreSQL back")
        stopped = running.pop(0)
        assert stopped.stop() == 0
        start("c")
        timeline("an instance stopped with SIGTERM (exit 0) and started again")

        published.join(SECONDS + 240)
        assert publisher.done, publisher.counts
        assert (publisher.counts.nacked, publisher.counts.returned) == (0, 0)
        timeline("every message confirmed by the broker")

        def counted() -> int:
            return int(database.execute("SELECT count(*) FROM vote_audit", dbname=DB)[0][0])

        wait_for(lambda: counted() == len(votes), timeout=300, interval=1.0, what="every vote counted")
        wait_for(lambda: broker.queue_state(queue)[0] == 0, timeout=120, interval=1.0, what="the queue drained")
        timeline("every vote counted and the queue drained")
        watch.stop()
        for svc in list(running):
            running.remove(svc)
            assert svc.stop() == 0, svc.logs()[-3000:]
        timeline("every instance stopped with exit 0")
    finally:
        watch.stop()
        for svc in running:
            svc.kill()
        print("\n".join(["", "TIMELINE", *timeline.events]))

    rows = database.execute("SELECT law_id, oui_count, non_count FROM vote_results", dbname=DB)
    assert {law: (int(oui), int(non)) for law, oui, non in rows if oui or non} == expected_totals(votes)
    assert database.execute("SELECT count(*) FROM vote_audit", dbname=DB) == [(len(votes),)]
    assert database.execute("SELECT count(*) FROM duplicate_attempts", dbname=DB) == [(0,)]
    assert broker.queue_state(queue) == (0, 0)

    letters = drain_with_headers(f"{queue}.dead", broker.params())
    copies = [body for body, _headers in letters]
    assert set(copies) == set(invalid), "the dead-letter queue holds exactly the invalid messages"
    assert all(headers.get("x-rejected-reason") for _body, headers in letters)
    # A dead-letter copy is made again only when an instance died between the copy's confirm and
    # the original's ack (the kill -9): never more than what one instance held.
    assert len(copies) - len(set(copies)) <= 1000
    print(f"dead letters: {len(copies)} for {len(invalid)} invalid messages")

    # The broker closed channels for overdue acks during the outage, and the instances consumed again.
    closed = [svc.log_path.name for svc in services if "RabbitMQ closed the channel consuming" in svc.logs()]
    assert closed, "no channel was closed for an overdue ack: the soak did not reach consumer_timeout"
    print(f"channels closed by the broker for an overdue ack: {closed}")
    assert watch.failures == [], watch.failures[:10]
    stop_all(services)
