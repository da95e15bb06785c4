"""PostgreSQL's synchronous replication as the service sees it: the primary's state (for the
periodic check, health.ReplicationWatch) and, with POSTGRES_REQUIRE_SYNC_STANDBY, whether one
commit is on a synchronous standby (CommitCheck, used by db.Database for every batch).

Statements only, on a cursor or connection db.py hands in; the pool and the retries are elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions

from config import node_text
from dberrors import NotReplicated


@dataclass(frozen=True)
class ReplicationState:
    """The primary's replication, as the service's own session sees it (Database.replication_state)."""

    server: str  # host:port the state was read from
    standby_names: str  # synchronous_standby_names
    synchronous_commit: str  # this session's, the one its commits use
    # (application_name, sync_state, bytes of WAL the standby has not flushed) of each
    # walsender; sync_state and the lag are None for a role without pg_read_all_stats.
    standbys: tuple[tuple[str, str | None, int | None], ...]

    @property
    def required(self) -> int:
        """How many synchronous standbys must confirm each commit (0: none)."""
        return required_standbys(self.standby_names)

    @property
    def synchronous(self) -> list[str]:
        """Standbys attached as synchronous ones ("sync" for FIRST, "quorum" for ANY)."""
        return [name for name, state, _lag in self.standbys if state in _SYNCHRONOUS]

    @property
    def readable(self) -> bool:
        """False when the role may not see pg_stat_replication's details (pg_read_all_stats)."""
        return all(state is not None for _name, state, _lag in self.standbys)

    @property
    def commits_wait(self) -> bool:
        """synchronous_commit makes a commit wait for the synchronous standbys (not local, not off)."""
        return self.synchronous_commit in ("on", "remote_write", "remote_apply")

    @property
    def failover_safe(self) -> bool:
        """Every commit, so every ack, waits until a standby has it: a failover to it loses no acked vote."""
        return self.readable and self.commits_wait and 0 < self.required <= len(self.synchronous)


# synchronous_standby_names: "[FIRST | ANY] num_sync ( name [, ...] )" or "name [, ...]".
_NUM_SYNC = re.compile(r"(?:(?:FIRST|ANY)\s+)?(\d+)\s*\(", re.IGNORECASE)
# sync_state of a standby whose flush position a commit waits for (FIRST: sync; ANY: quorum).
_SYNCHRONOUS = ("sync", "quorum")


def required_standbys(names: str) -> int:
    """How many synchronous standbys synchronous_standby_names makes each commit wait for (0: none)."""
    names = names.strip()
    if not names:
        return 0
    match = _NUM_SYNC.match(names)
    return int(match.group(1)) if match else 1  # "s1, s2" means FIRST 1 (s1, s2)


def read_standbys(cur: psycopg2.extensions.cursor) -> tuple[tuple[str, str | None, int | None], ...]:
    """(application_name, sync_state, bytes of WAL not flushed) of each walsender, read on the primary.

    Through init_db.sql's SECURITY DEFINER function where it exists: the service's role sees the
    standbys' sync state without pg_read_all_stats. An older schema: the view itself. The lag is
    the server's current WAL position, read when the row is, minus the standby's flush position.
    """
    cur.execute("SELECT has_function_privilege(to_regprocedure('vote_replication_standbys()'), 'EXECUTE')")
    row = cur.fetchone()
    cur.execute(
        "SELECT * FROM vote_replication_standbys()"
        if row and row[0]
        else "SELECT application_name, sync_state, pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint "
        "FROM pg_stat_replication ORDER BY application_name"
    )
    return tuple((str(name), state, lag) for name, state, lag in cur.fetchall())


# Last in a batch's transaction, with POSTGRES_REQUIRE_SYNC_STANDBY: will its commit wait for the
# synchronous standbys? Only if some are named, synchronous_commit makes commits wait, and the
# transaction wrote something: a transaction without a transaction id (a batch of redeliveries
# only) commits without writing WAL, so without waiting, whatever the settings.
_COMMIT_WAITS = (
    "SELECT btrim(current_setting('synchronous_standby_names')) <> '' "
    "AND current_setting('synchronous_commit') IN ('on', 'remote_write', 'remote_apply') "
    "AND txid_current_if_assigned() IS NOT NULL"
)
# Right after the commit, on the same connection: the standbys still named, and a WAL position at
# or past the commit's (the commit record is flushed locally before COMMIT returns).
_AFTER_COMMIT = "SELECT current_setting('synchronous_standby_names'), pg_current_wal_flush_lsn()::text"
# Bytes of WAL written since `flushed`: read before the standbys' lag, which is measured from a
# position at least as far on, so that flush_lsn >= flushed whenever lag <= this.
_WRITTEN_SINCE = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::bigint"


