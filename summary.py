"""The periodic INFO line: at 10,000 votes/s a line per batch is too much, one every few seconds is not.

Along with it, the head of each hash chain that grew (docs/security.md#tamper-evidence):
a log kept elsewhere then anchors the chains, and `aggregator.py verify --head` checks them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from db import BatchOutcome, ChainLink

logger = logging.getLogger(__name__)

# Chain heads are logged this often when the summary line itself is off.
HEADS_INTERVAL_S = 60.0


@dataclass
class _Counts:
    since: float = field(default_factory=time.monotonic)
    received: int = 0
    rejected: int = 0
    batches: int = 0
    written: int = 0
    new: int = 0
    redelivered: int = 0
    duplicates: int = 0
    errors: int = 0
    laws: set[str] = field(default_factory=set)


class Summary:
    """Counts since the last line; fed by the connection thread and the flush workers.

    The connection thread reports once per loop turn, not per message, so the
    lock is taken a few times per batch, never per vote.
    """

    def __init__(self, *, interval_s: float) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._heads: dict[str, ChainLink] = {}  # chain id -> its latest link
        self._heads_logged: dict[str, int] = {}  # chain id -> seq last logged
        self._heads_at = time.monotonic()

    def received(self, messages: int, rejected: int) -> None:
        with self._lock:
            self._counts.received += messages
            self._counts.rejected += rejected

    def committed(self, outcome: BatchOutcome) -> None:
        with self._lock:
            self._counts.new += outcome.new_votes
            self._counts.redelivered += outcome.redeliveries
            self._counts.duplicates += outcome.duplicate_attempts
            self._counts.laws.update(law for law, _choice in outcome.counted)
            link = outcome.link
            if link is not None:
                known = self._heads.get(link.chain_id)
                if known is None or link.seq > known.seq:
                    self._heads[link.chain_id] = link

    def batch_settled(self, written: int) -> None:
        with self._lock:
            self._counts.batches += 1
            self._counts.written += written

    def error(self) -> None:
        with self._lock:
            self._counts.errors += 1

    def log_heads(self) -> None:
        """A line per chain that grew since its last: `<chain id>:<seq>:<digest>`, as `verify --head` takes it."""
        with self._lock:
            self._heads_at = time.monotonic()
            grown = [link for chain, link in self._heads.items() if self._heads_logged.get(chain) != link.seq]
            for link in grown:
                self._heads_logged[link.chain_id] = link.seq
        for link in grown:
            head = f"{link.chain_id}:{link.seq}:{link.digest.hex()}"
            logger.info("hash chain head %s", head, extra={"chain_head": head})

    def maybe_log(self, *, buffered: int) -> None:
        """Log the line if LOG_SUMMARY_INTERVAL_SECONDS have passed and anything happened, and the chain heads."""
        if time.monotonic() - self._heads_at >= (self._interval_s or HEADS_INTERVAL_S):
            self.log_heads()
        if not self._interval_s:
            return
        with self._lock:
            # Decided under the lock: every flush worker calls this, and two that both saw the
            # line due would log a second one over an interval of almost nothing.
            if time.monotonic() - self._counts.since < self._interval_s:
                return
            done, self._counts = self._counts, _Counts()
        if not (done.received or done.written or done.errors):
            return
        elapsed = time.monotonic() - done.since
        rate = done.new / elapsed
        logger.info(
            "last %.0fs: %d votes/s, %d received, %d counted, %d redelivered, %d duplicate attempts, "
            "%d rejected, %d batches, %d database errors, %d buffered",
            elapsed,
            rate,
            done.received,
            done.new,
            done.redelivered,
            done.duplicates,
            done.rejected,
            done.batches,
            done.errors,
            buffered,
            extra={
                "interval_s": round(elapsed, 1),
                "votes_per_s": round(rate, 1),
                "received": done.received,
                "counted": done.new,
                "redelivered": done.redelivered,
                "duplicate_attempts": done.duplicates,
                "rejected": done.rejected,
                "batches": done.batches,
                "database_errors": done.errors,
                "laws": len(done.laws),
                "buffered": buffered,
            },
        )
