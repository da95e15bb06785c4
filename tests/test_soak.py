"""An election day in a few minutes, on servers of the test's own: every promise kept at once.

A RabbitMQ node with a short `consumer_timeout` (5 s), the service's quorum queue with a delivery
limit of 3, and a PostgreSQL server; three instances count while a publisher sends valid votes
mixed with floods of invalid messages. Meanwhile: a database outage longer than the broker's
consumer-timeout check (the broker closes channels whose acks are overdue), the broker closing
every connection of the service several times, an instance restarted during the outage, a memory
alarm longer than STALL_TIMEOUT_SECONDS, an instance killed with -9 and one stopped with SIGTERM,
and a crash of the database.

The day's length is a parameter: `TEST_SOAK_SECONDS` of publishing (90 by default, what `make test`
runs; `make soak` runs the 150 s election day of docs/operations.md). Every fault happens in either,
in the same order; the timeline is the 150 s one scaled down, with floors where a fault needs a
minimum length (the outage outlasts the broker's consumer-timeout check, which a shorter day has
the node make more often; the alarm outlasts STALL_TIMEOUT_SECONDS).

At the end every valid vote is counted exactly once, the dead-letter queue holds exactly the
invalid messages (each with its reason; none dead-lettered by the broker for its delivery count),
and no running instance ever said it was not alive. The timeline is printed (`-s`).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import pg_servers, rabbitmq_cluster
from tests.pg_servers import PgServer
from tests.rabbitmq_cluster import RabbitNode, standalone_node
from tests.roles import create_service_role
from tests.support import Service, VoteMsg, assert_all_counted_once, drain_with_headers, make_votes, stop_all, wait_for
from tools.publisher import ConfirmedPublisher

pytestmark = [
    pytest.mark.ha,
    pytest.mark.slow,
    pytest.mark.skipif(rabbitmq_cluster.unavailable() is not None, reason=str(rabbitmq_cluster.unavailable())),
    pytest.mark.skipif(pg_servers.unavailable() is not None, reason=str(pg_servers.unavailable())),
]

DB = "soak"
DELIVERY_LIMIT = 3
CONSUMER_TIMEOUT_S = 5.0
RATE = 400.0  # messages a second, valid and invalid together
# Of publishing; `make soak`: 150. The shortest day whose memory alarm still comes while the publisher
# sends (an instance's stop during the outage takes SHUTDOWN_TIMEOUT_SECONDS, 15 s, whatever the day).
SECONDS = float(os.environ.get("TEST_SOAK_SECONDS", "90"))
INVALID_SHARE = 0.15  # of the messages, in floods


@dataclass(frozen=True)
class Day:
    """When each fault comes, in seconds after the one before, and how long it lasts. Each wait is a
    floor: a rabbitmqctl call or a stop on a loaded machine can take longer, and a fault is never
    cut short for it. `Day.lasting(150)` is the election day of docs/operations.md."""

    check_s: float  # how often the broker checks consumer_timeout (channel_tick_interval)
    outage: float  # PostgreSQL stopped, after the publishing started
    closes: float  # the broker closes every connection of the service, after the outage began
    restart: float  # an instance restarted (SIGTERM) and the connections closed again, after that
    outage_s: float  # how long PostgreSQL stays stopped
    alarm: float  # a memory alarm, after PostgreSQL is back
    stall_timeout_s: float  # the alarm lasts 10 s longer; then an instance is killed with -9
    crash: float  # PostgreSQL crashed (immediate stop), after the alarm ended
    crash_s: float  # how long it stays down; then an instance is stopped with SIGTERM

    @classmethod
    def lasting(cls, seconds: float) -> Day:
        f = seconds / 150.0
        # RabbitMQ checks once a minute by default; a shorter day checks more often, in proportion.
        check_s = max(2.0, 60 * f)
        # The overdue acks must close the channels before the broker closes the connections: after a
        # reconnect an instance does not consume while PostgreSQL fails, so nothing would be overdue.
        closes = max(73 * f, CONSUMER_TIMEOUT_S + check_s + 5)
        restart = max(2.0, 6 * f)
        return cls(
            check_s=check_s,
            outage=15 * f,  # a backlog first
            closes=closes,
            restart=restart,
            outage_s=max(110 * f, closes + restart + 10),
            alarm=10 * f,
            stall_timeout_s=max(15.0, 30 * f),
            crash=15 * f,
            crash_s=max(2.0, 7 * f),
        )


DAY = Day.lasting(SECONDS)


@pytest.fixture(scope="module")
def broker() -> Iterator[RabbitNode]:
    with standalone_node(config=f"consumer_timeout = {CONSUMER_TIMEOUT_S * 1000:.0f}\n") as node:
        # Read by each channel when it sets its next check, so it applies to every channel opened after.
        node.ctl("eval", f"application:set_env(rabbit, channel_tick_interval, {DAY.check_s * 1000:.0f}).")
        yield node


@pytest.fixture
def database() -> Iterator[PgServer]:
    server = PgServer(settings={"synchronous_commit": "on"})  # a crash must not lose acknowledged commits
    try:
        server.start()
        server.execute(f"CREATE DATABASE {DB}")
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

    def __call__(self, what: str) -> float:
        """Note what just happened; returns when, in seconds from the start."""
        now = time.monotonic() - self.start
        self.events.append(f"{now:6.1f}s  {what}")
        print(self.events[-1], flush=True)
        return now

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


# Closes every connection of the service's instances (named vote-aggregator...) in one call to the
# node (rabbitmqctl takes seconds a call on a loaded machine); prints how many.
_CLOSE_SERVICE_CONNECTIONS = """
Service = [P || P <- rabbit_networking:connections(),
    case lists:keyfind(<<"connection_name">>, 1,
            proplists:get_value(client_properties, rabbit_networking:connection_info(P, [client_properties]), [])) of
        {_, longstr, <<"vote-aggregator", _/binary>>} -> true;
        _ -> false
    end],
