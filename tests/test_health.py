"""Liveness around a deliberate wait: votes held through it are not a stall the moment it ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from health import Health
from systemd import Notifier
from tests.support import wait_for


@dataclass
class _Consumer:
    consuming: bool = True
    stopping: bool = False
    queue_ready: int | None = 0
    received_at: float = field(default_factory=time.monotonic)


@dataclass
class _Pipeline:
    held_since: float
    database_error: str | None = None
    fatal: str | None = None
    database_failing: bool = False

    def oldest_unacked_age(self) -> float:
        return time.monotonic() - self.held_since


def test_votes_held_through_a_broker_alarm_get_a_stall_timeout_after_it_before_liveness_fails() -> None:
    blocked: list[str | None] = ["RabbitMQ blocks the dead-letter connection (memory alarm)"]
    health = Health(stall_timeout_s=0.5, notifier=Notifier({}))
    # Votes held an hour already: the alarm held their batches' acks back.
    health.watch(
        consumer=_Consumer(), pipeline=_Pipeline(held_since=time.monotonic() - 3600), blocked=lambda: blocked[0]
    )
    assert health.liveness() == (True, "ok")

    blocked[0] = None  # the alarm ends: the copies go out and the acks follow, but not in no time
    assert health.liveness() == (True, "ok")

    # Still held STALL_TIMEOUT_SECONDS after the wait ended: a stall, whatever came before.
    wait_for(lambda: not health.liveness()[0], timeout=30, interval=0.05, what="liveness failing")
    alive, reason = health.liveness()
    assert not alive
    assert "the oldest vote held has waited" in reason
    assert "STALL_TIMEOUT_SECONDS=0.5" in reason
