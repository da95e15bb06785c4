"""The RabbitMQ side: connection loop, queue set-up, receiving, validation hand-off, acks and rejects.

pika's BlockingConnection is not thread-safe, so everything here that touches
it runs on one thread (the main thread, in `Consumer.run`). Flush workers ask
for acks and rejects through `settle`, which schedules them on that thread with
`add_callback_threadsafe`, as dramatiq's RabbitMQ broker does.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from amqp import (
    amqp_parameters,
    close_quietly,
    declare_queues,
    describe_error,
    existing_queue_arguments,
    open_connection,
    refused_by_broker,
    what_happens_to_refused,
)
from config import Config, node_text
from exits import CONFIG as EXIT_CONFIG
from exits import FAILURE as EXIT_FAILURE
from exits import OK as EXIT_OK
from metrics import Metrics
from pipeline import Delivery, Pipeline
from summary import Summary
from systemd import Notifier
from votes import InvalidVote, parse_message

logger = logging.getLogger(__name__)

# How long the connection thread blocks in pika between checks of the stop flag.
_POLL_S = 0.05
# Past SHUTDOWN_TIMEOUT_SECONDS, how long the guard lets a shutdown go on (the last acks, closing
# the channel and the connection) before it ends the process.
_GUARD_MARGIN_S = 3.0
# How often the connection thread reads how many messages are ready in RABBITMQ_QUEUE (for liveness).
_READY_EVERY_S = 3.0
# Deliveries (votes and refused messages) reach the buffer in bunches of at most this many (and at
# the end of each loop turn): a bunch waits at most a few milliseconds, a vote never waits for a later one.
_HANDOFF = 64
# A "rejected message" line for each of the first this many refused messages of every window;
# past it, one line per window says how many more (the metrics count every one). A flood of
# garbage would otherwise spend a third of the service's time writing log lines nobody reads.
_REJECTS_LOGGED = 1_000
_REJECTS_WINDOW_S = 60.0
_SESSION = operator.attrgetter("session")
_TAG = operator.attrgetter("tag")


@dataclass(frozen=True, slots=True)
class _Then:
    """What follows a failed connection attempt, for its log line: the backoff, and the next node."""

    delay: float
    following: str | None  # the next node of RABBITMQ_HOST, if there are several
    more: bool  # nodes of this round not tried yet

    def phrase(self, consumed: bool) -> str:
        """ "now on <node>" when the next node is tried at once, else "in <seconds>"."""
        if self.following is not None and (consumed or self.more):
            return f"now on {self.following}"
        return f"in {1.0 if consumed else self.delay:.1f}s"


class ConsumerCancelled(Exception):
    """RabbitMQ ended our consumer or its channel: a cancel (queue deleted, or the node holding it went
    away), or the channel closed by the broker (an ack overdue past consumer_timeout, a channel error)."""


class Consumer:
    """Consumes RABBITMQ_QUEUE, hands every message to the pipeline (votes and refusals), and settles them when told."""

    def __init__(
        self,
        *,
        config: Config,
        metrics: Metrics,
        summary: Summary,
        notifier: Notifier,
        on_turn: Callable[[], None],
        hold: Callable[[], str | None] | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._summary = summary
        self._notifier = notifier
        self._on_turn = on_turn
        # Why not to consume right now (ReplicationWatch.hold_reason), or None; read on every turn.
        self._hold = hold or (lambda: None)
        self._nodes = [node_text(host, port) for host, port in config.rabbitmq_nodes]
        self._stop = threading.Event()
        self._ran = threading.Event()  # the shutdown is over (shutdown_done)
        self._deadline = float("inf")
        self._pipeline: Pipeline | None = None
        # The current connection and channel, and the session number that names
        # the channel in deliveries; all three change together, on this thread only.
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._session = 0
        self._cancelled = False
        self._connected_once = False  # a connection has been established since start-up
        # The current connection got as far as consuming, or as deliberately not consuming (hold).
        self._consumed = False
        self._ready_sent = False
        self._received = 0  # this thread's running counts; reported once per loop turn
        # Deliveries not yet in the buffer: handed over in bunches (_HANDOFF) and at the end
        # of every loop turn, one lock round per bunch instead of one per vote.
        self._arrived: list[Delivery] = []
        self._rejected = 0
        # For liveness (health.py): messages ready in RABBITMQ_QUEUE at the last look (None: unknown),
        # and when a delivery last arrived or consuming last (re)started (monotonic).
        self.queue_ready: int | None = None
        self.received_at = time.monotonic()
        self._described = False  # an existing RABBITMQ_QUEUE's dead-lettering was said
        self._spare: BlockingChannel | None = None  # reads queue_ready; never consumes
        self._ready_read_at = 0.0
        self._rejected_by: dict[str, int] = {}  # reason -> refused this turn, for the metrics
        self._rejects_logged = 0  # "rejected message" lines in this window
        self._rejects_unlogged: dict[str, int] = {}  # reason -> refused past _REJECTS_LOGGED
        self._rejects_window_ends = 0.0

    # -- any thread ---------------------------------------------------------------

    @property
    def consuming(self) -> bool:
        channel = self._channel
        return channel is not None and channel.is_open and not self._cancelled

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Stop consuming and drain within SHUTDOWN_TIMEOUT_SECONDS (safe from a signal handler)."""
        if not self._stop.is_set():
            self._deadline = time.monotonic() + self._config.shutdown_timeout_s
            self._stop.set()
            self._notifier.notify("STOPPING=1", "STATUS=draining buffered votes")

    def settle(self, committed: list[Delivery], rejected: list[Delivery]) -> None:
        """Have one batch acked and rejected on the connection thread (called in batch order)."""
        acks: dict[int, int] = {}  # session -> highest committed tag
        sessions = set(map(_SESSION, committed))
        if len(sessions) == 1:
            # The usual batch, all on one channel: its highest tag found in C, not in a loop per vote.
            acks[sessions.pop()] = max(map(_TAG, committed))
        else:
            for d in committed:
                acks[d.session] = max(d.tag, acks.get(d.session, 0))
        rejects = [(d.session, d.tag) for d in rejected]
        connection = self._connection
        try:
            if connection is None:
                raise pika.exceptions.ConnectionWrongStateError("not connected")
            connection.add_callback_threadsafe(functools.partial(self._settle_here, acks, rejects))
        except (pika.exceptions.AMQPError, AttributeError) as exc:
            # The connection is gone; RabbitMQ redelivers and the database absorbs.
            logger.warning("could not schedule an ack (%s); RabbitMQ will redeliver", exc)

    # -- the connection thread -------------------------------------------------------

    def run(self, pipeline: Pipeline) -> int:
        """Consume until a stop is requested; on a lost connection, go on with the next node. Returns the exit code.

        The nodes of RABBITMQ_HOST are tried in turn, starting after the one just lost, so
        that it comes last. The backoff only grows once every node failed in a row: while
        another node answers, nothing waits.
        """
        threading.Thread(target=self._guard_shutdown, name="shutdown-guard", daemon=True).start()
        return self._run(pipeline)

    def shutdown_done(self) -> None:
        """The whole shutdown is over (the final chain heads included): the guard stands down."""
        self._ran.set()

    def _run(self, pipeline: Pipeline) -> int:
        self._pipeline = pipeline
        self._warn_about_prefetch()
        nodes = self._config.rabbitmq_nodes
        self._metrics.record_rabbitmq_node(self._nodes, None)
        delay = 1.0
        code = EXIT_OK
        index = 0
        failed = refused = 0  # nodes failed in a row, and those of this round that refused us for good
        while not self._stop.is_set():
            following = node_text(*nodes[(index + 1) % len(nodes)]) if len(nodes) > 1 else None
            then = _Then(delay, following, more=(failed + 1) % len(nodes) != 0)
            outcome = self._connect_and_consume(nodes[index], then)
            self._on_turn()
            index = (index + 1) % len(nodes)
            if outcome == "unclean":
                code = EXIT_FAILURE
            if self._consumed:
                # The node worked: the backoff starts over, and the next node is tried at once.
                failed = refused = 0
                delay = 1.0
                if len(nodes) > 1:
                    continue
            else:
                failed += 1
                refused += outcome == "refused"
                if failed % len(nodes):
                    continue  # nodes not yet tried in this round
                if refused == len(nodes):
                    # Every node refused the credentials, the vhost or the certificate: retrying cannot help.
                    return self._finish(EXIT_CONFIG)
                refused = 0
                if len(nodes) > 1:
                    logger.warning("no RabbitMQ node answered (%d tried); trying again in %.0fs", len(nodes), delay)
            if not self._stop.is_set():
                self._notifier.notify(f"STATUS=RabbitMQ unavailable; reconnecting in {delay:.0f}s")
                self._wait(delay)
                delay = min(delay * 2, self._config.rabbitmq_reconnect_max_delay_s)
        return self._finish(code)

    def _guard_shutdown(self) -> None:
        """Ends the process when a shutdown outlasts SHUTDOWN_TIMEOUT_SECONDS (plus a margin).

        pika's blocking calls (basic_cancel, closing the channel and the connection, a passive
        declare, a publisher confirm) wait for the broker's answer without a timeout: a broker that
        stops answering (a partition, a blackholing firewall) would hold the shutdown until the
        heartbeat gives up, or forever, and one whose memory alarm blocks the connections that
        publish (the final chain heads) holds it until the alarm clears. Nothing is lost by
        leaving: a vote is acked only after its commit, so whatever is not acked yet is
        redelivered and the database absorbs what was committed; the final heads are in
        CHAIN_HEADS_FILE before they are published.
        """
        self._stop.wait()
        if self._ran.wait(max(self._deadline + _GUARD_MARGIN_S - time.monotonic(), 0.0)):
            return  # the shutdown is over
        logger.error(
            "shutdown still not done %.0fs after SHUTDOWN_TIMEOUT_SECONDS=%g (RabbitMQ not answering?); exiting now: "
            "votes not acked are redelivered",
            _GUARD_MARGIN_S,
            self._config.shutdown_timeout_s,
        )
        logging.shutdown()
        os._exit(EXIT_FAILURE)

    def _finish(self, code: int) -> int:
        """After the loop: stopped while disconnected, or refused. Writes what is buffered."""
        assert self._pipeline is not None
        self.request_stop()
        # The acks of what is written now cannot be sent: RabbitMQ redelivers
        # those votes and the database absorbs them.
        if not self._pipeline.finish(deadline=self._deadline, idle=lambda: time.sleep(_POLL_S)) and code == EXIT_OK:
            code = EXIT_FAILURE
        return code

    def _connect_and_consume(self, node: tuple[str, int], then: _Then) -> str:
        """One connection's life: "clean" or "unclean" after a stop, "lost", or "refused" (by this node, for good).

        `then` says when the next attempt comes, for the log lines.
        """
        connection: BlockingConnection | None = None
        self._consumed = False
        url = self._config.rabbitmq_url_for_logs(node)
        try:
            connection = open_connection(amqp_parameters(self._config, node))
            self._connection = connection
            self._connected_once = True
            self._metrics.record_rabbitmq_node(self._nodes, node_text(*node))
            return "clean" if self._consume(connection, node) else "unclean"
        except ConsumerCancelled as exc:
            self._metrics.record_error("consumer_cancelled")
            logger.warning("%s; consuming again %s", exc, then.phrase(self._consumed))
        except (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
            ssl.SSLCertVerificationError,
        ) as exc:
            self._metrics.record_error("rabbitmq_connection")
            if self._refused_for_good(exc, url):
                return "refused"
            # pika guesses "authentication" whenever the connection drops during
            # the handshake, also when a node is merely stopping.
            logger.error(
                "RabbitMQ TLS certificate of %s not accepted (%s); retrying %s"
                if isinstance(exc, ssl.SSLCertVerificationError)
                else "RabbitMQ connection to %s failed during the handshake (%s); retrying %s",
                url,
                describe_error(exc),
                then.phrase(self._consumed),
            )
        except (pika.exceptions.AMQPError, OSError) as exc:
            # OSError: ssl.SSLError and socket errors that pika lets through.
            self._metrics.record_error("rabbitmq_connection")
            logger.warning(
                "RabbitMQ connection to %s lost or refused (%s); retrying %s",
                url,
                describe_error(exc),
                then.phrase(self._consumed),
            )
        finally:
            self._disconnected(connection)
        return "lost"

    def _refused_for_good(self, exc: Exception, url: str) -> bool:
        """Whether this node refused us for a reason retrying cannot fix; said at once if so.

        Only certain before the first connection: later, a node that is merely
        stopping drops handshakes in ways pika reports the same.
        """
        if self._connected_once:
            return False
        if isinstance(exc, ssl.SSLCertVerificationError):
            # A CA file or server name that does not match: retrying will not help.
            logger.error(
                "RabbitMQ at %s: TLS certificate not accepted: %s (check RABBITMQ_TLS_CA_FILE, "
                "RABBITMQ_HOST and RABBITMQ_TLS_SERVER_NAME)",
                url,
                exc,
            )
            return True
        if refused_by_broker(exc):
            # Wrong credentials or vhost: the operator needs to see it at once.
            logger.error("RabbitMQ refused %s: %s", url, exc)
            return True
        return False

    def _disconnected(self, connection: BlockingConnection | None) -> None:
        self._forget_channel()
        self._spare = None
        self.queue_ready = None
        self._metrics.record_rabbitmq_node(self._nodes, None)
        self._connection = None
        if connection is not None and connection.is_open:
            close_quietly(connection.close)

    def _warn_about_prefetch(self) -> None:
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

    def _wait(self, seconds: float) -> None:
        """Sleep on the connection thread, still turning (systemd's watchdog, liveness)."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            self._on_turn()
            self._stop.wait(min(remaining, 1.0))
        self._on_turn()

    def _open_queue(self, connection: BlockingConnection) -> BlockingChannel:
        """A channel on RABBITMQ_QUEUE: an existing queue is used as it is, a missing one declared (declare_queues)."""
        channel = connection.channel()
        try:
            channel.queue_declare(self._config.rabbitmq_queue, passive=True)
            if not self._described:
                self._describe_existing_queue(connection)
            return channel
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
        declare_queues(connection, self._config)
        return connection.channel()

    def _describe_existing_queue(self, connection: BlockingConnection) -> None:
        """Once per process: what happens to a refused or over-delivered message in a queue declared by
        someone else (its dead-letter exchange and delivery limit, read from the broker's answers)."""
        self._described = True
        arguments = existing_queue_arguments(connection, self._config)
        if arguments is None:
            logger.warning(
                "existing queue %s: could not find out what RabbitMQ does with a refused or over-delivered message",
                self._config.rabbitmq_queue,
            )
            return
        line = what_happens_to_refused(arguments, self._config)
        logger.log(logging.WARNING if "DROPPED" in line else logging.INFO, "%s", line)

    def _start_consuming(self, connection: BlockingConnection, node: tuple[str, int]) -> str:
        channel = self._open_queue(connection)
        channel.basic_qos(prefetch_count=self._config.rabbitmq_prefetch_count)
        self._cancelled = False
        channel.add_on_cancel_callback(self._on_cancelled)
        self._session += 1
        self.received_at = time.monotonic()
        consumer_tag = channel.basic_consume(self._config.rabbitmq_queue, on_message_callback=self._on_message)
        self._channel = channel
        self._consumed = True
        self._metrics.rabbitmq_connected.set(1)
        status = f"STATUS=consuming {self._config.rabbitmq_queue}"
        if self._ready_sent:
            self._notifier.notify(status)
        else:
            # Both connections are up: the unit counts as started from here.
            self._notifier.notify("READY=1", status)
            self._ready_sent = True
        nodes = self._config.rabbitmq_nodes
        logger.info(
            "consuming %s on %s (%sprefetch %d, batch %d votes or %.2fs)",
            self._config.rabbitmq_queue,
            self._config.rabbitmq_url_for_logs(node),
            f"node {nodes.index(node) + 1} of {len(nodes)}, " if len(nodes) > 1 else "",
            self._config.rabbitmq_prefetch_count,
            self._config.batch_size,
            self._config.batch_timeout_s,
        )
        return str(consumer_tag)

    def _consume(self, connection: BlockingConnection, node: tuple[str, int]) -> bool:
        """Consume until a stop is requested, then drain. True when every vote written was acked.

        While the hold says so (POSTGRES_REQUIRE_SYNC_STANDBY), the channel stays closed and
        the connection open: RabbitMQ keeps the votes until consuming may go on.
        """
        assert self._pipeline is not None
        consumer_tag: str | None = None
        self._cancelled = False  # a cancel on an earlier connection is dealt with
        ended: str | None = None
        while not self._stop.is_set() and ended is None:
            consumer_tag = self._follow_hold(connection, node, consumer_tag)
            self._pump(connection)
            self._on_turn()
            self._report_received()
            ended = self._ended(consumer_tag)
            self._read_ready(connection)
        self._report_received(final=True)
        if ended is not None:
            # Nothing arrives on this channel any more, and pika says so nowhere else: a
            # channel the broker closed stays quiet for good. Its unacked votes are back in
            # the queue (redelivered, counted once); starting over on a new connection
            # declares the queue again if it is gone, as at start-up.
            raise ConsumerCancelled(ended)
        logger.info("stopping: no new messages; writing %d buffered votes", len(self._pipeline.buffer))
        channel = self._channel
        if channel is not None and consumer_tag is not None:
            # Undelivered prefetched messages are nacked by pika and stay in the queue.
            channel.basic_cancel(consumer_tag)

        def turn() -> None:
            self._pump(connection)
            self._on_turn()

        clean = self._pipeline.finish(deadline=self._deadline, idle=turn)
        # Every ack was scheduled before this sentinel; once it has run, all were sent.
        acks_sent = threading.Event()
        connection.add_callback_threadsafe(acks_sent.set)
        while not acks_sent.is_set() and time.monotonic() < self._deadline + 1.0:
            turn()
        self._forget_channel()
        if channel is not None:
            close_quietly(channel.close)
        close_quietly(connection.close)
        return clean and acks_sent.is_set()

    def _follow_hold(
        self, connection: BlockingConnection, node: tuple[str, int], consumer_tag: str | None
    ) -> str | None:
        """Start or stop consuming as the hold says; returns the consumer tag while consuming."""
        held = self._hold()
        if held is None and consumer_tag is None:
            held = self._database_hold()
        if held is None:
            return consumer_tag if consumer_tag is not None else self._start_consuming(connection, node)
        if consumer_tag is not None or not self._consumed:
            self._stand_by(held)
        return None

    def _database_hold(self) -> str | None:
        """Why not to start consuming while PostgreSQL fails, or None.

        Only consuming (again) is held, never a channel already consuming: what it holds is kept
        and written once PostgreSQL is back. But every vote delivered during an outage goes back
        to the queue at each reconnect, and a quorum queue's delivery limit counts each return
        (x-delivery-limit, RabbitMQ 3.10+): a flapping network during a long outage would
        otherwise dead-letter valid votes. Held, they stay in the queue, delivered once.
        """
        pipeline = self._pipeline
        if pipeline is None or not pipeline.database_failing:
            return None
        why = pipeline.database_error or "a batch is being retried"
        return f"PostgreSQL is failing ({why}); consuming resumes when it answers"

    def _stand_by(self, reason: str) -> None:
        """Stop consuming and hand back every vote not yet acked; the connection stays open.

        Buffered votes are dropped and batches being written are not acked (their
        channel is gone): RabbitMQ redelivers them all once consuming goes on, and
        the database absorbs those already committed. So no vote is acked while
        the hold lasts, whatever was under way when it began.
        """
        self._consumed = True  # the connection works: a loss later starts the backoff over
        channel = self._channel
        self._forget_channel()
        if channel is not None:
            close_quietly(channel.close)
        logger.warning("not consuming: %s; the votes stay in RabbitMQ", reason)
        status = f"STATUS=not consuming: {reason}"
        if self._ready_sent:
            self._notifier.notify(status)
        else:
            # Running as configured: deliberately not consuming is not a failed start.
            self._notifier.notify("READY=1", status)
            self._ready_sent = True

    def _on_cancelled(self, _method: object) -> None:
        self._cancelled = True

    def _ended(self, consumer_tag: str | None) -> str | None:
        """Why the broker ended the consumer or its channel, or None while it is consuming (or held)."""
        if self._cancelled:
            return f"RabbitMQ cancelled the consumer of {self._config.rabbitmq_queue}"
        channel = self._channel
        if consumer_tag is None or channel is None or not channel.is_closed:
            return None
        # BlockingChannel keeps the broker's Channel.Close (code and text) only in this attribute.
        reason = getattr(channel, "_closing_reason", None)
        return (
            f"RabbitMQ closed the channel consuming {self._config.rabbitmq_queue} "
            f"({describe_error(reason) if reason is not None else 'no reason given'})"
        )

    def _read_ready(self, connection: BlockingConnection) -> None:
        """Every few seconds, how many messages wait in RABBITMQ_QUEUE (a passive declare on a spare channel).

        Liveness compares it with the last delivery: ready messages and nothing received for
        STALL_TIMEOUT_SECONDS is a consumer that no longer consumes, whatever the cause. A busy
        quorum queue may answer 0 (RabbitMQ 3.10 gives its leader 250 ms): that only delays
        the verdict, it never makes one up.
        """
        now = time.monotonic()
        if now - self._ready_read_at < _READY_EVERY_S:
            return
        self._ready_read_at = now
        try:
            if self._spare is None or not self._spare.is_open:
                self._spare = connection.channel()
            frame = self._spare.queue_declare(self._config.rabbitmq_queue, passive=True)
            ready = frame.method.message_count
            self.queue_ready = int(ready) if ready is not None else None
        except pika.exceptions.ChannelClosedByBroker:
            self._spare, self.queue_ready = None, None  # the queue is gone: the consumer is cancelled too
        self._metrics.queue_ready.set(self.queue_ready or 0)

    def _pump(self, connection: BlockingConnection) -> None:
        """One turn of pika's loop: deliveries are handed to the buffer by its end, whatever happens."""
        try:
            connection.process_data_events(time_limit=_POLL_S)
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._arrived and self._pipeline is not None:
            # Counted as received before a flush worker can count them as written: a summary line
            # never shows a vote counted whose receipt a later line (perhaps never logged) carries.
            self._count_received()
            self._pipeline.buffer.extend(self._arrived)
            self._arrived = []

    def _forget_channel(self) -> None:
        self._metrics.rabbitmq_connected.set(0)
        channel, self._channel = self._channel, None
        self._hand_over()  # then dropped with the rest of the channel's deliveries
        if channel is not None and self._pipeline is not None:
            dropped = self._pipeline.buffer.drop_session(self._session)
            if dropped:
                logger.warning("dropped %d buffered votes of a closed channel; RabbitMQ redelivers them", dropped)

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, _properties: BasicProperties, body: bytes
    ) -> None:
        assert self._pipeline is not None
        # A Basic.Deliver from the broker always carries its tag (the stubs allow None for
        # frames built by hand).
        tag = cast(int, method.delivery_tag)
        self._received += 1  # only this thread writes it: no lock on the hot path
        try:
            parsed = parse_message(
                body, max_bytes=self._config.max_message_bytes, law_id_pattern=self._config.law_id_pattern
            )
        except InvalidVote as exc:
            delivery = self._refused(tag, body, exc)
        except Exception:
            logger.exception("validation failed unexpectedly (delivery tag %d)", tag)
            delivery = self._refused(tag, body, InvalidVote("unexpected", "validation raised an error"))
        else:
            if parsed.extra_fields:
                self._note_extra_fields(parsed.extra_fields)
            delivery = Delivery(parsed.vote, tag, self._session, time.monotonic(), body)
        arrived = self._arrived
        arrived.append(delivery)
        if len(arrived) >= _HANDOFF:
            self._hand_over()

    def _note_extra_fields(self, names: tuple[str, ...]) -> None:
        # A producer that adds a field during a rolling upgrade must not send
        # every vote to the dead-letter queue: the vote counts, the field is noted.
        for name in self._metrics.record_unknown_fields(names):
            logger.warning("votes carry a field this service ignores: %r (counted in vote_unknown_fields_total)", name)

    def _count_received(self) -> None:
        # Fed once per hand-over or loop turn, not once per message: the counter takes a lock on
        # every increment.
        received, rejected = self._received, self._rejected
        if received or rejected:
            self.received_at = time.monotonic()
            self._metrics.messages_received.inc(received)
            for reason, count in self._rejected_by.items():
                self._metrics.record_rejected(reason, count)
            self._rejected_by = {}
            self._summary.received(received, rejected)
            self._received = self._rejected = 0

    def _report_received(self, *, final: bool = False) -> None:
        self._count_received()
        now = time.monotonic()
        if final or now >= self._rejects_window_ends:
            if self._rejects_unlogged:
                logger.warning(
                    "%d more messages rejected in the last %.0fs, not logged one by one (%s); "
                    "votes_rejected_total counts every one",
                    sum(self._rejects_unlogged.values()),
                    _REJECTS_WINDOW_S,
                    ", ".join(f"{reason}: {n}" for reason, n in sorted(self._rejects_unlogged.items())),
                )
            self._rejects_logged, self._rejects_unlogged = 0, {}
            self._rejects_window_ends = now + _REJECTS_WINDOW_S

    def _refused(self, tag: int, body: bytes, exc: InvalidVote) -> Delivery:
        """An invalid message: never requeued (it would fail the same way forever), kept for audit with why.

        It goes through the buffer like a vote: its batch copies it to the dead-letter queue
        (deadletter_publisher), off this thread, and acks it with the votes once the copy is confirmed.
        """
        self._rejected_by[exc.reason] = self._rejected_by.get(exc.reason, 0) + 1
        self._rejected += 1
        if self._rejects_logged < _REJECTS_LOGGED:
            self._rejects_logged += 1
            logger.warning("rejected message (delivery tag %d, %d bytes): %s", tag, len(body), exc)
        else:
            self._rejects_unlogged[exc.reason] = self._rejects_unlogged.get(exc.reason, 0) + 1
        return Delivery(None, tag, self._session, time.monotonic(), body, (exc.reason, exc.detail))

    def _settle_here(self, acks: dict[int, int], rejects: list[tuple[int, int]]) -> None:
        """Rejects first, then one multiple-ack up to the batch's highest acked tag.

        Acked are the committed votes and the refused messages whose dead-letter copy is
        confirmed; rejected (without requeue) are refused messages that could not be copied.

        Runs in batch order, so every earlier delivery on the channel has already
        been acked or rejected. Deliveries of an earlier channel are skipped:
        their tags would ack someone else's messages on the new one.
        """
        channel = self._channel
        if channel is None or not channel.is_open:
            logger.warning("channel closed before a batch was settled; RabbitMQ will redeliver it")
            return
        for session, tag in rejects:
            if session == self._session:
                channel.basic_reject(tag, requeue=False)
        last = acks.get(self._session)
        if last is not None:
            channel.basic_ack(last, multiple=True)
        if len(acks) > (1 if last is not None else 0):
            logger.warning("a batch held votes of a closed channel; RabbitMQ redelivers them")
