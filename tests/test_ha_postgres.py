"""PostgreSQL high availability on real throwaway servers: a failover to a synchronous standby,
acked-means-durable (POSTGRES_REQUIRE_SYNC_STANDBY both ways), and a single server's fast and
immediate restarts.

The servers are tests.pg_servers clusters on free loopback ports (tests/pg_replication.py for the
primary and its standby); RabbitMQ is the shared broker, each test with its own queue. Recovery
times (from the crash or the restart to counting again) are printed: run with `-s` to see them;
docs/high-availability.md records them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg2
import pytest

import db
from config import Config
from tests import pg_servers
from tests.pg_replication import STANDBY_NAME, PgStandby, frozen, pair
from tests.pg_servers import PgServer
from tests.roles import SERVICE_ROLE, create_service_role
from tests.support import (
    Service,
    assert_all_counted_once,
    audit_count,
    backlog_held_back,
    make_votes,
    publish,
    queue_state,
    run_cli,
    service_env,
    wait_for,
)
from votes import Vote, parse_message

pytestmark = [
    pytest.mark.ha,
    pytest.mark.skipif(pg_servers.unavailable() is not None, reason=str(pg_servers.unavailable())),
]

MakeService = Callable[..., Service]
DB = "votes"
# What docs/high-availability.md recommends with several hosts: a retry wait never long after a failover.
HA_RETRY = {"RETRY_DELAY_SECONDS": "0.5", "RETRY_MAX_DELAY_SECONDS": "2"}
# What PostgreSQL says while it restarts, which a proxy cannot imitate.
SERVER_MESSAGES = (
    "terminating connection due to administrator command",
    "terminating connection due to immediate shutdown",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "server closed the connection unexpectedly",
    "Connection refused",
)


@dataclass(frozen=True)
class Pair:
    primary: PgServer
    standby: PgStandby
    dbname: str


@pytest.fixture(scope="module")
def module_pair() -> Iterator[tuple[PgServer, PgStandby]]:
    """One primary and its standby for the tests that stop, kill and promote neither (a standby
    frozen with SIGSTOP resumes where it was); a test that does builds a pair of its own."""
    primary, standby = pair(synchronous=True)
    try:
        yield primary, standby
    finally:
        standby.remove()
        primary.remove()


def _shared_pair(servers: tuple[PgServer, PgStandby], *, synchronous: bool) -> Pair:
    """The module's pair, in the replication mode the test needs, with a database of the test's own
    (the servers go at the module's end, and their databases with them)."""
    primary, standby = servers
    primary.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME if synchronous else ''}'")
    primary.execute("SELECT pg_reload_conf()")
    standby.wait_streaming(sync_state="sync" if synchronous else "async")
    dbname = f"votes_{uuid.uuid4().hex[:8]}"
    primary.execute(f"CREATE DATABASE {dbname}")
    return Pair(primary, standby, dbname)


@pytest.fixture
def sync_pair(module_pair: tuple[PgServer, PgStandby]) -> Pair:
    return _shared_pair(module_pair, synchronous=True)


@pytest.fixture
def async_pair(module_pair: tuple[PgServer, PgStandby]) -> Pair:
    return _shared_pair(module_pair, synchronous=False)


def hosts(*servers: PgServer, dbname: str = DB, **extra: str) -> dict[str, str]:
    """The service's settings for these servers, in this order (libpq's lists)."""
    return {
        "POSTGRES_HOST": ",".join("127.0.0.1" for _ in servers),
        "POSTGRES_PORT": ",".join(str(s.port) for s in servers),
        "POSTGRES_DB": dbname,
        **extra,
    }


@pytest.fixture
def services(make_service: MakeService) -> Callable[..., Service]:
    """The service on `servers` (in this order), as its least-privilege role, made on `primary`
    (the first server unless said) with the schema applied by an administrator first."""

    def make(*servers: PgServer, primary: PgServer | None = None, dbname: str = DB, **settings: str) -> Service:
        return make_service(hosts(*servers, dbname=dbname, **settings), server=primary or servers[0], dbname=dbname)

    return make


