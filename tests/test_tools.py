"""tools/publish_votes.py, run as users run it: `python -m tools.publish_votes ...`."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.proxy import TcpProxy
from tests.support import (
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    Service,
    amqp_connection,
    amqp_params,
    assert_invariant,
    audit_count,
    drain_queue,
    outside_checkout,
    query,
    queue_state,
    results,
    tool_command,
    tool_env,
    wait_for,
)
from tools.publisher import PublishError, publish_all
from tools.vote_messages import INVALID_KINDS, MessageFactory
from votes import InvalidVote, parse_vote

MakeService = Callable[..., Service]


def run_tool(
    *args: str, port: int = RABBITMQ_PORT, timeout: float = 120, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tool_command(f"--host={RABBITMQ_HOST}", f"--port={port}", *args),
        cwd=outside_checkout(),
        env=env if env is not None else tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON summary (exit {result.returncode}):\n{result.stdout}\n{result.stderr}") from None
    return data


def test_published_votes_are_counted_exactly_as_the_tool_reports(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    svc = make_service().start()
    result = run_tool(
        "--count=3000",
        "--laws=6",
        "--duplicates=0.05",
        "--replays=0.04",
        "--invalid=0.03",
        "--seed=11",
        "--json",
        f"--queue={queue}",
    )
    assert result.returncode == 0, result.stderr
    s = summary_of(result)
    assert s["ok"]
    assert s["published"] == s["confirmed"] == 3000
    assert s["nacked"] == s["returned"] == s["unconfirmed"] == 0
    assert (s["duplicates"], s["replays"], s["invalid"]) == (150, 120, 90)
    assert s["votes"] == 3000 - 150 - 120 - 90
    assert set(s["invalid_by_reason"]) == set(INVALID_KINDS)
    # The summary line is on stderr in --json mode, with every figure.
    assert "published=3000 confirmed=3000 nacked=0" in result.stderr
    assert "invalid=90" in result.stderr

    wait_for(lambda: svc.metric("messages_received_total") == 3000, timeout=60, what="every message received")
    wait_for(lambda: audit_count(dbname) == s["votes"], timeout=60, what="every vote counted")
    wait_for(lambda: queue_state(queue)[0] == 0, timeout=30, what="the queue to drain")
    wait_for(
        lambda: (
            svc.metric("duplicate_vote_attempts_total") == s["duplicates"]
            and svc.metric("votes_redelivered_total") == s["replays"]
        ),
        timeout=30,
        what="duplicates and redeliveries recorded",
    )

    # Per law and choice: exactly the unique valid votes the tool says it sent.
    want = {law: (t["oui"], t["non"]) for law, t in s["totals"].items()}
    assert results(dbname) == want
    assert set(want) == {f"law-{i:03d}" for i in range(1, 7)}
    assert_invariant(dbname)
    # Duplicate attempts: recorded once each, with the other choice and a later timestamp.
    attempts = query(
        dbname,
        "SELECT d.choice <> a.choice, d.vote_timestamp > a.timestamp FROM duplicate_attempts d "
        "JOIN vote_audit a USING (vote_hash)",
    )
    assert len(attempts) == s["duplicates"]
    assert all(flipped and later for flipped, later in attempts)
    # Invalid messages: rejected for the reason each kind is named after.
    for reason, n in s["invalid_by_reason"].items():
        assert svc.metric("votes_rejected_total", reason=reason) == n, reason
        assert svc.metric("aggregation_errors_total", error_type=reason) == n, reason
    # The votes are what upstream sends: vote_hash = sha256("citizen:law"), distinct citizens.
    rows = query(dbname, "SELECT vote_hash, citizen_id, law_id FROM vote_audit")
    assert all(h == hashlib.sha256(f"{c}:{law}".encode()).hexdigest() for h, c, law in rows)
    assert len({c for _h, c, _law in rows}) == len(rows)
    assert all(c.startswith(f"citizen-{s['run_id']}-") for _h, c, _law in rows)
    assert svc.stop() == 0


def test_each_kind_of_message_is_what_it_claims() -> None:
    """The generator alone, against the service's own validation."""
    factory = MessageFactory(
        count=2000, laws=3, duplicates=0.1, replays=0.1, invalid=0.2, reuse_after=100, seed=5, run_id="unit"
    )
    seen: dict[str, bytes] = {}
    first_use: dict[str, int] = {}
    reasons: Counter[str] = Counter()
    duplicates = replays = 0
    for position in range(len(factory)):
        body = factory.next()
        try:
            vote = parse_vote(body, max_bytes=4096)
        except InvalidVote as exc:
            reasons[exc.reason] += 1
            continue
        assert vote.law_id in ("law-001", "law-002", "law-003")
        assert body.decode().endswith('Z"}')
        assert vote.timestamp.tzinfo is not None
        if vote.vote_hash not in seen:
            assert vote.vote_hash == hashlib.sha256(f"{vote.citizen_id}:{vote.law_id}".encode()).hexdigest()
            seen[vote.vote_hash] = body
            first_use[vote.vote_hash] = position
            continue
        # A reuse: never of a vote published fewer than --reuse-after messages before.
        assert position - first_use[vote.vote_hash] >= 100
        original = parse_vote(seen[vote.vote_hash], max_bytes=4096)
        if body == seen[vote.vote_hash]:
            replays += 1
        else:
            duplicates += 1
            assert vote.choice != original.choice
            assert vote.timestamp > original.timestamp
            assert (vote.citizen_id, vote.law_id) == (original.citizen_id, original.law_id)
    assert (len(seen), duplicates, replays, sum(reasons.values())) == (1200, 200, 200, 400)
    assert reasons == factory.invalid
    assert set(reasons) == set(INVALID_KINDS)
    assert factory.votes == len(seen)
    assert sum(oui + non for oui, non in factory.totals.values()) == 1200


