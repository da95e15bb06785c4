"""Results anyone can check: the chain computed by the service, signed heads kept outside the
database, and each attack of docs/security.md#threats tried for real and caught.

Heads files are made by heads.HeadRecorder, the code the service runs, on the chains a
db.Database wrote; one test runs the service itself and checks what it records and publishes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import chain
import db
import heads
from config import load_config
from tests.proxy import TcpProxy
from tests.roles import ServiceRole, apply_scripts
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PASSWORD,
    POSTGRES_PORT,
    POSTGRES_USER,
    Service,
    VoteMsg,
    amqp_connection,
    audit_count,
    key_files,
    private_key_file,
    publish,
    query,
    queue_state,
    run_cli,
    service_env,
    wait_for,
)
from tests.tampering import QueryRewriter, maintenance, rechain, truncate_link, vote

MakeService = Callable[..., Service]


def config_for(dbname: str, tmp_path: Path, **env: str) -> object:
    return load_config(
        {"POSTGRES_HOST": POSTGRES_HOST, "POSTGRES_PORT": str(POSTGRES_PORT), "POSTGRES_USER": POSTGRES_USER,
         "POSTGRES_PASSWORD": POSTGRES_PASSWORD, "POSTGRES_DB": dbname,
         "CHAIN_HEADS_FILE": str(tmp_path / "heads.jsonl"), "CHAIN_HEADS_EXCHANGE": "", **env}
    )  # fmt: skip


@contextmanager
def store(dbname: str, tmp_path: Path, **env: str) -> Iterator[db.Database]:
    database = db.Database(config=config_for(dbname, tmp_path, **env))  # type: ignore[arg-type]
    database.open()
    try:
        yield database
    finally:
        database.close()


def record_heads(database: db.Database, tmp_path: Path, key: Ed25519PrivateKey, *, final: bool) -> Path:
    recorder = heads.HeadRecorder(
        config=config_for(database._config.postgres_db, tmp_path),  # type: ignore[arg-type]
        chains=database.chains,
        instance=database.instance_id,
        key=key,
    )
    recorder.record(final=final)
    return tmp_path / "heads.jsonl"


def verify_heads(dbname: str, heads_file: Path, keys: Path | None = None) -> tuple[int, list[str]]:
    args = ["verify", "--heads", str(heads_file)] + (["--keys", str(keys)] if keys else [])
    done = run_cli(*args, env=service_env(dbname=dbname))
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout.splitlines()


def verify(dbname: str, heads_file: Path, public: Path) -> tuple[int, list[str]]:
    return verify_heads(dbname, heads_file, public)


@pytest.fixture
def election(dbname: str, tmp_path: Path) -> tuple[str, Path, Path]:
    """300 votes in three batches on chain "legit", its final head signed: (db, heads file, public key)."""
    apply_scripts(dbname)
    key, public = key_files(tmp_path)
    with store(dbname, tmp_path) as database:
        for first in (0, 100, 200):
            batch = [vote(i, law=f"law-{i % 3}", choice=("oui", "non")[i % 2]) for i in range(first, first + 100)]
            database.write_batch(batch, chain="legit")
        heads_file = record_heads(database, tmp_path, key, final=True)
    return dbname, heads_file, public


def test_verify_heads_accepts_the_election_as_signed(election: tuple[str, Path, Path]) -> None:
    dbname, heads_file, public = election
    code, lines = verify_heads(dbname, heads_file, public)
    assert code == 0, lines
    assert lines[-1].startswith("verdict: OK: 3 laws, 300 votes")
    record = json.loads(heads_file.read_text().splitlines()[0])
    assert (record["chain_id"], record["seq"], record["final"]) == ("legit", 3, True)


def test_a_rogue_chain_written_with_the_services_credentials_is_caught(
    election: tuple[str, Path, Path], svc_role: ServiceRole, tmp_path: Path
) -> None:
    dbname, heads_file, public = election
    with store(dbname, tmp_path, **svc_role.env()) as rogue:
        rogue.write_batch([vote(i, law="law-0") for i in range(1000, 1060)], chain="rogue")
    code, lines = verify(dbname, heads_file, public)
    assert code == 1
    assert "head: chain rogue (1 links) is in the database but no head in" in "\n".join(lines)
    assert lines[-1] == "verdict: FAILED: 1 differences from the heads"


def test_a_truncated_tail_is_caught(election: tuple[str, Path, Path]) -> None:
    dbname, heads_file, public = election
    with maintenance(dbname) as cur:
        truncate_link(cur, "legit", 3)
    assert run_cli("verify", env=service_env(dbname=dbname)).returncode == 0  # consistent without the heads
    code, lines = verify(dbname, heads_file, public)
    assert code == 1
    gone = r"head: head legit:3:[0-9a-f]{64} \(final\): chain legit has no link 3 \(it ends at link 2"
    assert any(re.match(gone, line) for line in lines), lines


def test_a_deleted_whole_chain_is_caught(election: tuple[str, Path, Path]) -> None:
    dbname, heads_file, public = election
    with maintenance(dbname) as cur:
        cur.execute("DELETE FROM vote_audit")
        cur.execute("DELETE FROM vote_chain")
        cur.execute("DELETE FROM vote_results")
    assert run_cli("verify", env=service_env(dbname=dbname)).returncode == 0  # an empty database agrees with itself
    code, lines = verify(dbname, heads_file, public)
    assert code == 1
    assert any("chain legit has no link 3 (it ends at link 0" in line for line in lines), lines


def test_a_rewritten_chain_is_caught(election: tuple[str, Path, Path]) -> None:
    dbname, heads_file, public = election
    with maintenance(dbname) as cur:
        cur.execute("UPDATE vote_audit SET choice = 'oui' WHERE vote_hash = %s", (vote(1).vote_hash,))  # was non
        cur.execute(
            "UPDATE vote_results SET oui_count = oui_count + 1, non_count = non_count - 1 WHERE law_id = 'law-1'"
        )
        rechain(cur, "legit")
    assert run_cli("verify", env=service_env(dbname=dbname)).returncode == 0  # a thorough forger fools the rest
    code, lines = verify(dbname, heads_file, public)
    assert code == 1
    assert any(re.match(r"head: head legit:3:[0-9a-f]{64} \(final\): the chain up to link 3 was rewritten", line)
               for line in lines), lines  # fmt: skip


def test_an_ingest_trigger_that_slips_past_the_check_at_commit_is_caught(
    dbname: str, svc_role: ServiceRole, tmp_path: Path
) -> None:
    """A DBA's trigger that flips choices as they are stored, made to pass what the batch statement
    returns: it fires AFTER INSERT (the statement returns the rows as inserted), as its owner, on the
    maintenance path, and moves the totals to match. The service commits and signs its heads;
    `verify --heads` finds every flipped row."""
    key, public = key_files(tmp_path)
    query(
        dbname,
        "CREATE FUNCTION flip_after() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
        "SET search_path = pg_catalog, public AS $$ BEGIN "
        "IF NEW.choice = 'non' THEN "
        "  PERFORM set_config('vote_aggregator.maintenance', 'on', true); "
        "  UPDATE vote_audit SET choice = 'oui' WHERE vote_hash = NEW.vote_hash; "
        "  UPDATE vote_results SET oui_count = oui_count + 1, non_count = non_count - 1 WHERE law_id = NEW.law_id; "
        "END IF; RETURN NULL; END $$",
    )
    query(dbname, "CREATE TRIGGER flip_after AFTER INSERT ON vote_audit FOR EACH ROW EXECUTE FUNCTION flip_after()")
    with store(dbname, tmp_path, **svc_role.env()) as database:  # the service, under its own role
        outcome = database.write_batch([vote(i, choice=("oui", "non")[i % 2]) for i in range(10)], chain="legit")
        assert outcome.link is not None  # committed: nothing at ingest saw it
        heads_file = record_heads(database, tmp_path, key, final=True)
    assert query(dbname, "SELECT law_id, oui_count, non_count FROM vote_results") == [("law-1", 10, 0)]
    assert query(dbname, "SELECT count(*) FROM vote_audit WHERE choice = 'non'") == [(0,)]
    code, lines = verify(dbname, heads_file, public)
    assert code == 1
    altered = sorted(line.split()[2] for line in lines if line.startswith("altered: vote "))
    assert altered == sorted(vote(i).vote_hash for i in range(1, 10, 2)), lines
    assert lines[-1] == "verdict: FAILED: audit rows 5 altered", lines


def test_a_forged_link_with_a_huge_seq_is_caught(election: tuple[str, Path, Path], svc_role: ServiceRole) -> None:
    dbname, heads_file, public = election
    huge = 2**62
    conn = psycopg2.connect(
        host=POSTGRES_HOST, port=POSTGRES_PORT, dbname=dbname, user=svc_role.name, password=svc_role.password
    )
    try:
        with conn, conn.cursor() as cur:  # with the service's own rights: INSERT on vote_chain
            cur.execute(
                "INSERT INTO vote_chain (chain_id, seq, vote_hashes, row_digests, digest) "
                "VALUES ('legit', %s, '{}', ''::bytea, %s)",
                (huge, b"\0" * 32),
            )
    finally:
        conn.close()
    code, lines = verify(dbname, heads_file, public)
    assert code == 1
    assert f"head: chain legit: links 4 to {huge} lie past its final head (link 3): added after the instance stopped" \
        in lines  # fmt: skip


def test_a_head_file_from_another_election_is_caught(
    election: tuple[str, Path, Path], tmp_path: Path, module_dbname: str
) -> None:
    dbname, _heads_file, public = election
    other = tmp_path / "other"
    other.mkdir()
    apply_scripts(module_dbname)
    key, other_public = key_files(other)
    with store(module_dbname, other) as database:
        database.write_batch([vote(i) for i in range(5000, 5010)], chain="legit")  # same name, other votes
        other_heads = record_heads(database, other, key, final=True)
    code, lines = verify(dbname, other_heads, other_public)
    assert code == 1
    assert any(re.match(r"head: head legit:1:[0-9a-f]{64} \(final\): the chain up to link 1 was rewritten", line)
               for line in lines), lines  # fmt: skip
    assert any("links 2 to 3 lie past its final head" in line for line in lines)
    # Signed by a key the officials do not trust: refused as such.
    code, lines = verify(dbname, other_heads, public)
    assert code == 1
    assert any("signed by a key that is not among the trusted ones" in line for line in lines)


def test_an_altered_head_record_fails_its_signature(election: tuple[str, Path, Path]) -> None:
    dbname, heads_file, public = election
    record = json.loads(heads_file.read_text())
    record["final"] = False  # to let links be added past it
    heads_file.write_text(json.dumps(record) + "\n")
    code, lines = verify(dbname, heads_file, public)
    assert code == 1
    assert any("its signature does not match it (forged or altered)" in line for line in lines), lines


@pytest.mark.parametrize("content", ["not json\n", '{"kind": "chain_head", "seq": 1}\n', ""])
def test_a_malformed_heads_file_is_bad_input(election: tuple[str, Path, Path], tmp_path: Path, content: str) -> None:
    dbname, _heads_file, public = election
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    done = run_cli("verify", "--heads", str(bad), "--keys", str(public), env=service_env(dbname=dbname))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert done.stdout == ""


# -- caught when it acts, not at the next audit ------------------------------------------------


def test_an_ingest_trigger_is_caught_at_once_and_nothing_is_committed(dbname: str, tmp_path: Path) -> None:
    apply_scripts(dbname)
    query(
        dbname,
        "CREATE FUNCTION flip() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.choice = 'non' THEN NEW.choice := 'oui'; END IF; RETURN NEW; END $$",
    )
    query(dbname, "CREATE TRIGGER flip BEFORE INSERT ON vote_audit FOR EACH ROW EXECUTE FUNCTION flip()")
    with store(dbname, tmp_path) as database:
        with pytest.raises(db.IntegrityFailure, match="differ from the 10 new votes sent"):
            database.write_batch([vote(i, choice=("oui", "non")[i % 2]) for i in range(10)], chain="c")
        assert database.chains.links() == []
    assert audit_count(dbname) == 0
    assert query(dbname, "SELECT count(*) FROM vote_chain") == [(0,)]


def test_a_tampering_proxy_is_caught_at_once_and_nothing_is_committed(dbname: str, tmp_path: Path) -> None:
    """Between the service and PostgreSQL, a proxy turns every "non" the service sends into "oui"."""
    apply_scripts(dbname)
    rewriters: list[QueryRewriter] = []

    def rewriter() -> QueryRewriter:
        rewriters.append(QueryRewriter(b'"choice":"non"', b'"choice":"oui"'))
        return rewriters[-1]

    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT, rewrite=rewriter)
    try:
        through = {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(proxy.port), "POSTGRES_SSLMODE": "disable"}
        with store(dbname, tmp_path, **through) as database:
            with pytest.raises(db.IntegrityFailure, match="differ from the 10 new votes sent"):
                database.write_batch([vote(i, choice=("oui", "non")[i % 2]) for i in range(10)], chain="c")
            assert database.chains.links() == []
    finally:
        proxy.close()
    assert sum(r.rewritten for r in rewriters) == 5  # the proxy did rewrite the five "non"
    assert audit_count(dbname) == 0
    assert query(dbname, "SELECT count(*) FROM vote_chain") == [(0,)]


def test_a_link_written_into_a_live_chain_by_another_writer_is_caught_at_the_next_batch(
    dbname: str, tmp_path: Path, svc_role: ServiceRole
) -> None:
    apply_scripts(dbname)
    with store(dbname, tmp_path) as database:
        database.write_batch([vote(i) for i in range(10)], chain="live")
        [(seq, digest)] = query(dbname, "SELECT seq, digest FROM vote_chain")
        forged = chain.link_digest(bytes(digest), seq + 1, chain.content_digest([], b""))
        query(
            dbname,
            "INSERT INTO vote_chain (chain_id, seq, vote_hashes, row_digests, digest) "
            "VALUES ('live', 2, '{}', ''::bytea, %s)",
            (forged,),
        )
        with pytest.raises(db.IntegrityFailure, match="chain live ends at link 2 in PostgreSQL, but this instance"):
            database.write_batch([vote(i) for i in range(10, 20)], chain="live")
    assert audit_count(dbname) == 10


def test_a_link_committed_without_its_answer_is_taken_up_by_the_next_batch(dbname: str, tmp_path: Path) -> None:
    """The answer to COMMIT was lost: the instance proposed link 1 and PostgreSQL holds it."""
    apply_scripts(dbname)
    with store(dbname, tmp_path) as first:
        outcome = first.write_batch([vote(i) for i in range(10)], chain="c")
    assert outcome.link is not None
    with store(dbname, tmp_path) as database:
        database.chains.propose(outcome.link)  # as _count_new left it before the lost answer
        with pytest.raises(db.TransactionConflict):
            database.write_batch([vote(i) for i in range(10, 20)], chain="c")
        again = database.write_batch([vote(i) for i in range(10, 20)], chain="c")
    assert again.link is not None
    assert again.link.seq == 2
    assert run_cli("verify", env=service_env(dbname=dbname)).returncode == 0


def test_the_service_stops_on_an_integrity_failure_and_leaves_the_votes_in_rabbitmq(
    make_service: MakeService, dbname: str, queue: str
) -> None:
    svc = make_service()
    svc.start()
    query(
        dbname,
        "CREATE FUNCTION flip() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.choice = 'non' THEN NEW.choice := 'oui'; END IF; RETURN NEW; END $$",
    )
    query(dbname, "CREATE TRIGGER flip BEFORE INSERT ON vote_audit FOR EACH ROW EXECUTE FUNCTION flip()")
    votes = [VoteMsg(f"{i:04x}", f"citizen-{i}", "law-1", "non") for i in range(50)]
    publish(queue, [v.body() for v in votes])
    assert svc.proc is not None
    assert svc.proc.wait(30) == 1
    logs = svc.logs()
    assert re.search(r"CRITICAL .*integrity failure: PostgreSQL stored 50 audit rows that differ from the 50", logs), (
        logs
    )
    assert "left unacked (RabbitMQ keeps them), stopping" in logs
    assert audit_count(dbname) == 0
    wait_for(lambda: queue_state(queue) == (50, 0), timeout=30, what="every vote back in the queue")


class HeadsObserver:
    """An observer's copy of the signed heads: a queue of its own bound to CHAIN_HEADS_EXCHANGE."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.published: list[str] = []
        self._connection = amqp_connection()
        self._channel = self._connection.channel()
        self._channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
        self._copy = self._channel.queue_declare("", exclusive=True).method.queue
        self._channel.queue_bind(self._copy, exchange)

    def take(self) -> list[str]:
        """Every record published so far, in order."""
        while (body := self._channel.basic_get(self._copy, auto_ack=True)[2]) is not None:
            self.published.append(body.decode())
        return self.published

    def close(self) -> None:
        self._connection.close()


