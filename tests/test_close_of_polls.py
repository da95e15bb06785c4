"""Closing the polls, end to end, with the commands of docs/operations.md#closing-the-polls: two
embargoed instances count; the publishers stop; the queue is drained on the node; the dead-letter
queue is handled (what the database refused is replayed once the cause is fixed, invalid messages
are kept); the instances stop; verify; the results exported; the embargo lifted.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable

import pytest

import exits
from tests.support import (
    Service,
    VoteMsg,
    audit_count,
    expected_totals,
    make_votes,
    publish,
    query,
    run_cli,
    service_env,
    wait_for,
)

MakeService = Callable[..., Service]


def _on_the_node(queue: str) -> dict[str, tuple[int, int]]:
    """`rabbitmqctl list_queues name messages_ready messages_unacknowledged`: the runbook's step 2."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = {}
    for line in listed.stdout.splitlines():
        name, *counts = line.split("\t")
        if name in (queue, f"{queue}.dead"):
            found[name] = (int(counts[0]), int(counts[1]))
    return found


def _rabbitmqctl_unavailable() -> str | None:
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl (the runbook's step 2) is not installed"
    tried = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60)
    if tried.returncode != 0:
        # As a user without the node's Erlang cookie (a developer who is not root).
        return f"rabbitmqctl (the runbook's step 2) cannot reach the node as this user (exit {tried.returncode})"
    return None


@pytest.mark.skipif(_rabbitmqctl_unavailable() is not None, reason=str(_rabbitmqctl_unavailable()))
def test_closing_the_polls_step_by_step(make_service: MakeService, queue_names: list[str], dbname: str) -> None:
    queue = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(queue)  # declared by the service, with its dead-letter queue
    embargoed = {"RESULTS_EMBARGO": "true"}
    instances = [make_service(embargoed, queue_name=queue).start() for _ in range(2)]
    role_env = {k: v for k, v in instances[0].env.items() if k in ("POSTGRES_USER", "POSTGRES_PASSWORD")}
    operator = service_env(dbname=dbname, queue=queue, **role_env)

    # Some votes the database refuses (a constraint added by mistake), and two invalid messages.
    query(dbname, "ALTER TABLE vote_audit ADD CONSTRAINT polls_refused CHECK (citizen_id NOT LIKE 'refused-%')")
    good = make_votes(1500, laws=4, seed=22)
    refused = [VoteMsg(f"{i:064x}", f"refused-{i}", "law-001", "non") for i in range(1, 4)]
    invalid = [b"not json", json.dumps({**json.loads(good[0].body()), "choice": "maybe"}).encode()]
    publish(queue, [*invalid, *(v.body() for v in good), *(v.body() for v in refused)])

    # 1. The publishers stopped (above). 2. Nothing ready or unacked; the refused ones dead-lettered.
    wait_for(
        lambda: _on_the_node(queue) == {queue: (0, 0), f"{queue}.dead": (5, 0)},
        timeout=60,
        what="the queue drained on the node",
    )
    assert audit_count(dbname) == len(good)

    # 3. The dead-letter queue: counts by reason, the cause fixed, the refused votes replayed.
    listed = run_cli("dead-letters", "list", env=operator)
    assert listed.returncode == exits.OK, listed.stderr
    by_reason = {reason: int(n) for n, reason in re.findall(r"^\s+(\d+)\s+(\S+)$", listed.stdout, re.MULTILINE)}
    assert by_reason == {"database_rejected": 3, "invalid_json": 1, "invalid_choice": 1}, listed.stdout
    query(dbname, "ALTER TABLE vote_audit DROP CONSTRAINT polls_refused")
    replayed = run_cli("dead-letters", "replay", "--reason", "database_rejected", env=operator)
    assert replayed.returncode == exits.OK, replayed.stderr
    assert replayed.stdout.strip() == f"replayed 3 messages to {queue}; 2 left in {queue}.dead"
    wait_for(lambda: audit_count(dbname) == len(good) + len(refused), timeout=60, what="the replayed votes counted")
    wait_for(
        lambda: _on_the_node(queue) == {queue: (0, 0), f"{queue}.dead": (2, 0)},
        timeout=60,
        what="the queue drained again, the invalid messages kept",
    )

    # 4. Stop the instances: each writes and acks what it holds, exit 0.
    for svc in instances:
        assert svc.stop() == exits.OK

    # 5. Verify (the integrity issue's seal and verify --heads go here once they exist).
    # Every head the instances logged, the last of each chain included (logged at the stop).
    heads = [h for svc in instances for h in re.findall(r"hash chain head (\S+)", svc.logs())]
    assert heads
    verified = run_cli("verify", *(arg for head in heads for arg in ("--head", head)), env=operator)
    assert verified.returncode == exits.OK, verified.stdout + verified.stderr
    assert "verdict: OK" in verified.stdout

    # 6. Export the results: the operator's command reads them under the embargo too.
    exported = run_cli("results", "--format", "csv", env=operator)
    assert exported.returncode == exits.OK, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {r["law_id"]: (int(r["oui"]), int(r["non"])) for r in rows} == expected_totals([*good, *refused])

    # 7. Lift the embargo: an instance started with RESULTS_EMBARGO=false shows the totals.
    published = make_service({"RESULTS_EMBARGO": "false"}, queue_name=queue).start()
    assert published.metric("results_embargo") == 0
    for law, (oui, non) in expected_totals([*good, *refused]).items():
        assert published.metric("current_vote_totals", law_id=law, choice="oui") == oui
        assert published.metric("current_vote_totals", law_id=law, choice="non") == non
    assert published.stop() == exits.OK
    assert query(dbname, "SELECT count(*) FROM duplicate_attempts") == [(0,)]
