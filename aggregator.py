"""The vote aggregation service: RabbitMQ consumer, flush thread and main().

Threads:
- the main thread owns the pika BlockingConnection: it receives and validates
  messages, appends votes to the buffer, and runs every ack and reject (pika is
  not thread-safe, so nothing else touches the channel);
- the "flush" thread takes batches from the buffer and writes them to
  PostgreSQL; when a batch has committed it asks the main thread, through
  `add_callback_threadsafe`, to ack it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

import db
import logsetup
import results
from config import HELP, Config, ConfigError, load_config, variables
from metrics import Metrics
from systemd import Notifier
from votes import InvalidVote, Vote, parse_message

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

# How long the connection thread blocks in pika between checks of the stop flag.
_POLL_S = 0.05
# With no batch to write for this long, the flush thread checks that PostgreSQL answers.
_IDLE_CHECK_S = 10.0
# The connection loop turns every _POLL_S; one that has not turned for this long is stuck
# (connecting, which it also counts as turning, is bounded by pika's socket timeout).
_LOOP_STALL_S = 60.0
VERSION = "1.0.0"


@dataclass(slots=True)
class Delivery:
    """A valid vote waiting for its batch, and where to ack it."""

    vote: Vote
    tag: int
    channel: BlockingChannel
    received_at: float


@dataclass(slots=True)
class Batch:
    """Deliveries taken from the buffer together; `seq` numbers batches in delivery order."""

    seq: int
    deliveries: list[Delivery]


class Buffer:
    """Votes waiting to be written. The lock is held only to append or swap."""

    def __init__(self, *, batch_size: int, timeout_s: float) -> None:
        self._batch_size = batch_size
        self._timeout_s = timeout_s
        self._cond = threading.Condition(threading.Lock())
        self._items: list[Delivery] = []
        self._taken = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def add(self, delivery: Delivery) -> None:
        with self._cond:
            self._items.append(delivery)
            # One writer per full batch: with several writers, each gets one.
            if len(self._items) % self._batch_size == 0:
                self._cond.notify()

    def take(self, *, wait_s: float, drain: bool = False) -> Batch | None:
        """The next batch, once it is full or its oldest vote has waited BATCH_TIMEOUT_SECONDS.

        Returns None if no batch is due within `wait_s`. With `drain`, whatever
        is buffered is due at once. Batches are numbered under the same lock that
        takes them, so a lower number always means lower delivery tags.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                now = time.monotonic()
                items = self._items
                if items and (drain or len(items) >= self._batch_size or now - items[0].received_at >= self._timeout_s):
                    batch = Batch(self._taken, items[: self._batch_size])
                    del items[: self._batch_size]
                    self._taken += 1
                    return batch
                if now >= deadline:
                    return None
                wake_at = deadline
                if items:
                    wake_at = min(wake_at, items[0].received_at + self._timeout_s)
                self._cond.wait(max(wake_at - now, 0.001))

    def drop_channel(self, channel: BlockingChannel) -> int:
        """Forget deliveries of a channel that closed: RabbitMQ redelivers them."""
        with self._cond:
            kept = [d for d in self._items if d.channel is not channel]
            dropped = len(self._items) - len(kept)
            self._items = kept
            return dropped

    def oldest_received_at(self) -> float | None:
        with self._cond:
            return self._items[0].received_at if self._items else None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


@dataclass
class _Summary:
    """Counts for the periodic summary line. Each counter has one writing thread."""

    since: float = field(default_factory=time.monotonic)
    received_before: int = 0  # the connection thread's running totals when this summary began
    rejected_before: int = 0
    received: int = 0  # filled in when the summary is logged
    rejected: int = 0
    batches: int = 0
    written: int = 0
    new: int = 0
    redelivered: int = 0
    duplicates: int = 0
    errors: int = 0
    laws: set[str] = field(default_factory=set)


class ConsumerCancelled(Exception):
    """RabbitMQ cancelled our consumer (queue deleted, or the node holding it went away)."""


