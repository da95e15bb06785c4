"""RabbitMQ high availability on real throwaway nodes: a three-node cluster with a quorum queue
holding a backlog loses, under load, the node the service is connected to and later the node that
leads the queue; a standalone node is stopped (stop_app/start_app) and killed with the service
attached.

The nodes (tests/rabbitmq_cluster.py) boot once for this module, in parallel, on free loopback
ports; PostgreSQL is the shared server, each test with its own database. Recovery times (from the
kill to counting again) are printed: run with `-s` to see them; docs/high-availability.md records
them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

from amqp import declare_queues
from config import Config
from tests import rabbitmq_cluster
from tests.rabbitmq_cluster import RabbitNode, RabbitNodes
from tests.support import (
    Service,
    VoteMsg,
    assert_invariant,
    audit_count,
    expected_totals,
    make_votes,
    pg_connect,
    problems,
    query,
    results,
    run_cli,
    service_env,
    stop_all,
    wait_for,
)
from tools.ports import free_port
from tools.publisher import publish_all

pytestmark = [
    pytest.mark.ha,
    pytest.mark.skipif(rabbitmq_cluster.unavailable() is not None, reason=str(rabbitmq_cluster.unavailable())),
]

MakeService = Callable[..., Service]
PREFETCH = Config().rabbitmq_prefetch_count


@pytest.fixture(scope="module")
def brokers() -> Iterator[RabbitNodes]:
    """Three clustered nodes and a standalone fourth, booted once for the module."""
    nodes = RabbitNodes(4, clustered=3)
    try:
        yield nodes.start()
    finally:
        nodes.remove()


@pytest.fixture(autouse=True)
def all_nodes_up(brokers: RabbitNodes) -> None:
    """Every test starts with every node running, whatever an earlier failed test left."""
    brokers.revive()


@pytest.fixture
def services(tmp_path: Path, dbname: str) -> Iterator[Callable[[str, dict[str, str]], Service]]:
    started: list[Service] = []

    def make(queue: str, env: dict[str, str]) -> Service:
        svc = Service(queue=queue, dbname=dbname, log_path=tmp_path / f"service-{len(started)}.log", env=env)
        started.append(svc)
        return svc

    yield make
    stop_all(started)


def new_queue() -> str:
    return f"agg.test.ha.{uuid.uuid4().hex[:12]}"


def declare_through(node: RabbitNode, queue: str) -> None:
    """Declare the queue as the service does (its defaults: quorum, dead-lettering), through `node`:
    a quorum queue's leader starts on the node that declared it."""
    connection = pika.BlockingConnection(node.params())
    try:
        declare_queues(connection, Config(rabbitmq_queue=queue))
    finally:
        connection.close()


def publish_through(node: RabbitNode, queue: str, votes: list[VoteMsg]) -> None:
    publish_all(node.params(), queue, [v.body() for v in votes])


def connected_to(svc: Service, nodes: list[RabbitNode]) -> RabbitNode | None:
    """The node rabbitmq_node_connected says the service is on."""
    on = [n for n in nodes if svc.metric("rabbitmq_node_connected", default=0.0, node=n.address) == 1]
    return on[0] if len(on) == 1 else None


def seconds_until_counting(dbname: str, since: float, *, held_at_kill: int, timeout: float = 90) -> float:
    """Seconds from `since` until a vote delivered after the kill is counted.

    The service holds at most RABBITMQ_PREFETCH_COUNT votes it received before the kill; once more
    than that were counted after it, some of them came over the new connection (redelivered votes
    already counted are absorbed and do not raise the count).
    """
    wait_for(
        lambda: audit_count(dbname) > held_at_kill + PREFETCH, timeout=timeout, interval=0.05, what="counting again"
    )
    return time.monotonic() - since


def assert_all_counted_once(dbname: str, node: RabbitNode, queue: str, votes: list[VoteMsg]) -> None:
    assert results(dbname) == expected_totals(votes)
    assert audit_count(dbname) == len(votes)
    assert query(dbname, "SELECT count(*) FROM duplicate_attempts") == [(0,)]
    assert_invariant(dbname)
    assert node.queue_state(queue) == (0, 0)
    assert node.queue_state(f"{queue}.dead") == (0, 0)  # no vote went past the delivery limit