def test_the_service_signs_its_heads_into_the_file_and_the_exchange(
    make_service: MakeService, dbname: str, queue: str, tmp_path: Path
) -> None:
    key, public = key_files(tmp_path)
    observer = HeadsObserver(f"{queue}.heads")
    try:
        svc = make_service(
            {
                "CHAIN_SIGNING_KEY_FILE": str(private_key_file(key, tmp_path / "instance.pem")),
                "CHAIN_HEADS_EXCHANGE": observer.exchange,
                "FLUSH_WORKERS": "2",
                "BATCH_SIZE": "50",
                "LOG_LEVEL": "WARNING",  # heads are recorded whatever the log level
            }
        ).start(wait_consuming=False)
        wait_for(lambda: queue_state(queue)[1] == 1, timeout=30, what="the service to start consuming")
        votes = [VoteMsg(f"{i:04x}", f"citizen-{i}", f"law-{i % 2}", "oui") for i in range(500)]
        publish(queue, [v.body() for v in votes])
        wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="every vote counted")
        assert svc.stop() == 0
        lines = svc.heads_path.read_text().splitlines()
        published = observer.take()
    finally:
        observer.close()
    chains = {row[0] for row in query(dbname, "SELECT DISTINCT chain_id FROM vote_chain")}
    finals = [json.loads(line) for line in lines if json.loads(line)["final"]]
    assert {record["chain_id"] for record in finals} == chains  # a final head for each chain, at WARNING too
    assert published == lines  # the observer's copy is the file
    code, out = verify_heads(dbname, svc.heads_path, public)
    assert code == 0, out
    # The observer's copy verifies on its own.
    observed = tmp_path / "observed.jsonl"
    observed.write_text("".join(line + "\n" for line in published))
    assert verify_heads(dbname, observed, public)[0] == 0


