"""PostgreSQL: the connection pool, the schema, and the per-batch transaction.

psycopg2's exceptions stop here. Callers see:
- RetryableError (DatabaseUnavailable, TransactionConflict): may succeed later;
- DatabaseRejected: the data of one or more votes was refused; retrying the
  same batch would fail the same way;
- DatabaseMissing / DatabaseConfigError: the service cannot run as configured.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psycopg2
import psycopg2._psycopg
import psycopg2.errors
import psycopg2.extensions
import psycopg2.pool
from psycopg2.extras import execute_values
from psycopg2.pool import ThreadedConnectionPool

import chain as hashchain
import schema
from config import Config, node_text
from dbconnect import (
    PooledConnection,
    Watchdog,
    classify_connect_error,
    connect_kwargs,
    create_database,
)
from dberrors import (
    DatabaseConfigError,
    DatabaseError,
    DatabaseMissing,
    DatabaseRejected,
    DatabaseUnavailable,
    NotReplicated,
    RetryableError,
    TransactionConflict,
    translate,
)
from replication import CommitCheck, ReplicationState, read_standbys
from schema import SchemaState
from votes import Vote

__all__ = [
    "BatchOutcome",
    "ChainLink",
    "Database",
    "DatabaseConfigError",
    "DatabaseError",
    "DatabaseMissing",
    "DatabaseRejected",
    "DatabaseUnavailable",
    "IntegrityFailure",
    "NotReplicated",
    "ReplicationState",
    "RetryableError",
    "SchemaState",
    "TransactionConflict",
    "classify_connect_error",
    "connect_kwargs",
    "create_database",
]

logger = logging.getLogger(__name__)

SCHEMA_FILE = Path(__file__).with_name("init_db.sql")
SCHEMA_OBJECTS = ("vote_results", "vote_audit", "duplicate_attempts", "vote_statistics", "vote_chain")
# Any constant shared by every instance: serialises concurrent schema set-up.
_SCHEMA_LOCK_KEY = 0x766F746573  # "votes"
PAGE_SIZE = 100


# The link a committed batch added to its writer's hash chain (docs/security.md#tamper-evidence).
ChainLink = hashchain.Link
IntegrityFailure = hashchain.IntegrityFailure


@dataclass
class BatchOutcome:
    """What one committed batch did."""

    counted: dict[tuple[str, str], int] = field(default_factory=dict)  # (law_id, choice) -> new votes
    totals: dict[str, tuple[int, int]] = field(default_factory=dict)  # law_id -> (oui, non) after commit
    redeliveries: int = 0
    duplicate_attempts: int = 0
    link: ChainLink | None = None  # None when the batch inserted no audit row

    @property
    def new_votes(self) -> int:
        return sum(self.counted.values())


@contextmanager
def read_only(config: Config, *, snapshot: bool = False) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor on a connection of its own, for the read-only commands (`results`, `verify`).

    With `snapshot`, one REPEATABLE READ transaction without a statement timeout: batches
    committed meanwhile are either wholly in it or not at all, and a recount of millions of rows
    may take longer than the service's own statements may.
    """
    try:
        conn = psycopg2.connect(**connect_kwargs(config))
    except psycopg2.OperationalError as exc:
        raise classify_connect_error(exc, config) from None
    try:
        if snapshot:
            conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            if snapshot:
                cur.execute("SET LOCAL statement_timeout = 0")
            yield cur
    except psycopg2.errors.UndefinedTable:
        raise DatabaseError(
            f"the schema is missing or older than this version in {config.postgres_target_for_logs()}; "
            "apply it with: python aggregator.py --init-db"
        ) from None
    except psycopg2.Error as exc:
        raise DatabaseError(str(exc).strip()) from None
    finally:
        conn.close()


