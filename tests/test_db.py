"""The batch transaction on its own, against the real PostgreSQL."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import pytest

import db
from config import Config
from tests.support import POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, apply_schema, pg_connect, query, wait_for
from votes import Vote


def _database(dbname: str) -> db.Database:
    config = Config(
        postgres_host=POSTGRES_HOST,
        postgres_port=POSTGRES_PORT,
        postgres_user=POSTGRES_USER,
        postgres_db=dbname,
        retry_delay_s=0.1,
    )
    database = db.Database(config=config)
    database.open()
    return database


def test_a_deadlock_retries_the_whole_batch(dbname: str, caplog: pytest.LogCaptureFixture) -> None:
    # Another session holds the law's row and then inserts the batch's hash: a
    # lock cycle. PostgreSQL aborts the batch (it waited longest); the batch is
    # retried as a whole and counts its vote once.
    apply_schema(dbname)
    query(dbname, "INSERT INTO vote_results (law_id) VALUES ('law-x')")
    vote = Vote("ab" * 32, "citizen-1", "law-x", "oui", datetime(2025, 11, 14, 12, tzinfo=UTC))
    database = _database(dbname)
    other = pg_connect(dbname)
    other.autocommit = False
    outcome: list[db.BatchOutcome] = []
    try:
        with other.cursor() as cur:
            cur.execute("UPDATE vote_results SET updated_at = now() WHERE law_id = 'law-x'")
        with caplog.at_level(logging.WARNING, logger="db"):
            writer = threading.Thread(target=lambda: outcome.append(database.write_batch([vote])))
            writer.start()
            wait_for(
                lambda: query(dbname, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0,
                timeout=10,
                interval=0.02,
                what="the batch waiting for the law's row",
            )
            with other.cursor() as cur:
                cur.execute(
                    'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") '
                    "VALUES (%s, 'someone', 'law-x', 'non', now())",
                    (vote.vote_hash,),
                )
            other.rollback()
            writer.join(30)
        assert not writer.is_alive()
    finally:
        other.close()
        database.close()
    assert any("TransactionConflict" in r.getMessage() and "deadlock" in r.getMessage() for r in caplog.records)
    assert outcome and outcome[0].counted == {("law-x", "oui"): 1}
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
