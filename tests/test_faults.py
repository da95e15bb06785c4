"""Faults and hostile input: crashes, lost connections, database outages, several
instances, refused data and hostile payloads.

Network faults go through tests.proxy.TcpProxy between the service and the
servers; the shared servers themselves are never stopped. Every scenario ends
with the invariant, exact counts and an empty queue.
"""

from __future__ import annotations

import errno
import json
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pika.exceptions
import pytest

from amqp import amqp_parameters, open_connection
from config import Config
from tests.proxy import TcpProxy
from tests.support import (
    PER_LAW_METRICS,
    POSTGRES_HOST,
    POSTGRES_PORT,
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    Service,
    VoteMsg,
    apply_schema,
    assert_all_counted_once,
    assert_invariant,
    audit_count,
    drain_queue,
    expected_totals,
    make_votes,
    publish,
    query,
    queue_state,
    results,
    wait_for,
)

pytestmark = pytest.mark.slow  # each failure scenario under load

MakeService = Callable[..., Service]


@pytest.fixture
def amqp_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(RABBITMQ_HOST, RABBITMQ_PORT)
    yield proxy
    proxy.close()


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    yield proxy
    proxy.close()


def peak_rss_mb(svc: Service) -> float:
    assert svc.proc is not None
    with open(f"/proc/{svc.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


# -- 1. crashes ------------------------------------------------------------------------


def test_kill_9_at_random_points_and_between_commit_and_ack(
    make_service: MakeService, queue: str, dbname: str, amqp_proxy: TcpProxy
) -> None:
    votes = make_votes(30_000, laws=25)
    publish(queue, (v.body() for v in votes))
    env = {"RABBITMQ_PORT": str(amqp_proxy.port)}
    rng = random.Random(3)

    for _ in range(3):
        svc = make_service(env).start()
        wait_for(lambda: audit_count(dbname) > 0, timeout=30, interval=0.02, what="counting under way")
        time.sleep(rng.uniform(0.05, 1.0))
        svc.kill()
        amqp_proxy.cut()  # the broker sees the dead connection and requeues what was unacked

    # Between commit and ack: acks stop reaching RabbitMQ while batches keep committing.
    # A fresh backlog, so that this process has plenty to buffer whatever the rounds above left.
    more = make_votes(20_000, laws=25, seed=2)
    publish(queue, (v.body() for v in more))
    votes += more
    svc = make_service(env).start()
    # Pause once this process holds votes it has not written yet (not merely once
    # it started): they are then committed while their acks cannot leave.
    batch = Config().batch_size
    wait_for(lambda: svc.metric("vote_buffer_depth") >= 2 * batch, timeout=30, interval=0.01, what="votes buffered")
    amqp_proxy.pause()
    committed = audit_count(dbname)
    wait_for(lambda: audit_count(dbname) > committed, timeout=10, interval=0.02, what="a batch committed unacked")
    time.sleep(1.5)
    svc.kill()
    amqp_proxy.cut()
    amqp_proxy.resume()

    last = make_service(env).start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=120, what="every vote counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="queue drained")
    # The votes committed but never acked came back and were absorbed.
    assert last.metric("votes_redelivered_total") > 0
    assert last.stop() == 0
    assert_all_counted_once(dbname, queue, votes)


# -- 2. RabbitMQ connection lost --------------------------------------------------------------


def test_a_connection_reset_while_it_is_set_up_is_a_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy or load balancer in front of a node that is down accepts and resets at once. When
    # the reset beats pika's first getpeername(), pika raised a bare ValueError, which ended the
    # service instead of being retried. Here getpeername() fails as it then does.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def not_connected(_sock: socket.socket) -> tuple[str, int]:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(socket.socket, "getpeername", not_connected)
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError, match="reset while it was being set up") as raised:
            open_connection(amqp_parameters(Config(rabbitmq_host="127.0.0.1", rabbitmq_port=port)))
    finally:
        listener.close()
    assert isinstance(raised.value.__cause__, ValueError)