class Database:
    """A connection pool and the statements the service runs. Each call is one attempt:
    the retry policy is the caller's (pipeline.py)."""

    def __init__(self, *, config: Config) -> None:
        self._config = config
        self._pool: ThreadedConnectionPool | None = None
        # The client-side bound sits above the server's statement_timeout, so the
        # server gets the first chance to cancel cleanly. It also knows which
        # connections are in use, for interrupt().
        self._watchdog = Watchdog(config.postgres_query_timeout_s + 5.0)
        # Bumped by every connection-level failure; pooled connections opened
        # before it are closed instead of used (see _checkout).
        self._generation = 0
        self._server_lock = threading.Lock()
        self._server: str | None = None  # host:port of the server the last connection reached
        # Names this process's hash chains: unique across hosts, processes and restarts.
        self.instance_id = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Where each of them ends, as this instance committed it (heads.py signs these).
        self.chains = hashchain.Chains()

    # -- pool ---------------------------------------------------------------

    def open(self) -> None:
        """Create the pool; raises DatabaseUnavailable, DatabaseMissing or DatabaseConfigError."""
        try:
            pool = ThreadedConnectionPool(
                self._config.postgres_min_connections,
                self._config.postgres_max_connections,
                connection_factory=self._new_connection,
                **connect_kwargs(self._config),
            )
        except psycopg2.OperationalError as exc:
            raise classify_connect_error(exc, self._config) from None
        previous, self._pool = self._pool, pool
        if previous is not None and not previous.closed:
            previous.closeall()

    def interrupt(self) -> None:
        """For shutdown: every call blocked on PostgreSQL fails at once (DatabaseUnavailable).

        A connection attempt in progress is not interrupted; it ends within
        POSTGRES_CONNECT_TIMEOUT_SECONDS.
        """
        self._watchdog.break_all()

    def close(self) -> None:
        """Close the pool. Connections in use are broken first: psycopg2 would wait for their queries."""
        pool, self._pool = self._pool, None
        if pool is not None and not pool.closed:
            self._watchdog.break_all()
            pool.closeall()

    @property
    def server(self) -> str | None:
        """host:port of the server the last connection reached (the primary, with several hosts)."""
        return self._server

    def _new_connection(self, dsn: str, *args: Any, **kwargs: Any) -> PooledConnection:
        return PooledConnection(dsn, *args, generation=self._generation, **kwargs)

    def _checkout(self, pool: ThreadedConnectionPool) -> PooledConnection:
        """A pooled connection opened since the last connection-level failure.

        After a failover or a restart, every idle connection points at a server
        that is gone or no longer the primary: each would cost the batch a failed
        attempt and a retry wait. They are closed instead, and new ones opened
        (libpq finds the server that accepts writes).
        """
        for _ in range(self._config.postgres_max_connections):
            conn = cast(PooledConnection, pool.getconn())
            if conn.generation >= self._generation:
                self._note_server(conn)
                return conn
            pool.putconn(conn, close=True)
        conn = cast(PooledConnection, pool.getconn())
        self._note_server(conn)
        return conn

    def _note_server(self, conn: PooledConnection) -> None:
        server = node_text(conn.info.host, conn.info.port)
        if server == self._server:
            return
        with self._server_lock:
            previous, self._server = self._server, server
        if len(self._config.postgres_servers) > 1 and previous != server:
            # With several hosts, the server that accepts writes is the one libpq found.
            logger.log(
                logging.INFO if previous is None else logging.WARNING,
                "writing to the PostgreSQL primary at %s%s",
                server,
                "" if previous is None else f" (was {previous}: a failover or a restart)",
            )

    @contextmanager
    def _transaction(self, *, replicated: CommitCheck | None = None) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction on a pooled connection, with psycopg2's errors translated.

        A connection that failed at the connection level is closed, never
        handed back for reuse, and so are the idle ones opened before it. With
        `replicated`, the commit must be known to be on a synchronous standby
        (POSTGRES_REQUIRE_SYNC_STANDBY), or NotReplicated is raised after it.
        """
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable("the connection pool is not open")
        try:
            conn = self._checkout(pool)
        except psycopg2.OperationalError as exc:
            raise classify_connect_error(exc, self._config) from None
        except psycopg2.pool.PoolError as exc:  # closed while shutting down, or exhausted
            raise DatabaseUnavailable(str(exc)) from None
        discard = False
        self._watchdog.watch(conn)
        try:
            if replicated is not None:
                del conn.notices[:]  # whatever the commit says is read after it
            with conn.cursor() as cur:
                yield cur
                if replicated is not None:
                    replicated.before_commit(cur)
            conn.commit()
            if replicated is not None:
                replicated.after_commit(conn)
        except psycopg2.Error as exc:
            error, usable = translate(exc, lost=bool(conn.closed))
            discard = not (usable and _rollback(conn))
            if not usable:
                self._generation += 1  # the server may be gone: so are the idle connections to it
            raise error from None
        except BaseException:
            discard = not _rollback(conn)
            raise
        finally:
            self._watchdog.unwatch(conn)
            try:
                pool.putconn(conn, close=discard or bool(conn.closed))
            except psycopg2.pool.PoolError:  # the pool was closed meanwhile (shutdown)
                conn.close()

    # -- schema -------------------------------------------------------------

    def missing_schema_objects(self) -> list[str]:
        with self._transaction() as cur:
            cur.execute(
                "SELECT name FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NULL",
                (list(SCHEMA_OBJECTS),),
            )
            missing = [row[0] for row in cur.fetchall()]
            # A schema from before the service computed the chain: the batch
            # statement would fail on every attempt, so it is applied (or asked for) at start.
            cur.execute(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('vote_chain') "
                "AND attname = 'digest_format' AND NOT attisdropped"
            )
            if "vote_chain" not in missing and cur.fetchone() is None:
                missing.append("vote_chain.digest_format")
            return missing

    def apply_schema(self, *, migrations_dir: Path = schema.MIGRATIONS_DIR) -> tuple[int, list[str]]:
        """Bring the schema to schema.SCHEMA_VERSION, one instance at a time: the migrations above the
        database's version in order, then init_db.sql (idempotent), all in one transaction.

        Returns the version found (0: none) and the migration files applied. A database of a newer
        version is left alone (DatabaseConfigError): this code's init_db.sql would undo its changes.
        """
        script = SCHEMA_FILE.read_text(encoding="utf-8")
        steps = schema.migrations(migrations_dir)
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            found = schema.read_state(cur)
            if found.version > schema.SCHEMA_VERSION:
                raise DatabaseConfigError(
                    f"schema version {found.version} is newer than this code's {schema.SCHEMA_VERSION}: "
                    "apply the schema with the release that has it (docs/operations.md#upgrading)"
                )
            # A database with no schema at all gets init_db.sql alone: it is the whole current schema.
            applied = [m for m in steps if found.version and found.version < m.version <= schema.SCHEMA_VERSION]
            for migration in applied:
                cur.execute(migration.path.read_text(encoding="utf-8"))
            cur.execute(script)
        return found.version, [m.path.name for m in applied]

    def schema_state(self) -> SchemaState:
        with self._transaction() as cur:
            return schema.read_state(cur)

    def ensure_schema(self) -> bool:
        """Apply the schema when any of its objects is missing, else check its version against this
        code's (DatabaseConfigError when it must not count on it). True when it was applied."""
        missing = self.missing_schema_objects()
        if not missing:
            state = self.schema_state()
            problem = state.problem()
            if problem is not None:
                raise DatabaseConfigError(f"PostgreSQL {self._config.postgres_target_for_logs()}: {problem}")
            warning = state.warning()
            if warning is not None:
                logger.warning("%s", warning)
            return False
        logger.info("schema objects missing (%s): applying %s", ", ".join(missing), SCHEMA_FILE.name)
        try:
            self.apply_schema()
        except DatabaseConfigError as exc:
            raise DatabaseConfigError(
                f"schema objects missing ({', '.join(missing)}) and {self._config.postgres_user} may not create "
                f"them ({exc}); apply {SCHEMA_FILE.name} as the schema's owner: "
                "python aggregator.py --init-db with POSTGRES_USER set to an administrator"
            ) from None
        return True

    def ping(self) -> None:
        """A trivial round trip: raises DatabaseError if PostgreSQL cannot be used."""
        with self._transaction() as cur:
            cur.execute("SELECT 1")

    def replication_state(self) -> ReplicationState:
        """Read the primary's synchronous replication settings and its standbys (one attempt)."""
        with self._transaction() as cur:
            cur.execute("SELECT current_setting('synchronous_standby_names'), current_setting('synchronous_commit')")
            names, commit = cur.fetchone() or ("", "")  # a SELECT without FROM returns its one row
            standbys = read_standbys(cur)
        return ReplicationState(self._server or "", str(names), str(commit), standbys)

    def read_totals(self) -> dict[str, tuple[int, int]]:
        with self._transaction() as cur:
            cur.execute("SELECT law_id, oui_count, non_count FROM vote_results")
            return {law: (oui, non) for law, oui, non in cur.fetchall()}

    # -- the batch ------------------------------------------------------------

    def write_batch(self, votes: Sequence[Vote], *, chain: str | None = None) -> BatchOutcome:
        """Count `votes` exactly once, in one transaction (one attempt).

        The audit rows it inserts extend hash chain `chain` in the same
        transaction; by default the calling thread's own chain, so that each
        flush worker extends its chain without waiting for the others.

        Raises RetryableError when trying again later may succeed (the whole
        batch is retried: nothing of a failed transaction stays), and
        DatabaseRejected when PostgreSQL refuses the data itself.
        """
        if chain is None:
            chain = f"{self.instance_id}/{threading.current_thread().name}"[:100]
        if not self._config.postgres_require_sync_standby:
            with self._transaction() as cur:
                outcome = _write_batch(cur, votes, chain=chain, chains=self.chains)
        else:
            check = CommitCheck()
            with self._transaction(replicated=check) as cur:
                check.outcome = _write_batch(cur, votes, chain=chain, chains=self.chains)
            outcome = check.outcome
        if outcome.link is not None:
            self.chains.committed(outcome.link)  # only now: the commit is confirmed (and replicated, if required)
        return outcome

    def settle_pending_links(self) -> None:
        """Before the final heads: a link whose commit was not confirmed is this instance's head if
        PostgreSQL holds it (the answer to COMMIT was lost), so that the final head is the last link."""
        for link in self.chains.pending_links():
            with self._transaction() as cur:
                cur.execute(
                    "SELECT seq, digest FROM vote_chain WHERE chain_id = %s ORDER BY seq DESC LIMIT 1", (link.chain_id,)
                )
                row = cur.fetchone()
            if row is not None and (row[0], bytes(row[1])) == (link.seq, link.digest):
                self.chains.committed(link)

    def privilege_warnings(self) -> list[str]:
        """What this connection's role may do beyond the service's needs (docs/security.md#least-privilege)."""
        with self._transaction() as cur:
            cur.execute(_PRIVILEGES)
            row = cur.fetchone()
        if row is None:
            return []
        user, superuser, owner, rewrites = row
        if superuser:
            return [
                f"PostgreSQL user {user} is a superuser: it can rewrite the audit trail; "
                "run the service as a role made by service_role.sql"
            ]
        found = []
        if owner:
            found.append(f"PostgreSQL user {user} owns {owner}: it can drop the append-only triggers")
        if rewrites:
            found.append(f"PostgreSQL user {user} may {rewrites}: more than the service needs")
        return found


