"""`aggregator.py verify`: the recount, the hash chains, and audit rows edited, deleted or inserted after the fact.

Tampering goes through the maintenance path (docs/security.md), as an administrator would have to.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import db
from config import load_config
from tests.roles import ServiceRole, apply_scripts
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PASSWORD,
    POSTGRES_PORT,
    POSTGRES_USER,
    Service,
    VoteMsg,
    audit_count,
    publish,
    query,
    run_cli,
    service_env,
    wait_for,
)
from tests.tampering import maintenance, rechain, vote

MakeService = Callable[..., Service]


@contextmanager
def database(dbname: str) -> Iterator[db.Database]:
    config = load_config(
        {"POSTGRES_HOST": POSTGRES_HOST, "POSTGRES_PORT": str(POSTGRES_PORT), "POSTGRES_USER": POSTGRES_USER,
         "POSTGRES_PASSWORD": POSTGRES_PASSWORD, "POSTGRES_DB": dbname}
    )  # fmt: skip
    store = db.Database(config=config)
    store.open()
    try:
        yield store
    finally:
        store.close()


def verify(dbname: str, *args: str) -> tuple[int, list[str]]:
    done = run_cli("verify", *args, env=service_env(dbname=dbname, RESULTS_EMBARGO="false"))
    assert done.stderr == ""
    return done.returncode, done.stdout.splitlines()


@pytest.fixture
def chained(dbname: str) -> str:
    """300 votes over three laws, written in three batches by the service's own statement."""
    apply_scripts(dbname)
    with database(dbname) as store:
        for first in (0, 100, 200):
            store.write_batch(
                [vote(i, law=f"law-{i % 3}", choice=("oui", "non")[i % 2]) for i in range(first, first + 100)],
                chain="test-chain",
            )
    return dbname


def test_verify_agrees_and_prints_a_table_and_a_verdict(chained: str) -> None:
    code, lines = verify(chained)
    assert code == 0, lines
    assert lines[0].split() == ["law", "audit", "oui", "audit", "non", "results", "oui", "results", "non"]
    assert [line.split() for line in lines[1:4]] == [
        ["law-0", "50", "50", "50", "50", "ok"],
        ["law-1", "50", "50", "50", "50", "ok"],
        ["law-2", "50", "50", "50", "50", "ok"],
    ]
    assert lines[4] == "hash chains: 1 chains, 3 links, 300 rows chained"
    assert lines[-1] == (
        "verdict: OK: 3 laws, 300 votes: vote_results matches vote_audit; "
        "1 hash chains intact, every audit row as chained"
    )


def test_verify_names_each_row_edited_deleted_or_inserted(chained: str) -> None:
    with maintenance(chained) as cur:
        cur.execute("UPDATE vote_audit SET choice = 'oui' WHERE vote_hash = %s", (vote(1).vote_hash,))  # was non
        cur.execute("UPDATE vote_audit SET citizen_id = 'someone-else' WHERE vote_hash = %s", (vote(4).vote_hash,))
        cur.execute("DELETE FROM vote_audit WHERE vote_hash = %s", (vote(150).vote_hash,))
        cur.execute(
            'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") '
            "VALUES ('feedbeef', 'ghost', 'law-2', 'oui', now())"
        )
        cur.execute(
            'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp", recorded_at) '
            "VALUES ('deadbeef', 'ghost', 'law-2', 'oui', now(), (SELECT min(recorded_at) FROM vote_audit))"
        )
    code, lines = verify(chained)
    assert code == 1
    assert f"altered: vote {vote(1).vote_hash} (chain test-chain link 1) differs from what its chain link recorded: " \
           "altered after the fact" in lines  # fmt: skip
    assert any(line.startswith(f"altered: vote {vote(4).vote_hash} (chain test-chain link 1)") for line in lines)
    assert any(line.startswith(f"removed: vote {vote(150).vote_hash} (chain test-chain link 2)") for line in lines)
    assert any(line.startswith("added: vote deadbeef in no chain link") for line in lines)
    assert any(line.startswith("added: vote feedbeef in no chain link") for line in lines)
    # The recount sees the edit of a choice, the deletion and the insertions.
    differing = [line.split()[0] for line in lines if line.endswith("DIFFERS")]
    assert differing == ["law-0", "law-1", "law-2"]
    assert lines[-1] == (
        "verdict: FAILED: vote_results differs from vote_audit for law-0, law-1, law-2; "
        "audit rows 2 altered, 1 removed, 2 added"
    )