def counted(server: PgServer, dbname: str = DB) -> int:
    try:
        return audit_count(dbname, server)
    except psycopg2.Error:
        return -1  # not answering (yet)


def seconds_until_counting(server: PgServer, since: float, *, timeout: float = 60) -> float:
    """Seconds from `since` until `server` counts a vote it had not counted when this was called."""
    before = counted(server)
    wait_for(lambda: counted(server) > before, timeout=timeout, interval=0.05, what="counting again")
    return time.monotonic() - since


# -- failover ------------------------------------------------------------------------------------


def test_a_crashed_primary_and_a_promoted_synchronous_standby_lose_and_double_nothing(
    services: MakeService, queue: str
) -> None:
    primary, standby = pair(synchronous=True)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(3_000, laws=20, seed=61)
        publish(queue, [v.body() for v in votes])
        svc = services(primary, standby, **HA_RETRY).start()
        assert f"PostgreSQL replication on 127.0.0.1:{primary.port}: synchronous" in svc.logs()
        assert svc.metric("database_failover_safe") == 1
        assert svc.metric("database_synchronous_standbys") == 1

        wait_for(lambda: counted(primary) > 1_000, timeout=60, interval=0.02, what="counting under way")
        # The crash comes while a lock holds the service's next commit back and a backlog waits
        # (support.BACKLOG): however fast this machine counts, a batch is being written when the primary
        # dies, and votes are left to count on the promoted standby.
        with backlog_held_back(lambda: primary.connect(DB), queue, votes, seed=86, laws=20):
            crashed = time.monotonic()
            primary.stop(mode="immediate")  # a crash: no checkpoint, clients cut
        # Promoted once the service has been failing for a while, as after a failover manager's
        # detection time: its retry waits have grown to their cap by then.
        wait_for(lambda: svc.metric("database_up") == 0, timeout=30, what="the outage noticed")
        standby.promote()
        promoted = time.monotonic()
        recovered = seconds_until_counting(standby, promoted)
        print(
            f"\nRECOVERY PostgreSQL failover: counting again {recovered + promoted - crashed:.1f}s after the crash, "
            f"{recovered:.1f}s after the promotion (promoted {promoted - crashed:.1f}s after the crash)"
        )

        wait_for(lambda: counted(standby) == len(votes), timeout=120, what="every vote counted on the new primary")
        assert svc.running()
        logs = svc.logs()
        assert f"writing to the PostgreSQL primary at 127.0.0.1:{standby.port}" in logs
        # The new primary has no standby: the service says so at its next replication check (every
        # 5 s; the metric is 0 already while the state is unknown, during the outage).
        no_standby = f"PostgreSQL replication on 127.0.0.1:{standby.port}: no standby"
        wait_for(lambda: no_standby in svc.logs(), timeout=30, what="the new primary's missing standby reported")
        assert svc.metric("database_failover_safe") == 0
        assert svc.stop() == 0
        assert_all_counted_once(DB, queue, votes, server=standby)
    finally:
        standby.remove()
        primary.remove()


# -- acked means durable ---------------------------------------------------------------------------