def test_two_connections_share_the_messages(queue: str) -> None:
    result = run_tool("--count=2000", "--connections=2", "--json", f"--queue={queue}")
    assert result.returncode == 0, result.stderr
    s = summary_of(result)
    assert s["connections"] == 2
    assert s["published"] == s["confirmed"] == 2000
    assert queue_state(queue)[0] == 2000
    bodies = [json.loads(b) for b in drain_queue(queue)]
    citizens = [int(b["citizen_id"].rsplit("-", 1)[1]) for b in bodies]
    assert len(set(citizens)) == 2000
    # Connection 1 numbers its citizens 1, 3, 5, ..., connection 2 numbers them 2, 4, 6, ...
    assert Counter(n % 2 for n in citizens) == {0: 1000, 1: 1000}


def test_rate_paces_publishing(queue: str) -> None:
    result = run_tool("--count=200", "--rate=100", "--json", f"--queue={queue}")
    assert result.returncode == 0, result.stderr
    s = summary_of(result)
    # Message i goes out no earlier than i / rate after the first: 200 at 100/s take at least
    # 1.99 s (1.98 leaves room for rounding). A floor only: a loaded machine is slower, never faster.
    assert s["elapsed_s"] >= 1.98
    assert s["rate"] <= 200 / 1.98
    assert queue_state(queue)[0] == 200


def test_unpaced_publishing_confirms_every_message(queue: str) -> None:
    # How fast is bench/publisher.py's question (about 13,000/s on an idle 2-core machine).
    result = run_tool("--count=5000", "--json", f"--queue={queue}")
    assert result.returncode == 0, result.stderr
    s = summary_of(result)
    assert s["published"] == s["confirmed"] == 5000
    assert s["rate"] > 0
    assert queue_state(queue)[0] == 5000


def test_the_shared_publisher_raises_unless_every_message_is_in_the_queue(queue_names: list[str]) -> None:
    """tools/publisher.publish_all, which the bench and the tests publish with: never a silent loss."""
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    conn = amqp_connection()
    try:
        conn.channel().queue_declare(name, durable=True, arguments={"x-max-length": 10, "x-overflow": "reject-publish"})
    finally:
        conn.close()
    bodies = [f'{{"n": {i}}}'.encode() for i in range(50)]
    with pytest.raises(PublishError, match="the broker nacked 40 messages"):
        publish_all(amqp_params(), name, bodies, window=7)
    assert drain_queue(name) == bodies[:10]  # in order
    with pytest.raises(PublishError, match=f"50 messages were returned unroutable by queue {name}.absent"):
        publish_all(amqp_params(), f"{name}.absent", bodies)
    publish_all(amqp_params(), name, bodies[:10], window=3)
    assert drain_queue(name) == bodies[:10]


def test_nacked_messages_make_the_exit_status_non_zero(queue_names: list[str]) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    conn = amqp_connection()
    try:
        # A full queue that refuses publishes: the broker nacks what does not fit.
        conn.channel().queue_declare(name, durable=True, arguments={"x-max-length": 10, "x-overflow": "reject-publish"})
    finally:
        conn.close()
    result = run_tool("--count=50", "--json", f"--queue={name}")
    assert result.returncode == 1
    s = summary_of(result)
    assert (s["published"], s["confirmed"], s["nacked"], s["ok"]) == (50, 10, 40, False)
    assert "40 nacked" in result.stderr
    assert queue_state(name)[0] == 10


