"""Closing the polls, end to end, with the commands of docs/operations.md#closing-the-polls: two
embargoed instances count; the publishers stop; the queue is drained on the node; the dead-letter
queue is handled (what the database refused is replayed once the cause is fixed, invalid messages
are kept); the instances stop, each writing its final signed heads; `verify --heads` checks the
database against them; the count is sealed with the officials' key, and the seal verified; the
results exported (under the embargo, only with --polls-closed); the embargo lifted.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import exits
from tests import skips
from tests.support import (
    Service,
    VoteMsg,
    audit_count,
    expected_totals,
    key_files,
    make_votes,
    private_key_file,
    publish,
    query,
    run_cli,
    service_env,
    wait_for,
)

pytestmark = pytest.mark.slow  # the runbook step by step

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


def test_closing_the_polls_step_by_step(
    make_service: MakeService, queue_names: list[str], dbname: str, tmp_path: Path
) -> None:
    # Asked here, not at collection: rabbitmqctl takes a second or more, in every worker that collects.
    skips.require(_rabbitmqctl_unavailable())
    queue = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(queue)  # declared by the service, with its dead-letter queue
    # The instances' signing key (its public half goes to the observers) and the officials' key.
    instance_key, instances_public = key_files(tmp_path, "instances")
    officials_key, officials_public = key_files(tmp_path, "officials")
    embargoed = {
        "RESULTS_EMBARGO": "true",
        "CHAIN_SIGNING_KEY_FILE": str(private_key_file(instance_key, tmp_path / "instances.pem")),
    }
    instances = [make_service(embargoed, queue_name=queue).start() for _ in range(2)]
    # The operator's commands run as an administrator (the service's role may not read results).
    operator = service_env(dbname=dbname, queue=queue)

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

    # 4. Stop the instances: each writes and acks what it holds, exit 0, and ends its log as the runbook shows.
    for svc in instances:
        assert svc.stop() == exits.OK
        assert "consumer: stopping: no new messages; writing 0 buffered votes" in svc.logs()
        assert svc.logs().rstrip().endswith("__main__: stopped (exit code 0)"), svc.logs()[-500:]

    # 5. Seal and verify: the database holds exactly what the instances' final signed heads vouch
    # for; the officials seal the count with their key; the seal verifies.
    heads_files = [str(svc.heads_path) for svc in instances]
    checked = run_cli(
        "verify", *(arg for f in heads_files for arg in ("--heads", f)), "--keys", str(instances_public), env=operator
    )
    assert checked.returncode == exits.OK, checked.stdout + checked.stderr
    # What the runbook shows verify print: no per-law figure (the embargo holds here too), the
    # chains, the verdict.
    lines = checked.stdout.splitlines()
    assert lines[0].startswith("per-law counts withheld: RESULTS_EMBARGO"), checked.stdout
    assert re.fullmatch(r"hash chains: 2 chains, [\d,]+ links, 1,503 rows chained", lines[1]), checked.stdout
    assert lines[2:] == [
        "verdict: OK: 4 laws, 1,503 votes: vote_results matches vote_audit; "
        "2 hash chains intact, every audit row as chained"
    ], checked.stdout
    sealed = tmp_path / "seal.jsonl"
    officials = {**operator, "CHAIN_SIGNING_KEY_FILE": str(private_key_file(officials_key, tmp_path / "off.pem"))}
    made = run_cli(
        "seal",
        "--out",
        str(sealed),
        *(arg for f in heads_files for arg in ("--heads", f)),
        "--keys",
        str(instances_public),
        env=officials,
    )
    assert made.returncode == exits.OK, made.stdout + made.stderr
    # The signed record: appended to --out, printed the same, and the log says the polls are closed.
    assert made.stdout.splitlines() == sealed.read_text().splitlines()
    record = json.loads(sealed.read_text().splitlines()[-1])
    assert record["totals"] == {law: [oui, non] for law, (oui, non) in expected_totals([*good, *refused]).items()}
    assert (
        f"WARNING MainThread seal: sealed the count: 4 laws, 2 chains, totals digest {record['totals_digest']} "
        "(the polls are closed)"
    ) in made.stderr
    again = run_cli("verify", "--heads", str(sealed), "--keys", str(officials_public), env=operator)
    assert again.returncode == exits.OK, again.stdout + again.stderr

    # 6. Export the results: withheld under the embargo unless the polls are said to be closed.
    withheld = run_cli("results", "--format", "csv", env=operator)
    assert withheld.returncode == exits.CONFIG
    assert withheld.stdout == ""
    assert withheld.stderr.strip().startswith("error: RESULTS_EMBARGO is true: per-law results are withheld")
    exported = run_cli("results", "--format", "csv", "--polls-closed", env=operator)
    assert exported.returncode == exits.OK, exported.stderr
    # Logged with the user's name.
    assert (
        "WARNING MainThread __main__: results: per-law figures printed under RESULTS_EMBARGO because "
        f"--polls-closed was given (by {getpass.getuser()})"
    ) in exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    totals = expected_totals([*good, *refused])
    assert {r["law_id"]: (int(r["oui"]), int(r["non"])) for r in rows} == totals
    table = run_cli("results", "--polls-closed", env=operator)
    assert table.returncode == exits.OK, table.stderr
    shown = table.stdout.splitlines()
    header = ["law", "oui", "non", "total", "oui %", "non %", "leading", "last update (UTC)"]
    assert re.split(r"\s{2,}", shown[0].strip()) == header, table.stdout
    oui, non = sum(o for o, _ in totals.values()), sum(n for _, n in totals.values())
    assert shown[-1].split() == ["all", "laws", f"{oui:,}", f"{non:,}", f"{oui + non:,}"], table.stdout

    # 7. Lift the embargo: an instance started with RESULTS_EMBARGO=false shows the totals.
    published = make_service({"RESULTS_EMBARGO": "false"}, queue_name=queue).start()
    assert published.metric("results_embargo") == 0
    for law, (oui, non) in expected_totals([*good, *refused]).items():
        assert published.metric("current_vote_totals", law_id=law, choice="oui") == oui
        assert published.metric("current_vote_totals", law_id=law, choice="non") == non
    assert published.stop() == exits.OK
    assert query(dbname, "SELECT count(*) FROM duplicate_attempts") == [(0,)]
