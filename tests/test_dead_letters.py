"""The dead-letter queue: the reason the service records on each refused message, and the
`dead-letters` command that lists, shows and replays them without ever losing one."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pika
import pika.frame
import pika.spec
import pytest

from config import Config
from deadletter_publisher import _Wire
from tests.proxy import TcpProxy
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    Service,
    VoteMsg,
    aggregator_command,
    amqp_connection,
    assert_all_counted_once,
    audit_count,
    drain_queue,
    make_votes,
    outside_checkout,
    publish,
    query,
    queue_state,
    run_cli,
    service_env,
    wait_for,
)
from votes import InvalidVote, parse_message

pytestmark = pytest.mark.slow  # floods of refused messages, kills and replays

MakeService = Callable[..., Service]


def fresh_queue(queue_names: list[str]) -> str:
    """A queue name nobody declared: the service declares it, with its dead-letter queue."""
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    return name


def dead_headers(queue: str) -> list[tuple[dict[str, object], bytes]]:
    """Headers and bodies in the dead-letter queue, read and put back."""
    conn = amqp_connection()
    try:
        ch = conn.channel()
        out: list[tuple[dict[str, object], bytes]] = []
        while True:
            method, properties, body = ch.basic_get(f"{queue}.dead", auto_ack=False)
            if method is None or properties is None or body is None:
                return out
            headers: dict[str, object] = {
                k: v.decode() if isinstance(v, bytes) else v for k, v in (properties.headers or {}).items()
            }
            out.append((headers, body))
    finally:
        conn.close()  # unacked: every message goes back


def test_refused_messages_carry_why_and_the_command_lists_shows_and_replays_them(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    queue = fresh_queue(queue_names)
    svc = make_service(queue_name=queue).start()
    query(dbname, "ALTER TABLE vote_audit ADD CONSTRAINT no_refused CHECK (citizen_id NOT LIKE 'refused-%')")
    good = make_votes(50, laws=2, seed=5)
    refused = [VoteMsg(f"{i:064x}", f"refused-{i}", "law-000", "oui") for i in range(1, 4)]
    invalid = [b"not json", json.dumps({**json.loads(good[0].body()), "choice": "maybe"}).encode()]
    publish(queue, [*invalid, *(v.body() for v in good + refused)])
    wait_for(lambda: queue_state(f"{queue}.dead")[0] == 5, timeout=30, what="five messages dead-lettered")
    wait_for(lambda: audit_count(dbname) == len(good), timeout=30, what="the good votes counted")

    letters = dead_headers(queue)
    by_reason: dict[object, int] = {}
    for headers, _body in letters:
        by_reason[headers["x-rejected-reason"]] = by_reason.get(headers["x-rejected-reason"], 0) + 1
        assert headers["x-original-queue"] == queue
        assert str(headers["x-rejected-at"]).endswith("+00:00")
        assert "refused-" not in str(headers["x-rejected-detail"])  # never a field's value
    assert by_reason == {"invalid_json": 1, "invalid_choice": 1, "database_rejected": 3}
    assert sorted(body for _h, body in letters) == sorted([*invalid, *(v.body() for v in refused)])

    env = service_env(dbname=dbname, queue=queue)
    listing = run_cli("dead-letters", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0] == "5 messages"
    assert "      3  database_rejected" in listing.stdout
    assert "refused-1" not in listing.stdout  # citizen ids hidden unless asked
    assert "refused-1" in run_cli("dead-letters", "list", "--show-citizens", env=env).stdout
    shown = run_cli("dead-letters", "show", "5", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "x-rejected-reason: database_rejected" in shown.stdout
    assert "(hidden: --show-citizens)" in shown.stdout
    assert run_cli("dead-letters", "show", "6", env=env).returncode == 1
    assert queue_state(f"{queue}.dead")[0] == 5  # reading takes nothing away

    # The cause fixed, the refused votes are replayed and counted; the invalid ones stay.
    query(dbname, "ALTER TABLE vote_audit DROP CONSTRAINT no_refused")
    replayed = run_cli("dead-letters", "replay", "--reason", "database_rejected", env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed 3 messages to {queue}; 2 left in {queue}.dead"
    wait_for(lambda: audit_count(dbname) == len(good) + len(refused), timeout=30, what="the replayed votes counted")
    assert svc.stop() == 0
    assert sorted(body for _h, body in dead_headers(queue)) == sorted(invalid)
    # PostgreSQL's refusal quotes the failing row: it reached neither the log nor the headers.
    assert "refused-1" not in svc.logs()


def test_an_interrupted_replay_loses_nothing(make_service: MakeService, queue_names: list[str], dbname: str) -> None:
    queue = fresh_queue(queue_names)
    make_service(queue_name=queue).start().stop()  # declares the queue and its dead-letter queue
    votes = make_votes(3_000, laws=3, seed=9)
    publish(f"{queue}.dead", [v.body() for v in votes])
    env = service_env(dbname=dbname, queue=queue)

    replay = subprocess.Popen(
        aggregator_command("dead-letters", "replay", "--all"),
        cwd=outside_checkout(),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: queue_state(queue)[0] >= 300, timeout=30, interval=0.01, what="the replay under way")
    finally:
        replay.send_signal(signal.SIGKILL)
        replay.wait(10)

    def in_the_queues() -> tuple[int, int]:
        return queue_state(queue)[0], queue_state(f"{queue}.dead")[0]

    # Every message is in one queue or the other: the one the killed connection held comes back
    # when the broker sees the connection gone (a message lost for good times this out).
    wait_for(lambda: sum(in_the_queues()) >= len(votes), timeout=30, what="every message in one queue or the other")
    moved, left = in_the_queues()
    assert 0 < left < len(votes)  # killed half-way
    assert moved + left <= len(votes) + 1  # one confirmed copy may be in both

    finished = run_cli("dead-letters", "replay", "--all", env=env)
    assert finished.returncode == 0, finished.stderr
    assert queue_state(f"{queue}.dead") == (0, 0)
    svc = make_service(queue_name=queue).start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="every replayed vote counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="the queue drained")
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes)


def test_without_a_dead_letter_exchange_refused_messages_are_rejected_as_before(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    # The queue exists without dead-lettering and "<queue>.dlx" does not exist: no copy can be
    # made, so the message is rejected (RabbitMQ drops it) and the service says so once.
    svc = make_service().start()
    publish(queue, [b"not json", b"[]", make_votes(1, laws=1)[0].body()])
    wait_for(lambda: audit_count(dbname) == 1, timeout=30, what="the vote counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=10, what="both refused messages gone")
    assert svc.stop() == 0
    assert svc.logs().count("cannot dead-letter to exchange") == 1
    assert svc.logs().count("rejected message") == 2


def test_replay_needs_to_be_told_what(make_service: MakeService, queue_names: list[str], dbname: str) -> None:
    queue = fresh_queue(queue_names)
    make_service(queue_name=queue).start().stop()
    result = run_cli("dead-letters", "replay", env=service_env(dbname=dbname, queue=queue))
    assert result.returncode == 2
    assert "--all, --reason R or --vote-hash H" in result.stderr


def dead_letters_with_properties(queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message of the dead-letter queue with its properties, read and put back."""
    conn = amqp_connection()
    try:
        ch = conn.channel()
        out: list[tuple[pika.BasicProperties, bytes]] = []
        while True:
            method, properties, body = ch.basic_get(f"{queue}.dead", auto_ack=False)
            if method is None or properties is None or body is None:
                return out
            out.append((properties, body))
    finally:
        conn.close()


