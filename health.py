"""Liveness and readiness: /healthz, /readyz and systemd's watchdog say whether the service is counting."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import db
from metrics import Metrics
from replication import describe_replication
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

    queue_ready: int | None
    received_at: float


class _Pipeline(Protocol):
    database_error: str | None
    fatal: str | None

    @property
    def database_failing(self) -> bool: ...

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
        self._hold: Callable[[], str | None] = lambda: None
        # The last time not receiving was deliberate (a hold, PostgreSQL failing, stopping, a broker
        # alarm blocking the dead-letter copies): a stall is counted from the latest of this and the
        # consumer's last delivery.
        self._excused_at = time.monotonic()
        self._blocked: Callable[[], str | None] = lambda: None

    def watch(
        self,
        *,
        consumer: _Consumer,
        pipeline: _Pipeline,
        hold: Callable[[], str | None] | None = None,
        blocked: Callable[[], str | None] | None = None,
    ) -> None:
        """`hold`: why the consumer is told not to consume (ReplicationWatch.hold_reason), or None.
        `blocked`: why RabbitMQ blocks the dead-letter publisher (DeadLetterPublisher.blocked), or None."""
        self._consumer, self._pipeline = consumer, pipeline
        if hold is not None:
            self._hold = hold
        if blocked is not None:
            self._blocked = blocked

    def turned(self) -> None:
        """Called on every turn of the connection loop: records it, and pings systemd while alive."""
        now = self._turned_at = time.monotonic()
        self._excused(now)  # every turn, /healthz asked or not: a hold just ended is no stall
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
        been left unsettled, when messages wait in the queue and none has been received
        for STALL_TIMEOUT_SECONDS (unless held back on purpose), or when a vote has been
        held unacked for longer than STALL_TIMEOUT_SECONDS while PostgreSQL answers. While
        PostgreSQL is down, or while a broker alarm blocks the dead-letter copies, votes wait
        by design and a restart would not help.
        """
        pipeline = self._pipeline
        if pipeline is None:
            return True, "starting"
        silent = time.monotonic() - self._turned_at
        if silent > LOOP_STALL_S:
            return False, f"the RabbitMQ connection loop has not turned for {silent:.0f}s"
        if pipeline.fatal is not None:
            return False, pipeline.fatal
        stalled = self._not_receiving()
        if stalled is not None:
            return False, stalled
        # While a broker alarm blocks the dead-letter copies, acks wait by design, as during a
        # database outage: a restart would be blocked the same way (readiness says why). Counted from
        # the end of such a wait, too: the votes held through it need a moment to be settled after.
        age = min(pipeline.oldest_unacked_age(), time.monotonic() - self._excused_at)
        if age > self._stall_timeout_s and pipeline.database_error is None and self._blocked() is None:
            return False, (
                f"the oldest vote held has waited {age:.0f}s for its ack "
                f"(STALL_TIMEOUT_SECONDS={self._stall_timeout_s:g}) while PostgreSQL answers"
            )
        return True, "ok"

    def _not_receiving(self) -> str | None:
        """Why consuming itself has stalled, or None: messages wait in RABBITMQ_QUEUE and none has
        arrived for STALL_TIMEOUT_SECONDS, whatever the cause (a channel or consumer the broker
        ended unnoticed, a broker that stopped delivering). Holding back on purpose is not a stall."""
        consumer, pipeline = self._consumer, self._pipeline
        if consumer is None or pipeline is None:
            return None
        now = time.monotonic()
        if self._excused(now):
            return None
        ready = consumer.queue_ready
        quiet = now - max(consumer.received_at, self._excused_at)
        if not ready or quiet <= self._stall_timeout_s:
            return None
        return (
            f"{ready} messages are ready in the queue and none has been received for {quiet:.0f}s "
            f"(STALL_TIMEOUT_SECONDS={self._stall_timeout_s:g})"
        )

    def _excused(self, now: float) -> bool:
        """Not receiving is deliberate right now; noted, so that a stall is counted from after it."""
        consumer, pipeline = self._consumer, self._pipeline
        if consumer is None or pipeline is None:
            return True
        # A broker alarm blocking the dead-letter copies holds their batches' acks, so the prefetch
        # window fills and nothing more arrives: waiting, by design, as during an outage.
        if consumer.stopping or pipeline.database_failing or self._hold() is not None or self._blocked() is not None:
            self._excused_at = now
            return True
        return False

    def readiness(self) -> tuple[bool, str]:
        """/readyz: consuming from RabbitMQ, PostgreSQL answering, and counting."""
        consumer, pipeline = self._consumer, self._pipeline
        if consumer is None or pipeline is None:
            return False, "starting: waiting for PostgreSQL"
        if consumer.stopping:
            return False, "stopping"
        held = self._hold()
        if held is not None:
            return False, f"not consuming: {held}"
        if not consumer.consuming:
            return False, "not consuming from RabbitMQ"
        if pipeline.database_error is not None:
            return False, f"PostgreSQL is failing: {pipeline.database_error}"
        blocked = self._blocked()
        if blocked is not None:
            return False, f"{blocked}: refused messages cannot be dead-lettered, acks wait"
        alive, reason = self.liveness()
        return (True, "ready") if alive else (False, reason)


