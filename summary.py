"""The periodic INFO line: at 10,000 votes/s a line per batch is too much, one every few seconds is not."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from db import BatchOutcome

logger = logging.getLogger(__name__)


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

    def batch_settled(self, written: int) -> None:
        with self._lock:
            self._counts.batches += 1
            self._counts.written += written

    def error(self) -> None:
        with self._lock:
            self._counts.errors += 1

    def maybe_log(self, *, buffered: int) -> None:
        """Log the line if LOG_SUMMARY_INTERVAL_SECONDS have passed and anything happened."""
        if not self._interval_s or time.monotonic() - self._counts.since < self._interval_s:
            return
        with self._lock:
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