def test_periodic_heads_at_warning_level_anchor_the_chains_of_an_instance_killed_with_kill_9(
    make_service: MakeService, dbname: str, queue: str, tmp_path: Path
) -> None:
    key, public = key_files(tmp_path)
    observer = HeadsObserver(f"{queue}.heads")

    def vouched_for(lines: list[str]) -> bool:
        newest: dict[str, int] = {}
        for record in map(json.loads, lines):
            newest[record["chain_id"]] = max(newest.get(record["chain_id"], 0), record["seq"])
        return newest == dict(query(dbname, "SELECT chain_id, max(seq) FROM vote_chain GROUP BY 1"))

    def heads_cover_every_link() -> bool:
        lines = svc.heads_path.read_text().splitlines() if svc.heads_path.exists() else []
        return vouched_for(lines) and vouched_for(observer.take())

    try:
        svc = make_service(
            {
                "CHAIN_SIGNING_KEY_FILE": str(private_key_file(key, tmp_path / "instance.pem")),
                "CHAIN_HEADS_EXCHANGE": observer.exchange,
                "CHAIN_HEADS_INTERVAL_SECONDS": "0.2",
                "FLUSH_WORKERS": "2",
                "BATCH_SIZE": "50",
                "LOG_LEVEL": "WARNING",  # no INFO line: the heads are recorded all the same
            }
        ).start(wait_consuming=False)
        wait_for(lambda: queue_state(queue)[1] == 1, timeout=30, what="the service to start consuming")
        votes = [VoteMsg(f"{i:04x}", f"citizen-{i}", f"law-{i % 2}", ("oui", "non")[i % 3 == 0]) for i in range(400)]
        publish(queue, [v.body() for v in votes])
        wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="every vote counted")
        wait_for(heads_cover_every_link, timeout=30, what="periodic heads up to every chain's last link")
        svc.kill()  # kill -9: no final head
    finally:
        observer.close()
    published = observer.published
    lines = svc.heads_path.read_text().splitlines()
    assert not any(json.loads(line)["final"] for line in lines)
    assert set(published) <= set(lines)
    assert "hash chain head" not in svc.logs()  # none logged at WARNING: the file and the exchange have them
    code, out = verify_heads(dbname, svc.heads_path, public)
    assert code == 0, out
    assert not [line for line in out if line.startswith("note: chain")], out  # every link vouched for
    observed = tmp_path / "observed.jsonl"
    observed.write_text("".join(line + "\n" for line in published))
    assert verify_heads(dbname, observed, public)[0] == 0

    # The tail truncated after the kill (the last link of a chain, its rows and their counts): the
    # periodic heads catch it, as the final ones would have.
    [(chain_id, last)] = query(dbname, "SELECT chain_id, max(seq) FROM vote_chain GROUP BY 1 ORDER BY 1 LIMIT 1")
    with maintenance(dbname) as cur:
        truncate_link(cur, chain_id, last)
    assert run_cli("verify", env=service_env(dbname=dbname)).returncode == 0  # consistent without the heads
    code, out = verify_heads(dbname, svc.heads_path, public)
    assert code == 1
    assert any(f"chain {chain_id} has no link {last} (it ends at link {last - 1}" in line for line in out), out