# The connection's role against what the service needs: superuser, owner of a
# table (who can drop its triggers), or rights to rewrite the audit trail.
_PRIVILEGES = """
SELECT current_user,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
       (SELECT string_agg(relname, ', ' ORDER BY relname) FROM pg_class
         WHERE relname IN ('vote_results', 'vote_audit', 'duplicate_attempts', 'vote_chain')
           AND relkind = 'r' AND relnamespace = current_schema()::regnamespace
           AND pg_has_role(current_user, relowner, 'USAGE')),
       (SELECT string_agg(p || ' ' || t, ', ' ORDER BY t, p)
          FROM unnest(ARRAY['vote_audit', 'duplicate_attempts', 'vote_chain']) AS t,
               unnest(ARRAY['UPDATE', 'DELETE', 'TRUNCATE']) AS p
         WHERE to_regclass(t) IS NOT NULL AND has_table_privilege(t, p))
"""


def _rollback(conn: psycopg2.extensions.connection) -> bool:
    try:
        conn.rollback()
        return True
    except psycopg2.Error:
        return False


def row_digest_sql(alias: str) -> str:
    """SQL for the digest of one audit row of table alias `alias`, as chain.row_digest computes it
    (format 2). The batch statement returns it over the rows it stored, to be compared with the
    digests the service computed from what it sent: the time in PostgreSQL's binary form
    (microseconds, whatever the session's time zone).
    """
    return (
        f"sha256(convert_to(concat_ws(E'\\x1f', {alias}.vote_hash, {alias}.citizen_id, {alias}.law_id, "
        f"""{alias}.choice), 'UTF8') || timestamptz_send({alias}."timestamp"))"""
    )


