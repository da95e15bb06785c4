"""Confirmed publishing: persistent messages on one connection, with asynchronous publisher confirms.

A BlockingChannel in confirm mode waits for each message's confirm, a broker round trip and an
fsync per message (about 1,500 messages/s here). ConfirmedPublisher keeps up to `window`
messages unconfirmed instead, so the broker confirms them in groups while more are on the wire,
and it is done only when the broker has settled every one. Used by tools/publish_processes.py,
bench/bench_publishers.py and the tests (tests/support.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.spec
from pika.adapters.select_connection import SelectConnection

PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")
# After a stop request, how long the confirms already due may take.
STOP_GRACE_S = 5.0


@dataclass
class Counts:
    """What happened to the messages of one publisher so far."""

    published: int = 0
    acked: int = 0
    nacked: int = 0
    returned: int = 0  # unroutable: confirmed all the same, but no queue holds them

    @property
    def unconfirmed(self) -> int:
        return self.published - self.acked - self.nacked


class ConfirmedPublisher:
    """Publishes `count` messages from `next_body` to `queue` (default exchange, `mandatory`).

    Up to `window` messages are unconfirmed at once; with a `rate` (messages/s, 0 for no limit),
    message i goes out at start + i / rate. `should_stop` is asked every 0.1 s: once it answers
    yes, nothing more is published and the confirms in flight get STOP_GRACE_S to arrive.
    `on_progress` sees the counts after every change. run() returns None, or why the connection
    or channel failed; the counts say what the broker confirmed either way.
    """

    def __init__(
        self,
        params: pika.ConnectionParameters,
        queue: str,
        next_body: Callable[[], bytes],
        count: int,
        *,
        window: int = 1000,
        rate: float = 0.0,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[Counts], None] = lambda _counts: None,
    ) -> None:
        self._params = params
        self._queue = queue
        self._next_body = next_body
        self._count = count
        self._window = window
        self._rate = rate
        self._should_stop = should_stop
        self._on_progress = on_progress
        self.counts = Counts()
        self._unconfirmed: deque[int] = deque()  # delivery tags, in publishing order
        self._connection: Any = None
        self._channel: Any = None
        self._timer: Any = None
        self._started = 0.0
        self._stopping = False
        self._stop_deadline = math.inf
        self._closing = False
        self.error: str | None = None

    @property
    def done(self) -> bool:
        """Every message published and settled by the broker (acked or nacked)."""
        return self.counts.published == self._count and not self._unconfirmed

    def run(self) -> str | None:
        self._connection = SelectConnection(
            self._params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self._connection.ioloop.start()
        return self.error

    @property
    def _limit(self) -> int:
        return self.counts.published if self._stopping else self._count

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, connection: Any, exc: BaseException) -> None:
        self.error = f"cannot connect to RabbitMQ: {type(exc).__name__}: {exc}"
        connection.ioloop.stop()

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        if not self._closing and self.error is None:
            self.error = f"connection closed: {reason}"
        connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self._closing:
            self.error = self.error or f"channel closed: {reason}"
            self._close()

    def _on_confirm_mode(self, _frame: Any) -> None:
        self._started = time.monotonic()
        self._watch()
        self._pump()

    def _watch(self) -> None:
        """Every 0.1 s: has a stop been asked for, and are we done?"""
        if self._closing:
            return
        if not self._stopping and self._should_stop():
            self._stopping = True
            self._stop_deadline = time.monotonic() + STOP_GRACE_S
        if self._stopping and (not self._unconfirmed or time.monotonic() > self._stop_deadline):
            self._close()
            return
        self._connection.ioloop.call_later(0.1, self._watch)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        if self._closing:
            return
        counts = self.counts
        limit = self._limit
        due = limit
        if self._rate > 0:
            due = min(limit, int((time.monotonic() - self._started) * self._rate) + 1)
        end = min(due, counts.published + self._window - len(self._unconfirmed))
        publish = self._channel.basic_publish
        if counts.published < end:
            while counts.published < end:
                publish("", self._queue, self._next_body(), PERSISTENT, mandatory=True)
                counts.published += 1
                self._unconfirmed.append(counts.published)  # delivery tags count publications from 1
            self._on_progress(counts)
        if counts.published >= limit:
            if not self._unconfirmed:
                self._close()
            return
        if counts.published >= due and self._timer is None:
            wait = self._started + counts.published / self._rate - time.monotonic()
            self._timer = self._connection.ioloop.call_later(max(wait, 0.0005), self._on_timer)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        settled = 0
        if method.multiple:
            while self._unconfirmed and self._unconfirmed[0] <= tag:
                self._unconfirmed.popleft()
                settled += 1
        elif self._unconfirmed and self._unconfirmed[0] == tag:
            self._unconfirmed.popleft()
            settled = 1
        elif tag in self._unconfirmed:
            self._unconfirmed.remove(tag)
            settled = 1
        if isinstance(method, pika.spec.Basic.Nack):
            self.counts.nacked += settled
        else:
            self.counts.acked += settled
        self._on_progress(self.counts)
        self._pump()

    def _on_return(self, _channel: Any, _method: Any, _properties: Any, _body: bytes) -> None:
        self.counts.returned += 1
        self._on_progress(self.counts)

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._connection.is_open:
            self._connection.close()
        else:
            self._connection.ioloop.stop()


def publish_all(params: pika.ConnectionParameters, queue: str, bodies: Sequence[bytes], *, window: int = 1000) -> None:
    """Publish every body, in order; raises PublishError unless the broker confirmed each one into a queue."""
    publisher = ConfirmedPublisher(params, queue, iter(bodies).__next__, len(bodies), window=window)
    error = publisher.run()
    counts = publisher.counts
    if error is None and not publisher.done:
        error = f"stopped with {len(bodies) - counts.acked - counts.nacked} of {len(bodies)} messages unconfirmed"
    problems = [error] if error else []
    if counts.nacked:
        problems.append(f"the broker nacked {counts.nacked} messages")
    if counts.returned:
        problems.append(f"{counts.returned} messages were returned unroutable by queue {queue}")
    if problems:
        raise PublishError("; ".join(problems))


class PublishError(RuntimeError):
    """Not every message is in the queue: a lost connection, a nack or an unroutable message."""