# -- closing the polls ----------------------------------------------------------------------------


def test_the_seal_vouches_for_the_totals_and_every_final_head(
    election: tuple[str, Path, Path], tmp_path: Path, queue: str
) -> None:
    dbname, _heads_file, _public = election
    officials, officials_public = key_files(tmp_path, "officials")
    private = private_key_file(officials, tmp_path / "officials.pem")
    sealed = tmp_path / "seal.jsonl"
    env = service_env(dbname=dbname, queue=queue, CHAIN_SIGNING_KEY_FILE=str(private))

    publish(queue, [b"a vote still waiting"])
    busy = run_cli("seal", "--out", str(sealed), env=env)
    assert busy.returncode == 1
    assert f"queue {queue} holds 1 messages and has 0 consumers" in busy.stderr
    assert not sealed.exists()
    connection = amqp_connection()
    connection.channel().queue_purge(queue)
    connection.close()

    done = run_cli("seal", "--out", str(sealed), env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads(sealed.read_text())
    assert record["kind"] == "seal"
    assert record["totals"] == {"law-0": [50, 50], "law-1": [50, 50], "law-2": [50, 50]}
    assert list(record["chains"]) == ["legit"]
    assert record["chains"]["legit"][0] == 3
    assert "sealed the count: 3 laws, 1 chains" in done.stderr
    assert verify(dbname, sealed, officials_public)[0] == 0

    # Anything written after the seal: a vote slipped in with its count, in a chain of its own.
    with store(dbname, tmp_path) as late:
        late.write_batch([vote(9999, law="law-0")], chain="late")
    code, lines = verify(dbname, sealed, officials_public)
    assert code == 1
    text = "\n".join(lines)
    assert "chain late (1 links) is in the database but no head in" in text
    assert "vote_results differs from the sealed totals for law-0" in text


def test_the_seal_checks_the_database_against_the_instances_heads_in_the_same_snapshot(
    election: tuple[str, Path, Path], svc_role: ServiceRole, tmp_path: Path, queue: str
) -> None:
    dbname, heads_file, public = election
    officials, officials_public = key_files(tmp_path, "officials")
    env = service_env(
        dbname=dbname, queue=queue, CHAIN_SIGNING_KEY_FILE=str(private_key_file(officials, tmp_path / "off.pem"))
    )
    against_heads = ("--heads", str(heads_file), "--keys", str(public))
    done = run_cli("seal", *against_heads, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(json.loads(done.stdout)["chains"]) == ["legit"]
    (tmp_path / "first-seal.jsonl").write_text(done.stdout)
    assert verify(dbname, tmp_path / "first-seal.jsonl", officials_public)[0] == 0
    # A rogue chain, written with the service's credentials: the database alone still adds up, the
    # instances' heads do not vouch for it, and nothing is sealed.
    with store(dbname, tmp_path, **svc_role.env()) as rogue:
        rogue.write_batch([vote(i, law="law-0") for i in range(1000, 1060)], chain="rogue")
    assert run_cli("seal", env=env).returncode == 0  # without --heads, it would be sealed
    refused = run_cli("seal", "--out", str(tmp_path / "seal.jsonl"), *against_heads, env=env)
    assert refused.returncode == 1
    assert "head: chain rogue (1 links) is in the database but no head in" in refused.stdout
    assert "error: the database does not verify: nothing sealed" in refused.stderr
    assert not (tmp_path / "seal.jsonl").exists()
    assert '"kind"' not in refused.stdout
    # Links past the last head of an instance that did not stop (no final head): not sealed either.
    (tmp_path / "running").mkdir()
    with store(dbname, tmp_path, **svc_role.env()) as running:
        running.write_batch([vote(i) for i in range(2000, 2010)], chain="running")
        record_heads(running, tmp_path / "running", key_files(tmp_path, "running")[0], final=False)
        running.write_batch([vote(i) for i in range(2010, 2020)], chain="running")
    keys = tmp_path / "both.pub.pem"
    keys.write_bytes(public.read_bytes() + (tmp_path / "running.pub.pem").read_bytes())
    with maintenance(dbname) as cur:  # the rogue chain gone, with its votes and counts
        cur.execute("DELETE FROM vote_audit WHERE vote_hash IN (SELECT unnest(vote_hashes) FROM vote_chain "
                    "WHERE chain_id = 'rogue')")  # fmt: skip
        cur.execute("DELETE FROM vote_chain WHERE chain_id = 'rogue'")
        cur.execute("UPDATE vote_results SET oui_count = oui_count - 60 WHERE law_id = 'law-0'")
    both = ("--heads", str(heads_file), "--heads", str(tmp_path / "running" / "heads.jsonl"), "--keys", str(keys))
    unvouched = run_cli("seal", *both, env=env)
    assert unvouched.returncode == 1, unvouched.stdout + unvouched.stderr
    assert "error: links of running are past every head given with --heads: nothing sealed" in unvouched.stderr
    bad = run_cli("seal", "--keys", str(public), env=env)
    assert bad.returncode == 2
    assert bad.stderr == "error: --keys needs --heads\n"


def test_a_seal_is_refused_for_a_database_that_does_not_verify(election: tuple[str, Path, Path], queue: str) -> None:
    dbname, _heads_file, _public = election
    with maintenance(dbname) as cur:
        cur.execute("UPDATE vote_audit SET choice = 'oui' WHERE vote_hash = %s", (vote(1).vote_hash,))
    done = run_cli("seal", env=service_env(dbname=dbname, queue=queue))
    assert done.returncode == 1
    assert "error: the database does not verify: nothing sealed" in done.stderr
    assert '"kind"' not in done.stdout


def test_without_a_key_the_service_makes_a_development_key_and_says_so(
    make_service: MakeService, dbname: str, queue: str, tmp_path: Path
) -> None:
    svc = make_service({"CHAIN_HEADS_EXCHANGE": ""}).start()
    publish(queue, [VoteMsg(f"{i:04x}", f"citizen-{i}", "law-1", "oui").body() for i in range(20)])
    wait_for(lambda: audit_count(dbname) == 20, timeout=30, what="every vote counted")
    assert svc.stop() == 0
    dev = svc.heads_path.parent / heads.DEVELOPMENT_KEY_FILE
    assert "CHAIN_SIGNING_KEY_FILE is unset: chain heads are signed with a development key" in svc.logs()
    key = heads.load_signing_key(str(dev), heads_file=str(svc.heads_path))
    public = tmp_path / "dev.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert verify_heads(dbname, svc.heads_path, public)[0] == 0


def test_an_unwritable_heads_file_stops_start_up_as_a_configuration_error(
    make_service: MakeService, tmp_path: Path
) -> None:
    svc = make_service({"CHAIN_HEADS_FILE": str(tmp_path / "no-such-dir" / "heads.jsonl")}).start(wait_consuming=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2
    assert "CHAIN_HEADS_FILE " in svc.logs()
    assert "cannot append to it (No such file or directory)" in svc.logs()


def test_a_schema_from_before_the_service_computed_the_chain_is_upgraded_at_start(
    make_service: MakeService, dbname: str, queue: str
) -> None:
    apply_scripts(dbname)
    query(dbname, "ALTER TABLE vote_chain DROP COLUMN digest_format")
    svc = make_service(as_superuser=True).start()
    assert "schema objects missing (vote_chain.digest_format): applying init_db.sql" in svc.logs()
    publish(queue, [VoteMsg(f"{i:04x}", f"citizen-{i}", "law-1", "oui").body() for i in range(10)])
    wait_for(lambda: audit_count(dbname) == 10, timeout=30, what="every vote counted")
    assert svc.stop() == 0
    assert query(dbname, "SELECT DISTINCT digest_format FROM vote_chain") == [(2,)]


def test_the_final_head_takes_up_a_link_committed_without_its_answer(dbname: str, tmp_path: Path) -> None:
    apply_scripts(dbname)
    key, public = key_files(tmp_path)
    with store(dbname, tmp_path) as first:
        first.write_batch([vote(i) for i in range(10)], chain="c")
        outcome = first.write_batch([vote(i) for i in range(10, 20)], chain="c")
    assert outcome.link is not None
    with store(dbname, tmp_path) as database:
        database.chains.committed(stored_link(outcome.link, seq=1, dbname=dbname))
        database.chains.propose(outcome.link)  # link 2 sent, its COMMIT's answer lost
        recorder = heads.HeadRecorder(
            config=config_for(dbname, tmp_path),  # type: ignore[arg-type]
            chains=database.chains,
            instance=database.instance_id,
            key=key,
            before_final=database.settle_pending_links,
        )
        recorder.stop()  # never started: records the final heads only
    [record] = [json.loads(line) for line in (tmp_path / "heads.jsonl").read_text().splitlines()]
    assert (record["seq"], record["final"]) == (2, True)
    assert verify(dbname, tmp_path / "heads.jsonl", public)[0] == 0


def stored_link(link: db.ChainLink, *, seq: int, dbname: str) -> db.ChainLink:
    """The link `seq` of `link`'s chain, as stored."""
    [(digest,)] = query(dbname, "SELECT digest FROM vote_chain WHERE chain_id = %s AND seq = %s", (link.chain_id, seq))
    return db.ChainLink(link.chain_id, seq, bytes(digest))


def test_check_names_the_signing_key_and_refuses_one_it_cannot_read(
    dbname: str, svc_role: ServiceRole, queue: str, tmp_path: Path
) -> None:
    apply_scripts(dbname)
    key, _public = key_files(tmp_path)
    private = tmp_path / "instance.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    env = service_env(dbname=dbname, queue=queue, CHAIN_HEADS_FILE=str(tmp_path / "heads.jsonl"), **svc_role.env())
    done = run_cli("--check", env={**env, "CHAIN_SIGNING_KEY_FILE": str(private)})
    assert done.returncode == 0, done.stderr
    assert f"ok: chain heads signed by key {heads.public_hex(key)} into {tmp_path / 'heads.jsonl'}" in done.stdout
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello\n")
    done = run_cli("--check", env={**env, "CHAIN_SIGNING_KEY_FILE": str(not_a_key)})
    assert done.returncode == 2
    assert f"problem: CHAIN_SIGNING_KEY_FILE {not_a_key}: cannot read an Ed25519 private key" in done.stderr


def test_verify_takes_the_heads_of_every_instance_together(dbname: str, tmp_path: Path) -> None:
    """Two instances, a heads file each: one file vouches for only its own chain; both together for all."""
    apply_scripts(dbname)
    files = []
    for n in (1, 2):
        directory = tmp_path / f"instance-{n}"
        directory.mkdir()
        key, _public = key_files(tmp_path, f"instance-{n}")
        with store(dbname, directory) as database:
            database.write_batch([vote(i) for i in range(100 * n, 100 * n + 10)], chain=f"instance-{n}/flush-1")
            files.append(record_heads(database, directory, key, final=True))
    keys = tmp_path / "instances.pub.pem"
    keys.write_bytes((tmp_path / "instance-1.pub.pem").read_bytes() + (tmp_path / "instance-2.pub.pem").read_bytes())
    code, lines = verify_heads(dbname, files[0], keys)
    assert code == 1
    assert any("chain instance-2/flush-1 (1 links) is in the database but no head" in line for line in lines)
    done = run_cli(
        "verify",
        "--heads",
        str(files[0]),
        "--heads",
        str(files[1]),
        "--keys",
        str(keys),
        env=service_env(dbname=dbname),
    )
    assert done.returncode == 0, done.stdout