genesis_digest = hashchain.genesis_digest
link_digest_from_content = hashchain.link_digest


# One round trip counts a whole batch: insert the audit rows, aggregate the
# ones that were new per law, add them to vote_results, add the link the
# service computed for the batch, and return the new totals, the link, the
# hashes that were already stored, where the chain ended before, and a digest
# of the rows as PostgreSQL stored them (after any trigger), which the service
# compares with what it sent. Rows are inserted and locked in key order
# (vote_hash, then law_id) so that instances writing overlapping batches cannot
# deadlock. The link is computed over every vote of the batch, the common case:
# it is added only when every one of them was new and the chain still ends
# where this instance last left it; otherwise none is added here and the
# service adds the right one (_INSERT_LINK) or stops.
# Composed from this module's constants only (S608): every value travels as a parameter.
_COUNT_BATCH = f"""
WITH incoming AS (
    -- One JSON document: half the client CPU of five arrays, and quicker for the server to unpack.
    SELECT * FROM json_to_recordset(%(votes)s::json)
        AS t(vote_hash varchar, citizen_id varchar, law_id varchar, choice varchar, ts timestamptz)
), last_link AS (
    SELECT seq, digest FROM vote_chain WHERE chain_id = %(chain)s ORDER BY seq DESC LIMIT 1
), inserted AS (
    INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp")
    SELECT vote_hash, citizen_id, law_id, choice, ts FROM incoming ORDER BY vote_hash
    ON CONFLICT (vote_hash) DO NOTHING
    RETURNING vote_hash, citizen_id, law_id, choice, "timestamp"
), counted AS (
    SELECT law_id,
           count(*) FILTER (WHERE choice = 'oui') AS oui,
           count(*) FILTER (WHERE choice = 'non') AS non
    FROM inserted GROUP BY law_id
), totals AS (
    INSERT INTO vote_results AS r (law_id, oui_count, non_count)
    SELECT law_id, oui, non FROM counted ORDER BY law_id
    ON CONFLICT (law_id) DO UPDATE SET
        oui_count = r.oui_count + EXCLUDED.oui_count,
        non_count = r.non_count + EXCLUDED.non_count,
        updated_at = now()
    RETURNING law_id, oui_count, non_count
), link AS (
    INSERT INTO vote_chain (chain_id, seq, vote_hashes, row_digests, digest, digest_format)
    SELECT %(chain)s, %(seq)s, string_to_array(%(hashes)s, ','), decode(%(rows)s, 'hex'), %(digest)s, {hashchain.FORMAT}
    WHERE (SELECT count(*) FROM inserted) = %(n)s
      AND (SELECT seq FROM last_link) IS NOT DISTINCT FROM %(previous_seq)s
      AND (SELECT digest FROM last_link) IS NOT DISTINCT FROM %(previous)s
    RETURNING seq, digest
)
SELECT 'law', c.law_id, c.oui, c.non, t.oui_count, t.non_count, NULL::bytea
FROM counted c JOIN totals t USING (law_id)
UNION ALL
SELECT 'stored', i.vote_hash, NULL, NULL, NULL, NULL, NULL FROM incoming i
WHERE NOT EXISTS (SELECT 1 FROM inserted n WHERE n.vote_hash = i.vote_hash)
UNION ALL
SELECT 'link', NULL, seq, NULL, NULL, NULL, digest FROM link
UNION ALL
SELECT 'head', NULL, (SELECT seq FROM last_link), NULL, NULL, NULL, (SELECT digest FROM last_link)
UNION ALL
SELECT 'rows', NULL, count(*), NULL, NULL, NULL, sha256(coalesce(string_agg(d, ''::bytea ORDER BY d), ''::bytea))
FROM (SELECT {row_digest_sql("i")} AS d FROM inserted i) s
"""  # noqa: S608
# The link of a batch of which only some votes were new, on the same terms.
_INSERT_LINK = f"""
WITH last_link AS (
    SELECT seq, digest FROM vote_chain WHERE chain_id = %(chain)s ORDER BY seq DESC LIMIT 1
)
INSERT INTO vote_chain (chain_id, seq, vote_hashes, row_digests, digest, digest_format)
SELECT %(chain)s, %(seq)s, string_to_array(%(hashes)s, ','), decode(%(rows)s, 'hex'), %(digest)s, {hashchain.FORMAT}
WHERE (SELECT seq FROM last_link) IS NOT DISTINCT FROM %(previous_seq)s
  AND (SELECT digest FROM last_link) IS NOT DISTINCT FROM %(previous)s
RETURNING seq, digest
"""  # noqa: S608
_SELECT_STORED = 'SELECT vote_hash, citizen_id, law_id, choice, "timestamp" FROM vote_audit WHERE vote_hash = ANY(%s)'
_INSERT_ATTEMPTS = (
    "INSERT INTO duplicate_attempts (vote_hash, citizen_id, law_id, choice, vote_timestamp) VALUES %s "
    "ON CONFLICT ON CONSTRAINT duplicate_attempts_once DO NOTHING RETURNING id"
)