[rabbit_networking:close_connection(P, "soak: a flapping network") || P <- Service],
length(Service).
"""


def close_service_connections(node: RabbitNode) -> int:
    return int(node.ctl("eval", _CLOSE_SERVICE_CONNECTIONS).strip())


@pytest.mark.timeout(900)  # several minutes of election day, by design
def test_an_election_day_of_faults_counts_every_vote_once(
    broker: RabbitNode, database: PgServer, tmp_path: Path
) -> None:
    queue = f"soak.{uuid.uuid4().hex[:8]}"
    role = create_service_role(DB, server=database)  # the schema applied by an administrator first
    env = {
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": str(broker.port),
        "RABBITMQ_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(database.port),
        **role.env(),
        "STALL_TIMEOUT_SECONDS": str(DAY.stall_timeout_s),
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
        timeline(f"3 instances consuming; publishing {len(order)} messages at {RATE:.0f}/s; {DAY}")

        timeline.until(DAY.outage)
        database.stop(mode="fast")
        outage = timeline(
            f"PostgreSQL stopped: an outage longer than the broker's consumer-timeout check (every {DAY.check_s:g} s)"
        )
        # Nothing else happens until the broker has checked: the instances hold the votes they had,
        # unacked, and the broker closes their channels for the overdue acks.
        timeline.until(outage + DAY.closes)
        at = timeline(f"the broker closed every connection of the service ({close_service_connections(broker)})")
        timeline.until(at + DAY.restart)
        restarted = running.pop(0)
        code = restarted.stop()
        # Exit 1 says that votes in hand could not be written within SHUTDOWN_TIMEOUT_SECONDS.
        assert code == 0 or (code == 1 and "shutdown budget" in restarted.logs()), restarted.logs()[-3000:]
        start("a")
        timeline(f"instance a restarted during the outage (SIGTERM, exit {code})")
        timeline(f"the broker closed every connection of the service again ({close_service_connections(broker)})")
        timeline.until(outage + DAY.outage_s)
        database.start()
        back = timeline("PostgreSQL back")

        timeline.until(back + DAY.alarm)
        broker.ctl("set_vm_memory_high_watermark", "0.0001")
        alarm = timeline(f"memory alarm raised ({publisher.counts.acked} of {len(order)} messages confirmed so far)")
        timeline.until(alarm + DAY.stall_timeout_s + 10)
        broker.ctl("set_vm_memory_high_watermark", "0.4")
        cleared = timeline("memory alarm cleared")

        killed = running.pop(0)
        killed.kill()
        start("b")
        timeline("an instance killed with -9 and started again")
        timeline.until(cleared + DAY.crash)
        database.stop(mode="immediate")
        crash = timeline("PostgreSQL crashed")
        timeline.until(crash + DAY.crash_s)
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

    assert_all_counted_once(DB, queue, votes, server=database, broker=broker.params())

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
