"""The batch transaction on its own, against the real PostgreSQL."""

from __future__ import annotations

import json
import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import db
from config import Config
from tests.proxy import TcpProxy
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    POSTGRES_USER,
    apply_schema,
    deadlock_partner,
    pg_connect,
    query,
    set_database_default,
    wait_for,
    waiting_on,
)
from votes import Vote, parse_message


def _database(dbname: str, **settings: Any) -> db.Database:
    config = Config(
        postgres_host=POSTGRES_HOST,
        postgres_port=POSTGRES_PORT,
        postgres_user=POSTGRES_USER,
        postgres_db=dbname,
        retry_delay_s=0.1,
        **settings,
    )
    database = db.Database(config=config)
    database.open()
    return database


def _service_backends(dbname: str) -> set[int]:
    """The backend pids of the connections db.Database holds in `dbname`."""
    rows = query(
        dbname,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'vote-aggregator'",
    )
    return {pid for (pid,) in rows}


@pytest.mark.slow
def test_a_deadlock_is_a_conflict_that_leaves_nothing_behind(dbname: str) -> None:
    # Another session holds the law's row and then inserts the batch's hash: a
    # lock cycle. PostgreSQL aborts the batch (its check runs first, see deadlock_partner): a conflict,
    # rolled back whole; the pipeline's retry then counts the vote once
    # (tests/test_pipeline.py).
    apply_schema(dbname)
    query(dbname, "INSERT INTO vote_results (law_id) VALUES ('law-x')")
    other = deadlock_partner(dbname)  # before the service connects
    vote = Vote("ab" * 32, "citizen-1", "law-x", "oui", datetime(2025, 11, 14, 12, tzinfo=UTC))
    database = _database(dbname)
    try:
        backends = _service_backends(dbname)
        with other.cursor() as cur:
            cur.execute("UPDATE vote_results SET updated_at = now() WHERE law_id = 'law-x'")
        writer, raised = _in_thread(lambda: database.write_batch([vote]))
        wait_for(lambda: waiting_on(dbname, other), timeout=10, interval=0.02, what="the batch waiting for the row")
        with other.cursor() as cur:
            cur.execute(
                'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") '
                "VALUES (%s, 'someone', 'law-x', 'non', now())",
                (vote.vote_hash,),
            )
        other.rollback()
        writer.join(30)
        assert not writer.is_alive()
        assert raised
        assert isinstance(raised[0], db.TransactionConflict)
        assert "deadlock" in str(raised[0])
        assert query(dbname, "SELECT count(*) FROM vote_audit") == [(0,)]
        assert _service_backends(dbname) == backends  # the connection was kept
        assert database.write_batch([vote]).counted == {("law-x", "oui"): 1}
    finally:
        other.close()
        database.close()
    assert query(dbname, "SELECT oui_count, non_count FROM vote_results WHERE law_id = 'law-x'") == [(1, 0)]
    assert query(dbname, "SELECT citizen_id, choice FROM vote_audit") == [("citizen-1", "oui")]


def test_a_refused_row_raises_database_rejected_and_leaves_nothing(dbname: str) -> None:
    apply_schema(dbname)
    query(dbname, "ALTER TABLE vote_audit ADD CONSTRAINT test_refused CHECK (citizen_id <> 'refused')")
    good = Vote("cd" * 32, "citizen-2", "law-y", "non", datetime(2025, 11, 14, 12, tzinfo=UTC))
    bad = Vote("ef" * 32, "refused", "law-y", "oui", datetime(2025, 11, 14, 12, tzinfo=UTC))
    database = _database(dbname)
    try:
        with pytest.raises(db.DatabaseRejected):
            database.write_batch([good, bad])
        # Nothing of the refused batch stayed: the transaction is all or nothing.
        assert query(dbname, "SELECT count(*) FROM vote_audit") == [(0,)]
        assert database.write_batch([good]).counted == {("law-y", "non"): 1}
    finally:
        database.close()


def test_timestamps_read_back_unchanged_whatever_the_database_timezone(dbname: str) -> None:
    # West of UTC, 0001-01-01T00:00:00Z is a BC date: read back in the database's
    # time zone, it raised "year -1 is out of range" and the redelivery never settled.
    apply_schema(dbname)
    set_database_default(dbname, "timezone", "America/New_York")
    assert query(dbname, "SHOW timezone") == [("America/New_York",)]
    vote = Vote("01" * 32, "citizen-tz", "law-tz", "oui", datetime(1, 1, 1, tzinfo=UTC))
    database = _database(dbname)
    try:
        assert database.write_batch([vote]).counted == {("law-tz", "oui"): 1}
        again = database.write_batch([vote])  # a redelivery
    finally:
        database.close()
    assert (again.counted, again.redeliveries, again.duplicate_attempts) == ({}, 1, 0)
    assert query(dbname, "SELECT count(*) FROM duplicate_attempts") == [(0,)]
    assert query(dbname, "SELECT oui_count, non_count FROM vote_results WHERE law_id = 'law-tz'") == [(1, 0)]


