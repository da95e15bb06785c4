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


def truncate_link(cur: psycopg2.extensions.cursor, chain: str, seq: int) -> None:
    """Remove link `seq` of `chain`, its rows, and their votes from the totals: a tail cut off so
    that the totals, the rows and the chain still agree with each other."""
    cur.execute("SELECT vote_hashes FROM vote_chain WHERE chain_id = %s AND seq = %s", (chain, seq))
    [(hashes,)] = cur.fetchall()
    cur.execute(
        "UPDATE vote_results r SET oui_count = r.oui_count - a.oui, non_count = r.non_count - a.non "
        "FROM (SELECT law_id, count(*) FILTER (WHERE choice = 'oui') AS oui, "
        "      count(*) FILTER (WHERE choice = 'non') AS non FROM vote_audit "
        "      WHERE vote_hash = ANY(%s) GROUP BY law_id) a WHERE r.law_id = a.law_id",
        (hashes,),
    )
    cur.execute("DELETE FROM vote_audit WHERE vote_hash = ANY(%s)", (hashes,))
    cur.execute("DELETE FROM vote_chain WHERE chain_id = %s AND seq = %s", (chain, seq))


# Protocol codes of the requests a client may send before its startup message, untyped like it.
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


class QueryRewriter:
    """A tampering proxy's rewriting (tests.proxy.TcpProxy(rewrite=...)), one per connection: in every
    simple query the client sends to PostgreSQL, `old` becomes `new` (as long: the message's length
    stands). It cuts the client's bytes into protocol messages first, so that a query split across
    reads is rewritten whole."""

    def __init__(self, old: bytes, new: bytes) -> None:
        assert len(old) == len(new)
        self._old, self._new = old, new
        self._pending = b""
        self._started = False  # the startup message (untyped) has gone through
        self.rewritten = 0

    def __call__(self, data: bytes) -> bytes:
        self._pending += data
        out = []
        while True:
            typed = 1 if self._started else 0
            if len(self._pending) < typed + 4:
                break
            size = typed + int.from_bytes(self._pending[typed : typed + 4], "big")
            if len(self._pending) < size:
                break
            message, self._pending = self._pending[:size], self._pending[size:]
            if not typed:
                code = int.from_bytes(message[4:8], "big") if len(message) >= 8 else 0
                self._started = code not in (_SSL_REQUEST, _GSSENC_REQUEST)
            elif message[:1] == b"Q" and self._old in message:
                self.rewritten += message.count(self._old)
                message = message.replace(self._old, self._new)
            out.append(message)
        return b"".join(out)
