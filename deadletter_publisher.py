"""The dead-letter publisher: a connection and a thread ("dead-letters") of its own that copy refused
messages to RABBITMQ_DEAD_LETTER_EXCHANGE, a bunch at a time, with the reason in their headers.

A flush worker hands over the refused messages of its batch (`put`) with what to do once the broker
has confirmed every copy: only then is the batch settled, so the multiple-ack that covers the batch
never covers a refused message whose copy is not safe. The copies of a bunch are published back to
back and their confirms awaited together, and the worker goes on with the next batch meanwhile, so
several bunches are in flight at once (pipelined): a flood of garbage drains about as fast as votes.

The connection is not the consuming one. RabbitMQ blocks a connection that publishes while a memory
or disk alarm lasts; the consuming connection, which only acks, keeps going, and this one says that
it is blocked (`blocked`, the dead_letter_publishing_blocked gauge, a log line) instead of tearing
itself down: a new connection would be blocked just the same. pika touches this connection only on
its thread (a SelectConnection's ioloop); other threads wake it with `add_callback_threadsafe`.

When the copy cannot be made (dead-lettering off, the exchange missing, nothing bound to it, a nack),
`put` answers False and the batch rejects those messages without requeue, as before: RabbitMQ then
applies whatever dead-lettering the queue has, without a reason. Copies whose confirm was lost with
the connection are published again on the next one: the dead-letter queue may hold a message twice,
never zero times.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic

from amqp import amqp_parameters, close_quietly, describe_error
from config import Config, node_text
from deadletters import AT, BY, DETAIL, QUEUE, REASON
from metrics import Metrics

logger = logging.getLogger(__name__)

_DETAIL_MAX = 300
# After the exchange turned out missing or unroutable, refused messages are rejected without
# their reason for this long before the next try, instead of trying (and logging) for each one.
_BROKEN_S = 30.0


@dataclass(eq=False)
class _Bunch:
    """The copies of one batch's refused messages, and the flush worker's answer once they are settled."""

    copies: list[tuple[bytes, pika.BasicProperties]]
    then: Callable[[bool], None]
    unconfirmed: int = 0
    failed: bool = False  # nacked or returned: the originals are rejected instead


class DeadLetterPublisher:
    """Copies refused messages to the dead-letter exchange on a connection of its own."""

    def __init__(self, *, config: Config, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._by = f"vote-aggregator@{socket.gethostname()}:{os.getpid()}"
        self._nodes = config.rabbitmq_nodes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dead-letters", daemon=True)
        # Shared with flush workers; the lock is held only to swap these.
        self._lock = threading.Lock()
        self._pending: list[_Bunch] = []
        self._connection: pika.SelectConnection | None = None  # set while a confirming channel is open
        self._broken_until = 0.0
        self._blocked: str | None = None
        self._blocked_since = 0.0
        # The thread's own state, for the current channel.
        self._select: pika.SelectConnection | None = None  # the current connection, open or not
        self._node = ""
        self._opened = False  # a confirming channel was opened on the current connection
        self._channel: Channel | None = None
        self._seq = 0
        self._unconfirmed: dict[int, _Bunch] = {}  # publish sequence number -> its bunch, in order
        self._in_flight: list[_Bunch] = []
        metrics.dead_letter_publishing_blocked.set(0)

    # -- any thread ---------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._config.rabbitmq_dead_lettering

    @property
    def blocked(self) -> str | None:
        """Why RabbitMQ blocks this connection (a memory or disk alarm), for as long as it does."""
        return self._blocked

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Close the connection; called once no flush worker waits for a copy any more."""
        self._stop.set()
        select = self._select
        if select is not None:
            try:
                select.ioloop.add_callback_threadsafe(self._close)
            except Exception as exc:  # the ioloop already ended
                logger.debug("could not wake the dead-letter publisher: %s", exc)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def put(self, refused: Sequence[tuple[bytes, str, str]], *, then: Callable[[bool], None]) -> None:
        """Copy (body, reason, detail) messages, then call `then(True)` once the broker confirmed every copy.

        `then(False)`: no copy can be made now; reject the originals. Called on this module's thread,
        or at once on the caller's. Never called if the service stops first: the originals stay
        unsettled and are redelivered.
        """
        if not self.enabled or not refused:
            then(not refused)
            return
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        # One set of properties per reason and detail: a flood of one kind of garbage shares it.
        shared: dict[tuple[str, str], pika.BasicProperties] = {}
        copies = []
        for body, reason, detail in refused:
            properties = shared.get((reason, detail))
            if properties is None:
                properties = shared[reason, detail] = self._properties(reason, detail, at)
            copies.append((body, properties))
        bunch = _Bunch(copies, then)
        with self._lock:
            broken = time.monotonic() < self._broken_until
            if not broken:
                self._pending.append(bunch)
            connection = self._connection
        if broken:
            then(False)
            return
        if connection is not None:
            try:
                connection.ioloop.add_callback_threadsafe(self._send)
            except Exception as exc:  # the connection is going: the next one sends what is pending
                logger.debug("could not wake the dead-letter publisher: %s", exc)
        # Otherwise the thread sends it once its channel is open.

    def _properties(self, reason: str, detail: str, at: str) -> pika.BasicProperties:
        headers = {
            REASON: reason,
            DETAIL: detail[:_DETAIL_MAX],
            AT: at,
            BY: self._by,
            QUEUE: self._config.rabbitmq_queue,
        }
        return pika.BasicProperties(delivery_mode=2, content_type="application/json", headers=headers)

    # -- the "dead-letters" thread --------------------------------------------------------

    def _run(self) -> None:
        index, delay = 0, 1.0
        while not self._stop.is_set():
            node = self._nodes[index]
            try:
                opened = self._connect(node)
            except Exception:
                logger.exception("unexpected error in the dead-letter publisher")
                opened = False
            self._lost()
            index = (index + 1) % len(self._nodes)
            if opened:
                delay = 1.0
                if len(self._nodes) > 1:
                    continue
            self._stop.wait(delay)
            delay = min(delay * 2, self._config.rabbitmq_reconnect_max_delay_s)

    def _connect(self, node: tuple[str, int]) -> bool:
        """Run one connection's ioloop until it closes; True if a channel was opened on it."""
        parameters = amqp_parameters(self._config, node, name="vote-aggregator-dead-letters")
        # A blocked connection waits for the alarm to clear: tearing it down would not help,
        # since the next one is blocked too, and the copies in flight would have to be sent again.
        parameters.blocked_connection_timeout = None
        self._opened = False
        self._node = node_text(*node)
        connection = pika.SelectConnection(
            parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
        )
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._select = connection
        connection.ioloop.start()
        return self._opened

    def _on_open(self, connection: pika.SelectConnection) -> None:
        if self._stop.is_set():
            connection.close()
            return
        self._open_channel()

    def _open_channel(self) -> None:
        if self._select is not None and self._select.is_open and not self._stop.is_set():
            self._select.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self._seq = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirming)

    def _on_confirming(self, _frame: Method[Any]) -> None:
        if not self._opened:
            logger.debug("dead-letter publisher connected to %s", self._node)
        self._opened = True
        with self._lock:
            self._connection = self._select
        self._send()

    def _on_open_error(self, connection: pika.SelectConnection, exc: BaseException | str) -> None:
        logger.warning(
            "dead-letter publisher: RabbitMQ connection to %s failed (%s); retrying",
            self._node,
            describe_error(exc) if isinstance(exc, BaseException) else exc,
        )
        connection.ioloop.stop()

    def _on_close(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        if not self._stop.is_set() and self._opened:
            logger.warning(
                "dead-letter publisher: RabbitMQ connection to %s lost (%s)", self._node, describe_error(reason)
            )
        connection.ioloop.stop()

    def _close(self) -> None:
        select = self._select
        if select is not None and select.is_open:
            close_quietly(select.close)
        elif select is not None:
            select.ioloop.stop()

    def _lost(self) -> None:
        """The connection is gone: copies not confirmed are sent again on the next one."""
        unconfirmed = len(self._unconfirmed)
        if unconfirmed and not self._stop.is_set():
            logger.warning(
                "dead-letter publisher: sending %d unconfirmed copies again on the next connection", unconfirmed
            )
        with self._lock:
            self._connection = None
            self._pending[:0] = self._in_flight
        self._in_flight, self._unconfirmed, self._channel = [], {}, None
        self._unblocked_now()

    def _send(self) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        with self._lock:
            bunches, self._pending = self._pending, []
        wire = _Wire.on(self._select, channel.channel_number, self._config) if bunches else None
        for bunch in bunches:
            if time.monotonic() < self._broken_until:
                self._answer(bunch, ok=False)
                continue
            bunch.unconfirmed, bunch.failed = len(bunch.copies), False
            self._in_flight.append(bunch)
            for body, properties in bunch.copies:
                if wire is None or not wire.add(body, properties):
                    if wire is not None:
                        wire.flush()  # the frames before this copy leave first: confirms follow the order
                    # Mandatory: a copy that no queue takes comes back (basic.return) instead of vanishing.
                    channel.basic_publish(
                        self._config.dead_letter_exchange, self._config.rabbitmq_queue, body, properties, mandatory=True
                    )
                self._seq += 1
                self._unconfirmed[self._seq] = bunch
        if wire is not None:
            wire.flush()
        if bunches:
            _coalesce(self._select)

    def _on_confirm(self, frame: Method[Any]) -> None:
        method = frame.method
        tag = int(method.delivery_tag or 0)
        nacked = isinstance(method, Basic.Nack)
        if method.multiple:
            seqs = []
            for seq in self._unconfirmed:
                if seq > tag:
                    break
                seqs.append(seq)
        else:
            seqs = [tag] if tag in self._unconfirmed else []
        if nacked:
            self._break("RabbitMQ nacked a copy")
        for seq in seqs:
            bunch = self._unconfirmed.pop(seq)
            bunch.failed |= nacked
            bunch.unconfirmed -= 1
            if bunch.unconfirmed == 0:
                self._in_flight.remove(bunch)
                self._answer(bunch, ok=not bunch.failed)

    def _on_return(self, _channel: Channel, _method: Basic.Return, _properties: object, _body: bytes) -> None:
        # The return comes before the confirm of the same copy: its bunch is in flight. Which one
        # is not said, so every bunch in flight is rejected; some of those copies may be in the
        # dead-letter queue as well (twice is allowed, never zero times).
        for bunch in self._in_flight:
            bunch.failed = True
        self._break(f"nothing is bound to exchange {self._config.dead_letter_exchange}")

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if self._channel is channel:
            self._channel = None
        select = self._select
        if select is None or self._stop.is_set() or not select.is_open:
            return  # the connection is closing: _lost deals with what is in flight
        in_flight, self._in_flight, self._unconfirmed = self._in_flight, [], {}
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == 404:
            self._break(f"exchange {self._config.dead_letter_exchange} is missing")
            with self._lock:
                waiting, self._pending = self._pending, []
            # Neither the copies in flight nor those not yet sent can be made until the channel is back.
            for bunch in in_flight + waiting:
                self._answer(bunch, ok=False)
            select.ioloop.call_later(_BROKEN_S, self._open_channel)
            return
        logger.warning("dead-letter publisher: channel closed (%s); opening another", describe_error(reason))
        with self._lock:
            self._connection = None
            self._pending[:0] = in_flight
        select.ioloop.call_later(1.0, self._open_channel)

    def _break(self, why: str) -> None:
        """Reject refused messages without their reason for a while, said once."""
        now = time.monotonic()
        if now >= self._broken_until:
            logger.warning(
                "cannot dead-letter to exchange %s (%s): refused messages are rejected without their reason "
                "for the next %.0fs",
                self._config.dead_letter_exchange,
                why,
                _BROKEN_S,
            )
        with self._lock:
            self._broken_until = now + _BROKEN_S

    def _answer(self, bunch: _Bunch, *, ok: bool) -> None:
        try:
            bunch.then(ok)
        except Exception:
            # Settling only schedules acks; a failure there is the sequencer's to report.
            logger.exception("unexpected error while settling a batch after its dead-letter copies")

    def _on_blocked(self, _connection: pika.SelectConnection, frame: Method[Any]) -> None:
        reason = getattr(frame.method, "reason", "") or "a resource alarm"
        self._blocked = f"RabbitMQ blocks publishing ({reason})"
        self._blocked_since = time.monotonic()
        self._metrics.dead_letter_publishing_blocked.set(1)
        logger.warning(
            "RabbitMQ blocks the dead-letter connection (%s): refused messages wait for their copies, and the "
            "acks of the votes behind them wait too, until the alarm clears",
            reason,
        )

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: Method[Any]) -> None:
        self._unblocked_now()

    def _unblocked_now(self) -> None:
        if self._blocked is not None:
            logger.info(
                "RabbitMQ no longer blocks the dead-letter connection (blocked for %.0fs)",
                time.monotonic() - self._blocked_since,
            )
        self._blocked = None
        self._metrics.dead_letter_publishing_blocked.set(0)