class ReplicationWatch:
    """What a PostgreSQL failover could lose: read from the primary at start-up and then every
    POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS, on a thread of its own ("replication-check").

    A vote is acked after its COMMIT; the ack survives losing the primary only if the commit
    waited for a standby that is then promoted. One line is logged whenever the answer changes,
    and the database_* gauges follow it. With POSTGRES_REQUIRE_SYNC_STANDBY, `hold_reason` tells
    the consumer to stop consuming while an ack would not survive it.
    """

    def __init__(
        self,
        *,
        read: Callable[[], db.ReplicationState],
        metrics: Metrics,
        interval_s: float,
        require_sync: bool,
        user: str,
    ) -> None:
        self._read = read
        self._metrics = metrics
        self._interval_s = interval_s
        self._require_sync = require_sync
        self._user = user
        self._said: str | None = None  # the last line logged, without figures that change all the time
        # Why not to consume; None while consuming is fine. Unknown until the first check.
        self._hold: str | None = "the replication state has not been read yet" if require_sync else None
        self._checked = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold_reason(self) -> str | None:
        return self._hold

    def start(self) -> None:
        """Check once now (before consuming starts), then every interval on a thread of its own."""
        self.check()
        self._thread = threading.Thread(target=self._loop, name="replication-check", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception:
                # Never die: the next check may work, and the state stays the last one known.
                logger.exception("unexpected error while reading the replication state")
                self._metrics.record_error("unexpected")

    def check(self) -> None:
        """Read the state once; log it if it changed; update the gauges and the hold."""
        try:
            state = self._read()
        except db.DatabaseError as exc:
            self._update(
                None, f"PostgreSQL replication state unknown: assume a failover could lose acked votes [{exc}]"
            )
            return
        self._update(state, describe_replication(state, user=self._user))

    def _update(self, state: db.ReplicationState | None, said: str) -> None:
        safe = state is not None and state.failover_safe
        self._metrics.database_failover_safe.set(1 if safe else 0)
        self._metrics.database_standbys.set(len(state.standbys) if state is not None else 0)
        self._metrics.database_synchronous_standbys.set(len(state.synchronous) if state is not None else 0)
        line, _, _figures = said.partition(" [")
        if line != self._said:
            self._said = line
            # A single server without standbys is a choice, not a fault: said once, at INFO.
            alone = state is not None and state.readable and state.required == 0 and not state.standbys
            logger.log(logging.INFO if safe or alone else logging.WARNING, "%s", said)
        if not self._require_sync:
            return
        hold = None if safe else f"POSTGRES_REQUIRE_SYNC_STANDBY=true and {_short(state)}"
        self._metrics.consumption_held.set(0 if hold is None else 1)
        if hold != self._hold:
            if hold is None and self._checked:
                logger.info("a synchronous standby has every commit again: consuming may go on")
            self._hold = hold
        self._checked = True


def _short(state: db.ReplicationState | None) -> str:
    """Why an ack would not survive losing the primary, in a few words (for /readyz)."""
    if state is None or not state.readable:
        return "the primary's replication state is unknown"
    if state.required == 0:
        return "the primary has no synchronous standby configured (synchronous_standby_names is empty)"
    if not state.commits_wait:
        return f"commits do not wait for the standby (synchronous_commit={state.synchronous_commit})"
    return f"{len(state.synchronous)} of the {state.required} synchronous standbys required are attached"