def _row(vote: Vote) -> tuple[str, str, str, str, Any]:
    return (vote.vote_hash, vote.citizen_id, vote.law_id, vote.choice, vote.timestamp)


# Each string through the JSON encoder's C function: the same text json.dumps writes for a list of
# dicts, at a sixth of the client CPU (docs/performance.md).
_json_string = json.encoder.encode_basestring_ascii


def _votes_document(votes: Sequence[Vote]) -> str:
    """`votes` as the JSON array of objects the batch statement reads with json_to_recordset.

    The instant travels as the producer wrote it when PostgreSQL reads that text to exactly
    the same instant (Vote.timestamp_text), otherwise as ISO 8601 with its offset (UTC).
    """
    return "[" + ",".join([
        f'{{"vote_hash":{_json_string(v.vote_hash)},"citizen_id":{_json_string(v.citizen_id)},'
        f'"law_id":{_json_string(v.law_id)},"choice":{_json_string(v.choice)},'
        f'"ts":{_json_string(v.timestamp_text or v.timestamp.isoformat())}}}'
        for v in votes
    ]) + "]"  # fmt: skip


def _write_batch(
    cur: psycopg2.extensions.cursor, votes: Sequence[Vote], *, chain: str, chains: hashchain.Chains
) -> BatchOutcome:
    outcome = BatchOutcome()
    # The first copy of each hash is the candidate; later copies in the batch are
    # judged against whichever vote ends up stored under that hash.
    candidates: dict[str, Vote] = {}
    copies: list[Vote] = []
    for vote in votes:
        if vote.vote_hash in candidates:
            copies.append(vote)
        else:
            candidates[vote.vote_hash] = vote
    if not candidates:
        return outcome
    conflicting = _count_new(cur, list(candidates.values()), outcome, chain=chain, chains=chains)
    if conflicting or copies:
        _judge_the_rest(cur, candidates, conflicting, copies, outcome)
    return outcome


