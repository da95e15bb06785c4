"""PostgreSQL under Patroni (etcd as its store), as operators run it: a leader killed with kill -9,
a planned switchover, the old leader rejoining (pg_rewind), synchronous_mode and
synchronous_mode_strict with standbys lost, and synchronous_mode alone (the leader commits without a
standby, the service holds). Every scenario ends with every vote counted exactly
once, and shows that the service never writes to a server that is not the leader.

One cluster of three members (tests/patroni_cluster.py) serves the module, about 15 s to start;
each test has its own database and queue and leaves the cluster healthy. The service lists every
member in POSTGRES_HOST, the member that was leader first: if it came back writable, libpq would
pick it. Recovery times are printed (run with `-s`); docs/high-availability.md records them.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg2
import pytest

from tests import patroni_cluster
from tests.patroni_cluster import Member, PatroniCluster
from tests.support import (
    Service,
    assert_all_counted_once,
    backlog_held_back,
    make_votes,
    publish,
    queue_state,
    wait_for,
)

pytestmark = [
    pytest.mark.ha,
    pytest.mark.skipif(patroni_cluster.unavailable() is not None, reason=str(patroni_cluster.unavailable())),
]

MakeService = Callable[..., Service]
# What docs/high-availability.md recommends with several hosts: after a new leader is there, the
# next attempt at a batch comes within a second.
HA_RETRY = {"RETRY_DELAY_SECONDS": "0.5", "RETRY_MAX_DELAY_SECONDS": "1"}


@pytest.fixture(scope="module")
def patroni() -> Iterator[PatroniCluster]:
    cluster = PatroniCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(patroni: PatroniCluster) -> PatroniCluster:
    """The module's cluster, healthy (every member running, a synchronous standby) at the start."""
    for member in patroni.members.values():
        if member.proc is None or member.proc.poll() is not None:
            member.start()
    patroni.wait_healthy(timeout=120)
    return patroni


@pytest.fixture
def services(cluster: PatroniCluster, make_service: MakeService) -> Callable[[str, dict[str, str]], Service]:
    """The service on a database of the cluster, as its least-privilege role (made on the leader,
    the schema applied by an administrator first)."""

    def make(dbname: str, env: dict[str, str]) -> Service:
        return make_service(env, server=cluster.leader(), dbname=dbname)

    return make


def new_database(cluster: PatroniCluster) -> str:
    name = f"votes_{uuid.uuid4().hex[:8]}"
    cluster.leader().execute(f"CREATE DATABASE {name}")
    return name


def counted(member: Member, dbname: str) -> int:
    try:
        return int(member.execute("SELECT count(*) FROM vote_audit", dbname=dbname)[0][0])
    except psycopg2.Error:
        return -1  # not answering, or no schema yet


def assert_replicas_agree(cluster: PatroniCluster, leader: Member, dbname: str) -> None:
    """Every member has what the leader has: nothing was written anywhere else."""
    want = counted(leader, dbname)
    for member in cluster.members.values():
        wait_for(lambda m=member: counted(m, dbname) == want, timeout=60, what=f"{member.name} to have every vote")  # type: ignore[misc]


def primaries_written(svc: Service) -> list[str]:
    """host:port of each server the service said it writes to, in order."""
    return re.findall(r"writing to the PostgreSQL primary at (\S+)", svc.logs())


class WritableWatch:
    """Polls a member every 20 ms from now on and remembers whether it ever accepted writes."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.seen_writable: list[float] = []
        self.seen_answering = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{member.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                in_recovery = self.member.execute("SELECT pg_is_in_recovery()")[0][0]
            except psycopg2.Error:
                continue
            self.seen_answering += 1
            if not in_recovery:
                self.seen_writable.append(time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def wait_new_leader(cluster: PatroniCluster, old: Member) -> tuple[Member, float]:
    """The member that accepts writes in `old`'s place, and when it first did (polled every 50 ms)."""
    others = [m for m in cluster.members.values() if m is not old]

    def writable() -> Member | None:
        return next((m for m in others if m.writable()), None)

    member = wait_for(writable, timeout=90, interval=0.05, what="a new leader that accepts writes")
    return member, time.monotonic()