class AckSequencer:
    """Settles batches in the order they were taken, whatever order they commit in.

    `basic_ack(tag, multiple=True)` covers every earlier delivery on the channel,
    so a batch may be acked only once every batch taken before it is settled:
    acking batch k+1 while batch k is still being written, then crashing, would
    lose batch k. A batch that is never settled (abandoned at shutdown) holds
    back the acks of every later one, so all of them are redelivered.
    """

    def __init__(self, settle: Callable[[list[Delivery], list[Delivery]], None]) -> None:
        self._settle = settle
        self._lock = threading.Lock()
        self._next = 0
        self._done: dict[int, tuple[list[Delivery], list[Delivery]]] = {}
        # seq -> when the batch's oldest vote arrived, for every batch taken and not yet settled.
        self._held: dict[int, float] = {}

    def taken(self, batch: Batch) -> None:
        """Register a batch as soon as it leaves the buffer, so its age stays visible."""
        if batch.deliveries:
            with self._lock:
                self._held[batch.seq] = batch.deliveries[0].received_at

    def done(self, batch: Batch, committed: list[Delivery], rejected: list[Delivery]) -> None:
        with self._lock:
            self._done[batch.seq] = (committed, rejected)
            # Settling only queues callbacks for the connection thread (cheap); it
            # happens under the lock so that they are queued in batch order.
            while self._next in self._done:
                settled = self._done.pop(self._next)
                self._held.pop(self._next, None)
                self._next += 1
                try:
                    self._settle(*settled)
                except Exception:
                    # Never let one batch's settling stop the sequence: the ones
                    # behind it would wait forever. Unsent acks are redelivered.
                    logger.exception("could not settle a batch; RabbitMQ redelivers its votes")

    def oldest_received_at(self) -> float | None:
        """Arrival time of the oldest vote taken from the buffer and not yet settled."""
        with self._lock:
            return min(self._held.values(), default=None)

    @property
    def unsettled(self) -> int:
        """Batches taken and not yet settled."""
        with self._lock:
            return len(self._held)

    @property
    def waiting(self) -> int:
        """Committed batches waiting for an earlier one."""
        with self._lock:
            return len(self._done)


