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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

import db
from config import Config
from tests import pg_servers
from tests.pg_replication import STANDBY_NAME, PgStandby, frozen, pair
from tests.pg_servers import PgServer
from tests.roles import INIT_DB, SERVICE_ROLE
from tests.support import (
    Service,
    VoteMsg,
    expected_totals,
    make_votes,
    publish,
    queue_state,
    run_cli,
    service_env,
    stop_all,
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


@pytest.fixture
def services(tmp_path: Path, queue: str) -> Iterator[MakeService]:
    started: list[Service] = []

    def make(env: dict[str, str]) -> Service:
        svc = Service(queue=queue, dbname=DB, log_path=tmp_path / f"service-{len(started)}.log", env=env)
        started.append(svc)
        return svc

    yield make
    stop_all(started)


def hosts(*servers: PgServer, **extra: str) -> dict[str, str]:
    """The service's settings for these servers, in this order (libpq's lists)."""
    return {
        "POSTGRES_HOST": ",".join("127.0.0.1" for _ in servers),
        "POSTGRES_PORT": ",".join(str(s.port) for s in servers),
        "POSTGRES_DB": DB,
        **extra,
    }


def counted(server: PgServer) -> int:
    try:
        return int(server.execute("SELECT count(*) FROM vote_audit", dbname=DB)[0][0])
    except psycopg2.Error:
        return -1  # not answering (yet), or no schema yet


def probe(svc: Service, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def assert_counted_once(server: PgServer, queue: str, votes: list[VoteMsg]) -> None:
    """Every vote counted once on `server`, no duplicate attempt, the invariant, the queue empty."""
    rows = server.execute("SELECT law_id, oui_count, non_count FROM vote_results", dbname=DB)
    assert {law: (int(oui), int(non)) for law, oui, non in rows if oui or non} == expected_totals(votes)
    assert counted(server) == len(votes)
    assert server.execute("SELECT count(*) FROM duplicate_attempts", dbname=DB) == [(0,)]
    grouped: dict[str, list[int]] = {}
    for law, choice, n in server.execute("SELECT law_id, choice, count(*) FROM vote_audit GROUP BY 1, 2", dbname=DB):
        grouped.setdefault(law, [0, 0])[0 if choice == "oui" else 1] = int(n)
    assert {law: (int(oui), int(non)) for law, oui, non in rows} == {law: (o, n) for law, (o, n) in grouped.items()}
    assert queue_state(queue) == (0, 0)


def seconds_until_counting(server: PgServer, since: float, *, timeout: float = 60) -> float:
    """Seconds from `since` until `server` counts a vote it had not counted when this was called."""
    before = counted(server)
    wait_for(lambda: counted(server) > before, timeout=timeout, interval=0.05, what="counting again")
    return time.monotonic() - since


def still_running(svc: Service) -> bool:
    assert svc.proc is not None
    return svc.proc.poll() is None


# -- failover ------------------------------------------------------------------------------------


def test_a_crashed_primary_and_a_promoted_synchronous_standby_lose_and_double_nothing(
    services: MakeService, queue: str
) -> None:
    primary, standby = pair(synchronous=True)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(40_000, laws=20, seed=61)
        publish(queue, [v.body() for v in votes])
        svc = services(hosts(primary, standby, **HA_RETRY)).start()
        assert f"PostgreSQL replication on 127.0.0.1:{primary.port}: synchronous" in svc.logs()
        assert svc.metric("database_failover_safe") == 1
        assert svc.metric("database_synchronous_standbys") == 1

        wait_for(lambda: counted(primary) > 5_000, timeout=60, interval=0.02, what="counting under way")
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
        assert still_running(svc)
        logs = svc.logs()
        assert f"writing to the PostgreSQL primary at 127.0.0.1:{standby.port}" in logs
        # The new primary has no standby: the service says so.
        wait_for(lambda: svc.metric("database_failover_safe") == 0, timeout=30, what="the risk reported")
        assert f"PostgreSQL replication on 127.0.0.1:{standby.port}: no standby" in svc.logs()
        assert svc.stop() == 0
        assert_counted_once(standby, queue, votes)
    finally:
        standby.remove()
        primary.remove()


# -- acked means durable ---------------------------------------------------------------------------


def test_with_require_sync_standby_consuming_stops_while_the_standby_is_away(services: MakeService, queue: str) -> None:
    primary, standby = pair(synchronous=True)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(30_000, laws=10, seed=62)
        publish(queue, [v.body() for v in votes])
        svc = services(
            hosts(
                primary,
                standby,
                POSTGRES_REQUIRE_SYNC_STANDBY="true",
                POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5",
                **HA_RETRY,
            )
        ).start()
        assert probe(svc, "/readyz") == (200, "ready\n")
        wait_for(lambda: counted(primary) > 3_000, timeout=60, interval=0.02, what="counting under way")

        # The standby goes: commits wait for it, and the service stops consuming. Every vote it held,
        # buffered or being written, goes back to RabbitMQ: each one is counted or ready in the queue.
        standby.stop(mode="fast")
        wait_for(lambda: probe(svc, "/readyz")[0] == 503, timeout=30, what="not ready without a sync standby")
        assert "POSTGRES_REQUIRE_SYNC_STANDBY" in probe(svc, "/readyz")[1]
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
        assert probe(svc, "/healthz")[0] == 200
        assert "not consuming: POSTGRES_REQUIRE_SYNC_STANDBY=true" in svc.logs()

        # It comes back: consuming goes on, and everything is counted exactly once.
        standby.start()
        wait_for(lambda: probe(svc, "/readyz")[0] == 200, timeout=60, what="ready again")
        wait_for(lambda: counted(primary) == len(votes), timeout=120, what="every vote counted")
        assert svc.metric("database_failover_safe") == 1
        assert svc.metric("vote_consumption_held") == 0
        assert still_running(svc)
        assert svc.stop() == 0
        assert_counted_once(primary, queue, votes)
    finally:
        standby.remove()
        primary.remove()


def test_an_asynchronous_standby_is_reported_and_held_to_when_required(
    services: MakeService, queue: str, queue_names: list[str]
) -> None:
    primary, standby = pair(synchronous=False)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        # By default the service counts, and says what a failover could lose.
        votes = make_votes(2_000, laws=5, seed=63)
        publish(queue, [v.body() for v in votes])
        svc = services(hosts(primary, standby)).start()
        wait_for(lambda: counted(primary) == len(votes), timeout=60, what="votes counted")
        assert svc.metric("database_failover_safe") == 0
        assert svc.metric("database_standbys") == 1
        assert svc.metric("database_synchronous_standbys") == 0
        line = next(line for line in svc.logs().splitlines() if "PostgreSQL replication on" in line)
        assert "WARNING" in line
        assert f"asynchronous to {STANDBY_NAME}" in line
        assert "a failover can lose the votes acked just before it" in line
        assert probe(svc, "/readyz")[0] == 200
        assert svc.stop() == 0

        # Required: nothing is consumed, from the start, until a synchronous standby has every commit.
        more = make_votes(2_000, laws=5, seed=64)
        publish(queue, [v.body() for v in more])
        held = services(
            hosts(
                primary,
                standby,
                POSTGRES_REQUIRE_SYNC_STANDBY="true",
                POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5",
            )
        ).start(wait_consuming=False)
        wait_for(lambda: "not consuming: POSTGRES_REQUIRE_SYNC_STANDBY" in held.logs(), timeout=30, what="the hold")
        status, reason = probe(held, "/readyz")
        assert status == 503
        assert "synchronous_standby_names is empty" in reason
        assert queue_state(queue) == (len(more), 0)
        assert counted(primary) == len(votes)

        primary.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        primary.execute("SELECT pg_reload_conf()")
        wait_for(lambda: probe(held, "/readyz")[0] == 200, timeout=30, what="ready once the standby is synchronous")
        wait_for(lambda: counted(primary) == len(votes) + len(more), timeout=60, what="the held votes counted")
        assert held.metric("database_failover_safe") == 1
        assert held.stop() == 0
        assert_counted_once(primary, queue, votes + more)
    finally:
        standby.remove()
        primary.remove()


# -- a single server restarted for real ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_single_server_restarted_under_load(services: MakeService, queue: str, mode: str) -> None:
    server = PgServer(settings={"synchronous_commit": "on"})  # a crash must not lose acknowledged commits
    try:
        server.start()
        server.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(30_000, laws=10, seed=65 if mode == "fast" else 66)
        publish(queue, [v.body() for v in votes])
        # Retries every 0.1 s, so that the service meets the server while it shuts down and starts up.
        svc = services(
            hosts(server, RETRY_DELAY_SECONDS="0.1", RETRY_MAX_DELAY_SECONDS="0.1", MAX_RETRY_ATTEMPTS="100")
        ).start()
        wait_for(lambda: counted(server) > 3_000, timeout=60, interval=0.02, what="counting under way")

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
        assert still_running(svc)
        met = [m for m in SERVER_MESSAGES if m in svc.logs()]
        print(f"the service met: {met}")
        assert "Retrying a batch" in svc.logs()
        assert svc.stop() == 0
        assert_counted_once(server, queue, votes)
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
        svc = services(hosts(server, **HA_RETRY, MAX_RETRY_ATTEMPTS="1")).start()
        wait_for(lambda: counted(server) == len(first), timeout=30, what="votes counted")

        server.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        server.execute("SELECT pg_reload_conf()")
        more = make_votes(500, laws=3, seed=68)
        publish(queue, [v.body() for v in more])
        wait_for(lambda: probe(svc, "/readyz")[0] == 503, timeout=30, what="not ready while read-only")
        assert "the server accepts no writes" in svc.logs()
        assert counted(server) == len(first)

        server.execute("ALTER SYSTEM RESET default_transaction_read_only")
        server.execute("SELECT pg_reload_conf()")
        wait_for(lambda: counted(server) == len(first) + len(more), timeout=60, what="counted once writable again")
        assert svc.metric("votes_rejected_total", reason="database_rejected") == 0
        assert svc.stop() == 0
        assert_counted_once(server, queue, first + more)
    finally:
        server.remove()


def test_a_standby_listed_first_is_skipped_for_the_primary(services: MakeService, queue: str) -> None:
    primary, standby = pair(synchronous=False)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        votes = make_votes(300, laws=3, seed=69)
        publish(queue, [v.body() for v in votes])
        svc = services(hosts(standby, primary)).start()
        wait_for(lambda: counted(primary) == len(votes), timeout=30, what="votes counted on the primary")
        assert f"writing to the PostgreSQL primary at 127.0.0.1:{primary.port}" in svc.logs()
        assert svc.stop() == 0
        assert_counted_once(primary, queue, votes)
    finally:
        standby.remove()
        primary.remove()


def test_the_least_privilege_role_sees_the_standbys_through_its_function_only(
    services: MakeService, queue: str
) -> None:
    primary, standby = pair(synchronous=False)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        role = "agg_ha_reader"
        conn = primary.connect(DB)
        try:
            with conn.cursor() as cur:
                cur.execute(INIT_DB.read_text())
                cur.execute(f"CREATE ROLE {role} LOGIN")
                cur.execute("SET vote_aggregator.service_role = %s", (role,))
                cur.execute(SERVICE_ROLE.read_text())
                # Without the function (an older schema, or the grant taken back), the role sees
                # pg_stat_replication's rows but not their state.
                cur.execute(f"REVOKE EXECUTE ON FUNCTION vote_replication_standbys() FROM {role}")
        finally:
            conn.close()
        votes = make_votes(300, laws=3, seed=70)
        publish(queue, [v.body() for v in votes])
        svc = services(hosts(primary, standby, POSTGRES_USER=role, POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5"))
        svc.start()
        wait_for(lambda: counted(primary) == len(votes), timeout=30, what="votes counted under the role")
        assert f"unknown, role {role} cannot see the standbys' state in pg_stat_replication" in svc.logs()
        assert "apply init_db.sql and service_role.sql again" in svc.logs()
        assert svc.metric("database_failover_safe") == 0
        assert svc.metric("database_standbys") == 1
        assert primary.execute("SELECT pg_has_role(%s, 'pg_read_all_stats', 'USAGE')", (role,)) == [(False,)]

        # service_role.sql grants it again: the state is read through the function, with no
        # pg_read_all_stats (which would also show the role every session's queries).
        conn = primary.connect(DB)
        try:
            with conn.cursor() as cur:
                cur.execute("SET vote_aggregator.service_role = %s", (role,))
                cur.execute(SERVICE_ROLE.read_text())
        finally:
            conn.close()
        wait_for(lambda: f"asynchronous to {STANDBY_NAME}" in svc.logs(), timeout=30, what="the state read")
        assert primary.execute("SELECT pg_has_role(%s, 'pg_read_all_stats', 'USAGE')", (role,)) == [(False,)]
        assert svc.stop() == 0
        assert_counted_once(primary, queue, votes)
    finally:
        standby.remove()
        primary.remove()


def test_check_names_the_primary_and_what_a_failover_could_lose(queue: str) -> None:
    primary, standby = pair(synchronous=True)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        assert run_cli("--init-db", env=service_env(dbname=DB, **hosts(primary, standby))).returncode == 0
        result = run_cli("--check", env=service_env(dbname=DB, queue=queue, **hosts(standby, primary)))
        assert result.returncode == 0, result.stderr
        assert f"schema complete (writes go to 127.0.0.1:{primary.port})" in result.stdout
        assert f"ok: PostgreSQL replication on 127.0.0.1:{primary.port}: synchronous" in result.stdout
    finally:
        standby.remove()
        primary.remove()


# -- acked means on two servers, per commit ----------------------------------------------------------


def _database(server: PgServer, **settings: object) -> db.Database:
    """The service's database layer on `server`, with POSTGRES_REQUIRE_SYNC_STANDBY."""
    config = Config(
        postgres_host="127.0.0.1",
        postgres_port=server.port,
        postgres_db=DB,
        postgres_user="postgres",
        postgres_require_sync_standby=True,
        **settings,  # type: ignore[arg-type]
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


def test_a_commit_whose_wait_for_the_standby_is_cancelled_is_not_taken_for_replicated() -> None:
    primary, standby = pair(synchronous=True)
    database = None
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        # A default that would let commits skip the standby: the service's sessions override it.
        primary.execute(f"ALTER DATABASE {DB} SET synchronous_commit = local")
        database = _database(primary)
        database.ensure_schema()
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
            assert counted(primary) == len(first) + len(second)  # committed here, not on the standby
            # Writing it again proves nothing: it writes no WAL, and its commit does not wait.
            with pytest.raises(db.NotReplicated, match="did not wait for a synchronous standby"):
                database.write_batch(second)
        # The standby catches up: the same batch is now proved by its flush position.
        wait_for(lambda: _replicated(database, second), timeout=30, what="the batch known to be on the standby")
    finally:
        if database is not None:
            database.close()
        standby.remove()
        primary.remove()


def _replicated(database: db.Database, votes: list[Vote]) -> bool:
    try:
        database.write_batch(votes)
    except db.NotReplicated:
        return False
    return True


def test_no_vote_is_acked_while_the_synchronous_standby_is_frozen(services: MakeService, queue: str) -> None:
    primary, standby = pair(synchronous=True)
    try:
        primary.execute(f"CREATE DATABASE {DB}")
        prefetch, batch = 400, 100
        svc = services(
            hosts(
                primary,
                standby,
                POSTGRES_REQUIRE_SYNC_STANDBY="true",
                POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS="0.5",
                POSTGRES_QUERY_TIMEOUT_SECONDS="1",
                BATCH_SIZE=str(batch),
                RABBITMQ_PREFETCH_COUNT=str(prefetch),
                **HA_RETRY,
            )
        ).start()
        first = make_votes(1_000, laws=5, seed=83)
        publish(queue, [v.body() for v in first])
        wait_for(lambda: counted(primary) == len(first), timeout=60, what="the first votes counted")
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
            assert counted(primary) == len(first) + batch
            assert "canceling wait for synchronous replication" in svc.logs()
            wait_for(lambda: probe(svc, "/readyz")[0] == 503, timeout=10, what="not ready")
            assert "not known to be on a synchronous standby" in probe(svc, "/readyz")[1]
            assert probe(svc, "/healthz")[0] == 200
        # The standby catches up: the batch is proved by its flush position, and counting goes on.
        wait_for(lambda: counted(primary) == len(first) + len(second), timeout=120, what="every vote counted")
        wait_for(lambda: queue_state(queue)[0] == 0, timeout=60, what="the queue drained")
        # The metrics count the cancelled batch's votes once, when they were committed.
        aggregated = [v for (name, _labels), v in svc.metrics().items() if name == "votes_aggregated_total"]
        assert sum(aggregated) == len(first) + len(second)
        assert svc.stop() == 0
        assert_counted_once(primary, queue, first + second)
    finally:
        standby.remove()
        primary.remove()


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
        votes = make_votes(10_000, laws=10, seed=85)
        publish(queue, [v.body() for v in votes])
        # The replication state is read every 5 s (the default): a failover manager that promotes
        # the standby at once puts the promoted server in the service's hands before the next check.
        svc = services(hosts(primary, standby, POSTGRES_REQUIRE_SYNC_STANDBY="true", **HA_RETRY)).start()
        wait_for(lambda: counted(primary) > 2_000, timeout=60, interval=0.02, what="counting under way")
        primary.stop(mode="immediate")  # a crash, with batches in the service's hands
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
        assert probe(svc, "/healthz")[0] == 200

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
        assert_counted_once(standby, queue, votes)
    finally:
        if another is not None:
            another.remove()
        standby.remove()
        primary.remove()