def seconds_until_counting(member: Member, dbname: str, since: float, *, timeout: float = 90) -> float:
    before = counted(member, dbname)
    wait_for(lambda: counted(member, dbname) > before, timeout=timeout, interval=0.05, what="counting again")
    return time.monotonic() - since


# -- kill -9 of the leader, and its return ---------------------------------------------------------


def test_leader_killed_then_rejoining_loses_doubles_and_splits_nothing(
    cluster: PatroniCluster, services: Callable[[str, dict[str, str]], Service], queue: str
) -> None:
    old = cluster.leader()
    dbname = new_database(cluster)
    votes = make_votes(3_000, laws=20, seed=71)
    publish(queue, [v.body() for v in votes])
    order = [old] + [m for m in cluster.members.values() if m is not old]
    svc = services(dbname, {**cluster.env(dbname, order=order), **HA_RETRY}).start()
    assert svc.metric("database_failover_safe") == 1  # strict synchronous mode: Patroni names a standby

    wait_for(lambda: counted(old, dbname) > 1_000, timeout=60, interval=0.02, what="counting under way")
    with backlog_held_back(lambda: old.connect(dbname), queue, votes, seed=74, laws=20):
        killed = time.monotonic()
        old.kill()
    new, promoted = wait_new_leader(cluster, old)
    recovered = seconds_until_counting(new, dbname, promoted)
    print(
        f"\nRECOVERY Patroni kill -9 of the leader {old.name}: new leader {new.name} accepted writes "
        f"{promoted - killed:.1f}s after the kill; counting {recovered:.2f}s after that"
    )

    # The old leader comes back (its Patroni restarted): rewound onto the new timeline, as a
    # replica, never accepting a write, although it is first in POSTGRES_HOST.
    rejoin_log_from = len(old.logs())
    watch = WritableWatch(old)
    try:
        old.start()
        cluster.wait_healthy(timeout=120)
        wait_for(lambda: counted(new, dbname) == len(votes), timeout=180, what="every vote counted on the new leader")
        wait_for(lambda: watch.seen_answering > 10, timeout=30, what="the old leader watched while it answers")
    finally:
        watch.stop()
    assert watch.seen_writable == [], "the old leader accepted writes after it came back"
    assert cluster.leader() is new
    # On the new leader's timeline, following it, through pg_rewind. After a kill -9 Patroni first
    # runs crash recovery in single-user mode, whose shutdown checkpoint no standby ever received:
    # a killed leader has always diverged from the new timeline, and must be rewound, not copied.
    timelines = {m["name"]: m.get("timeline") for m in cluster.cluster_state()}
    assert timelines[old.name] == timelines[new.name], timelines
    rejoin_log = old.logs()[rejoin_log_from:]
    assert f"running pg_rewind from {new.name}" in rejoin_log, rejoin_log[-3000:]
    assert "pg_rewind exit code=0" in rejoin_log, rejoin_log[-3000:]
    print(f"RECOVERY the old leader {old.name} rejoined as a replica, rewound with pg_rewind from {new.name}")

    assert svc.proc is not None
    assert svc.proc.poll() is None
    written = primaries_written(svc)
    assert written[0] == f"127.0.0.1:{old.port}"
    assert set(written[1:]) == {f"127.0.0.1:{new.port}"}, written
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes, server=new)
    assert_replicas_agree(cluster, new, dbname)


# -- a planned switchover ------------------------------------------------------------------------------