@contextlib.contextmanager
def holding_back(dbname: str) -> Iterator[None]:
    """The service cannot commit while this lasts (an exclusive lock on vote_results); it retries."""
    conn = pg_connect(dbname)
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE vote_results IN EXCLUSIVE MODE")
        yield
    finally:
        conn.rollback()
        conn.close()


def still_running(svc: Service) -> bool:
    assert svc.proc is not None
    return svc.proc.poll() is None


# -- the cluster -------------------------------------------------------------------------------------


def test_losing_the_connected_node_then_the_queue_leader_loses_and_doubles_nothing(
    brokers: RabbitNodes, services: Callable[[str, dict[str, str]], Service], dbname: str
) -> None:
    n1, n2, n3 = brokers.cluster
    queue = new_queue()
    declare_through(n3, queue)
    described = n2.queues()[queue]
    assert described["type"] == "quorum"
    assert described["leader"] == n3.node
    assert sorted(described["members"]) == sorted(n.node for n in brokers.cluster)

    votes = make_votes(60_000, laws=20, seed=71)
    publish_through(n2, queue, votes)
    svc = services(queue, {"RABBITMQ_HOST": ",".join(n.address for n in brokers.cluster)}).start()
    assert connected_to(svc, brokers.cluster) is n1
    assert f"on amqp://guest@{n1.address}/ (node 1 of 3," in svc.logs()

    # 1. The node the service is connected to dies (it does not lead the queue).
    wait_for(lambda: audit_count(dbname) > 5_000, timeout=60, interval=0.02, what="counting under way")
    held, killed = audit_count(dbname), time.monotonic()
    n1.kill()
    recovered = seconds_until_counting(dbname, killed, held_at_kill=held)
    print(f"\nRECOVERY RabbitMQ cluster, connected node killed: counting again {recovered:.1f}s after the kill")
    assert connected_to(svc, brokers.cluster) is n2
    assert f"RabbitMQ connection to amqp://guest@{n1.address}/ lost or refused" in svc.logs()
    assert f"retrying now on {n2.address}" in svc.logs()
    n1.start()  # back before the next kill: the queue needs two of its three members
    n1.wait_started()

    # 2. The node leading the queue dies; the service is on another one. A second backlog is
    # published, and the leader killed, while a lock on vote_results holds the service back: there
    # are votes left to count when the leader dies, however fast this machine counts and however
    # long finding the leader takes on it (a slow rabbitmqctl once let the service count the whole
    # backlog before the kill, and nothing was left to show counting going on).
    more = make_votes(60_000, laws=20, seed=72)
    with holding_back(dbname):
        publish_through(n2, queue, more)
        votes += more
        leader = next(n for n in brokers.cluster if n.node == n2.queues()[queue]["leader"])
        assert leader is not connected_to(svc, brokers.cluster)
        held, killed = audit_count(dbname), time.monotonic()
        assert held <= len(votes) - len(more)
        leader.kill()
    recovered = seconds_until_counting(dbname, killed, held_at_kill=held)
    print(f"RECOVERY RabbitMQ cluster, queue leader killed: counting again {recovered:.1f}s after the kill")
    leader.start()
    leader.wait_started()

    wait_for(lambda: audit_count(dbname) == len(votes), timeout=120, what="every vote counted")
    wait_for(lambda: n2.queue_state(queue)[0] == 0, timeout=30, what="the queue drained")
    assert still_running(svc)
    assert "Traceback" not in svc.logs()
    assert svc.stop() == 0
    assert_all_counted_once(dbname, n2, queue, votes)