def refused_mix(count: int, *, seed: int) -> dict[bytes, tuple[str, str]]:
    """`count` distinct invalid messages of several kinds, each with the (reason, detail) it is refused for."""
    good = make_votes(count, laws=3, seed=seed, prefix="refused")
    out: dict[bytes, tuple[str, str]] = {}
    for i, vote in enumerate(good):
        fields = json.loads(vote.body())
        kind = i % 5
        if kind == 0:
            body = f'{{"vote_hash": "{i}'.encode()  # cut short
        elif kind == 1:
            body = json.dumps({**fields, "choice": f"maybe-{i}"}).encode()
        elif kind == 2:
            body = json.dumps({**fields, "timestamp": f"tomorrow-{i}"}).encode()
        elif kind == 3:
            body = json.dumps({k: v for k, v in fields.items() if k != "law_id"} | {"n": i}).encode()
        else:
            body = json.dumps([fields["vote_hash"]]).encode()
        with pytest.raises(InvalidVote) as refused:
            parse_message(body, max_bytes=65_536)
        out[body] = (refused.value.reason, refused.value.detail)
    return out


def test_a_mix_of_votes_and_refused_messages_gives_each_refused_one_copy_with_why(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    queue = fresh_queue(queue_names)
    svc = make_service(queue_name=queue).start()
    good = make_votes(1_000, laws=3, seed=21)
    refused = refused_mix(1_000, seed=21)
    bodies: list[bytes] = []
    for vote, body in zip(good, refused, strict=True):
        bodies += [vote.body(), body]
    before = datetime.now(UTC)
    publish(queue, bodies)
    wait_for(lambda: queue_state(f"{queue}.dead")[0] == len(refused), timeout=60, what="every refused one copied")
    wait_for(lambda: audit_count(dbname) == len(good), timeout=60, what="the votes counted")
    assert svc.metric("dead_letter_publishing_blocked") == 0
    pid = svc.proc.pid if svc.proc is not None else 0
    assert svc.stop() == 0
    after = datetime.now(UTC)

    letters = dead_letters_with_properties(queue)
    assert sorted(body for _p, body in letters) == sorted(refused)  # each once: nothing crashed
    for properties, body in letters:
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in (properties.headers or {}).items()}
        reason, detail = refused[body]
        at = headers.pop("x-rejected-at")
        headers.pop("x-delivery-count", None)  # added by the quorum dead-letter queue as this test reads it
        assert headers == {
            "x-rejected-reason": reason,
            "x-rejected-detail": detail[:300],
            "x-rejected-by": f"vote-aggregator@{socket.gethostname()}:{pid}",
            "x-original-queue": queue,
        }
        assert before - timedelta(seconds=1) <= datetime.fromisoformat(str(at)) <= after
        assert str(at).endswith("+00:00")
        assert properties.delivery_mode == 2
        assert properties.content_type == "application/json"
    assert_all_counted_once(dbname, queue, good)