def test_rabbitmq_connection_cut_and_broker_down_under_load(
    make_service: MakeService, queue: str, dbname: str, amqp_proxy: TcpProxy
) -> None:
    votes = make_votes(30_000, laws=20)
    publish(queue, (v.body() for v in votes))
    svc = make_service({"RABBITMQ_PORT": str(amqp_proxy.port), "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": "1"}).start()

    for threshold in (2_000, 8_000):
        wait_for(lambda t=threshold: audit_count(dbname) > t, timeout=60, what="counting under way")  # type: ignore[misc]
        amqp_proxy.cut()
    # The broker is down for a while: connections are refused, and refused again.
    wait_for(lambda: audit_count(dbname) > 14_000, timeout=60, what="counting under way")
    failures = svc.logs().count("RabbitMQ connection to")
    amqp_proxy.refuse()
    amqp_proxy.cut()
    # The lost connection, then two refused attempts (one a second at this backoff cap).
    wait_for(lambda: svc.logs().count("RabbitMQ connection to") >= failures + 3, timeout=60, what="refused reconnects")
    assert svc.proc is not None
    assert svc.proc.poll() is None
    amqp_proxy.resume()

    wait_for(lambda: audit_count(dbname) == len(votes), timeout=120, what="every vote counted")
    assert svc.stop() == 0
    logs = svc.logs()
    assert logs.count("RabbitMQ connection to") >= 3
    assert "unknown delivery tag" not in logs.lower()
    assert_all_counted_once(dbname, queue, votes)


def test_hung_broker_is_detected_by_heartbeats(
    make_service: MakeService, queue: str, dbname: str, amqp_proxy: TcpProxy
) -> None:
    # The smallest heartbeat: pika notices a silent broker after heartbeat + 5 s.
    svc = make_service({"RABBITMQ_PORT": str(amqp_proxy.port), "RABBITMQ_HEARTBEAT_SECONDS": "1"}).start()
    first = make_votes(500, laws=5, seed=1)
    publish(queue, (v.body() for v in first))
    wait_for(lambda: audit_count(dbname) == len(first), timeout=30, what="first votes counted")

    amqp_proxy.pause()  # the broker stops answering but the TCP connection stays up
    wait_for(lambda: "RabbitMQ connection to" in svc.logs(), timeout=30, what="the dead connection noticed")
    amqp_proxy.cut()
    amqp_proxy.resume()
    second = make_votes(500, laws=5, seed=2)
    publish(queue, (v.body() for v in second))
    wait_for(lambda: audit_count(dbname) == len(first) + len(second), timeout=60, what="second votes counted")
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, first + second)


# -- 3. PostgreSQL unavailable ------------------------------------------------------------------


# Rounds of "keeping it and retrying" the outage lasts (logged past MAX_RETRY_ATTEMPTS, 3): with
# waits of 0.1 s doubling up to 1.6 s, the fifth comes after 0.1+0.2+0.4+0.8+1.6+1.6+1.6 = 6.3 s of
# waits, past RabbitMQ's two missed heartbeats (~4 s with RABBITMQ_HEARTBEAT_SECONDS=2).
OUTAGE_ROUNDS = 5


