"""The hash chains, computed by the service (docs/security.md#tamper-evidence).

Each flush worker of each running instance extends a chain of its own. A link is

    digest = sha256(previous digest || int8(seq) || sha256(vote hashes joined by ',' || row digests))

with the first link's `previous digest` = sha256(chain id). A row digest is computed here, in
Python, from the vote the service sent (format 2), never from what PostgreSQL says it stored:

    sha256(utf8(vote_hash US citizen_id US law_id US choice) || int8(µs since 2000-01-01 UTC))

(US: the unit separator, 0x1f). Format 1, written by earlier versions and still verified, prefixed
each text with its length and also hashed recorded_at, which only the server knows.

The chain's head is kept in memory by the instance that writes it: PostgreSQL is told where the
chain ends, and a head found there that this instance did not write is a finding, not something
to link to.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from hashlib import sha256

# Rows the service writes now; 1 is what earlier versions wrote (see the module's docstring).
FORMAT = 2
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's epoch for its binary timestamps
_SEP = "\x1f"  # the unit separator, between a row's texts


class IntegrityFailure(Exception):
    """What PostgreSQL stored, or the chain it holds, differs from what this instance sent.

    Not a database error: retrying cannot help, and the batch must not be acked or dead-lettered.
    """


@dataclass(frozen=True)
class Link:
    chain_id: str
    seq: int
    digest: bytes


def genesis_digest(chain_id: str) -> bytes:
    """The `previous digest` of a chain's first link."""
    return hashlib.sha256(chain_id.encode()).digest()


def link_digest(previous: bytes, seq: int, content: bytes) -> bytes:
    """A link's digest; `content` is content_digest(...) of the link."""
    return hashlib.sha256(previous + seq.to_bytes(8, "big", signed=True) + content).digest()


def content_digest(vote_hashes: Iterable[str], row_digests: bytes) -> bytes:
    return hashlib.sha256(",".join(vote_hashes).encode() + row_digests).digest()


_MICROSECOND = timedelta(microseconds=1)


def micros(instant: datetime) -> int:
    """Microseconds since 2000-01-01 UTC: PostgreSQL's binary form of a timestamptz."""
    return (instant - _EPOCH) // _MICROSECOND


def row_digest(vote_hash: str, citizen_id: str, law_id: str, choice: str, timestamp_us: int) -> bytes:
    """A row's digest (format 2): its four texts joined by the unit separator, then its time.

    No valid vote holds a control character (votes.py), so every row the service writes encodes
    with exactly three separators, and no other row encodes alike. One join and one sha256 per
    vote: the least the service can do and still let anyone recompute each row.
    """
    return sha256(
        _SEP.join((vote_hash, citizen_id, law_id, choice)).encode() + timestamp_us.to_bytes(8, "big", signed=True)
    ).digest()


def row_digest_v1(
    vote_hash: str, citizen_id: str, law_id: str, choice: str, timestamp_us: int, recorded_us: int
) -> bytes:
    """A row's digest as earlier versions had PostgreSQL compute it (format 1): each text prefixed
    with its length, then the time and recorded_at."""
    text = f"{len(vote_hash)}:{vote_hash}{len(citizen_id)}:{citizen_id}{len(law_id)}:{law_id}{len(choice)}:{choice}"
    return sha256(
        text.encode() + timestamp_us.to_bytes(8, "big", signed=True) + recorded_us.to_bytes(8, "big", signed=True)
    ).digest()


def stored_digest(row_digests: Iterable[bytes]) -> bytes:
    """One digest of a set of rows, whatever their order: what the batch statement returns for the
    rows it inserted (bytea sorts bytewise in PostgreSQL, as bytes do here)."""
    return hashlib.sha256(b"".join(sorted(row_digests))).digest()


@dataclass(frozen=True)
class Head:
    """Where this instance's chain ends: (0, genesis) before its first link."""

    seq: int
    digest: bytes


class Chains:
    """The heads of this instance's chains. Each chain is extended by one thread at a time; the
    lock only guards the dict, for the thread that signs the heads (heads.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heads: dict[str, Head] = {}
        # chain id -> the link sent in a transaction whose commit was not confirmed: PostgreSQL
        # may hold it (the answer to COMMIT was lost) or not.
        self._pending: dict[str, Link] = {}

    def head(self, chain_id: str) -> Head:
        with self._lock:
            return self._heads.get(chain_id) or self.genesis(chain_id)

    @staticmethod
    def genesis(chain_id: str) -> Head:
        return Head(0, genesis_digest(chain_id))

    def pending(self, chain_id: str) -> Link | None:
        with self._lock:
            return self._pending.get(chain_id)

    def propose(self, link: Link) -> None:
        """`link` is about to be committed: until committed() says so, PostgreSQL may or may not hold it."""
        with self._lock:
            self._pending[link.chain_id] = link

    def pending_links(self) -> list[Link]:
        with self._lock:
            return list(self._pending.values())

    def committed(self, link: Link) -> None:
        with self._lock:
            self._pending.pop(link.chain_id, None)
            self._heads[link.chain_id] = Head(link.seq, link.digest)

    def links(self) -> list[Link]:
        """Every chain's committed head (chains with at least one link)."""
        with self._lock:
            return [Link(chain, head.seq, head.digest) for chain, head in self._heads.items()]