class Aggregator:
    """Consumes votes from RabbitMQ and writes them to PostgreSQL in batches."""

    def __init__(
        self, *, config: Config, database: db.Database, metrics: Metrics, notifier: Notifier | None = None
    ) -> None:
        self._config = config
        self._db = database
        self._metrics = metrics
        self._buffer = Buffer(batch_size=config.batch_size, timeout_s=config.batch_timeout_s)
        self._stop = threading.Event()  # a signal arrived: stop consuming
        self._draining = threading.Event()  # consuming stopped: write what is buffered, then exit
        self._abandon = threading.Event()  # shutdown budget spent: stop retrying
        self._stop_deadline = float("inf")
        # Several writers keep PostgreSQL busy while one waits for a commit; the
        # sequencer keeps their acks in delivery order.
        self._flush_threads = [
            threading.Thread(target=self._flush_loop, name=f"flush-{i + 1}", daemon=True)
            for i in range(config.flush_workers)
        ]
        self._sequencer = AckSequencer(self._settle)
        self._summary_lock = threading.Lock()
        self._channel: BlockingChannel | None = None
        self._consumed_since_connect = False
        self._notifier = notifier if notifier is not None else Notifier({})
        self._next_watchdog = 0.0
        self._ready_sent = False
        self._summary = _Summary()
        # Running totals written by the connection thread only; summaries report differences.
        self._received = 0
        self._received_reported = 0
        self._rejected = 0
        self._database_error: str | None = None  # why the last database operation failed, if it did
        self._last_database_check = time.monotonic()
        self._loop_turned_at = time.monotonic()  # the connection thread's last turn
        self._consuming = False  # a consumer is registered with RabbitMQ
        self._cancelled = False  # RabbitMQ cancelled it; set on the connection thread
        self._fatal: str | None = None  # why the service must stop and exit 1
        metrics.buffer_depth.set_function(lambda: len(self._buffer))
        metrics.oldest_unacked_age.set_function(self.oldest_unacked_age)

    # -- control (any thread, signal handlers included) -----------------------

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: consuming from RabbitMQ, PostgreSQL answering, and counting."""
        channel = self._channel
        if self._stop.is_set():
            return False, "stopping"
        if channel is None or not channel.is_open or not self._consuming:
            return False, "not consuming from RabbitMQ"
        error = self._database_error
        if error is not None:
            return False, f"PostgreSQL is failing: {error}"
        return self.liveness()

    def liveness(self) -> tuple[bool, str]:
        """For /healthz and systemd's watchdog: the service is still counting.

        Alive means the connection loop turns and no vote is held unacked for
        longer than STALL_TIMEOUT_SECONDS while PostgreSQL answers. While
        PostgreSQL is down, votes wait by design and a restart would not help.
        """
        silent = time.monotonic() - self._loop_turned_at
        if silent > _LOOP_STALL_S:
            return False, f"the RabbitMQ connection loop has not turned for {silent:.0f}s"
        if self._fatal is not None:
            return False, self._fatal
        age = self.oldest_unacked_age()
        if age > self._config.stall_timeout_s and self._database_error is None:
            return False, (
                f"the oldest vote held has waited {age:.0f}s for its ack "
                f"(STALL_TIMEOUT_SECONDS={self._config.stall_timeout_s:g}) while PostgreSQL answers"
            )
        return True, "ok"

    def oldest_unacked_age(self) -> float:
        """Seconds since the oldest delivery the service holds (buffered or being written) arrived."""
        oldest = [t for t in (self._sequencer.oldest_received_at(), self._buffer.oldest_received_at()) if t is not None]
        return max(time.monotonic() - min(oldest), 0.0) if oldest else 0.0

    def request_stop(self) -> None:
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + self._config.shutdown_timeout_s
            self._stop.set()
            self._notifier.notify("STOPPING=1", "STATUS=draining buffered votes")

    # -- connection thread ----------------------------------------------------

    def run(self) -> int:
        """Consume until a stop is requested; reconnect on connection loss. Returns the exit code."""
        c = self._config
        if c.rabbitmq_prefetch_count < 2 * c.batch_size:
            # Acks follow commits: with fewer unacked messages allowed than two
            # batches, RabbitMQ stops delivering while each batch is written.
            logger.warning(
                "RABBITMQ_PREFETCH_COUNT=%d is below twice BATCH_SIZE=%d: consumption pauses while each batch "
                "is written%s",
                c.rabbitmq_prefetch_count,
                c.batch_size,
                ", and batches never fill (they are written on the timeout)"
                if c.rabbitmq_prefetch_count < c.batch_size
                else "",
            )
        for thread in self._flush_threads:
            thread.start()
        delay = 1.0
        connected_once = False
        code = EXIT_OK
        while not self._stop.is_set():
            connection: BlockingConnection | None = None
            self._consumed_since_connect = False
            try:
                connection = pika.BlockingConnection(amqp_parameters(self._config))
                connected_once = True
                if not self._consume(connection):
                    code = EXIT_FAILURE
            except ConsumerCancelled as exc:
                self._metrics.record_error("consumer_cancelled")
                logger.warning("%s; consuming again", exc)
            except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError) as exc:
                self._metrics.record_error("rabbitmq_connection")
                if not connected_once and refused_by_broker(exc):
                    # Wrong credentials or vhost: retrying will not help, and the
                    # operator needs to see it at once.
                    logger.error("RabbitMQ refused %s: %s", self._config.rabbitmq_url_for_logs(), exc)
                    self.request_stop()
                    code = EXIT_CONFIG
                    break
                # pika guesses "authentication" whenever the connection drops
                # during the handshake, also when a node is merely stopping.
                logger.error(
                    "RabbitMQ connection to %s failed during the handshake (%s); retrying in %.1fs",
                    self._config.rabbitmq_url_for_logs(),
                    describe_error(exc),
                    delay,
                )
            except ssl.SSLCertVerificationError as exc:
                self._metrics.record_error("rabbitmq_connection")
                if not connected_once:
                    # A CA file or server name that does not match: retrying will not help.
                    logger.error(
                        "RabbitMQ at %s: TLS certificate not accepted: %s (check RABBITMQ_TLS_CA_FILE, "
                        "RABBITMQ_HOST and RABBITMQ_TLS_SERVER_NAME)",
                        self._config.rabbitmq_url_for_logs(),
                        exc,
                    )
                    self.request_stop()
                    code = EXIT_CONFIG
                    break
                logger.error("RabbitMQ TLS certificate not accepted (%s); retrying in %.1fs", exc, delay)
            except (pika.exceptions.AMQPError, OSError) as exc:
                # OSError: ssl.SSLError and socket errors that pika lets through.
                self._metrics.record_error("rabbitmq_connection")
                logger.warning(
                    "RabbitMQ connection to %s lost or refused (%s); retrying in %.1fs",
                    self._config.rabbitmq_url_for_logs(),
                    describe_error(exc),
                    delay,
                )
            finally:
                self._forget_channel()
                if connection is not None and connection.is_open:
                    _close_quietly(connection.close)
            if self._consumed_since_connect:
                delay = 1.0  # the last connection worked: start the backoff over
            if not self._stop.is_set():
                self._notifier.notify(f"STATUS=RabbitMQ unavailable; reconnecting in {delay:.0f}s")
                self._wait(delay)
                delay = min(delay * 2, self._config.rabbitmq_reconnect_max_delay_s)
        # Stopped while disconnected (or the drain above did not finish): let the
        # flush thread write what it holds; its acks cannot be sent, so RabbitMQ
        # redelivers those votes and the database absorbs them.
        if not self._finish_flushing(None) and code == EXIT_OK:
            code = EXIT_FAILURE
        unsettled = self._sequencer.unsettled
        if unsettled:
            logger.error("%d batches were not settled: RabbitMQ redelivers their votes", unsettled)
        if (unsettled or self._fatal is not None) and code == EXIT_OK:
            code = EXIT_FAILURE
        return code

    def _wait(self, seconds: float) -> None:
        """Sleep on the connection thread, still answering systemd's watchdog."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            self._watchdog()
            self._stop.wait(min(remaining, 1.0))
        self._watchdog()

    def _watchdog(self) -> None:
        """Called on every turn of the connection loop: records the turn and pings systemd if alive."""
        now = self._loop_turned_at = time.monotonic()
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

    def _open_queue(self, connection: BlockingConnection) -> BlockingChannel:
        """A channel on RABBITMQ_QUEUE: an existing queue is used as it is, a missing one declared durable."""
        channel = connection.channel()
        queue = self._config.rabbitmq_queue
        try:
            channel.queue_declare(queue, passive=True)
            return channel
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
        channel = connection.channel()
        arguments: dict[str, str] = {}
        c = self._config
        if c.rabbitmq_dead_lettering:
            # Rejected messages are kept for audit instead of being discarded.
            channel.exchange_declare(c.dead_letter_exchange, "fanout", durable=True)
            channel.queue_declare(c.dead_letter_queue, durable=True)
            channel.queue_bind(c.dead_letter_queue, c.dead_letter_exchange)
            arguments["x-dead-letter-exchange"] = c.dead_letter_exchange
        channel.queue_declare(queue, durable=True, arguments=arguments)
        logger.info(
            "declared durable queue %s%s",
            queue,
            f" dead-lettering to {c.dead_letter_exchange} -> {c.dead_letter_queue}" if arguments else "",
        )
        return channel

    def _consume(self, connection: BlockingConnection) -> bool:
        channel = self._open_queue(connection)
        channel.basic_qos(prefetch_count=self._config.rabbitmq_prefetch_count)
        self._cancelled = False
        channel.add_on_cancel_callback(self._on_cancelled)
        consumer_tag = channel.basic_consume(self._config.rabbitmq_queue, on_message_callback=self._on_message)
        self._channel = channel
        self._consuming = True
        self._consumed_since_connect = True
        self._metrics.rabbitmq_connected.set(1)
        status = f"STATUS=consuming {self._config.rabbitmq_queue}"
        if self._ready_sent:
            self._notifier.notify(status)
        else:
            # Both connections are up: the unit counts as started from here.
            self._notifier.notify("READY=1", status)
            self._ready_sent = True
        logger.info(
            "consuming %s on %s (prefetch %d, batch %d votes or %.2fs)",
            self._config.rabbitmq_queue,
            self._config.rabbitmq_url_for_logs(),
            self._config.rabbitmq_prefetch_count,
            self._config.batch_size,
            self._config.batch_timeout_s,
        )
        while not self._stop.is_set() and not self._cancelled:
            connection.process_data_events(time_limit=_POLL_S)
            self._watchdog()
            self._report_received()
        if self._cancelled and not self._stop.is_set():
            # The channel stays open after a cancel, but nothing arrives on it any
            # more. Closing it hands its unacked votes back to RabbitMQ; a new
            # channel declares the queue again if it is gone, as at start-up.
            self._report_received()
            raise ConsumerCancelled(f"RabbitMQ cancelled the consumer of {self._config.rabbitmq_queue}")

        logger.info("stopping: no new messages; writing %d buffered votes", len(self._buffer))
        # Undelivered prefetched messages are nacked by pika and stay in the queue.
        channel.basic_cancel(consumer_tag)
        self._report_received()
        clean = self._finish_flushing(connection)
        # Every ack was scheduled before this sentinel; once it has run, all were sent.
        acks_sent = threading.Event()
        connection.add_callback_threadsafe(acks_sent.set)
        while not acks_sent.is_set() and time.monotonic() < self._stop_deadline + 1.0:
            connection.process_data_events(time_limit=_POLL_S)
        self._forget_channel()
        _close_quietly(channel.close)
        _close_quietly(connection.close)
        return clean and acks_sent.is_set()

    def _on_cancelled(self, _method: object) -> None:
        self._consuming = False
        self._cancelled = True

    def _finish_flushing(self, connection: BlockingConnection | None) -> bool:
        """Let the flush threads write what is buffered, within the shutdown budget."""
        self._draining.set()
        self._buffer.wake()

        def writing() -> bool:
            return any(thread.is_alive() for thread in self._flush_threads)

        while writing() and time.monotonic() < self._stop_deadline:
            if connection is not None:
                connection.process_data_events(time_limit=_POLL_S)
            else:
                time.sleep(_POLL_S)
        if writing():
            self._abandon.set()
            logger.error(
                "shutdown budget (SHUTDOWN_TIMEOUT_SECONDS=%.1f) spent with %d votes not written: "
                "they stay unacked and RabbitMQ redelivers them",
                self._config.shutdown_timeout_s,
                len(self._buffer),
            )
            return False
        return True

    def _forget_channel(self) -> None:
        self._metrics.rabbitmq_connected.set(0)
        self._consuming = False
        channel, self._channel = self._channel, None
        if channel is not None:
            dropped = self._buffer.drop_channel(channel)
            if dropped:
                logger.warning("dropped %d buffered votes of a closed channel; RabbitMQ redelivers them", dropped)

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, _properties: BasicProperties, body: bytes
    ) -> None:
        tag = method.delivery_tag
        self._received += 1  # only this thread writes it: no lock on the hot path
        try:
            parsed = parse_message(
                body, max_bytes=self._config.max_message_bytes, law_id_pattern=self._config.law_id_pattern
            )
        except InvalidVote as exc:
            self._reject_invalid(channel, tag, len(body), exc)
            return
        except Exception:
            logger.exception("validation failed unexpectedly (delivery tag %d)", tag)
            self._reject_invalid(channel, tag, len(body), InvalidVote("unexpected", "validation raised an error"))
            return
        if parsed.extra_fields:
            self._note_extra_fields(parsed.extra_fields)
        self._buffer.add(Delivery(parsed.vote, tag, channel, time.monotonic()))

    def _note_extra_fields(self, names: tuple[str, ...]) -> None:
        # A producer that adds a field during a rolling upgrade must not send
        # every vote to the dead-letter queue: the vote counts, the field is noted.
        for name in self._metrics.record_unknown_fields(names):
            logger.warning("votes carry a field this service ignores: %r (counted in vote_unknown_fields_total)", name)

    def _report_received(self) -> None:
        # messages_received_total is fed once per loop, not once per message: the
        # counter takes a lock on every increment.
        new = self._received - self._received_reported
        if new:
            self._metrics.messages_received.inc(new)
            self._received_reported += new

    def _reject_invalid(self, channel: BlockingChannel, tag: int, size: int, exc: InvalidVote) -> None:
        # Never requeued: it would fail the same way forever. A dead-letter
        # exchange on the queue keeps it for audit.
        channel.basic_reject(tag, requeue=False)
        self._metrics.record_rejected(exc.reason)
        self._rejected += 1
        logger.warning("rejected message (delivery tag %d, %d bytes): %s", tag, size, exc)

    # -- flush thread -----------------------------------------------------------

    def _flush_loop(self) -> None:
        while True:
            batch: Batch | None = None
            try:
                draining = self._draining.is_set()
                batch = self._buffer.take(wait_s=0.2, drain=draining)
                if batch is not None:
                    self._sequencer.taken(batch)
                    self._write(batch)
                elif draining:
                    return
                elif time.monotonic() - self._last_database_check >= _IDLE_CHECK_S:
                    self._check_database()
                self._log_summary()
                if self._abandon.is_set():
                    return
            except Exception:
                # Never die: a dead flush thread would stall every vote behind it.
                logger.exception("unexpected error in the flush thread")
                self._metrics.record_error("unexpected")
                if batch is not None:
                    # _write settles every batch it is given; getting here means a
                    # batch may be left unsettled, and every later ack waits behind
                    # it. Stop (exit 1) so that RabbitMQ redelivers, rather than
                    # stay up without counting.
                    self._fail("a batch could not be settled after an unexpected error")
                time.sleep(1.0)

    def _fail(self, reason: str) -> None:
        if self._fatal is None:
            self._fatal = reason
            logger.error("%s; stopping (exit code 1)", reason)
        self.request_stop()

    def _write(self, batch: Batch) -> None:
        """Write one batch until it commits, then have it settled. Never drops it."""
        started = time.monotonic()
        delay = self._config.retry_delay_s
        deliveries = batch.deliveries
        while True:
            try:
                committed, rejected = self._write_isolating(deliveries)
                break
            except db.TransactionConflict as exc:
                # Contention, not an outage: PostgreSQL answers, so database_up
                # and /readyz stay as they are.
                self._record_failed_attempt("database_conflict")
                logger.warning(
                    "batch of %d votes still conflicting after %d retries (%s); retrying in %.1fs",
                    len(deliveries),
                    self._config.max_retry_attempts,
                    exc,
                    delay,
                )
            except db.RetryableError as exc:
                self._record_failed_attempt("database_unavailable", exc)
                logger.error(
                    "batch of %d votes not written after %d retries (%s); keeping it and retrying in %.1fs",
                    len(deliveries),
                    self._config.max_retry_attempts,
                    exc,
                    delay,
                )
            except db.DatabaseError as exc:
                self._record_failed_attempt("database_error", exc)
                logger.error(
                    "batch of %d votes failed (%s); keeping it and retrying in %.1fs", len(deliveries), exc, delay
                )
            # The votes stay unacked meanwhile, so RabbitMQ stops delivering once
            # prefetch is full: memory stays bounded while PostgreSQL is away.
            if self._abandon.wait(delay):
                return
            delay = min(delay * 2, self._config.retry_max_delay_s)
        duration = time.monotonic() - started
        self._sequencer.done(batch, committed, rejected)
        self._database_ok()
        self._metrics.batch_processing_duration.set(duration)
        self._metrics.batch_duration.observe(duration)
        self._metrics.last_flush.set_to_current_time()
        with self._summary_lock:
            self._summary.batches += 1
            self._summary.written += len(committed)
        logger.debug(
            "batch %d of %d votes committed in %.3fs",
            batch.seq,
            len(deliveries),
            duration,
            extra={"batch_size": len(deliveries), "duration_s": round(duration, 4), "rejected": len(rejected)},
        )

    def _record_failed_attempt(self, error_type: str, exc: Exception | None = None) -> None:
        with self._summary_lock:
            self._summary.errors += 1
        if exc is not None:
            self._database_failed(exc)
        self._metrics.record_error(error_type)

    def _write_isolating(self, batch: list[Delivery], *, whole: bool = True) -> tuple[list[Delivery], list[Delivery]]:
        """Write the batch; split it until each vote that cannot be written is alone, and reject those.

        A vote is rejected when PostgreSQL refuses its data, or when writing it
        raises anything that is not database trouble (a bug, a value the driver
        cannot read back): retrying it would fail the same way, and leaving its
        batch unsettled would hold back every later ack. Returns (committed,
        rejected). Raises DatabaseError (database trouble) for the caller to retry.
        """
        refused: Exception | None = None
        try:
            outcome = self._db.write_batch([d.vote for d in batch])
        except db.DatabaseRejected as exc:
            refused = exc
        except db.DatabaseError:
            raise
        except Exception as exc:
            refused = exc
        else:
            self._record_outcome(outcome, size=len(batch))
            return list(batch), []
        # Split outside the except clauses, so that no traceback chains the halves' errors.
        unexpected = not isinstance(refused, db.DatabaseRejected)
        if len(batch) > 1:
            if unexpected and whole:
                logger.warning(
                    "writing a batch of %d votes raised %s; splitting it to find the vote",
                    len(batch),
                    describe_error(refused),
                )
            return self._write_halves(batch)
        vote, tag = batch[0].vote.vote_hash, batch[0].tag
        if unexpected:
            self._metrics.record_rejected("unexpected")
            logger.error(
                "writing vote %s (delivery tag %d) raised an unexpected error; rejecting it to the dead-letter queue",
                vote,
                tag,
                exc_info=refused,
            )
        else:
            self._metrics.record_rejected("database_rejected")
            logger.error("PostgreSQL refused vote %s (delivery tag %d): %s; rejecting it", vote, tag, refused)
        return [], list(batch)

    def _write_halves(self, batch: list[Delivery]) -> tuple[list[Delivery], list[Delivery]]:
        middle = len(batch) // 2
        first = self._write_isolating(batch[:middle], whole=False)
        second = self._write_isolating(batch[middle:], whole=False)
        return first[0] + second[0], first[1] + second[1]

    def _record_outcome(self, outcome: db.BatchOutcome, *, size: int) -> None:
        """Metrics and summary of a committed batch. The batch is committed whatever happens here."""
        try:
            self._metrics.record_batch(outcome, size=size)
            with self._summary_lock:
                self._summary.new += outcome.new_votes
                self._summary.redelivered += outcome.redeliveries
                self._summary.duplicates += outcome.duplicate_attempts
                self._summary.laws.update(law for law, _choice in outcome.counted)
        except Exception:
            self._metrics.record_error("unexpected")
            logger.exception("could not record the metrics of a committed batch")

    def _log_summary(self) -> None:
        """One INFO line per LOG_SUMMARY_INTERVAL_SECONDS: at 10k votes/s a line per batch is too much."""
        interval = self._config.log_summary_interval_s
        elapsed = time.monotonic() - self._summary.since
        if not interval or elapsed < interval:
            return
        received, rejected = self._received, self._rejected
        with self._summary_lock:
            done, self._summary = self._summary, _Summary(received_before=received, rejected_before=rejected)
        done.received = received - done.received_before
        done.rejected = rejected - done.rejected_before
        if not (done.received or done.written or done.errors):
            return
        logger.info(
            "last %.0fs: %d votes/s, %d received, %d counted, %d redelivered, %d duplicate attempts, "
            "%d rejected, %d batches, %d database errors, %d buffered",
            elapsed,
            done.new / elapsed,
            done.received,
            done.new,
            done.redelivered,
            done.duplicates,
            done.rejected,
            done.batches,
            done.errors,
            len(self._buffer),
            extra={
                "interval_s": round(elapsed, 1),
                "votes_per_s": round(done.new / elapsed, 1),
                "received": done.received,
                "counted": done.new,
                "redelivered": done.redelivered,
                "duplicate_attempts": done.duplicates,
                "rejected": done.rejected,
                "batches": done.batches,
                "database_errors": done.errors,
                "laws": len(done.laws),
                "buffered": len(self._buffer),
            },
        )

    def _check_database(self) -> None:
        """While idle, keep /readyz and database_up honest with a trivial query."""
        try:
            self._db.ping()
        except db.DatabaseError as exc:
            self._database_failed(exc)
        else:
            self._database_ok()

    def _database_ok(self) -> None:
        self._last_database_check = time.monotonic()
        if self._database_error is not None:
            logger.info("PostgreSQL is answering again")
        self._database_error = None
        self._metrics.database_up.set(1)

    def _database_failed(self, exc: Exception) -> None:
        self._last_database_check = time.monotonic()
        self._database_error = str(exc) or type(exc).__name__
        self._metrics.database_up.set(0)

    def _settle(self, committed: list[Delivery], rejected: list[Delivery]) -> None:
        """Rejects first, then one multiple-ack per channel up to the highest committed tag.

        Called by the sequencer in batch order, so every earlier delivery on the
        channel has already been acked or rejected.
        """
        for delivery in rejected:
            self._schedule(delivery.channel, functools.partial(_reject, delivery.channel, delivery.tag))
        last: dict[int, Delivery] = {}
        for d in committed:
            key = id(d.channel)
            if key not in last or d.tag > last[key].tag:
                last[key] = d
        for d in last.values():
            self._schedule(d.channel, functools.partial(self._ack_on_connection_thread, d.channel, d.tag))

    def _schedule(self, channel: BlockingChannel, callback: Callable[[], None]) -> None:
        try:
            channel.connection.add_callback_threadsafe(callback)
        except (pika.exceptions.AMQPError, AttributeError) as exc:
            # The connection is gone; RabbitMQ redelivers and the database absorbs.
            logger.warning("could not schedule an ack (%s); RabbitMQ will redeliver", exc)

    # -- runs on the connection thread ------------------------------------------

    def _ack_on_connection_thread(self, channel: BlockingChannel, tag: int) -> None:
        current = self._channel
        if current is None or channel is not current or not current.is_open:
            # Acking on another channel would ack someone else's messages.
            logger.warning("channel closed before delivery tag %d was acked; RabbitMQ will redeliver", tag)
            return
        current.basic_ack(tag, multiple=True)