def test_postgres_unreachable_longer_than_the_retry_budget(
    make_service: MakeService, queue: str, dbname: str, pg_proxy: TcpProxy
) -> None:
    svc = make_service(
        {
            "POSTGRES_PORT": str(pg_proxy.port),
            # RabbitMQ would drop the connection after two missed heartbeats (~4 s) if pika's
            # I/O stalled during the outage.
            "RABBITMQ_HEARTBEAT_SECONDS": "2",
            # Waits of 0.1 s doubling up to 1.6 s: an outage of OUTAGE_ROUNDS rounds outlasts
            # tenacity's budget (0.1 + 0.2 + 0.4 s) several times over.
            "RETRY_DELAY_SECONDS": "0.1",
            "RETRY_MAX_DELAY_SECONDS": "1.6",
        }
    ).start()
    before = make_votes(2_000, laws=10, seed=1)
    publish(queue, (v.body() for v in before))
    wait_for(lambda: audit_count(dbname) == len(before), timeout=30, what="votes before the outage counted")

    pg_proxy.refuse()
    pg_proxy.cut()
    during = make_votes(3_000, laws=10, seed=2)
    publish(queue, (v.body() for v in during))
    wait_for(
        lambda: svc.logs().count("keeping it and retrying") >= OUTAGE_ROUNDS,
        timeout=60,
        what=f"{OUTAGE_ROUNDS} rounds of retries",
    )
    assert svc.proc is not None
    assert svc.proc.poll() is None
    assert audit_count(dbname) == len(before)
    # Nothing was acked, nothing dropped, nothing requeued in a loop: the queue
    # still holds what the service has not taken, and no message was redelivered.
    ready, consumers = queue_state(queue)
    assert consumers == 1
    assert ready >= len(during) - Config().rabbitmq_prefetch_count
    outage_logs = svc.logs()
    assert "keeping it and retrying" in outage_logs
    assert "Retrying" in outage_logs  # tenacity's attempts, logged
    # Capped backoff, not a tight loop: the waits double up to RETRY_MAX_DELAY_SECONDS and stay there.
    waits = [
        float(wait)
        for wait in re.findall(r"(?:Retrying a batch of \d+ votes|keeping it and retrying) in ([\d.]+)s", outage_logs)
    ]
    attempts = Config().max_retry_attempts + OUTAGE_ROUNDS
    assert waits[:attempts] == [round(min(0.1 * 2**i, 1.6), 1) for i in range(attempts)], waits
    assert svc.metric("aggregation_errors_total", error_type="database_unavailable") >= 1

    pg_proxy.resume()
    wait_for(lambda: audit_count(dbname) == len(before) + len(during), timeout=90, what="backlog written")
    assert "RabbitMQ connection to" not in svc.logs(), "the broker connection must survive a database outage"
    assert svc.metric("votes_redelivered_total") == 0
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, before + during)


def test_postgres_that_stops_answering_is_abandoned_and_reconnected(
    make_service: MakeService, queue: str, dbname: str, pg_proxy: TcpProxy
) -> None:
    svc = make_service(
        {"POSTGRES_PORT": str(pg_proxy.port), "POSTGRES_QUERY_TIMEOUT_SECONDS": "1", "RETRY_DELAY_SECONDS": "0.1"}
    ).start()
    first = make_votes(300, laws=4, seed=1)
    publish(queue, (v.body() for v in first))
    wait_for(lambda: audit_count(dbname) == len(first), timeout=30, what="first votes counted")

    pg_proxy.pause()  # packets are acknowledged, nothing answers: a hung server
    second = make_votes(300, laws=4, seed=2)
    publish(queue, (v.body() for v in second))
    wait_for(lambda: "did not answer within" in svc.logs(), timeout=30, what="the watchdog to drop the connection")
    pg_proxy.cut()
    pg_proxy.resume()
    wait_for(lambda: audit_count(dbname) == len(first) + len(second), timeout=60, what="second votes counted")
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, first + second)


# -- 4. several instances ---------------------------------------------------------------------