class CommitCheck:
    """Is one commit on a synchronous standby? (POSTGRES_REQUIRE_SYNC_STANDBY, per commit.)

    The normal path costs one statement in the transaction and one after it: a commit that
    wrote WAL, with standbys named before and after it, synchronous_commit making it wait, and
    no notice from the server (a cancelled wait says "canceling wait for synchronous
    replication ... already committed locally" as a WARNING, in the server's language) waited
    until the standbys had it. Anything else (a cancelled wait, no standby named, a batch of
    redeliveries that wrote nothing) is proved by the standbys' flush position instead, read
    through vote_replication_standbys(): enough synchronous ones (sync_state sync or quorum)
    must have flushed past a WAL position read after the commit. Otherwise NotReplicated.
    """

    def __init__(self) -> None:
        self.waits = False
        self.outcome: Any = None  # the batch's db.BatchOutcome, handed to NotReplicated

    def before_commit(self, cur: psycopg2.extensions.cursor) -> None:
        cur.execute(_COMMIT_WAITS)
        row = cur.fetchone()
        self.waits = bool(row and row[0])

    def after_commit(self, conn: psycopg2.extensions.connection) -> None:
        notices = [line.strip().splitlines()[0] for line in conn.notices if line.strip()]
        conn.autocommit = True  # one round trip each, no transaction to end
        try:
            with conn.cursor() as cur:
                cur.execute(_AFTER_COMMIT)
                names, flushed = cur.fetchone() or ("", "0/0")
                if self.waits and str(names).strip() and not notices:
                    return  # the commit waited for the synchronous standbys, and nothing cut the wait short
                cur.execute(_WRITTEN_SINCE, (flushed,))
                written = int((cur.fetchone() or (0,))[0])
                standbys = read_standbys(cur)
        finally:
            conn.autocommit = False
        required = required_standbys(str(names))
        have = [name for name, state, lag in standbys if state in _SYNCHRONOUS and lag is not None and lag <= written]
        if required and len(have) >= required:
            return
        why = "; ".join(notices) if notices else "its commit did not wait for a synchronous standby"
        server = node_text(conn.info.host, conn.info.port)
        raise NotReplicated(
            f"a batch committed on {server} is not known to be on a synchronous standby ({why}; "
            f"synchronous_standby_names={names!r}, {len(have)} of {required} past WAL {flushed}); not acked",
            outcome=self.outcome,
        )


def describe_replication(state: ReplicationState, *, user: str) -> str:
    """One line: what losing the primary would cost the votes already acked.

    Figures that change all the time (replication lag) come last, in brackets, and do not
    make the line count as changed.
    """
    where = f"PostgreSQL replication on {state.server or 'the primary'}"
    names = state.standby_names
    if not state.readable:
        return (
            f"{where}: unknown, role {user} cannot see the standbys' state in pg_stat_replication "
            "(apply init_db.sql and service_role.sql again as an administrator, which grants it "
            "vote_replication_standbys()); assume a failover could lose acked votes"
        )
    if state.failover_safe:
        return (
            f"{where}: synchronous, every commit waits until {state.required} of "
            f"synchronous_standby_names={names!r} has it (attached: {', '.join(state.synchronous)}); "
            "a failover to a synchronous standby loses no acked vote"
        )
    if state.required == 0 and not state.standbys:
        return (
            f"{where}: no standby; acked votes are as safe as this server's disk, "
            "and there is no standby to fail over to"
        )
    if state.required == 0:
        lags = [lag for _name, _state, lag in state.standbys if lag is not None]
        return (
            f"{where}: asynchronous to {', '.join(name for name, _s, _l in state.standbys)} "
            "(synchronous_standby_names is empty); a failover can lose the votes acked just before it, "
            f"and RabbitMQ will not redeliver them [standbys behind by up to {max(lags, default=0)} bytes of WAL]"
        )
    if not state.commits_wait:
        return (
            f"{where}: synchronous_commit={state.synchronous_commit}, so commits do not wait for "
            f"synchronous_standby_names={names!r}; a failover can lose the votes acked just before it"
        )
    return (
        f"{where}: commits wait for {state.required} synchronous standby(s) of {names!r} and "
        f"{len(state.synchronous)} attached: writing stalls until one attaches, and a commit whose wait is "
        "cut short (a cancel, or the connection dropped) is kept only on the primary and can be lost in a failover"
    )
