"""The audit trail as someone with the owner's rights changes it: votes made directly, one
transaction on the maintenance path (docs/security.md), a chain recomputed by a thorough forger."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psycopg2.extensions

import db
from tests.support import pg_connect
from votes import Vote

WHEN = datetime(2025, 11, 14, 12, 0, tzinfo=UTC)


def vote(i: int, *, law: str = "law-1", choice: str = "oui") -> Vote:
    return Vote(f"{i:08x}", f"citizen-{i}", law, choice, WHEN)


@contextmanager
def maintenance(dbname: str) -> Iterator[psycopg2.extensions.cursor]:
    """One transaction on the maintenance path: the owner, saying so first."""
    conn = pg_connect(dbname)
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL vote_aggregator.maintenance = 'on'")
            yield cur
        conn.commit()
    finally:
        conn.close()


def rechain(cur: psycopg2.extensions.cursor, chain: str) -> None:
    """Recompute every link of `chain` from the rows as they are now: a thorough forger."""
    cur.execute(
        f"SELECT c.seq, array_agg(a.vote_hash), string_agg({db.row_digest_sql('a')}, ''::bytea) "
        "FROM vote_chain c JOIN vote_audit a ON a.vote_hash = ANY(c.vote_hashes) "
        "WHERE c.chain_id = %s GROUP BY c.seq ORDER BY c.seq",
        (chain,),
    )
    previous = db.genesis_digest(chain)
    for seq, hashes, digests in cur.fetchall():
        content = hashlib.sha256(",".join(hashes).encode() + bytes(digests)).digest()
        previous = db.link_digest_from_content(previous, seq, content)
        cur.execute(
            "UPDATE vote_chain SET vote_hashes = %s, row_digests = %s, digest = %s WHERE chain_id = %s AND seq = %s",
            (hashes, bytes(digests), previous, chain, seq),
        )