def _link_params(chain: str, head: hashchain.Head, hashes: list[str], digests: list[bytes]) -> dict[str, Any]:
    """The link that extends `head` with these rows, as parameters of _COUNT_BATCH and _INSERT_LINK."""
    rows = b"".join(digests)
    seq = head.seq + 1
    return {
        "chain": chain,
        "seq": seq,
        "hashes": ",".join(hashes),  # hex digits: no comma inside one
        "rows": rows.hex(),
        "digest": hashchain.link_digest(head.digest, seq, hashchain.content_digest(hashes, rows)),
        "previous_seq": head.seq or None,
        "previous": head.digest if head.seq else None,
    }


def _count_new(
    cur: psycopg2.extensions.cursor,
    candidates: list[Vote],
    outcome: BatchOutcome,
    *,
    chain: str,
    chains: hashchain.Chains,
) -> list[str]:
    """Insert and count the votes whose hash is new, and chain them; returns the hashes already stored.

    Raises IntegrityFailure when PostgreSQL stored anything else than what was sent, or its
    chain does not end where this instance left it.
    """
    micros, row_digest = hashchain.micros, hashchain.row_digest
    digests = [row_digest(v.vote_hash, v.citizen_id, v.law_id, v.choice, micros(v.timestamp)) for v in candidates]
    head = chains.head(chain)
    params = _link_params(chain, head, [v.vote_hash for v in candidates], digests)
    cur.execute(_COUNT_BATCH, {**params, "votes": _votes_document(candidates), "n": len(candidates)})
    conflicting: list[str] = []
    link: ChainLink | None = None
    found = head
    stored_rows, stored = 0, b""
    for kind, key, oui, non, oui_total, non_total, digest in cur.fetchall():
        if kind == "stored":
            conflicting.append(key)
        elif kind == "link":
            link = ChainLink(chain_id=chain, seq=oui, digest=bytes(digest))
        elif kind == "head":
            # No link yet: the genesis, as chains.head() gives it for a chain this instance never extended.
            found = hashchain.Head(oui, bytes(digest)) if oui is not None else chains.genesis(chain)
        elif kind == "rows":
            stored_rows, stored = oui, bytes(digest)
        else:
            outcome.totals[key] = (oui_total, non_total)
            if oui:
                outcome.counted[(key, "oui")] = oui
            if non:
                outcome.counted[(key, "non")] = non
    _check_head(chains, chain, head, found)

    new = range(len(candidates))
    if conflicting:
        skip = set(conflicting)
        new = [i for i, v in enumerate(candidates) if v.vote_hash not in skip]  # type: ignore[assignment]
    # What PostgreSQL says it stored (after any trigger), against what was sent.
    if stored_rows != len(new) or stored != hashchain.stored_digest([digests[i] for i in new]):
        raise IntegrityFailure(
            f"PostgreSQL stored {stored_rows} audit rows that differ from the {len(new)} new votes sent "
            f"(chain {chain}): something between the service and the table changed them"
        )
    expected: dict[tuple[str, str], int] = {}
    for i in new:
        key = (candidates[i].law_id, candidates[i].choice)
        expected[key] = expected.get(key, 0) + 1
    if expected != outcome.counted:
        raise IntegrityFailure(f"PostgreSQL counted other votes per law and choice than the ones sent (chain {chain})")

    if not new:
        if link is not None:
            raise IntegrityFailure(f"PostgreSQL added link {link.seq} to chain {chain} for a batch with no new vote")
        return conflicting
    if link is None and conflicting:
        # Some votes were stored already: the link holds only the new ones.
        params = _link_params(chain, head, [candidates[i].vote_hash for i in new], [digests[i] for i in new])
        cur.execute(_INSERT_LINK, params)
        row = cur.fetchone()
        link = ChainLink(chain_id=chain, seq=row[0], digest=bytes(row[1])) if row is not None else None
    if link is None or link != ChainLink(chain, params["seq"], params["digest"]):
        raise IntegrityFailure(f"PostgreSQL did not store link {params['seq']} of chain {chain} as sent")
    chains.propose(link)
    outcome.link = link
    return conflicting