def test_with_require_sync_standby_consuming_stops_while_the_standby_is_away(services: MakeService, queue: str) -> None:
    primary, standby = pair(synchronous=True)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(3_000, laws=10, seed=62)
        publish(queue, [v.body() for v in votes])
        svc = services(
            primary,
            standby,
            POSTGRES_REQUIRE_SYNC_STANDBY="true",
            POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5",
            **HA_RETRY,
        ).start()
        assert svc.http("/readyz") == (200, "ready\n")
        wait_for(lambda: counted(primary) > 1_000, timeout=60, interval=0.02, what="counting under way")

        # The standby goes: commits wait for it, and the service stops consuming. Every vote it held,
        # buffered or being written, goes back to RabbitMQ: each one is counted or ready in the queue.
        # It goes while a lock holds the service's next commit back and a backlog (support.BACKLOG) waits:
        # votes are in the service's hands and in the queue then, however fast this machine counts.
        with backlog_held_back(lambda: primary.connect(DB), queue, votes, seed=87, laws=10):
            standby.stop(mode="fast")
        wait_for(lambda: svc.http("/readyz")[0] == 503, timeout=30, what="not ready without a sync standby")
        assert "POSTGRES_REQUIRE_SYNC_STANDBY" in svc.http("/readyz")[1]
        assert svc.metric("database_failover_safe") == 0
        assert svc.metric("vote_consumption_held") == 1
        wait_for(lambda: svc.metric("rabbitmq_connected") == 0, timeout=10, what="the channel closed")
        # At least: a batch whose commit returns just after the channel closed is counted and back
        # in RabbitMQ too (its ack could not be sent), and is absorbed as redeliveries later.
        wait_for(
            lambda: queue_state(queue)[1] == 0 and queue_state(queue)[0] >= len(votes) - counted(primary),
            timeout=60,
            what="every vote not counted back in RabbitMQ, no consumer",
        )
        assert svc.http("/healthz")[0] == 200
        assert "not consuming: POSTGRES_REQUIRE_SYNC_STANDBY=true" in svc.logs()

        # It comes back: consuming goes on, and everything is counted exactly once.
        standby.start()
        wait_for(lambda: svc.http("/readyz")[0] == 200, timeout=60, what="ready again")
        wait_for(lambda: counted(primary) == len(votes), timeout=120, what="every vote counted")
        assert svc.metric("database_failover_safe") == 1
        assert svc.metric("vote_consumption_held") == 0
        assert svc.running()
        assert svc.stop() == 0
        assert_all_counted_once(DB, queue, votes, server=primary)
    finally:
        standby.remove()
        primary.remove()


def test_an_asynchronous_standby_is_reported_and_held_to_when_required(
    services: MakeService, queue: str, async_pair: Pair
) -> None:
    primary, standby, dbname = async_pair.primary, async_pair.standby, async_pair.dbname
    # By default the service counts, and says what a failover could lose.
    votes = make_votes(2_000, laws=5, seed=63)
    publish(queue, [v.body() for v in votes])
    svc = services(primary, standby, dbname=dbname).start()
    wait_for(lambda: counted(primary, dbname) == len(votes), timeout=60, what="votes counted")
    assert svc.metric("database_failover_safe") == 0
    assert svc.metric("database_standbys") == 1
    assert svc.metric("database_synchronous_standbys") == 0
    line = next(line for line in svc.logs().splitlines() if "PostgreSQL replication on" in line)
    assert "WARNING" in line
    assert f"asynchronous to {STANDBY_NAME}" in line
    assert "a failover can lose the votes acked just before it" in line
    assert svc.http("/readyz")[0] == 200
    assert svc.stop() == 0

    # Required: nothing is consumed, from the start, until a synchronous standby has every commit.
    more = make_votes(2_000, laws=5, seed=64)
    publish(queue, [v.body() for v in more])
    held = services(
        primary,
        standby,
        dbname=dbname,
        POSTGRES_REQUIRE_SYNC_STANDBY="true",
        POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5",
    ).start(wait_consuming=False)
    wait_for(lambda: "not consuming: POSTGRES_REQUIRE_SYNC_STANDBY" in held.logs(), timeout=30, what="the hold")
    status, reason = held.http("/readyz")
    assert status == 503
    assert "synchronous_standby_names is empty" in reason
    assert queue_state(queue) == (len(more), 0)
    assert counted(primary, dbname) == len(votes)

    primary.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
    primary.execute("SELECT pg_reload_conf()")
    wait_for(lambda: held.http("/readyz")[0] == 200, timeout=30, what="ready once the standby is synchronous")
    wait_for(lambda: counted(primary, dbname) == len(votes) + len(more), timeout=60, what="the held votes counted")
    assert held.metric("database_failover_safe") == 1
    assert held.stop() == 0
    assert_all_counted_once(dbname, queue, votes + more, server=primary)


