"""The batch pipeline against the real PostgreSQL: its one retry policy, and its shutdown bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

import db
from config import Config
from health import Health
from metrics import Metrics
from pipeline import Buffer, Delivery, Pipeline
from summary import Summary
from systemd import Notifier
from tests.proxy import TcpProxy
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    POSTGRES_USER,
    apply_schema,
    deadlock_partner,
    query,
    wait_for,
    waiting_on,
)
from votes import Vote


class _Settled:
    def __init__(self) -> None:
        self.committed: list[int] = []
        self.rejected: list[int] = []
        self.calls = threading.Event()

    def __call__(self, committed: list[Delivery], rejected: list[Delivery]) -> None:
        self.committed += [d.tag for d in committed]
        self.rejected += [d.tag for d in rejected]
        self.calls.set()


def _pipeline(
    dbname: str,
    *,
    port: int = POSTGRES_PORT,
    host: str = POSTGRES_HOST,
    on_fatal: Callable[[str], None] = lambda _reason: None,
    **settings: Any,
) -> tuple[Pipeline, db.Database, Metrics, _Settled]:
    config = Config(
        postgres_host=host,
        postgres_port=port,
        postgres_user=POSTGRES_USER,
        postgres_db=dbname,
        postgres_min_connections=1,
        batch_timeout_s=0.05,
        **{"retry_delay_s": 0.1, **settings},
    )
    database = db.Database(config=config)
    database.open()
    metrics = Metrics(CollectorRegistry())
    settled = _Settled()
    pipeline = Pipeline(
        config=config,
        database=database,
        metrics=metrics,
        summary=Summary(interval_s=0),
        settle=settled,
        on_fatal=on_fatal,
    )
    return pipeline, database, metrics, settled


def _vote(n: int, law: str = "law-x") -> Vote:
    return Vote(f"{n:064x}", f"citizen-{n}", law, "oui", datetime(2025, 11, 14, 12, tzinfo=UTC))


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


def test_a_deadlock_is_retried_as_a_conflict_and_counted_once(dbname: str) -> None:
    # Another session holds the law's row and then inserts the batch's hash: a
    # lock cycle, and PostgreSQL aborts the batch. Contention is not an outage:
    # the batch is retried whole and counted once, and database_up stays 1.
    apply_schema(dbname)
    query(dbname, "INSERT INTO vote_results (law_id) VALUES ('law-x')")
    other = deadlock_partner(dbname)  # before the pipeline connects
    pipeline, database, metrics, settled = _pipeline(dbname)
    vote = _vote(1)
    try:
        metrics.database_up.set(1)
        with other.cursor() as cur:
            cur.execute("UPDATE vote_results SET updated_at = now() WHERE law_id = 'law-x'")
        pipeline.start()
        pipeline.buffer.extend([Delivery(vote, 7, 1, time.monotonic())])
        wait_for(lambda: waiting_on(dbname, other), timeout=10, interval=0.02, what="the batch waiting for the row")
        with other.cursor() as cur:
            cur.execute(
                'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") '
                "VALUES (%s, 'someone', 'law-x', 'non', now())",
                (vote.vote_hash,),
            )
        other.rollback()
        assert settled.calls.wait(30)
        assert pipeline.finish(deadline=time.monotonic() + 10, idle=lambda: time.sleep(0.01))
    finally:
        other.close()
        database.close()
    assert settled.committed == [7]
    assert settled.rejected == []
    assert _value(metrics, "database_retries_total") >= 1
    assert _value(metrics, "database_up") == 1
    assert pipeline.database_error is None
    assert query(dbname, "SELECT oui_count, non_count FROM vote_results WHERE law_id = 'law-x'") == [(1, 0)]
    assert query(dbname, "SELECT citizen_id FROM vote_audit") == [("citizen-1",)]


def test_the_shutdown_budget_cuts_a_long_retry_wait_short(dbname: str) -> None:
    apply_schema(dbname)
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    # A retry wait of an hour: the flush worker leaves it within the test only if it is cut short.
    pipeline, database, metrics, settled = _pipeline(
        dbname,
        host="127.0.0.1",
        port=proxy.port,
        retry_delay_s=3600.0,
        retry_max_delay_s=3600.0,
        max_retry_attempts=5,
    )
    try:
        proxy.refuse()
        proxy.cut()  # the pooled connection dies, and no new one can be made
        pipeline.start()
        pipeline.buffer.extend([Delivery(_vote(2), 1, 1, time.monotonic())])
        wait_for(lambda: _value(metrics, "database_retries_total") >= 1, timeout=10, what="the first retry wait")
        finished = pipeline.finish(deadline=time.monotonic() + 1.0, idle=lambda: time.sleep(0.01))
        wait_for(lambda: not pipeline.writing, timeout=30, what="the flush worker to leave its hour-long retry wait")
    finally:
        database.close()
        proxy.close()
    assert not finished
    assert settled.committed == []
    assert pipeline.unsettled == 1
    assert query(dbname, "SELECT count(*) FROM vote_audit") == [(0,)]


def test_the_shutdown_budget_ends_a_query_postgres_never_answers(dbname: str) -> None:
    apply_schema(dbname)
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    pipeline, database, _metrics, settled = _pipeline(dbname, host="127.0.0.1", port=proxy.port)
    try:
        database.ping()
        proxy.pause()  # PostgreSQL (or the path to it) stops answering mid-query
        pipeline.start()
        pipeline.buffer.extend([Delivery(_vote(3), 1, 1, time.monotonic())])
        wait_for(proxy.holding, timeout=10, interval=0.01, what="the batch's query sent and held back")
        # finish() keeps to its deadline (a hang is the test's timeout), then ends the query that
        # never returns: the flush worker leaves, with the proxy still paused.
        finished = pipeline.finish(deadline=time.monotonic() + 1.0, idle=lambda: time.sleep(0.01))
        wait_for(lambda: not pipeline.writing, timeout=30, what="the hung query ended and the flush worker gone")
        database.close()
    finally:
        proxy.close()
    assert not finished
    assert settled.committed == []


def test_a_bunch_of_deliveries_that_fills_two_batches_wakes_two_writers() -> None:
    # The consumer hands deliveries over in bunches: each batch a bunch fills must wake a
    # writer of its own, or the second waits for the timeout with several writers idle.
    # A writer not woken would sleep out its wait (an hour) or the batch timeout (an hour): the two
    # batches are taken within the test only if the bunch woke two writers.
    buffer = Buffer(batch_size=2, timeout_s=3600.0)
    taken: list[list[int]] = []
    lock = threading.Lock()

    def writer() -> None:
        batch = buffer.take(wait_s=3600.0)
        with lock:
            taken.append([d.tag for d in batch.deliveries] if batch else [])

    writers = [threading.Thread(target=writer, daemon=True) for _ in range(3)]
    for thread in writers:
        thread.start()
    # All three asleep in take() before the bunch arrives (CPython's Condition lists its waiters).
    wait_for(lambda: len(buffer._cond._waiters) == 3, timeout=10, interval=0.01, what="three writers waiting")  # type: ignore[attr-defined]
    buffer.extend([Delivery(_vote(n), n, 1, time.monotonic()) for n in range(1, 6)])
    wait_for(lambda: len(taken) == 2, timeout=30, interval=0.01, what="two batches taken by two writers")

    with lock:
        assert sorted(taken) == [[1, 2], [3, 4]]
    assert len(buffer) == 1  # the fifth waits for its batch to fill or time out
    # The third writer, still waiting, takes the fifth once its batch fills.
    buffer.extend([Delivery(_vote(6), 6, 1, time.monotonic())])
    for thread in writers:
        thread.join(timeout=30)
    assert sorted(taken) == [[1, 2], [3, 4], [5, 6]]


class _Consuming:
    """A consumer that receives as fast as votes come: liveness then depends on the pipeline alone."""

    consuming = True
    stopping = False
    queue_ready: int | None = 0

    def __init__(self) -> None:
        self.received_at = time.monotonic()


def test_a_systematic_failure_fails_liveness_and_leaves_its_batch_unsettled(dbname: str) -> None:
    apply_schema(dbname)
    fatal: list[str] = []
    pipeline, database, metrics, settled = _pipeline(dbname, on_fatal=fatal.append, max_unexpected_rejections=3)

    def raises(votes: Sequence[Vote], *, chain: str | None = None) -> db.BatchOutcome:
        raise TypeError("a driver that changed what it hands back")

    database.write_batch = raises  # type: ignore[method-assign]  # a bug in the service's own code
    health = Health(stall_timeout_s=120, notifier=Notifier({}))
    health.watch(consumer=_Consuming(), pipeline=pipeline)
    try:
        assert health.liveness() == (True, "ok")
        pipeline.start()
        pipeline.buffer.extend([Delivery(_vote(n), n, 1, time.monotonic()) for n in range(1, 21)])
        wait_for(lambda: fatal, timeout=10, what="the service told to stop")
        wait_for(lambda: not pipeline.writing, timeout=10, what="the flush worker to stop writing")
    finally:
        database.close()
    alive, reason = health.liveness()
    assert not alive
    assert "more than 3 votes refused as unexpected" in reason
    assert fatal == [reason]
    # Three votes were refused before the fourth tripped it, in the same batch: that batch is not
    # settled at all, so none of its votes is dead-lettered; RabbitMQ redelivers them all.
    assert settled.committed == []
    assert settled.rejected == []
    assert pipeline.unsettled == 1
    assert _value(metrics, "aggregation_errors_total", error_type="systematic_failure") == 1
    assert _value(metrics, "votes_rejected_total", reason="unexpected") == 3
    assert query(dbname, "SELECT count(*) FROM vote_audit") == [(0,)]


def test_an_integrity_failure_is_counted_stops_the_service_and_leaves_its_batch_unsettled(dbname: str) -> None:
    # A DBA's ingest trigger turns every "non" into "oui" as rows are stored: the batch is neither
    # retried nor dead-lettered, vote_integrity_failures_total (which pages) counts it.
    apply_schema(dbname)
    query(
        dbname,
        "CREATE FUNCTION flip() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.choice = 'non' THEN NEW.choice := 'oui'; END IF; RETURN NEW; END $$",
    )
    query(dbname, "CREATE TRIGGER flip BEFORE INSERT ON vote_audit FOR EACH ROW EXECUTE FUNCTION flip()")
    fatal: list[str] = []
    pipeline, database, metrics, settled = _pipeline(dbname, on_fatal=fatal.append)
    votes = [Vote(f"{n:064x}", f"citizen-{n}", "law-x", ("oui", "non")[n % 2], _vote(n).timestamp) for n in range(10)]
    try:
        pipeline.start()
        pipeline.buffer.extend([Delivery(v, n + 1, 1, time.monotonic()) for n, v in enumerate(votes)])
        wait_for(lambda: fatal, timeout=10, what="the service told to stop")
        # What the service does once told to stop (aggregator.py: the consumer stops, the pipeline finishes).
        pipeline.finish(deadline=time.monotonic() + 10, idle=lambda: time.sleep(0.01))
        assert not pipeline.writing
    finally:
        database.close()
    assert len(fatal) == 1
    assert fatal[0].startswith("integrity failure: PostgreSQL stored 10 audit rows that differ from the 10 new votes")
    assert _value(metrics, "vote_integrity_failures_total") == 1
    assert _value(metrics, "database_retries_total") == 0
    assert settled.committed == []
    assert settled.rejected == []
    assert pipeline.unsettled == 1
    assert query(dbname, "SELECT count(*) FROM vote_audit") == [(0,)]