def test_switchover_under_load_loses_and_doubles_nothing(
    cluster: PatroniCluster, services: Callable[[str, dict[str, str]], Service], queue: str
) -> None:
    old = cluster.leader()
    candidate = next(cluster.members[n] for n, role in cluster.roles().items() if role == "sync_standby")
    dbname = new_database(cluster)
    votes = make_votes(3_000, laws=20, seed=72)
    publish(queue, [v.body() for v in votes])
    order = [old] + [m for m in cluster.members.values() if m is not old]
    svc = services(dbname, {**cluster.env(dbname, order=order), **HA_RETRY}).start()

    wait_for(lambda: counted(old, dbname) > 1_000, timeout=60, interval=0.02, what="counting under way")
    with backlog_held_back(lambda: old.connect(dbname), queue, votes, seed=75, laws=20):
        asked = time.monotonic()
        cluster.switchover(leader=old, candidate=candidate)
    new, promoted = wait_new_leader(cluster, old)
    assert new is candidate
    watch = WritableWatch(old)  # demoted by now: it must never accept a write again
    try:
        recovered = seconds_until_counting(new, dbname, promoted)
        print(
            f"\nRECOVERY Patroni switchover {old.name} -> {new.name}: the new leader accepted writes "
            f"{promoted - asked:.1f}s after the request; counting {recovered:.2f}s after that"
        )
        cluster.wait_healthy(timeout=120)
        wait_for(lambda: counted(new, dbname) == len(votes), timeout=180, what="every vote counted on the new leader")
        wait_for(lambda: watch.seen_answering > 10, timeout=30, what="the old leader watched while it answers")
    finally:
        watch.stop()
    assert watch.seen_writable == [], "the demoted leader accepted writes"

    written = primaries_written(svc)
    assert written == [f"127.0.0.1:{old.port}", f"127.0.0.1:{new.port}"], written
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes, server=new)
    assert_replicas_agree(cluster, new, dbname)


# -- synchronous_mode_strict ------------------------------------------------------------------------


def test_strict_synchronous_mode_holds_every_commit_until_a_standby_is_back(
    cluster: PatroniCluster, services: Callable[[str, dict[str, str]], Service], queue: str
) -> None:
    """Three members: losing one standby costs nothing (the other becomes synchronous). Losing both,
    as a two-member cluster losing its only standby, stops every commit: the service holds
    (POSTGRES_REQUIRE_SYNC_STANDBY) until a standby is back, then counts every vote once."""
    leader = cluster.leader()
    standbys = [m for m in cluster.members.values() if m is not leader]
    dbname = new_database(cluster)
    # Each part only has to be there: counted, counted with one standby, held in the queue.
    votes = make_votes(3_000, laws=10, seed=73)
    first, second, third = votes[:1_000], votes[1_000:2_000], votes[2_000:]
    env = (
        cluster.env(dbname, POSTGRES_REQUIRE_SYNC_STANDBY="true", POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5")
        | HA_RETRY
    )
    publish(queue, [v.body() for v in first])
    svc = services(dbname, env).start()
    wait_for(lambda: counted(leader, dbname) == len(first), timeout=60, what="the first votes counted")

    # One standby stopped: Patroni makes the other one synchronous, and counting goes on.
    standbys[0].stop()
    wait_for(
        lambda: cluster.roles().get(standbys[1].name) == "sync_standby",
        timeout=60,
        what="the other standby synchronous",
    )
    publish(queue, [v.body() for v in second])
    wait_for(lambda: counted(leader, dbname) == len(first) + len(second), timeout=60, what="counting with one standby")
    assert svc.metric("vote_consumption_held") == 0

    # The second one too: strict mode lets no commit through without a synchronous standby.
    standbys[1].stop()
    wait_for(lambda: svc.metric("vote_consumption_held") == 1, timeout=60, what="the service holding")
    status, reason = svc.http("/readyz")
    assert status == 503
    assert "POSTGRES_REQUIRE_SYNC_STANDBY" in reason
    assert svc.http("/healthz")[0] == 200
    publish(queue, [v.body() for v in third])
    # Any commit on the leader alone waits for a standby: PostgreSQL shows it waiting (SyncRep).
    probe = threading.Thread(
        target=leader.execute, args=("CREATE TABLE strict_probe (x int)",), kwargs={"dbname": dbname}
    )
    probe.start()
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query LIKE 'CREATE TABLE strict_probe%'"
    )
    wait_for(lambda: leader.execute(waiting) == [(1,)], timeout=30, what="the probe's commit waiting for a standby")
    assert queue_state(queue) == (len(third), 0)
    assert counted(leader, dbname) == len(first) + len(second)

    # A standby back: it becomes synchronous, the waiting commit returns, and the service counts the rest.
    back = time.monotonic()
    standbys[0].start()
    probe.join(timeout=120)
    assert not probe.is_alive()
    recovered = seconds_until_counting(leader, dbname, back)
    print(f"\nRECOVERY strict synchronous mode: counting {recovered:.1f}s after a standby's Patroni was started")
    wait_for(lambda: counted(leader, dbname) == len(votes), timeout=180, what="every vote counted")
    assert svc.metric("vote_consumption_held") == 0
    assert primaries_written(svc) == [f"127.0.0.1:{leader.port}"]
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes, server=leader)
    standbys[1].start()
    cluster.wait_healthy(timeout=120)
    assert_replicas_agree(cluster, leader, dbname)