def test_three_instances_with_replays_and_attempts_count_exactly(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    apply_schema(dbname)
    services = [make_service({"BATCH_SIZE": "50", "RABBITMQ_PREFETCH_COUNT": "100"}).start() for _ in range(3)]
    originals = make_votes(6_000, laws=12, seed=1)
    publish(queue, (v.body() for v in originals))
    wait_for(lambda: audit_count(dbname) == len(originals), timeout=90, what="originals counted")

    rng = random.Random(5)
    fresh = make_votes(6_000, laws=12, seed=2)
    replays = rng.sample(originals, 2_000) + rng.sample(fresh, 2_000)
    targets = rng.sample(originals, 300)
    attempts = [VoteMsg(v.vote_hash, v.citizen_id, v.law_id, "non" if v.choice == "oui" else "oui") for v in targets]
    mixed = [v.body() for v in fresh + replays + attempts]
    rng.shuffle(mixed)
    publish(queue, mixed)

    wait_for(lambda: audit_count(dbname) == len(originals) + len(fresh), timeout=120, what="every vote counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="queue drained")
    redelivered = sum(s.metric("votes_redelivered_total") for s in services)
    recorded = sum(s.metric("duplicate_vote_attempts_total") for s in services)
    for svc in services:
        assert svc.stop() == 0
        assert "deadlock" not in svc.logs().lower()

    assert results(dbname) == expected_totals(originals + fresh)
    stored = query(dbname, "SELECT vote_hash, choice FROM duplicate_attempts")
    assert sorted(stored) == sorted((a.vote_hash, a.choice) for a in attempts)
    assert recorded == len(attempts)
    assert redelivered == len(replays)
    assert queue_state(queue) == (0, 0)
    assert_invariant(dbname)


# -- 5. data the database refuses -----------------------------------------------------------------


def test_batch_refused_for_one_vote_commits_the_rest_and_rejects_the_offender(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    apply_schema(dbname)
    # Something validation lets through but the database refuses.
    query(dbname, "ALTER TABLE vote_audit ADD CONSTRAINT test_refused CHECK (citizen_id NOT LIKE 'refused-%')")
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    good = make_votes(1_000, laws=6)
    refused = make_votes(5, laws=6, seed=9, prefix="refused")
    bodies = [v.body() for v in good]
    for i, v in enumerate(refused):
        bodies.insert(150 * i + 7, v.body())
    svc = make_service(queue_name=name).start()
    publish(name, bodies)

    wait_for(lambda: audit_count(dbname) == len(good), timeout=60, what="good votes counted")
    wait_for(lambda: queue_state(f"{name}.dead")[0] == len(refused), timeout=30, what="offenders dead-lettered")
    assert svc.metric("aggregation_errors_total", error_type="database_rejected") == len(refused)
    assert svc.stop() == 0
    assert sorted(drain_queue(f"{name}.dead")) == sorted(v.body() for v in refused)
    assert results(dbname) == expected_totals(good)
    assert queue_state(name) == (0, 0)
    assert_invariant(dbname)


# -- 6. hostile payloads -------------------------------------------------------------------------------


def _vote_json(**overrides: object) -> dict[str, object]:
    vote: dict[str, object] = {
        "vote_hash": "ab" * 32,
        "citizen_id": "hostile-citizen",
        "law_id": "law-001",
        "choice": "oui",
        "timestamp": "2025-11-14T12:00:00Z",
    }
    vote.update(overrides)
    return vote


HOSTILE: dict[str, tuple[bytes, str]] = {
    "oversized": (json.dumps(_vote_json(citizen_id="x" * 8000)).encode(), "too_large"),
    "nested_100k": (b"[" * 100_000 + b"]" * 100_000, "too_large"),
    "nested_in_limit": (b"[" * 2_000 + b"]" * 2_000, "invalid_json"),
    "string_10mb": (b'{"vote_hash": "' + b"a" * 10_000_000 + b'"}', "too_large"),
    "invalid_utf8": (b'{"vote_hash": "\xc3\x28"}', "invalid_encoding"),
    "lone_surrogate": (json.dumps(_vote_json(citizen_id="\ud800")).encode(), "invalid_citizen_id"),
    "nul": (json.dumps(_vote_json(law_id="law\u0000001")).encode(), "invalid_law_id"),
    "nan": (b'{"vote_hash": NaN}', "invalid_json"),
    "infinity": (json.dumps(_vote_json()).replace('"oui"', "Infinity").encode(), "invalid_json"),
    "duplicate_key": (b'{"choice": "oui", "choice": "non"}', "duplicate_key"),
    "extra_key_bad_value": (json.dumps(_vote_json(admin=True, choice="peut-etre")).encode(), "invalid_choice"),
    "wrong_type": (json.dumps(_vote_json(choice=["oui"])).encode(), "wrong_type"),
    "sql_law": (json.dumps(_vote_json(law_id="x'); DROP TABLE vote_audit;--")).encode(), "invalid_law_id"),
    "sql_citizen": (
        json.dumps(_vote_json(citizen_id="x'); DROP TABLE vote_audit;--\n")).encode(),
        "invalid_citizen_id",
    ),
}


def test_hostile_payloads_are_rejected_and_good_votes_counted(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    good = make_votes(2_000, laws=8)
    rounds = 3
    bodies = [v.body() for v in good]
    for r in range(rounds):
        for i, (body, _reason) in enumerate(HOSTILE.values()):
            bodies.insert((r * len(HOSTILE) + i) * 40 + 3, body)
    svc = make_service().start()
    baseline = peak_rss_mb(svc)
    publish(queue, bodies)

    wait_for(lambda: audit_count(dbname) == len(good), timeout=90, what="good votes counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="queue drained")
    expected: dict[str, int] = {}
    for _body, reason in HOSTILE.values():
        expected[reason] = expected.get(reason, 0) + rounds
    for reason, count in expected.items():
        assert svc.metric("aggregation_errors_total", error_type=reason) == count, reason
    # Thirty 10 MB bodies went through; memory is held only while one is parsed.
    peak = peak_rss_mb(svc)
    assert peak < baseline + 120, f"peak RSS {peak:.0f} MB from {baseline:.0f} MB"
    assert svc.proc is not None
    assert svc.proc.poll() is None
    assert svc.stop() == 0
    assert results(dbname) == expected_totals(good)
    assert query(dbname, "SELECT count(*) FROM vote_audit WHERE citizen_id LIKE 'hostile%'") == [(0,)]
    assert queue_state(queue) == (0, 0)
    assert_invariant(dbname)


# -- 7. metric labels from message data -----------------------------------------------------------------


def test_law_labels_are_capped_and_law_ids_checked_against_the_pattern(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    votes = make_votes(3_000, laws=40)
    outsider = VoteMsg("cd" * 32, "citizen-x", "bill-7", "oui")
    svc = make_service({"METRICS_MAX_LAWS": "10", "LAW_ID_PATTERN": r"law-[0-9]{3}", **PER_LAW_METRICS}).start()
    publish(queue, [outsider.body()] + [v.body() for v in votes])
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="votes counted")
    wait_for(lambda: svc.metric("batch_size_processed_total") == len(votes), timeout=10, what="metrics updated")

    samples = svc.metrics()
    labelled = {dict(labels)["law_id"] for (name, labels) in samples if name == "votes_aggregated_total"}
    gauged = {dict(labels)["law_id"] for (name, labels) in samples if name == "current_vote_totals"}
    assert len(labelled - {"_other"}) == 10
    assert "_other" in labelled
    assert len(gauged) == 10
    assert gauged <= labelled
    totals = expected_totals(votes)
    beyond = sum(oui + non for law, (oui, non) in totals.items() if law not in labelled)
    other = svc.metric("votes_aggregated_total", law_id="_other", choice="oui") + svc.metric(
        "votes_aggregated_total", law_id="_other", choice="non"
    )
    assert other == beyond == svc.metric("votes_over_law_label_cap_total")
    assert svc.metric("aggregation_errors_total", error_type="invalid_law_id") == 1
    assert svc.stop() == 0
    assert results(dbname) == totals  # the database counts every law, whatever the cap
    assert_invariant(dbname)