# -- a single server restarted for real ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_single_server_restarted_under_load(services: MakeService, queue: str, mode: str) -> None:
    server = PgServer(settings={"synchronous_commit": "on"})  # a crash must not lose acknowledged commits
    try:
        server.start()
        server.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(3_000, laws=10, seed=65 if mode == "fast" else 66)
        publish(queue, [v.body() for v in votes])
        # Retries every 0.1 s, so that the service meets the server while it shuts down and starts up.
        svc = services(
            server, RETRY_DELAY_SECONDS="0.1", RETRY_MAX_DELAY_SECONDS="0.1", MAX_RETRY_ATTEMPTS="100"
        ).start()
        wait_for(lambda: counted(server) > 1_000, timeout=60, interval=0.02, what="counting under way")

        # The server stops while a lock holds the service's next commit back and a backlog
        # (support.BACKLOG) waits: a batch is being written, and votes are left to count after the restart.
        with backlog_held_back(lambda: server.connect(DB), queue, votes, seed=88 if mode == "fast" else 89, laws=10):
            stopped = time.monotonic()
            server.stop(mode=mode)
        server.start(wait=False)
        wait_for(server.answers, timeout=60, interval=0.02, what="the server to accept connections")
        started = time.monotonic()
        recovered = seconds_until_counting(server, started)
        print(
            f"\nRECOVERY PostgreSQL {mode} restart: counting again {recovered + started - stopped:.1f}s after the "
            f"stop, {recovered:.1f}s after the server accepted connections again"
        )
        wait_for(lambda: counted(server) == len(votes), timeout=120, what="every vote counted")
        assert svc.running()
        met = [m for m in SERVER_MESSAGES if m in svc.logs()]
        print(f"the service met: {met}")
        assert "Retrying a batch" in svc.logs()
        assert svc.stop() == 0
        assert_all_counted_once(DB, queue, votes, server=server)
    finally:
        server.remove()


def test_a_server_that_turns_read_only_is_unavailable_not_a_refused_vote(services: MakeService, queue: str) -> None:
    # What a fenced old primary looks like: open sessions start failing writes with SQLSTATE 25006,
    # and new ones are turned away by libpq (target_session_attrs=read-write).
    server = PgServer(settings={"synchronous_commit": "on"})
    try:
        server.start()
        server.execute(f"CREATE DATABASE {DB}")
        first = make_votes(500, laws=3, seed=67)
        publish(queue, [v.body() for v in first])
        svc = services(server, **HA_RETRY, MAX_RETRY_ATTEMPTS="1").start()
        wait_for(lambda: counted(server) == len(first), timeout=30, what="votes counted")

        server.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        server.execute("SELECT pg_reload_conf()")
        more = make_votes(500, laws=3, seed=68)
        publish(queue, [v.body() for v in more])
        wait_for(lambda: svc.http("/readyz")[0] == 503, timeout=30, what="not ready while read-only")
        assert "the server accepts no writes" in svc.logs()
        assert counted(server) == len(first)

        server.execute("ALTER SYSTEM RESET default_transaction_read_only")
        server.execute("SELECT pg_reload_conf()")
        wait_for(lambda: counted(server) == len(first) + len(more), timeout=60, what="counted once writable again")
        assert svc.metric("votes_rejected_total", reason="database_rejected") == 0
        assert svc.stop() == 0
        assert_all_counted_once(DB, queue, first + more, server=server)
    finally:
        server.remove()


def test_a_standby_listed_first_is_skipped_for_the_primary(services: MakeService, queue: str, async_pair: Pair) -> None:
    primary, standby, dbname = async_pair.primary, async_pair.standby, async_pair.dbname
    votes = make_votes(300, laws=3, seed=69)
    publish(queue, [v.body() for v in votes])
    svc = services(standby, primary, primary=primary, dbname=dbname).start()
    wait_for(lambda: counted(primary, dbname) == len(votes), timeout=30, what="votes counted on the primary")
    assert f"writing to the PostgreSQL primary at 127.0.0.1:{primary.port}" in svc.logs()
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes, server=primary)