# -- synchronous_mode without strict ----------------------------------------------------------------


def test_synchronous_mode_without_strict_the_service_holds_while_the_leader_commits_alone(
    cluster: PatroniCluster, services: Callable[[str, dict[str, str]], Service], queue: str
) -> None:
    """synchronous_mode alone (synchronous_mode_strict off): with no standby left, Patroni empties
    synchronous_standby_names and the leader commits alone, so a vote acked then would live on one
    server only. POSTGRES_REQUIRE_SYNC_STANDBY holds the service all the same, until a standby is
    synchronous again; then every vote is counted once."""
    leader = cluster.leader()
    standbys = [m for m in cluster.members.values() if m is not leader]
    dbname = new_database(cluster)
    votes = make_votes(2_000, laws=10, seed=76)
    first, rest = votes[:1_000], votes[1_000:]
    env = (
        cluster.env(dbname, POSTGRES_REQUIRE_SYNC_STANDBY="true", POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5")
        | HA_RETRY
    )
    publish(queue, [v.body() for v in first])
    svc = services(dbname, env).start()
    wait_for(lambda: counted(leader, dbname) == len(first), timeout=60, what="the first votes counted")

    config = cluster.edit_config(synchronous_mode_strict=False)
    try:
        assert config["synchronous_mode"] is True
        assert config["synchronous_mode_strict"] is False
        for standby in standbys:
            standby.stop()
        wait_for(lambda: svc.metric("vote_consumption_held") == 1, timeout=60, what="the service holding")
        # Unlike strict mode, the leader now commits without any standby (once Patroni has
        # emptied synchronous_standby_names, within a turn of its loop).
        wait_for(
            lambda: leader.execute("SHOW synchronous_standby_names") == [("",)],
            timeout=60,
            what="Patroni to stop waiting for a synchronous standby",
        )
        leader.execute("CREATE TABLE alone_probe (x int)", dbname=dbname)
        status, reason = svc.http("/readyz")
        assert status == 503
        assert "POSTGRES_REQUIRE_SYNC_STANDBY" in reason
        publish(queue, [v.body() for v in rest])
        assert queue_state(queue) == (len(rest), 0)
        assert counted(leader, dbname) == len(first)

        back = time.monotonic()
        standbys[0].start()
        recovered = seconds_until_counting(leader, dbname, back)
        print(f"\nRECOVERY synchronous mode, not strict: counting {recovered:.1f}s after a standby was started")
        wait_for(lambda: counted(leader, dbname) == len(votes), timeout=180, what="every vote counted")
        assert svc.metric("vote_consumption_held") == 0
        assert primaries_written(svc) == [f"127.0.0.1:{leader.port}"]
        assert svc.stop() == 0
        assert_all_counted_once(dbname, queue, votes, server=leader)
    finally:
        cluster.edit_config(synchronous_mode_strict=True)
    standbys[1].start()
    cluster.wait_healthy(timeout=120)
    assert_replicas_agree(cluster, leader, dbname)