@pytest.mark.slow
def test_verify_catches_a_rewritten_chain_only_through_a_head_kept_elsewhere(chained: str) -> None:
    (head_seq, head_digest) = query(chained, "SELECT seq, digest FROM vote_chain ORDER BY seq DESC LIMIT 1")[0]
    head = f"test-chain:{head_seq}:{bytes(head_digest).hex()}"
    assert verify(chained, "--head", head)[0] == 0

    # Altering a row and its link's record of it breaks that link.
    with maintenance(chained) as cur:
        cur.execute("UPDATE vote_audit SET choice = 'non' WHERE vote_hash = %s", (vote(0).vote_hash,))
        cur.execute(
            "UPDATE vote_chain c SET row_digests = overlay(row_digests PLACING "
            f"(SELECT {db.row_digest_sql('a')} FROM vote_audit a WHERE vote_hash = %(h)s) "
            "FROM 32 * (array_position(vote_hashes, %(h)s::varchar) - 1) + 1 FOR 32) "
            "WHERE chain_id = 'test-chain' AND seq = 1",
            {"h": vote(0).vote_hash},
        )
        cur.execute(
            "UPDATE vote_results SET oui_count = oui_count - 1, non_count = non_count + 1 WHERE law_id = 'law-0'"
        )
    code, lines = verify(chained)
    assert code == 1
    assert "link: chain test-chain link 1: its digest does not match its content and the link before it " \
           "(the link, or one before it, was altered)" in lines  # fmt: skip
    assert lines[-1] == "verdict: FAILED: 3 chain links broken"  # link 1, and the two that build on it

    # Rewriting the whole chain consistently fools every check but the head logged at the time.
    with maintenance(chained) as cur:
        rechain(cur, "test-chain")
    assert verify(chained)[0] == 0
    code, lines = verify(chained, "--head", head)
    assert code == 1
    assert any(re.fullmatch(rf"head: head {head}: the chain up to link 3 was rewritten \([0-9a-f]{{64}} now\)", line)
               for line in lines)  # fmt: skip
    assert verify(chained, "--head", f"test-chain:4:{'0' * 64}")[1][-2].endswith("has no link 4 (links were removed)")


def test_verify_refuses_a_malformed_head(chained: str) -> None:
    done = run_cli("verify", "--head", "not-a-head", env=service_env(dbname=chained))
    assert done.returncode == 2
    assert done.stderr == "error: --head must be <chain id>:<seq>:<digest hex>, got 'not-a-head'\n"


def test_only_newly_inserted_rows_enter_the_chain(dbname: str) -> None:
    apply_scripts(dbname)
    with database(dbname) as store:
        first = store.write_batch([vote(i) for i in range(10)], chain="c")
        again = store.write_batch([vote(i) for i in range(10)], chain="c")  # a redelivered batch
        mixed = store.write_batch([vote(i) for i in range(5, 15)], chain="c")
    assert first.link is not None
    assert first.link.seq == 1
    assert again.link is None
    assert again.redeliveries == 10
    assert mixed.link is not None
    assert mixed.link.seq == 2
    rows = query(dbname, "SELECT seq, vote_hashes FROM vote_chain ORDER BY seq")
    assert [(seq, sorted(hashes)) for seq, hashes in rows] == [
        (1, [vote(i).vote_hash for i in range(10)]),
        (2, [vote(i).vote_hash for i in range(10, 15)]),
    ]