def amqp_parameters(c: Config) -> pika.ConnectionParameters:
    """Connection parameters for RabbitMQ, TLS included."""
    ssl_options = None
    if c.rabbitmq_tls:
        context = ssl.create_default_context(cafile=c.rabbitmq_tls_ca_file or None)
        context.check_hostname = c.rabbitmq_tls_verify_hostname
        if c.rabbitmq_tls_cert_file:
            context.load_cert_chain(c.rabbitmq_tls_cert_file, c.rabbitmq_tls_key_file)
        ssl_options = pika.SSLOptions(context, c.rabbitmq_tls_server_name or c.rabbitmq_host)
    return pika.ConnectionParameters(
        ssl_options=ssl_options,
        host=c.rabbitmq_host,
        port=c.rabbitmq_port,
        virtual_host=c.rabbitmq_vhost,
        credentials=pika.PlainCredentials(c.rabbitmq_user, c.rabbitmq_password),
        heartbeat=c.rabbitmq_heartbeat_s,
        blocked_connection_timeout=300,
        connection_attempts=1,
        socket_timeout=10,
        client_properties={"connection_name": "vote-aggregator"},
    )


def _reject(channel: BlockingChannel, tag: int) -> None:
    if channel.is_open:
        channel.basic_reject(tag, requeue=False)