def test_the_least_privilege_role_sees_the_standbys_through_its_function_only(
    services: MakeService, queue: str, async_pair: Pair
) -> None:
    primary, standby, dbname = async_pair.primary, async_pair.standby, async_pair.dbname
    svc = services(primary, standby, dbname=dbname, POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5")
    role = svc.env["POSTGRES_USER"]
    # Without the function (an older schema, or the grant taken back), the role sees
    # pg_stat_replication's rows but not their state.
    primary.execute(f"REVOKE EXECUTE ON FUNCTION vote_replication_standbys() FROM {role}", dbname=dbname)
    votes = make_votes(300, laws=3, seed=70)
    publish(queue, [v.body() for v in votes])
    svc.start()
    wait_for(lambda: counted(primary, dbname) == len(votes), timeout=30, what="votes counted under the role")
    assert f"unknown, role {role} cannot see the standbys' state in pg_stat_replication" in svc.logs()
    assert "apply init_db.sql and service_role.sql again" in svc.logs()
    assert "pg_read_all_stats" not in svc.logs()  # not advised: it would show the role every session's queries
    assert svc.metric("database_failover_safe") == 0
    assert svc.metric("database_standbys") == 1
    assert primary.execute("SELECT pg_has_role(%s, 'pg_read_all_stats', 'USAGE')", (role,)) == [(False,)]

    # service_role.sql grants it again: the state is read through the function, with no
    # pg_read_all_stats (which would also show the role every session's queries).
    conn = primary.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SET vote_aggregator.service_role = %s", (role,))
            cur.execute(SERVICE_ROLE.read_text())
    finally:
        conn.close()
    wait_for(lambda: f"asynchronous to {STANDBY_NAME}" in svc.logs(), timeout=30, what="the state read")
    assert primary.execute("SELECT pg_has_role(%s, 'pg_read_all_stats', 'USAGE')", (role,)) == [(False,)]
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes, server=primary)


def test_check_names_the_primary_and_what_a_failover_could_lose(queue: str, sync_pair: Pair) -> None:
    primary, standby, dbname = sync_pair.primary, sync_pair.standby, sync_pair.dbname
    role = create_service_role(dbname, server=primary)  # the schema applied by an administrator
    env = service_env(dbname=dbname, queue=queue, **hosts(standby, primary, dbname=dbname), **role.env())
    result = run_cli("--check", env=env)
    assert result.returncode == 0, result.stderr
    assert f"schema complete (writes go to 127.0.0.1:{primary.port})" in result.stdout
    assert f"ok: PostgreSQL replication on 127.0.0.1:{primary.port}: synchronous" in result.stdout


# -- acked means on two servers, per commit ----------------------------------------------------------


def _database(server: PgServer, dbname: str) -> db.Database:
    """The service's database layer on `server`, as its least-privilege role (the schema applied by
    an administrator first), with POSTGRES_REQUIRE_SYNC_STANDBY."""
    role = create_service_role(dbname, server=server)
    config = Config(
        postgres_host="127.0.0.1",
        postgres_port=server.port,
        postgres_db=dbname,
        postgres_user=role.name,
        postgres_password=role.password,
        postgres_require_sync_standby=True,
    )
    database = db.Database(config=config)
    database.open()
    return database


def _votes(count: int, *, seed: int) -> list[Vote]:
    return [parse_message(v.body(), max_bytes=4096).vote for v in make_votes(count, laws=3, seed=seed)]


def _sync_waiter(server: PgServer) -> int | None:
    """The pid of a service session whose commit waits for the synchronous standby, if any."""
    rows = server.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND application_name = 'vote-aggregator'"
    )
    return int(rows[0][0]) if rows else None