def test_copies_leave_as_the_frames_pika_would_send() -> None:
    # The publisher marshals the copies' frames itself (one method frame, each shared set of
    # properties encoded once): the bytes must be exactly those of pika's basic_publish.
    emitted: list[bytes] = []

    class Connection:
        params = pika.ConnectionParameters(frame_max=4096)  # the smallest AMQP allows: bodies of 4088 bytes

        def _output_marshaled_frames(self, frames: list[bytes]) -> None:
            emitted.extend(frames)

    config = Config(rabbitmq_queue="votes.aggregation")
    wire = _Wire.on(Connection(), 7, config)  # type: ignore[arg-type]  # the two attributes pika's connection has
    assert wire is not None
    why = pika.BasicProperties(
        delivery_mode=2,
        content_type="application/json",
        headers={"x-rejected-reason": "invalid_choice", "x-rejected-detail": "maybe", "x-original-queue": "q"},
    )
    other = pika.BasicProperties(delivery_mode=2, headers={"x-rejected-reason": "invalid_json", "x-n": 1})
    copies = [(b"not json", other), (b'{"choice": "maybe"}', why), (b"", why), (b"x" * 4088, other), (b"y", why)]
    publish = pika.spec.Basic.Publish(exchange="votes.aggregation.dlx", routing_key="votes.aggregation", mandatory=True)
    expected: list[bytes] = []
    for body, properties in copies:
        assert wire.add(body, properties)
        expected += [pika.frame.Method(7, publish).marshal(), pika.frame.Header(7, len(body), properties).marshal()]
        if body:
            expected.append(pika.frame.Body(7, body).marshal())
    # A body larger than a frame is left to basic_publish, which splits it.
    assert not wire.add(b"z" * 4089, why)
    assert emitted == []
    wire.flush()
    assert emitted == [b"".join(expected)]
    wire.flush()
    assert len(emitted) == 1