def test_timestamps_sent_as_written_are_stored_as_the_instant_parse_message_read(dbname: str) -> None:
    # The batch statement sends a common-form timestamp as the producer wrote it rather than
    # formatting the datetime again: PostgreSQL must read that text to exactly Vote.timestamp.
    rng = random.Random(13)
    texts = ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "2024-02-29T12:00:00.5Z", "2026-11-29T10:00:00Z"]
    for _ in range(400):
        moment = datetime(1, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.uniform(0, 315_537_897_599))
        digits = rng.randint(0, 6)
        fraction = f".{rng.randrange(10**digits):0{digits}d}" if digits else ""
        texts.append(moment.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + fraction + "Z")
    votes = []
    for i, text in enumerate(texts):
        body = json.dumps(
            {"vote_hash": f"{i:064x}", "citizen_id": f"c-{i}", "law_id": "law-ts", "choice": "oui", "timestamp": text}
        )
        vote = parse_message(body.encode(), max_bytes=10_000).vote
        assert vote.timestamp_text == text
        votes.append(vote)
    apply_schema(dbname)
    database = _database(dbname)
    try:
        assert database.write_batch(votes).counted == {("law-ts", "oui"): len(votes)}
    finally:
        database.close()
    stored = dict(query(dbname, 'SELECT vote_hash, "timestamp" FROM vote_audit'))
    assert {v.vote_hash: v.timestamp for v in votes} == stored


def test_a_lock_wait_timeout_is_a_conflict_on_a_kept_connection(dbname: str) -> None:
    # Another session holds the law's row past the statement timeout: plain
    # contention, not a database failure. The wait ends as a lock timeout (55P03),
    # the transaction is rolled back and the connection kept.
    apply_schema(dbname)
    query(dbname, "INSERT INTO vote_results (law_id) VALUES ('law-x')")
    vote = Vote("ab" * 32, "citizen-1", "law-x", "oui", datetime(2025, 11, 14, 12, tzinfo=UTC))
    database = _database(dbname, postgres_query_timeout_s=1.0)
    other = pg_connect(dbname)
    other.autocommit = False
    try:
        backends = _service_backends(dbname)
        with other.cursor() as cur:
            cur.execute("UPDATE vote_results SET updated_at = now() WHERE law_id = 'law-x'")
        with pytest.raises(db.TransactionConflict, match="lock"):
            database.write_batch([vote])
        assert _service_backends(dbname) == backends
        other.rollback()
        assert database.write_batch([vote]).counted == {("law-x", "oui"): 1}
        assert _service_backends(dbname) == backends
    finally:
        other.close()
        database.close()


def test_a_statement_timeout_is_retried_on_a_kept_connection(dbname: str) -> None:
    # A server too slow to answer within the statement timeout (57014): retryable,
    # not a conflict; the session itself is fine and is kept.
    apply_schema(dbname)
    query(
        dbname,
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$",
    )
    query(dbname, "CREATE TRIGGER slow BEFORE INSERT ON vote_audit FOR EACH STATEMENT EXECUTE FUNCTION slow()")
    vote = Vote("cd" * 32, "citizen-2", "law-y", "non", datetime(2025, 11, 14, 12, tzinfo=UTC))
    database = _database(dbname, postgres_query_timeout_s=1.0)
    try:
        backends = _service_backends(dbname)
        with pytest.raises(db.DatabaseUnavailable, match="statement timeout") as raised:
            database.write_batch([vote])
        assert not isinstance(raised.value, db.TransactionConflict)
        assert _service_backends(dbname) == backends
        query(dbname, "DROP TRIGGER slow ON vote_audit")
        assert database.write_batch([vote]).counted == {("law-y", "non"): 1}
        assert _service_backends(dbname) == backends
    finally:
        database.close()


# -- shutdown never waits on PostgreSQL ---------------------------------------------------


def _through(proxy: TcpProxy, dbname: str, **settings: Any) -> db.Database:
    config = Config(
        postgres_host="127.0.0.1",
        postgres_port=proxy.port,
        postgres_user=POSTGRES_USER,
        postgres_db=dbname,
        postgres_min_connections=1,
        **settings,
    )
    database = db.Database(config=config)
    database.open()
    return database


def _in_thread(call: Any) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def test_close_returns_and_ends_a_query_that_hangs(dbname: str) -> None:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    database = _through(proxy, dbname)
    try:
        database.ping()
        proxy.pause()  # PostgreSQL (or the path to it) stops answering mid-query
        thread, raised = _in_thread(database.ping)
        wait_for(proxy.holding, timeout=10, interval=0.01, what="the query sent and held back")
        assert thread.is_alive(), "the query should hang while the proxy is paused"
        database.close()  # returns although the query never will (a hang is the test's timeout)
        # The hung query ends, with the proxy still paused: close() interrupted it.
        wait_for(lambda: not thread.is_alive(), timeout=30, what="the hung query ended by close()")
    finally:
        proxy.close()
    assert raised
    assert isinstance(raised[0], db.DatabaseUnavailable)


def test_interrupt_ends_a_hung_write(dbname: str) -> None:
    apply_schema(dbname)
    vote = Vote("ef" * 32, "citizen-3", "law-z", "oui", datetime(2025, 11, 14, 12, tzinfo=UTC))
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    database = _through(proxy, dbname)
    try:
        proxy.pause()
        thread, raised = _in_thread(lambda: database.write_batch([vote]))
        wait_for(proxy.holding, timeout=10, interval=0.01, what="the write sent and held back")
        assert thread.is_alive(), "the write should hang while the proxy is paused"
        database.interrupt()
        # The hung write ends, with the proxy still paused: interrupt() ended it.
        wait_for(lambda: not thread.is_alive(), timeout=30, what="the hung write ended by interrupt()")
        assert raised
        assert isinstance(raised[0], db.DatabaseUnavailable)
    finally:
        database.close()
        proxy.close()
    assert query(dbname, "SELECT count(*) FROM vote_audit") == [(0,)]