def _check_head(chains: hashchain.Chains, chain: str, head: hashchain.Head, found: hashchain.Head) -> None:
    """The chain must end in PostgreSQL where this instance left it."""
    if found == head:
        return
    pending = chains.pending(chain)
    if pending is not None and (found.seq, found.digest) == (pending.seq, pending.digest):
        # A commit whose answer was lost did happen: the chain goes on from it.
        chains.committed(pending)
        raise TransactionConflict(f"link {pending.seq} of chain {chain} was committed after all; retrying the batch")
    raise IntegrityFailure(
        f"chain {chain} ends at link {found.seq} in PostgreSQL, but this instance last committed link {head.seq}: "
        "another writer extended, cut or rewrote it"
    )


def _judge_the_rest(
    cur: psycopg2.extensions.cursor,
    candidates: dict[str, Vote],
    conflicting: list[str],
    copies: list[Vote],
    outcome: BatchOutcome,
) -> None:
    """Tell redeliveries (same content as stored) from duplicate attempts, and record the attempts."""
    already_stored = set(conflicting)
    stored = {h: v for h, v in candidates.items() if h not in already_stored}
    if conflicting:
        # A new statement sees rows another instance committed while our
        # INSERT waited on them (READ COMMITTED takes a snapshot per statement).
        cur.execute(_SELECT_STORED, (conflicting,))
        for vote_hash, citizen_id, law_id, choice, timestamp in cur.fetchall():
            stored[vote_hash] = Vote(vote_hash, citizen_id, law_id, choice, timestamp)
        if len(stored) != len(candidates):
            raise TransactionConflict("a conflicting vote_hash vanished; retrying the batch")

    attempts: dict[tuple[str, str, str, str, Any], Vote] = {}
    for vote in [candidates[h] for h in conflicting] + copies:
        if vote.same_content(stored[vote.vote_hash]) or _row(vote) in attempts:
            outcome.redeliveries += 1
        else:
            attempts[_row(vote)] = vote

    if attempts:
        recorded = execute_values(cur, _INSERT_ATTEMPTS, sorted(attempts), page_size=PAGE_SIZE, fetch=True)
        outcome.duplicate_attempts = len(recorded)
        # An attempt already on record (a redelivered attempt) is not a new one.
        outcome.redeliveries += len(attempts) - len(recorded)