def test_writers_racing_for_the_same_votes_keep_their_chains_and_the_totals(dbname: str) -> None:
    """Writers (as instances and flush workers are) on overlapping batches at once: each vote in one link."""
    apply_scripts(dbname)
    errors: list[BaseException] = []
    chained: dict[int, int] = {}  # writer -> votes it chained
    together = threading.Barrier(3)

    def write(worker: int) -> None:
        try:
            with database(dbname) as store:
                for start in range(0, 400, 50):
                    batch = [vote(i, law=f"law-{i % 4}") for i in range(start + 20 * worker, start + 20 * worker + 60)]
                    together.wait(30)
                    while True:  # the pipeline's retry, in short
                        try:
                            outcome = store.write_batch(batch)
                            break
                        except db.RetryableError:
                            continue
                    chained[worker] = chained.get(worker, 0) + outcome.new_votes
        except BaseException as exc:  # reported below; a thread's exception would go unseen
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,), name=f"flush-{n}") for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sum(chained.values()) == 450
    writers = len([n for n in chained.values() if n])
    assert writers >= 2  # the last rows of each round are the third writer's alone
    assert query(dbname, "SELECT count(DISTINCT chain_id) FROM vote_chain") == [(writers,)]
    assert query(dbname, "SELECT sum(cardinality(vote_hashes)) FROM vote_chain") == [(450,)]
    code, lines = verify(dbname)
    assert code == 0, lines
    assert lines[-1].startswith("verdict: OK: 4 laws, 450 votes")


def test_the_service_logs_chain_heads_that_verify_accepts(
    make_service: MakeService, dbname: str, svc_role: ServiceRole, queue: str
) -> None:
    votes = [VoteMsg(f"{i:04x}", f"citizen-{i}", f"law-{i % 2}", "oui") for i in range(500)]
    svc = make_service({**svc_role.env(), "FLUSH_WORKERS": "2", "BATCH_SIZE": "50"}).start()
    publish(queue, [v.body() for v in votes])
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="every vote counted")
    assert svc.stop() == 0
    heads = re.findall(r"hash chain head (\S+)", svc.logs())
    assert heads
    last = {head.rsplit(":", 2)[0]: head for head in heads}  # the final head of each chain
    assert len(last) == len(query(dbname, "SELECT DISTINCT chain_id FROM vote_chain"))
    args = [arg for head in heads for arg in ("--head", head)]
    done = run_cli("verify", *args, env=service_env(dbname=dbname, **svc_role.env()))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("verdict: OK: 2 laws, 500 votes")


def test_links_written_before_the_service_computed_the_chain_still_verify(dbname: str) -> None:
    """Format 1: the server computed each row's digest, with recorded_at; verify recomputes it in Python."""
    apply_scripts(dbname)
    row_v1 = (
        "sha256(convert_to(concat(length(a.vote_hash), ':', a.vote_hash, length(a.citizen_id), ':', a.citizen_id, "
        "length(a.law_id), ':', a.law_id, length(a.choice), ':', a.choice), 'UTF8') "
        '|| timestamptz_send(a."timestamp") || timestamptz_send(a.recorded_at))'
    )
    with maintenance(dbname) as cur:
        cur.execute(
            'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") VALUES '
            "('0a', 'c-1', 'law-1', 'oui', now()), ('0b', 'c-2', 'law-1', 'non', now())"
        )
        cur.execute("INSERT INTO vote_results (law_id, oui_count, non_count) VALUES ('law-1', 1, 1)")
        cur.execute(f"SELECT array_agg(vote_hash ORDER BY vote_hash), string_agg({row_v1}, ''::bytea ORDER BY "
                    "vote_hash) FROM vote_audit a")  # fmt: skip
        [(hashes, digests)] = cur.fetchall()
        content = hashlib.sha256(",".join(hashes).encode() + bytes(digests)).digest()
        digest = db.link_digest_from_content(db.genesis_digest("old"), 1, content)
        cur.execute(
            "INSERT INTO vote_chain (chain_id, seq, vote_hashes, row_digests, digest) VALUES ('old', 1, %s, %s, %s)",
            (hashes, bytes(digests), digest),
        )
    code, lines = verify(dbname)
    assert code == 0, lines
    assert query(dbname, "SELECT digest_format FROM vote_chain") == [(1,)]
    with maintenance(dbname) as cur:
        cur.execute("UPDATE vote_audit SET recorded_at = recorded_at + interval '1 second' WHERE vote_hash = '0a'")
    code, lines = verify(dbname)
    assert code == 1
    assert any(line.startswith("altered: vote 0a (chain old link 1)") for line in lines), lines
