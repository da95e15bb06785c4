"""Liveness and readiness: /healthz, /readyz and systemd's watchdog say whether the service is counting."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from systemd import Notifier

logger = logging.getLogger(__name__)

# The connection loop turns every few tens of milliseconds; one that has not
# turned for this long is stuck (connecting counts as turning, and is bounded by
# pika's socket timeout).
LOOP_STALL_S = 60.0


class _Consumer(Protocol):
    @property
    def consuming(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...


class _Pipeline(Protocol):
    database_error: str | None
    fatal: str | None

    def oldest_unacked_age(self) -> float: ...


class Health:
    """Answers from the state of the consumer and the pipeline; fed by the connection loop's turns."""

    def __init__(self, *, stall_timeout_s: float, notifier: Notifier) -> None:
        self._stall_timeout_s = stall_timeout_s
        self._notifier = notifier
        self._consumer: _Consumer | None = None
        self._pipeline: _Pipeline | None = None
        self._turned_at = time.monotonic()
        self._next_watchdog = 0.0

    def watch(self, *, consumer: _Consumer, pipeline: _Pipeline) -> None:
        self._consumer, self._pipeline = consumer, pipeline

    def turned(self) -> None:
        """Called on every turn of the connection loop: records it, and pings systemd while alive."""
        now = self._turned_at = time.monotonic()
        interval = self._notifier.watchdog_interval_s
        if interval is None or now < self._next_watchdog:
            return
        alive, reason = self.liveness()
        if alive:
            self._notifier.notify("WATCHDOG=1")
        else:
            # No ping: systemd's WatchdogSec= kills and restarts the service, and
            # RabbitMQ redelivers whatever it held.
            logger.error("not counting (%s): systemd watchdog no longer fed", reason)
            self._notifier.notify(f"STATUS=not counting: {reason}")
        self._next_watchdog = now + interval

    def liveness(self) -> tuple[bool, str]:
        """/healthz: the service is still counting, or can still count once PostgreSQL is back.

        Not alive when the connection loop stopped turning, when a batch may have
        been left unsettled, or when a vote has been held unacked for longer than
        STALL_TIMEOUT_SECONDS while PostgreSQL answers. While PostgreSQL is down,
        votes wait by design and a restart would not help.
        """
        pipeline = self._pipeline
        if pipeline is None:
            return True, "starting"
        silent = time.monotonic() - self._turned_at
        if silent > LOOP_STALL_S:
            return False, f"the RabbitMQ connection loop has not turned for {silent:.0f}s"
        if pipeline.fatal is not None:
            return False, pipeline.fatal
        age = pipeline.oldest_unacked_age()
        if age > self._stall_timeout_s and pipeline.database_error is None:
            return False, (
                f"the oldest vote held has waited {age:.0f}s for its ack "
                f"(STALL_TIMEOUT_SECONDS={self._stall_timeout_s:g}) while PostgreSQL answers"
            )
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """/readyz: consuming from RabbitMQ, PostgreSQL answering, and counting."""
        consumer, pipeline = self._consumer, self._pipeline
        if consumer is None or pipeline is None:
            return False, "starting: waiting for PostgreSQL"
        if consumer.stopping:
            return False, "stopping"
        if not consumer.consuming:
            return False, "not consuming from RabbitMQ"
        if pipeline.database_error is not None:
            return False, f"PostgreSQL is failing: {pipeline.database_error}"
        alive, reason = self.liveness()
        return (True, "ready") if alive else (False, reason)