def test_a_lost_connection_is_reported_and_fails(queue: str) -> None:
    proxy = TcpProxy(RABBITMQ_HOST, RABBITMQ_PORT)
    try:
        proc = subprocess.Popen(
            tool_command(
                f"--host={RABBITMQ_HOST}",
                f"--port={proxy.port}",
                "--count=5000",
                "--rate=500",
                "--json",
                f"--queue={queue}",
            ),
            cwd=outside_checkout(),
            env=tool_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: proxy.connections >= 1 and queue_state(queue)[0] > 100, timeout=20, what="publishing")
        proxy.refuse()
        proxy.cut()
        out, err = proc.communicate(timeout=30)
    finally:
        proxy.close()
    assert proc.returncode == 1, err
    s = json.loads(out)
    assert not s["ok"]
    assert 100 < s["published"] < 5000
    assert any("connection" in e for e in s["errors"]), s["errors"]
    assert "connection 1:" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_stops_publishing_and_settles_what_is_in_flight(queue: str, signum: int) -> None:
    proc = subprocess.Popen(
        tool_command(
            f"--host={RABBITMQ_HOST}",
            f"--port={RABBITMQ_PORT}",
            "--count=20000",
            "--rate=1000",
            "--connections=2",
            "--json",
            f"--queue={queue}",
        ),
        cwd=outside_checkout(),
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: queue_state(queue)[0] > 300, timeout=20, what="publishing")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    s = json.loads(out)
    assert s["interrupted"]
    assert not s["ok"]
    assert 300 < s["published"] < 20000
    # Stopped at once, with every message in flight confirmed: all of them are in the queue.
    assert s["confirmed"] == s["published"]
    assert s["unconfirmed"] == 0
    assert queue_state(queue)[0] == s["published"]
    assert f"interrupted after {s['published']} of 20000 messages" in err


def test_a_missing_queue_stops_it_unless_declared(queue_names: list[str]) -> None:
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    result = run_tool("--count=10", f"--queue={name}")
    assert result.returncode == 2
    assert f"queue {name} does not exist" in result.stderr
    assert "--declare" in result.stderr
    result = run_tool("--count=10", "--declare", f"--queue={name}")
    assert result.returncode == 0, result.stderr
    assert queue_state(name)[0] == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duplicates=0.4", "--replays=0.2"], "add up to more than 0.5"),
        (["--invalid=1.5"], "must be between 0 and 1"),
        (["--count=0"], "must be at least 1"),
        (["--rate=-5"], "must be 0 (unlimited) or more"),
        (["--count=2", "--connections=3"], "more than --count"),
    ],
)
def test_bad_options_exit_2(args: list[str], message: str) -> None:
    result = run_tool(*args, "--queue=unused")
    assert result.returncode == 2
    assert message in result.stderr


def test_unreachable_broker_exits_1(queue: str) -> None:
    proxy = TcpProxy(RABBITMQ_HOST, RABBITMQ_PORT)
    proxy.refuse()
    try:
        result = run_tool("--count=10", f"--queue={queue}", port=proxy.port)
    finally:
        proxy.close()
    assert result.returncode == 1  # may work later: not a configuration error
    assert "cannot connect to RabbitMQ" in result.stderr


def test_wrong_password_exits_2(queue: str) -> None:
    result = run_tool("--count=10", f"--queue={queue}", env=tool_env(RABBITMQ_PASSWORD="wrong"))
    assert result.returncode == 2
    assert "RabbitMQ refused" in result.stderr


def test_the_password_is_not_a_command_line_option(queue: str) -> None:
    # A password in argv shows in `ps` to every user of the machine: RABBITMQ_PASSWORD only.
    result = run_tool("--count=10", "--password=guest", f"--queue={queue}")
    assert result.returncode == 2
    assert "unrecognized arguments: --password" in result.stderr


def test_environment_variables_set_the_connection(queue: str) -> None:
    env = tool_env(RABBITMQ_HOST=RABBITMQ_HOST, RABBITMQ_PORT=str(RABBITMQ_PORT), RABBITMQ_QUEUE=queue)
    result = subprocess.run(
        tool_command("--count=25"),
        cwd=outside_checkout(),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("published=25 confirmed=25 nacked=0")
    assert queue_state(queue)[0] == 25


def test_progress_bar_on_a_terminal(queue: str) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            tool_command(
                f"--host={RABBITMQ_HOST}",
                f"--port={RABBITMQ_PORT}",
                "--count=400",
                "--rate=400",
                f"--queue={queue}",
            ),
            cwd=outside_checkout(),
            env=tool_env(),
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        slave = -1
        screen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    text = screen.decode()
    assert proc.returncode == 0, text
    updates = [u for u in text.split("\r") if u.strip()]
    assert len(updates) >= 3, text  # redrawn in place several times
    assert "msg/s" in updates[0]
    assert "[" in updates[0]
    assert "100.0%" in updates[-1]
    assert "400/400 confirmed" in updates[-1]
    assert out.startswith("published=400 confirmed=400")


def test_help_lists_every_option() -> None:
    result = subprocess.run(
        tool_command("--help"), cwd=outside_checkout(), env=tool_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    for option in ("--count", "--laws", "--rate", "--duplicates", "--replays", "--invalid", "--connections", "--queue"):
        assert option in result.stdout