def test_a_commit_whose_wait_for_the_standby_is_cancelled_is_not_taken_for_replicated(sync_pair: Pair) -> None:
    primary, standby, dbname = sync_pair.primary, sync_pair.standby, sync_pair.dbname
    database = None
    try:
        # A default that would let commits skip the standby: the service's sessions override it.
        primary.execute(f"ALTER DATABASE {dbname} SET synchronous_commit = local")
        database = _database(primary, dbname)
        assert database.ensure_schema() is False  # applied by the administrator
        assert database.replication_state().synchronous_commit == "on"

        # The normal path: the commit waited for the standby. Written again (redeliveries only, no
        # WAL, no wait), it is proved by the standby's flush position instead.
        first = _votes(50, seed=81)
        assert database.write_batch(first).new_votes == len(first)
        assert database.write_batch(first).redeliveries == len(first)

        second = _votes(50, seed=82)
        with frozen(standby):
            raised: list[BaseException] = []

            def write() -> None:
                try:
                    database.write_batch(second)
                except BaseException as exc:
                    raised.append(exc)

            writer = threading.Thread(target=write)
            writer.start()
            # The commit waits for the standby; a cancel (an operator's pg_cancel_backend, a
            # pooler's timeout) ends the wait, and PostgreSQL reports it committed, with a WARNING.
            pid = wait_for(lambda: _sync_waiter(primary), timeout=30, what="a commit waiting for the standby")
            primary.execute("SELECT pg_cancel_backend(%s)", (pid,))
            writer.join(30)
            assert len(raised) == 1
            error = raised[0]
            assert isinstance(error, db.NotReplicated)
            assert "canceling wait for synchronous replication" in str(error)
            assert isinstance(error.outcome, db.BatchOutcome)
            assert error.outcome.new_votes == len(second)
            assert counted(primary, dbname) == len(first) + len(second)  # committed here, not on the standby
            # Writing it again proves nothing: it writes no WAL, and its commit does not wait.
            with pytest.raises(db.NotReplicated, match="did not wait for a synchronous standby"):
                database.write_batch(second)
        # The standby catches up: the same batch is now proved by its flush position.
        wait_for(lambda: _replicated(database, second), timeout=30, what="the batch known to be on the standby")
    finally:
        if database is not None:
            database.close()


def _replicated(database: db.Database, votes: list[Vote]) -> bool:
    try:
        database.write_batch(votes)
    except db.NotReplicated:
        return False
    return True


def test_no_vote_is_acked_while_the_synchronous_standby_is_frozen(
    services: MakeService, queue: str, sync_pair: Pair
) -> None:
    primary, standby, dbname = sync_pair.primary, sync_pair.standby, sync_pair.dbname
    prefetch, batch = 400, 100
    svc = services(
        primary,
        standby,
        dbname=dbname,
        POSTGRES_REQUIRE_SYNC_STANDBY="true",
        POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5",
        POSTGRES_QUERY_TIMEOUT_SECONDS="1",
        BATCH_SIZE=str(batch),
        # Only full batches: the one whose commit waits holds `batch` votes however slowly the
        # second votes arrive (with the tests' 0.2 s, a loaded machine once wrote 69 of them).
        BATCH_TIMEOUT_SECONDS="60",
        RABBITMQ_PREFETCH_COUNT=str(prefetch),
        **HA_RETRY,
    ).start()
    first = make_votes(1_000, laws=5, seed=83)
    publish(queue, [v.body() for v in first])
    wait_for(lambda: counted(primary, dbname) == len(first), timeout=60, what="the first votes counted")
    wait_for(lambda: svc.metric("oldest_unacked_delivery_age_seconds") == 0, timeout=30, what="all of them acked")

    second = make_votes(2_000, laws=5, seed=84)
    with frozen(standby):
        # Still attached, so still "sync" in pg_stat_replication: the periodic check sees nothing
        # wrong, and consuming goes on. Each commit waits; the first wait is cancelled (PostgreSQL
        # then reports the batch committed, with a WARNING), the next ones never end.
        publish(queue, [v.body() for v in second])
        pid = wait_for(lambda: _sync_waiter(primary), timeout=30, what="a commit waiting for the standby")
        retries = svc.metric("database_retries_total")
        primary.execute("SELECT pg_cancel_backend(%s)", (pid,))
        handed_over = len(second) - prefetch  # ready while RabbitMQ waits for acks

        # Retried and found unproven each time, past MAX_RETRY_ATTEMPTS (3): an outage. An ack
        # would instead have RabbitMQ hand over more votes.
        def retried_or_acked() -> bool:
            return svc.metric("database_retries_total") >= retries + 4 or queue_state(queue)[0] < handed_over

        wait_for(retried_or_acked, timeout=30, what="more retries, or an ack")
        # The cancelled batch is committed on the primary, and not acked: RabbitMQ has handed
        # over one prefetch window of the second votes and no more.
        assert queue_state(queue) == (handed_over, 1)
        assert counted(primary, dbname) == len(first) + batch
        assert "canceling wait for synchronous replication" in svc.logs()
        wait_for(lambda: svc.http("/readyz")[0] == 503, timeout=10, what="not ready")
        assert "not known to be on a synchronous standby" in svc.http("/readyz")[1]
        assert svc.http("/healthz")[0] == 200
    # The standby catches up: the batch is proved by its flush position, and counting goes on.
    wait_for(lambda: counted(primary, dbname) == len(first) + len(second), timeout=120, what="every vote counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=60, what="the queue drained")
    # The metrics count the cancelled batch's votes once, when they were committed.
    aggregated = [v for (name, _labels), v in svc.metrics().items() if name == "votes_aggregated_total"]
    assert sum(aggregated) == len(first) + len(second)
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, first + second, server=primary)