class _Wire:
    """The copies of one turn as AMQP frames, marshalled here and handed to pika's transport at once.

    pika's basic_publish builds and marshals a method frame, a content header (the properties
    table encoded again for every message) and a body frame per message, about 20 µs of the
    service's CPU per copy: the larger part of what a refused message cost more than a vote
    (bench/refused.py). Every copy goes to the same exchange with the same routing key, and the
    copies of a flood share their properties (put), so the method frame is marshalled once per
    turn and each properties object is encoded once; the bytes are the ones pika would send
    (tests/test_dead_letters.py compares them). A body larger than a frame, or a pika without
    the connection's frame writer (1.4, pinned in requirements.txt), goes through basic_publish.
    """

    def __init__(self, emit: Callable[[Sequence[bytes]], None], channel_number: int, method: bytes, body_max: int):
        self._emit = emit
        self._channel = channel_number
        self._method = method
        self._body_max = body_max
        self._encoded: dict[int, tuple[pika.BasicProperties, bytes]] = {}
        self._frames: list[bytes] = []

    @classmethod
    def on(cls, connection: pika.SelectConnection | None, channel_number: int, config: Config) -> _Wire | None:
        emit = getattr(connection, "_output_marshaled_frames", None)
        frame_max = getattr(getattr(connection, "params", None), "frame_max", None)
        if not callable(emit) or not isinstance(frame_max, int):
            return None
        publish = pika.spec.Basic.Publish(
            exchange=config.dead_letter_exchange, routing_key=config.rabbitmq_queue, mandatory=True
        )
        method = pika.frame.Method(channel_number, publish).marshal()
        return cls(emit, channel_number, method, frame_max - pika.spec.FRAME_HEADER_SIZE - pika.spec.FRAME_END_SIZE)

    def add(self, body: bytes, properties: pika.BasicProperties) -> bool:
        """Queue one copy's frames; False if it must go through basic_publish (a body larger than a frame)."""
        if len(body) > self._body_max:
            return False
        known = self._encoded.get(id(properties))
        if known is None or known[0] is not properties:
            known = self._encoded[id(properties)] = (properties, b"".join(properties.encode()))
        encoded = known[1]
        header = _HEADER_PREFIX.pack(
            pika.spec.FRAME_HEADER, self._channel, 12 + len(encoded), properties.INDEX, len(body)
        )
        self._frames += (self._method, header + encoded + _FRAME_END)
        if body:
            self._frames.append(_FRAME_PREFIX.pack(pika.spec.FRAME_BODY, self._channel, len(body)) + body + _FRAME_END)
        return True

    def flush(self) -> None:
        if self._frames:
            self._emit([b"".join(self._frames)])
            self._frames = []


# A frame's type, channel and size; a content header's are followed by its class, weight and body size.
_FRAME_PREFIX = struct.Struct(">BHI")
_HEADER_PREFIX = struct.Struct(">BHIHxxQ")
_FRAME_END = bytes([pika.spec.FRAME_END])


def _coalesce(connection: pika.SelectConnection | None) -> None:
    """Join the frames waiting to be written into one chunk, so that a bunch leaves in a few send() calls.

    pika's transport sends each frame of its buffer with a send() of its own: three per message
    (method, header, body), which cost about a third of the service's CPU while a flood of
    refused messages was copied (bench/refused.py, profiled). The buffer is pika's (1.4,
    requirements.txt pins it); without one where it is expected, nothing is changed.
    """
    buffers = getattr(getattr(connection, "_transport", None), "_tx_buffers", None)
    if isinstance(buffers, deque) and len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)