def test_killing_the_service_while_it_dead_letters_a_flood_loses_nothing(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    queue = fresh_queue(queue_names)
    make_service(queue_name=queue).start().stop()  # declares the queue and its dead-letter queue
    good = make_votes(4_000, laws=5, seed=22)
    invalid = [
        json.dumps({**json.loads(v.body()), "choice": "maybe"}).encode() for v in make_votes(20_000, laws=5, seed=23)
    ]
    bodies: list[bytes] = []
    for i, vote in enumerate(good):
        bodies += [*invalid[5 * i : 5 * i + 5], vote.body()]
    publish(queue, bodies)

    svc = make_service(queue_name=queue).start(wait_consuming=False)
    wait_for(
        lambda: queue_state(f"{queue}.dead")[0] >= 2_000, timeout=60, interval=0.01, what="dead-lettering under way"
    )
    svc.kill()  # SIGKILL: copies and acks in flight are cut off
    assert queue_state(f"{queue}.dead")[0] < len(invalid), "killed too late to prove anything"

    last = make_service(queue_name=queue).start()
    wait_for(lambda: audit_count(dbname) == len(good), timeout=120, what="every vote counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=60, what="the queue drained")
    wait_for(lambda: queue_state(f"{queue}.dead")[0] >= len(invalid), timeout=60, what="every refused one copied")
    assert last.stop() == 0
    dead = Counter(drain_queue(f"{queue}.dead"))
    # Every invalid message at least once (twice when its copy was confirmed but its ack cut off), nothing else.
    assert set(dead) == set(invalid)
    assert_all_counted_once(dbname, queue, good)


def test_a_flood_of_refused_messages_is_logged_one_by_one_only_up_to_a_cap(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    queue = fresh_queue(queue_names)
    svc = make_service(queue_name=queue).start()
    invalid = [json.dumps({**json.loads(v.body()), "choice": "maybe"}).encode() for v in make_votes(1_300, laws=2)]
    publish(queue, invalid)
    wait_for(lambda: queue_state(f"{queue}.dead")[0] == len(invalid), timeout=60, what="every refused one copied")
    wait_for(
        lambda: svc.metric("votes_rejected_total", reason="invalid_choice") == len(invalid),
        timeout=10,
        what="every one counted in the metrics",
    )
    assert svc.stop() == 0
    logs = svc.logs()
    assert logs.count("rejected message (") == 1_000
    assert "300 more messages rejected in the last 60s, not logged one by one (invalid_choice: 300)" in logs


def test_without_a_dead_letter_exchange_a_flood_is_rejected_as_it_comes(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    # As above, with a flood in small batches: each is rejected as it comes (the copies are not
    # tried again for 30 s), said once, and the votes among them are counted.
    svc = make_service({"BATCH_SIZE": "20"}).start()
    votes = make_votes(200, laws=2, seed=51)
    bodies: list[bytes] = []
    for i, vote in enumerate(votes):
        bodies += [f"not json {i}.{k}".encode() for k in range(5)] + [vote.body()]
    publish(queue, bodies)
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=20, what="the votes counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=20, what="every message settled")
    assert svc.stop() == 0
    assert svc.logs().count("cannot dead-letter to exchange") == 1
    assert_all_counted_once(dbname, queue, votes)


def test_refused_messages_during_a_database_outage_do_not_say_postgresql_is_back(
    make_service: MakeService, queue_names: list[str], dbname: str
) -> None:
    # A batch of refused messages writes nothing: copying it must not count as PostgreSQL
    # answering (database_up, /readyz, and the stall rule of /healthz, which waits for it).
    queue = fresh_queue(queue_names)
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    try:
        svc = make_service(
            {
                "POSTGRES_PORT": str(proxy.port),
                "FLUSH_WORKERS": "2",  # one retries the vote, the other takes the refused ones
                "RETRY_DELAY_SECONDS": "0.1",
                "RETRY_MAX_DELAY_SECONDS": "0.5",
                "MAX_RETRY_ATTEMPTS": "1",
                "STALL_TIMEOUT_SECONDS": "2",
                "BATCH_SIZE": "20",
            },
            queue_name=queue,
        ).start()
        first = make_votes(50, laws=2, seed=61)
        publish(queue, [v.body() for v in first])
        wait_for(lambda: audit_count(dbname) == len(first), timeout=30, what="votes counted")

        proxy.refuse()
        proxy.cut()
        held = make_votes(1, laws=2, seed=62)
        publish(queue, [held[0].body()])
        wait_for(lambda: svc.metric("database_up") == 0, timeout=30, what="the outage noticed")
        invalid = [f"not json {i}".encode() for i in range(200)]
        publish(queue, invalid)
        wait_for(lambda: queue_state(f"{queue}.dead")[0] == len(invalid), timeout=30, what="the copies made")
        assert svc.metric("database_up") == 0
        assert svc.http("/healthz") == (200, "ok\n")
        assert svc.http("/readyz")[1].startswith("PostgreSQL is failing")
        assert "PostgreSQL is answering again" not in svc.logs()

        proxy.resume()
        wait_for(lambda: audit_count(dbname) == len(first) + len(held), timeout=60, what="the held vote counted")
        wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="every message settled")
        assert svc.stop() == 0
    finally:
        proxy.close()
    assert sorted(drain_queue(f"{queue}.dead")) == sorted(invalid)
    assert_all_counted_once(dbname, queue, first + held)