def test_the_service_declares_a_replicated_quorum_queue_and_check_names_each_node(
    brokers: RabbitNodes, services: Callable[[str, dict[str, str]], Service], dbname: str
) -> None:
    n1, n2, n3 = brokers.cluster
    queue = new_queue()
    hosts = f"{n2.address},{n3.address},{n1.address}"
    svc = services(queue, {"RABBITMQ_HOST": hosts, "RABBITMQ_DELIVERY_LIMIT": "7"}).start()
    assert connected_to(svc, brokers.cluster) is n2
    described = n1.queues()[queue]
    assert described["type"] == "quorum"
    assert sorted(described["members"]) == sorted(n.node for n in brokers.cluster)
    assert {name: value for name, _type, value in described["arguments"]} == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": f"{queue}.dlx",
        "x-delivery-limit": 7,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert n1.queues()[f"{queue}.dead"]["type"] == "quorum"
    votes = make_votes(500, laws=3, seed=73)
    publish_through(n3, queue, votes)
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
    assert svc.stop() == 0
    assert_all_counted_once(dbname, n1, queue, votes)

    # --check: one line per node that answers; a node that does not is a warning while another answers.
    gone = f"127.0.0.1:{free_port()}"
    result = run_cli("--check", env=service_env(dbname=dbname, queue=queue, RABBITMQ_HOST=f"{hosts},{gone}"))
    assert result.returncode == 0, result.stderr
    for i, node in enumerate((n2, n3, n1)):
        assert f"ok: RabbitMQ amqp://guest@{node.address}/ (node {i + 1} of 4), queue {queue}" in result.stdout
    assert f"warning: RabbitMQ amqp://guest@{gone}/ (node 4 of 4): " in result.stderr
    assert problems(result) == []


def test_nodes_that_do_not_answer_cost_no_wait_while_another_does(
    brokers: RabbitNodes, services: Callable[[str, dict[str, str]], Service], dbname: str
) -> None:
    n1 = brokers.cluster[0]
    queue = new_queue()
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    svc = services(queue, {"RABBITMQ_HOST": ",".join([*dead, n1.address])}).start()
    logs = svc.logs()
    for address, following in zip(dead, [dead[1], n1.address], strict=True):
        assert logs.count(f"RabbitMQ connection to amqp://guest@{address}/ lost or refused") == 1
        assert f"retrying now on {following}" in logs
    # The backoff only applies once every node failed: no round failed here.
    assert "no RabbitMQ node answered" not in logs
    assert connected_to(svc, brokers.cluster) is n1
    assert svc.stop() == 0


# -- one node, restarted for real -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop_app/start_app", "kill -9"])
def test_a_single_node_restarted_with_the_service_attached(
    brokers: RabbitNodes, services: Callable[[str, dict[str, str]], Service], dbname: str, how: str
) -> None:
    node = brokers.nodes[3]
    queue = new_queue()
    declare_through(node, queue)
    votes = make_votes(40_000, laws=10, seed=74 if how == "kill -9" else 75)
    publish_through(node, queue, votes)
    svc = services(queue, {"RABBITMQ_HOST": node.address, "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": "2"}).start()
    wait_for(lambda: audit_count(dbname) > 5_000, timeout=60, interval=0.02, what="counting under way")

    lost = svc.logs().count("RabbitMQ connection to")
    held, stopped = audit_count(dbname), time.monotonic()
    if how == "kill -9":
        node.kill()
        wait_for(lambda: svc.logs().count("RabbitMQ connection to") > lost, timeout=30, what="the loss noticed")
        node.start()
        node.wait_started()
    else:
        node.ctl("stop_app")
        wait_for(lambda: svc.logs().count("RabbitMQ connection to") > lost, timeout=30, what="the loss noticed")
        node.ctl("start_app")
    back = time.monotonic()
    recovered = seconds_until_counting(dbname, back, held_at_kill=held)
    print(
        f"\nRECOVERY RabbitMQ single node, {how}: counting again {recovered:.1f}s after the node was back "
        f"({back - stopped:.1f}s down)"
    )
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=120, what="every vote counted")
    wait_for(lambda: node.queue_state(queue)[0] == 0, timeout=30, what="the queue drained")
    assert still_running(svc)
    assert svc.stop() == 0
    assert_all_counted_once(dbname, node, queue, votes)