def refused_by_broker(exc: BaseException) -> bool:
    """True when RabbitMQ itself refused the login (403) or the vhost (530).

    pika raises ProbableAuthenticationError / ProbableAccessDeniedError for any
    connection lost during the handshake; only a broker's explicit Connection.Close
    with one of these reply codes is certain, and retrying cannot fix it.
    """
    text = " ".join(str(arg) for arg in exc.args)
    return text.startswith("ConnectionClosedByBroker: (403)") or text.startswith("ConnectionClosedByBroker: (530)")


def describe_error(exc: BaseException) -> str:
    """One line naming an error. pika's connection errors have an empty str(): the cause is in args."""
    text = str(exc) or "; ".join(str(arg) or repr(arg) for arg in exc.args)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close_quietly(close: Callable[[], None]) -> None:
    try:
        close()
    except Exception as exc:  # closing something already broken
        logger.debug("ignored while closing: %s", exc)


# -- start-up ------------------------------------------------------------------


def _open_database(config: Config, stop: threading.Event, metrics: Metrics) -> db.Database | None:
    """Connect and make sure the schema exists, waiting for PostgreSQL if it is down."""
    database = db.Database(config=config, on_retry=metrics.database_retries.inc)
    delay = 1.0
    while not stop.is_set():
        try:
            database.open()
            database.ensure_schema()
            logger.info("connected to PostgreSQL at %s", config.postgres_target_for_logs())
            return database
        except db.RetryableError as exc:
            database.close()
            logger.warning("PostgreSQL not available (%s); retrying in %.1fs", exc, delay)
        stop.wait(delay)
        delay = min(delay * 2, config.retry_max_delay_s)
    return None


