"""End to end: `python aggregator.py` against the real RabbitMQ and PostgreSQL.

Every test ends by checking the invariant: for each law, vote_results equals
vote_audit grouped by law and choice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Callable

import pika
import pytest

from tests.proxy import TcpProxy
from tests.support import (
    PER_LAW_METRICS,
    POSTGRES_HOST,
    POSTGRES_PASSWORD,
    POSTGRES_PORT,
    POSTGRES_USER,
    ROOT,
    Service,
    VoteMsg,
    amqp_connection,
    assert_all_counted_once,
    assert_invariant,
    audit_count,
    clean_env,
    drain_queue,
    expected_totals,
    make_votes,
    outside_checkout,
    publish,
    query,
    queue_state,
    results,
    run_cli,
    service_env,
    wait_for,
)

MakeService = Callable[..., Service]


def test_an_administrator_service_applies_a_missing_schema_itself(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    # Run as an administrator (not the least-privilege role the other tests use), on an empty
    # database, the service applies init_db.sql itself before it consumes.
    votes = make_votes(100, laws=3)
    publish(queue, (v.body() for v in votes))
    svc = make_service(as_superuser=True).start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="every vote counted")
    assert svc.stop() == 0
    assert "schema objects missing (vote_results, vote_audit" in svc.logs()
    assert_all_counted_once(dbname, queue, votes)


def test_thousands_of_votes_over_many_laws_are_counted_exactly(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    votes = make_votes(5000, laws=40)
    publish(queue, (v.body() for v in votes))
    svc = make_service().start()

    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="every vote counted")
    assert svc.stop() == 0

    assert_all_counted_once(dbname, queue, votes)


def test_redeliveries_are_absorbed_and_not_taken_for_duplicate_attempts(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    votes = make_votes(300, laws=5)
    publish(queue, (v.body() for v in votes))
    svc = make_service().start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="first delivery counted")
    counted = results(dbname)

    # The same ballots again: a different key order and spacing, and a
    # timestamp spelled in another zone, are still the same content.
    replays = [v.body() for v in votes[:200]]
    replays += [
        json.dumps(
            {
                "timestamp": "2025-11-14T14:00:00+02:00",
                "choice": v.choice,
                "law_id": v.law_id,
                "citizen_id": v.citizen_id,
                "vote_hash": v.vote_hash.upper(),
            },
            indent=1,
        ).encode()
        for v in votes[200:]
    ]
    # A new vote sent twice in one burst (same batch) counts once.
    fresh = make_votes(1, laws=5, seed=99)[0]
    replays += [fresh.body(), fresh.body()]
    publish(queue, replays)

    wait_for(lambda: svc.metric("votes_redelivered_total") == 301, timeout=30, what="replays absorbed")
    assert svc.stop() == 0

    assert results(dbname) == expected_totals([*votes, fresh])
    assert results(dbname) != counted
    assert query(dbname, "SELECT count(*) FROM duplicate_attempts") == [(0,)]
    assert audit_count(dbname) == len(votes) + 1
    assert queue_state(queue)[0] == 0
    assert_invariant(dbname)


def test_duplicate_attempts_are_recorded_and_never_counted(make_service: MakeService, queue: str, dbname: str) -> None:
    original = make_votes(50, laws=3)
    publish(queue, (v.body() for v in original))
    svc = make_service().start()
    wait_for(lambda: audit_count(dbname) == len(original), timeout=30, what="originals counted")

    flipped = VoteMsg(
        original[0].vote_hash,
        original[0].citizen_id,
        original[0].law_id,
        "non" if original[0].choice == "oui" else "oui",
    )
    other_citizen = VoteMsg(original[1].vote_hash, "someone-else", original[1].law_id, original[1].choice)
    later = VoteMsg(
        original[2].vote_hash, original[2].citizen_id, original[2].law_id, original[2].choice, "2025-11-15T09:00:00Z"
    )
    # Two copies of one new hash in the same burst, different choices: the first stands.
    first = make_votes(1, laws=3, seed=7)[0]
    second = VoteMsg(first.vote_hash, first.citizen_id, first.law_id, "non" if first.choice == "oui" else "oui")
    # The same attempt delivered twice is one attempt.
    publish(queue, [flipped.body(), other_citizen.body(), later.body(), first.body(), second.body(), flipped.body()])

    wait_for(lambda: svc.metric("duplicate_vote_attempts_total") == 4, timeout=30, what="attempts recorded")
    assert svc.stop() == 0

    assert results(dbname) == expected_totals([*original, first])
    attempts = query(
        dbname, "SELECT vote_hash, citizen_id, choice, vote_timestamp::text FROM duplicate_attempts ORDER BY id"
    )
    assert sorted(a[:3] for a in attempts) == sorted(
        [
            (flipped.vote_hash, flipped.citizen_id, flipped.choice),
            (other_citizen.vote_hash, "someone-else", other_citizen.choice),
            (later.vote_hash, later.citizen_id, later.choice),
            (second.vote_hash, second.citizen_id, second.choice),
        ]
    )
    stored = query(dbname, "SELECT choice FROM vote_audit WHERE vote_hash = %s", (first.vote_hash,))
    assert stored == [(first.choice,)]
    assert queue_state(queue)[0] == 0
    assert_invariant(dbname)


INVALID_BODIES: dict[str, bytes] = {
    "invalid_json": b'{"vote_hash": ',
    "not_an_object": b'["oui"]',
    "missing_field": json.dumps({"vote_hash": "ab", "citizen_id": "c", "law_id": "l", "choice": "oui"}).encode(),
    "wrong_type": json.dumps(
        {"vote_hash": 12, "citizen_id": "c", "law_id": "l", "choice": "oui", "timestamp": "2025-01-01"}
    ).encode(),
    "invalid_choice": json.dumps(
        {"vote_hash": "ab", "citizen_id": "c", "law_id": "l", "choice": "peut-etre", "timestamp": "2025-01-01"}
    ).encode(),
    "invalid_timestamp": json.dumps(
        {"vote_hash": "ab", "citizen_id": "c", "law_id": "l", "choice": "oui", "timestamp": "tomorrow"}
    ).encode(),
    "invalid_vote_hash": json.dumps(
        {"vote_hash": "f" * 65, "citizen_id": "c", "law_id": "l", "choice": "oui", "timestamp": "2025-01-01"}
    ).encode(),
    "invalid_citizen_id": json.dumps(
        {"vote_hash": "ab", "citizen_id": "x" * 101, "law_id": "l", "choice": "oui", "timestamp": "2025-01-01"}
    ).encode(),
    "invalid_law_id": json.dumps(
        {
            "vote_hash": "ab",
            "citizen_id": "secret-citizen-4711",
            "law_id": "x'); DROP TABLE vote_audit;--",
            "choice": "oui",
            "timestamp": "2025-01-01",
        }
    ).encode(),
    "invalid_encoding": b'{"vote_hash": "\xff\xfe"}',
    "too_large": b'{"pad": "' + b"x" * 10_000 + b'"}',
}


def test_invalid_messages_are_rejected_to_the_dead_letter_queue_and_good_ones_counted(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    # The queue exists already, with a dead-letter exchange: the service must
    # use it as it is, and rejected messages must land in the dead-letter queue.
    suffix = uuid.uuid4().hex[:12]
    queue, dead_queue, dlx = f"agg.test.{suffix}", f"agg.test.{suffix}.dead", f"agg.test.{suffix}.dlx"
    queue_names.extend([queue, dead_queue])
    conn = amqp_connection()
    ch = conn.channel()
    ch.exchange_declare(dlx, "fanout", durable=True, auto_delete=True)
    ch.queue_declare(dead_queue, durable=True)
    ch.queue_bind(dead_queue, dlx)
    ch.queue_declare(queue, durable=True, arguments={"x-dead-letter-exchange": dlx})
    conn.close()

    good = make_votes(400, laws=7)
    bodies: list[bytes] = []
    for i, v in enumerate(good):
        bodies.append(v.body())
        if i % 30 == 0:
            bodies.extend(INVALID_BODIES.values())
    publish(queue, bodies)
    rounds = (len(good) + 29) // 30

    svc = make_service(queue_name=queue).start()
    wait_for(lambda: audit_count(dbname) == len(good), timeout=30, what="good votes counted")
    wait_for(lambda: queue_state(dead_queue)[0] == rounds * len(INVALID_BODIES), timeout=30, what="dead letters")
    for reason in INVALID_BODIES:
        assert svc.metric("aggregation_errors_total", error_type=reason) == rounds, reason
    assert svc.stop() == 0

    assert results(dbname) == expected_totals(good)
    assert sorted(drain_queue(dead_queue)) == sorted(list(INVALID_BODIES.values()) * rounds)
    assert queue_state(queue)[0] == 0
    logs = svc.logs()
    assert logs.count("rejected message") == rounds * len(INVALID_BODIES)
    assert "secret-citizen-4711" not in logs
    assert_invariant(dbname)


def test_partial_batch_is_written_after_the_batch_timeout(make_service: MakeService, queue: str, dbname: str) -> None:
    svc = make_service({"BATCH_SIZE": "1000", "BATCH_TIMEOUT_SECONDS": "1.5"}).start()
    votes = make_votes(7, laws=2)
    publish(queue, (v.body() for v in votes))
    # 7 votes never fill a batch of 1000: only the timer writes them.
    wait_for(lambda: audit_count(dbname) == 7, timeout=30, what="partial batch written")
    assert results(dbname) == expected_totals(votes)
    assert svc.stop() == 0
    assert_invariant(dbname)


def test_a_batch_waits_for_its_timeout_when_not_full(make_service: MakeService, queue: str, dbname: str) -> None:
    svc = make_service({"BATCH_SIZE": "1000", "BATCH_TIMEOUT_SECONDS": "60"}).start()
    publish(queue, (v.body() for v in make_votes(5, laws=1)))
    wait_for(lambda: svc.metric("vote_buffer_depth") == 5, timeout=15, what="the votes buffered")
    # Held longer than the default timeout (1 s) and the tests' (0.2 s), by the service's own clock.
    wait_for(
        lambda: svc.metric("oldest_unacked_delivery_age_seconds") > 1.5, timeout=30, what="the votes held past 1.5 s"
    )
    assert audit_count(dbname) == 0
    # A graceful stop writes what is buffered instead of waiting out the timer.
    assert svc.stop(timeout=20) == 0
    assert audit_count(dbname) == 5
    assert queue_state(queue)[0] == 0
    assert_invariant(dbname)


def test_metrics_agree_with_the_database_also_after_a_restart(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    votes = make_votes(1000, laws=6)
    publish(queue, (v.body() for v in votes))
    svc = make_service(PER_LAW_METRICS).start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
    wait_for(lambda: svc.metric("batch_size_processed_total") == len(votes), timeout=10, what="metrics updated")

    totals = results(dbname)
    for law, (oui, non) in totals.items():
        assert svc.metric("current_vote_totals", law_id=law, choice="oui") == oui
        assert svc.metric("current_vote_totals", law_id=law, choice="non") == non
        assert svc.metric("votes_aggregated_total", law_id=law, choice="oui") == oui
        assert svc.metric("votes_aggregated_total", law_id=law, choice="non") == non
    assert svc.metric("batch_processing_duration_seconds") > 0
    assert svc.stop() == 0

    # A new process knows the stored totals before it counts anything.
    again = make_service(PER_LAW_METRICS).start()
    for law, (oui, non) in totals.items():
        assert again.metric("current_vote_totals", law_id=law, choice="oui") == oui
        assert again.metric("current_vote_totals", law_id=law, choice="non") == non
    assert again.stop() == 0
    assert_invariant(dbname)


@pytest.mark.slow
def test_sigterm_with_votes_in_flight_loses_and_doubles_nothing(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    votes = make_votes(20_000, laws=30)
    publish(queue, (v.body() for v in votes))
    svc = make_service().start()
    wait_for(lambda: audit_count(dbname) > 500, timeout=30, interval=0.02, what="counting under way")

    assert svc.stop(timeout=30) == 0
    logs = svc.logs()
    assert "stopping" in logs
    assert "Traceback" not in logs

    counted = audit_count(dbname)
    ready, consumers = queue_state(queue)
    assert consumers == 0
    assert 0 < counted < len(votes)
    assert counted + ready == len(votes)  # every vote counted or still queued, none in both
    assert_invariant(dbname)

    # The rest is counted by the next run, exactly once.
    make_service().start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="the rest counted")
    assert results(dbname) == expected_totals(votes)
    assert_invariant(dbname)


def test_service_declares_a_missing_queue_durable_with_dead_lettering(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    svc = make_service(queue_name=name).start()
    conn = amqp_connection()
    try:
        # Re-declaring with the same arguments succeeds only if the queue is a durable quorum
        # queue (the default type) that dead-letters to the documented exchange, at least once,
        # after the documented number of deliveries.
        documented = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": f"{name}.dlx",
            "x-delivery-limit": 20,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        conn.channel().queue_declare(name, durable=True, arguments=documented)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            conn.channel().queue_declare(name, durable=True, arguments={**documented, "x-delivery-limit": 21})
    finally:
        conn.close()
    vote = make_votes(1, laws=1)[0]
    publish(name, [b"not json", vote.body()])
    wait_for(lambda: queue_state(f"{name}.dead")[0] == 1, timeout=15, what="the rejected message dead-lettered")
    wait_for(lambda: audit_count(dbname) == 1, timeout=15, what="the vote counted")
    assert svc.stop() == 0
    assert drain_queue(f"{name}.dead") == [b"not json"]
    assert_invariant(dbname)


def test_dead_lettering_can_be_turned_off(make_service: MakeService, queue_names: list[str]) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    svc = make_service({"RABBITMQ_DEAD_LETTERING": "false"}, queue_name=name).start()
    assert svc.stop() == 0
    conn = amqp_connection()
    try:
        # Matches only if no dead-letter exchange and no delivery limit were set.
        conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            conn.channel().queue_declare(f"{name}.dead", passive=True)
    finally:
        conn.close()


def test_existing_quorum_queue_is_used_as_it_is(make_service: MakeService, queue_names: list[str], dbname: str) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    conn = amqp_connection()
    conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 5})
    conn.close()
    votes = make_votes(250, laws=3)
    publish(name, (v.body() for v in votes))
    svc = make_service(queue_name=name).start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted")
    assert svc.stop() == 0
    assert_all_counted_once(dbname, name, votes)


def test_missing_database_stops_start_up_with_how_to_create_it(make_service: MakeService) -> None:
    svc = make_service({"POSTGRES_DB": f"agg_missing_{uuid.uuid4().hex[:8]}"}).start(wait_consuming=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2
    logs = svc.logs()
    assert "does not exist" in logs
    assert "createdb" in logs
    assert "--init-db" in logs
    assert "Traceback" not in logs


def test_second_signal_exits_at_once(make_service: MakeService, queue: str, dbname: str) -> None:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    try:
        svc = make_service(
            {"POSTGRES_PORT": str(proxy.port), "SHUTDOWN_TIMEOUT_SECONDS": "120", "BATCH_TIMEOUT_SECONDS": "0.2"}
        ).start()
        # A database that stops answering keeps the graceful stop waiting for its batch.
        proxy.pause()
        votes = make_votes(10, laws=2)
        publish(queue, (v.body() for v in votes))
        wait_for(lambda: svc.metric("messages_received_total") == len(votes), timeout=15, what="the votes received")
        wait_for(proxy.holding, timeout=10, interval=0.01, what="the batch on its way to the silent database")
        svc.signal(signal.SIGTERM)
        wait_for(lambda: "stopping: no new messages" in svc.logs(), timeout=15, what="the first signal handled")
        svc.signal(signal.SIGTERM)
        assert svc.proc is not None
        assert svc.proc.wait(30) == 1
    finally:
        proxy.close()
    # The second signal ended it, not the first one's shutdown: that one was still waiting for the batch.
    assert "stopped (exit code" not in svc.logs()
    # Nothing was acked: the votes come back and are counted once.
    assert queue_state(queue)[0] == len(votes)
    make_service().start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted after restart")
    assert results(dbname) == expected_totals(votes)
    assert_invariant(dbname)


def test_init_db_is_idempotent_with_psql(dbname: str) -> None:
    for _ in range(2):
        done = subprocess.run(
            [
                "psql",
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                POSTGRES_HOST,
                "-p",
                str(POSTGRES_PORT),
                "-U",
                POSTGRES_USER,
                "-d",
                dbname,
                "-f",
                str(ROOT / "init_db.sql"),
            ],
            cwd=outside_checkout(),
            env=clean_env(PGPASSWORD=POSTGRES_PASSWORD),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    columns = [
        r[0]
        for r in query(
            dbname, "SELECT column_name FROM information_schema.columns WHERE table_name = 'vote_statistics'"
        )
    ]
    assert {"law_id", "oui_count", "non_count", "total_votes", "oui_percentage", "non_percentage"} <= set(columns)


def test_schema_rejects_what_the_invariant_forbids(dbname: str) -> None:
    import psycopg2

    done = run_cli("--init-db", env=service_env(dbname=dbname))
    assert done.returncode == 0, done.stderr
    audit = 'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") VALUES '
    bad = [
        "INSERT INTO vote_results (law_id, oui_count) VALUES ('l', -1)",
        audit + "('a', 'c', 'l', 'yes', now())",
        audit + "('a', 'c', 'l', 'oui', NULL)",
        audit + "('a', '', 'l', 'oui', now())",
    ]
    for statement in bad:
        with pytest.raises(psycopg2.IntegrityError):
            query(dbname, statement + " RETURNING 1")
    query(dbname, "INSERT INTO vote_results (law_id, oui_count, non_count) VALUES ('l', 3, 1) RETURNING 1")
    assert query(dbname, "SELECT total_votes, oui_percentage::text, leading_choice FROM vote_statistics") == [
        (4, "75.00", "oui")
    ]


def test_credentials_never_reach_the_logs(make_service: MakeService, queue: str, dbname: str) -> None:
    # Trust authentication ignores the password, so the service runs normally with it.
    pg_secret = "pg-Secret-" + uuid.uuid4().hex
    svc = make_service({"POSTGRES_PASSWORD": pg_secret, "LOG_LEVEL": "DEBUG"}).start()
    publish(queue, (v.body() for v in make_votes(50, laws=2)))
    wait_for(lambda: audit_count(dbname) == 50, timeout=30, what="votes counted")
    assert svc.stop() == 0

    amqp_secret = "amqp-Secret-" + uuid.uuid4().hex
    refused = make_service({"RABBITMQ_PASSWORD": amqp_secret}).start(wait_consuming=False)
    assert refused.proc is not None
    assert refused.proc.wait(60) == 2
    # Wrong credentials: one clear line, no traceback.
    assert refused.logs().count("RabbitMQ refused") == 1
    assert "Traceback" not in refused.logs()
    for log in (svc.logs(), refused.logs()):
        assert pg_secret not in log
        assert amqp_secret not in log