def _replayed(standby: PgServer) -> bool:
    """The standby has applied all it received (its primary being gone, nothing more comes)."""
    rows = standby.execute(
        "SELECT pg_last_wal_receive_lsn() IS NULL OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn()"
    )
    return bool(rows[0][0])


def test_after_a_failover_nothing_is_acked_on_a_promoted_server_without_a_standby(
    services: MakeService, queue: str
) -> None:
    primary, standby = pair(synchronous=True)
    another: PgStandby | None = None
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(3_000, laws=10, seed=85)
        publish(queue, [v.body() for v in votes])
        # The replication state is read every 5 s (the default): a failover manager that promotes
        # the standby at once puts the promoted server in the service's hands before the next check.
        svc = services(primary, standby, POSTGRES_REQUIRE_SYNC_STANDBY="true", **HA_RETRY).start()
        wait_for(lambda: counted(primary) > 1_000, timeout=60, interval=0.02, what="counting under way")
        # A crash, with batches in the service's hands: a lock holds its next commit back while a
        # backlog (support.BACKLOG) is published, so they are there however fast this machine counts.
        with backlog_held_back(lambda: primary.connect(DB), queue, votes, seed=90, laws=10):
            primary.stop(mode="immediate")
        # What the old primary acked is on the standby: read it there before it is promoted.
        wait_for(lambda: _replayed(standby), timeout=30, what="the standby to replay what it received")
        replicated = counted(standby)
        standby.promote()  # with synchronous_standby_names empty: no standby of its own

        # The batch in hand is written on the promoted server, which has no standby: not acked, and
        # the hold then stops consuming. Every vote not acked goes back to RabbitMQ.
        wait_for(lambda: counted(standby) > replicated, timeout=60, what="a batch written on the promoted server")
        wait_for(lambda: svc.metric("vote_consumption_held") == 1, timeout=30, what="the hold")
        wait_for(lambda: queue_state(queue)[1] == 0, timeout=30, what="no consumer")
        acked = len(votes) - queue_state(queue)[0]
        print(
            f"\nSYNC failover: {acked} votes acked, {replicated} on the standby when it was promoted, "
            f"{counted(standby) - replicated} written on it (not acked) before the hold"
        )
        assert acked <= replicated
        assert "not known to be on a synchronous standby" in svc.logs()
        assert svc.http("/healthz")[0] == 200

        # The promoted server gets a synchronous standby: counting goes on, every vote once.
        another = PgStandby(standby)
        another.start()
        standby.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        standby.execute("SELECT pg_reload_conf()")
        another.wait_streaming(sync_state="sync")
        wait_for(lambda: counted(standby) == len(votes), timeout=120, what="every vote counted")
        wait_for(lambda: queue_state(queue)[0] == 0, timeout=60, what="the queue drained")
        assert svc.metric("vote_consumption_held") == 0
        assert svc.stop() == 0
        assert_all_counted_once(DB, queue, votes, server=standby)
    finally:
        if another is not None:
            another.remove()
        standby.remove()
        primary.remove()