def init_db(config: Config) -> int:
    if db.create_database(config):
        print(f"created database {config.postgres_db}")
    database = db.Database(config=config)
    database.open()
    try:
        database.apply_schema()
    finally:
        database.close()
    print(f"schema applied to {config.postgres_target_for_logs()}")
    return EXIT_OK


def check(config: Config) -> list[str]:
    """Connect to both servers and verify the schema; one line per problem (for ExecStartPre=, CI)."""
    problems: list[str] = []
    try:
        connection = pika.BlockingConnection(amqp_parameters(config))
    except (pika.exceptions.AMQPError, OSError) as exc:
        problems.append(f"RabbitMQ {config.rabbitmq_url_for_logs()}: {describe_error(exc)}")
    else:
        try:
            ok = connection.channel().queue_declare(config.rabbitmq_queue, passive=True).method
            print(
                f"ok: RabbitMQ {config.rabbitmq_url_for_logs()}, queue {config.rabbitmq_queue} "
                f"({ok.message_count} ready, {ok.consumer_count} consumers)"
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                problems.append(f"RabbitMQ queue {config.rabbitmq_queue}: {exc.reply_text}")
            else:
                print(
                    f"ok: RabbitMQ {config.rabbitmq_url_for_logs()}, queue {config.rabbitmq_queue} "
                    "does not exist yet (the service declares it)"
                )
        finally:
            _close_quietly(connection.close)

    database = db.Database(config=config)
    try:
        database.open()
        missing = database.missing_schema_objects()
    except db.DatabaseError as exc:
        problems.append(f"PostgreSQL: {exc}")
    else:
        if missing:
            problems.append(
                f"PostgreSQL {config.postgres_target_for_logs()}: schema incomplete, missing {', '.join(missing)}; "
                "apply it with: python aggregator.py --init-db"
            )
        else:
            print(f"ok: PostgreSQL {config.postgres_target_for_logs()}, schema complete")
    finally:
        database.close()
    return problems


def _parser() -> argparse.ArgumentParser:
    defaults = variables()

    def shown(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value) if value != "" else "unset"

    lines = [f"  {name} (default {shown(defaults[name])}): {HELP[name]}" for name in defaults]
    parser = argparse.ArgumentParser(
        prog="aggregator.py",
        description="Vote aggregation service: counts validated votes from RabbitMQ into PostgreSQL. "
        "With no arguments it runs until SIGTERM or SIGINT.",
        epilog="environment variables (also read from a .env file; set ones win):\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        action="store_true",
        help="check the configuration, connect to RabbitMQ and PostgreSQL, verify the schema; exit 0 or 1",
    )
    mode.add_argument(
        "--init-db", action="store_true", help="create the database if missing, apply init_db.sql, and exit"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    results_parser = commands.add_parser("results", help="print the counts stored in PostgreSQL and exit")
    results_parser.add_argument("--law", metavar="ID", help="only this law")
    results_parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from dotenv import find_dotenv, load_dotenv

    # Variables already set (systemd's EnvironmentFile=, docker -e) win over .env.
    load_dotenv(find_dotenv(usecwd=True))
    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        if args.check:
            # --check reports problems one per line and exits 1, configuration included.
            print(f"problem: configuration: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logsetup.configure(level=config.log_level, fmt=config.log_format)

    if args.check:
        problems = check(config)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        return EXIT_FAILURE if problems else EXIT_OK
    try:
        if args.init_db:
            return init_db(config)
        if args.command == "results":
            return results.print_results(config, law_id=args.law, fmt=args.format)
    except db.DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return serve(config)


def serve(config: Config) -> int:
    """Run the service until SIGTERM or SIGINT. Returns the exit code."""
    stop = threading.Event()
    aggregator: Aggregator | None = None
    notifier = Notifier(os.environ)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            # Second signal: leave now. Unacked votes are redelivered and absorbed.
            os._exit(EXIT_FAILURE)
        stop.set()
        if aggregator is not None:
            aggregator.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def readiness() -> tuple[bool, str]:
        if aggregator is None:
            return False, "starting: waiting for PostgreSQL"
        return aggregator.readiness()

    def liveness() -> tuple[bool, str]:
        if aggregator is None:
            return True, "starting"
        return aggregator.liveness()

    metrics = Metrics(max_laws=config.metrics_max_laws, version=VERSION)
    try:
        metrics.serve(
            port=config.prometheus_port, addr=config.prometheus_bind_address, readiness=readiness, liveness=liveness
        )
    except OSError as exc:
        logger.error(
            "cannot serve metrics on %s:%d (PROMETHEUS_BIND_ADDRESS, PROMETHEUS_PORT): %s",
            config.prometheus_bind_address,
            config.prometheus_port,
            exc,
        )
        return EXIT_CONFIG

    notifier.notify("STATUS=connecting to PostgreSQL")
    try:
        database = _open_database(config, stop, metrics)
    except (db.DatabaseMissing, db.DatabaseConfigError) as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    if database is None:
        return EXIT_OK
    try:
        try:
            metrics.set_totals(database.read_totals())
        except db.DatabaseError as exc:
            logger.warning("could not read current totals (%s); gauges fill in as batches commit", exc)
        metrics.database_up.set(1)
        aggregator = Aggregator(config=config, database=database, metrics=metrics, notifier=notifier)
        if stop.is_set():
            aggregator.request_stop()
        code = aggregator.run()
    finally:
        database.close()
    logger.info("stopped (exit code %d)", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
