"""The batch pipeline: the buffer, batches, ack ordering, and the flush workers that write them.

The connection thread adds deliveries to the buffer. Each flush worker
("flush-N") takes the next batch, writes it until it commits (the retry policy
lives here, in one place), isolates the votes that cannot be written, and hands
the result to the sequencer, which settles batches in delivery order through
the consumer's `settle` callback. Nothing here touches pika: a delivery carries
its tag and an opaque session number naming the channel it came on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

import db
from config import Config
from metrics import Metrics
from summary import Summary
from votes import Vote

logger = logging.getLogger(__name__)

# With no batch to write for this long, a flush worker checks that PostgreSQL answers;
# while it is failing, every second (the consumer waits for that answer to consume again).
_IDLE_CHECK_S = 10.0
_FAILING_CHECK_S = 1.0


@dataclass(slots=True)
class Delivery:
    """A message waiting for its batch, and how to settle it: its tag on channel `session`.

    `body` is kept for the dead-letter queue; `refusal` is (reason, detail) once the message is
    refused. A message refused on arrival (invalid) has no vote: it travels with the votes all the
    same, so that it is settled in delivery order, after its copy is in the dead-letter queue.
    """

    vote: Vote | None
    tag: int
    session: int
    received_at: float
    body: bytes = b""
    refusal: tuple[str, str] | None = None


@dataclass(slots=True)
class Batch:
    """Deliveries taken from the buffer together; `seq` numbers batches in delivery order."""

    seq: int
    deliveries: list[Delivery]


# (acked, rejected) deliveries of one batch, called in batch order: acked are the committed votes and
# the refused messages whose copy the dead-letter queue confirmed; rejected have no copy.
Settle = Callable[[list[Delivery], list[Delivery]], None]


class SystematicFailure(Exception):
    """Too many votes refused as `unexpected`: the fault is in the service, not in the votes.

    Raised out of isolation so that the batch in hand stays unsettled (RabbitMQ keeps
    its votes) instead of being dead-lettered vote by vote.
    """


class DeadLetters(Protocol):
    """Where refused messages are copied (deadletter_publisher.DeadLetterPublisher)."""

    def put(self, refused: Sequence[tuple[bytes, str, str]], *, then: Callable[[bool], None]) -> None: ...


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

    def extend(self, deliveries: list[Delivery]) -> None:
        """Append deliveries in the order they arrived: one lock round for a bunch of them."""
        with self._cond:
            items = self._items
            before = len(items)
            items.extend(deliveries)
            # One writer per batch that filled: with several writers, each gets one.
            filled = len(items) // self._batch_size - before // self._batch_size
            if filled:
                self._cond.notify(filled)

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

    def drop_session(self, session: int) -> int:
        """Forget deliveries of a channel that closed: RabbitMQ redelivers them."""
        with self._cond:
            kept = [d for d in self._items if d.session != session]
            dropped = len(self._items) - len(kept)
            self._items = kept
            return dropped

    def oldest_received_at(self) -> float | None:
        with self._cond:
            return self._items[0].received_at if self._items else None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class AckSequencer:
    """Settles batches in the order they were taken, whatever order they commit in.

    `basic_ack(tag, multiple=True)` covers every earlier delivery on the channel,
    so a batch may be acked only once every batch taken before it is settled:
    acking batch k+1 while batch k is still being written, then crashing, would
    lose batch k. A batch that is never settled (abandoned at shutdown) holds
    back the acks of every later one, so all of them are redelivered.
    """

    def __init__(self, settle: Settle, *, on_failure: Callable[[str], None] | None = None) -> None:
        self._settle = settle
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._next = 0
        self._done: dict[int, tuple[list[Delivery], list[Delivery]]] = {}
        # seq -> when the batch's oldest vote arrived, for every batch taken and not yet settled.
        self._held: dict[int, float] = {}

    def taken(self, batch: Batch) -> None:
        """Register a batch as soon as it leaves the buffer, so that its age stays visible."""
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
                    # behind it would wait forever. But its votes may stay unacked on
                    # an open channel, holding prefetch slots while nothing looks held:
                    # the service stops (exit 1) and RabbitMQ redelivers them.
                    logger.exception("could not settle a batch; RabbitMQ redelivers its votes")
                    if self._on_failure is not None:
                        self._on_failure("a committed batch could not be settled")

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


class Pipeline:
    """The buffer, the sequencer and FLUSH_WORKERS writer threads."""

    def __init__(
        self,
        *,
        config: Config,
        database: db.Database,
        metrics: Metrics,
        summary: Summary,
        settle: Settle,
        on_fatal: Callable[[str], None],
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self._config = config
        self._dead_letters = dead_letters
        self._copying_lock = threading.Lock()
        self._copying = 0  # batches whose dead-letter copies are not confirmed yet
        self._db = database
        self._metrics = metrics
        self._summary = summary
        self._on_fatal = on_fatal
        self.buffer = Buffer(batch_size=config.batch_size, timeout_s=config.batch_timeout_s)
        # Several writers keep PostgreSQL busy while one waits for a commit; the
        # sequencer keeps their acks in delivery order.
        self._sequencer = AckSequencer(settle, on_failure=self._fail)
        self._workers = [
            threading.Thread(target=self._work, name=f"flush-{i + 1}", daemon=True) for i in range(config.flush_workers)
        ]
        self._draining = threading.Event()  # consuming stopped: write what is buffered, then exit
        self._abandon = threading.Event()  # shutdown budget spent: stop retrying
        self.database_error: str | None = None  # why the last database operation failed, if it did
        self._last_database_check = time.monotonic()
        self._write_failed = False  # a write attempt failed (not a conflict) since PostgreSQL last answered
        self.fatal: str | None = None  # set when a batch may be left unsettled: the service must exit 1
        # When the last votes refused as `unexpected` were, within UNEXPECTED_REJECTIONS_WINDOW_SECONDS.
        self._unexpected_lock = threading.Lock()
        self._unexpected: deque[float] = deque()
        self._systematic = threading.Event()  # past MAX_UNEXPECTED_REJECTIONS: write and reject nothing more
        metrics.buffer_depth.set_function(lambda: len(self.buffer))
        metrics.oldest_unacked_age.set_function(self.oldest_unacked_age)

    # -- any thread -------------------------------------------------------------

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def oldest_unacked_age(self) -> float:
        """Seconds since the oldest delivery held (buffered or being written) arrived; 0 when none."""
        oldest = [t for t in (self._sequencer.oldest_received_at(), self.buffer.oldest_received_at()) if t is not None]
        return max(time.monotonic() - min(oldest), 0.0) if oldest else 0.0

    @property
    def database_failing(self) -> bool:
        """PostgreSQL is failing: known down, or a batch write failed since it last answered."""
        return self.database_error is not None or self._write_failed

    @property
    def unsettled(self) -> int:
        return self._sequencer.unsettled

    def finish(self, *, deadline: float, idle: Callable[[], None]) -> bool:
        """Write what is buffered and let the workers exit, calling `idle` meanwhile (acks go out).

        Returns False when the deadline came first: the workers are abandoned
        and their votes, unacked, are redelivered.
        """
        self._draining.set()
        self.buffer.wake()
        while self.writing and time.monotonic() < deadline:
            idle()
        if not self.writing:
            return True
        self._abandon.set()
        # Retry waits end at once (abandon), and so do queries PostgreSQL never answers.
        self._db.interrupt()
        logger.error(
            "shutdown budget (SHUTDOWN_TIMEOUT_SECONDS=%.1f) spent with %d votes not written: "
            "they stay unacked and RabbitMQ redelivers them",
            self._config.shutdown_timeout_s,
            len(self.buffer),
        )
        return False

    @property
    def writing(self) -> bool:
        """A flush worker is still running, or a batch waits for its dead-letter copies."""
        with self._copying_lock:
            copying = self._copying
        return copying > 0 or any(worker.is_alive() for worker in self._workers)

    # -- flush workers ------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch: Batch | None = None
            try:
                draining = self._draining.is_set()
                batch = self.buffer.take(wait_s=0.2, drain=draining)
                if batch is not None:
                    self._sequencer.taken(batch)
                    self._write(batch)
                elif draining:
                    return
                elif time.monotonic() - self._last_database_check >= (
                    _FAILING_CHECK_S if self.database_failing else _IDLE_CHECK_S
                ):
                    self._check_database()
                self._summary.maybe_log(buffered=len(self.buffer))
                if self._abandon.is_set() or self._systematic.is_set():
                    return  # what is left stays unacked: RabbitMQ redelivers it
            except Exception:
                # Never die: a dead flush worker would stall every vote behind it.
                logger.exception("unexpected error in the flush worker")
                self._metrics.record_error("unexpected")
                if batch is not None:
                    # _write settles every batch it is given; getting here means a
                    # batch may be left unsettled, and every later ack waits behind
                    # it. Stop (exit 1) so that RabbitMQ redelivers, rather than
                    # stay up without counting.
                    self._fail("a batch could not be settled after an unexpected error")
                time.sleep(1.0)

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            logger.error("%s; stopping (exit code 1)", reason)
        self._on_fatal(reason)

    def _write(self, batch: Batch) -> None:
        """Write one batch until it commits, then have it settled. Never drops it."""
        if self._systematic.is_set():
            return  # unsettled: the service is stopping, and RabbitMQ keeps these votes
        started = time.monotonic()
        retrying = Retrying(
            retry=retry_if_exception_type(db.DatabaseError),
            wait=wait_exponential(multiplier=self._config.retry_delay_s, max=self._config.retry_max_delay_s),
            # Database trouble is retried until it clears: a batch is never
            # dropped. Only a shutdown whose budget is spent stops it.
            stop=lambda _state: self._abandon.is_set(),
            sleep=self._sleep,
            before_sleep=self._before_retry,
            reraise=True,
        )
        refused = [d for d in batch.deliveries if d.refusal is not None]  # invalid on arrival
        votes = [d for d in batch.deliveries if d.refusal is None] if refused else batch.deliveries
        try:
            committed, rejected = retrying(self._write_isolating, votes) if votes else ([], [])
        except db.DatabaseError:
            return  # abandoned at shutdown: unsettled, so RabbitMQ redelivers it and every later batch
        except SystematicFailure as exc:
            # Unsettled, with the votes this batch already refused: they and every later batch are
            # redelivered once the fault is fixed, instead of being dead-lettered one by one.
            self._fail(str(exc))
            return
        except db.IntegrityFailure as exc:
            self._integrity_failed(batch, exc)
            return
        refused += rejected
        if refused:
            self._dead_letter(batch, committed, refused)
        else:
            self._sequencer.done(batch, committed, [])
        duration = time.monotonic() - started
        self._summary.batch_settled(len(committed))
        if not votes:
            # Only refused messages: nothing was written, so this says nothing about PostgreSQL
            # (database_up, /readyz, the stall rule) nor about flushing.
            return
        self._database_ok()
        self._metrics.batch_processing_duration.set(duration)
        self._metrics.batch_duration.observe(duration)
        self._metrics.last_flush.set_to_current_time()
        logger.debug(
            "batch %d of %d votes committed in %.3fs",
            batch.seq,
            len(votes),
            duration,
            extra={"batch_size": len(batch.deliveries), "duration_s": round(duration, 4), "rejected": len(rejected)},
        )

    def _integrity_failed(self, batch: Batch, exc: db.IntegrityFailure) -> None:
        """PostgreSQL stored something else than what was sent (its transaction was rolled back).

        Not retried: whatever altered the batch would alter it again, and the retries would hide
        it. Not rejected: the votes are sound, so they must not leave RabbitMQ for the dead-letter
        queue. The batch stays unsettled, which holds back every later ack, and the service stops
        (exit 1): RabbitMQ keeps every vote for an instance that can store them faithfully, and a
        supervisor's restarts make the failure loud (VoteAggregatorIntegrityFailure, CrashLoop)
        instead of a service that stays up counting nothing.
        """
        self._metrics.integrity_failures.inc()
        logger.critical(
            "integrity failure: %s; batch of %d votes left unacked (RabbitMQ keeps them), stopping",
            exc,
            len(batch.deliveries),
        )
        self._fail(f"integrity failure: {exc}")

    def _dead_letter(self, batch: Batch, committed: list[Delivery], refused: list[Delivery]) -> None:
        """Copy a batch's refused messages to the dead-letter queue, all at once, and settle the batch then.

        The flush worker goes on with the next batch meanwhile: copies of several batches are in
        flight together, and the sequencer still settles them in order. A batch whose copies are
        never confirmed (a shutdown first) is never settled: RabbitMQ redelivers it and every later one.
        """
        if self._dead_letters is None:
            self._sequencer.done(batch, committed, refused)
            return

        def copied(ok: bool) -> None:
            with self._copying_lock:
                self._copying -= 1
            if ok:
                # The copies are confirmed: the batch's multiple-ack may cover the originals.
                self._sequencer.done(batch, committed + refused, [])
            else:
                # No copy can be made: rejected without requeue, as RabbitMQ's own dead-lettering takes them.
                self._sequencer.done(batch, committed, refused)

        with self._copying_lock:
            self._copying += 1
        try:
            self._dead_letters.put([(d.body, *(d.refusal or ("unexpected", ""))) for d in refused], then=copied)
        except Exception:
            # Never called back: the batch stays unsettled, which the flush worker reports (exit 1).
            with self._copying_lock:
                self._copying -= 1
            raise

    def _sleep(self, seconds: float) -> None:
        """Wait before a retry; cut short by a spent shutdown budget, or by PostgreSQL answering again.

        The consumer does not consume while PostgreSQL fails (Consumer._database_hold): a
        retry backoff of up to RETRY_MAX_DELAY_SECONDS would keep it waiting after the outage.
        """
        deadline = time.monotonic() + seconds
        down = False  # only an answer after a failed ping ends the wait: a server that answers
        # throughout (a lock, a read-only server) keeps the full backoff
        while not self._abandon.wait(min(_FAILING_CHECK_S, max(deadline - time.monotonic(), 0.0))):
            if time.monotonic() >= deadline:
                return
            if self._answers():
                if down:
                    return
            else:
                down = True

    def _answers(self) -> bool:
        try:
            self._db.ping()
        except db.DatabaseError:
            return False
        return True

    def _before_retry(self, state: RetryCallState) -> None:
        """Log and count a failed attempt. Past MAX_RETRY_ATTEMPTS it is an outage, not a blip."""
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        size = len(state.args[0]) if state.args else 0
        conflict = isinstance(exc, db.TransactionConflict)
        self._metrics.database_retries.inc()
        self._summary.error()
        if not conflict:
            self._write_failed = True
        attempt = state.attempt_number
        if attempt <= self._config.max_retry_attempts:
            logger.warning(
                "Retrying a batch of %d votes in %.1fs (attempt %d failed: %s: %s)",
                size,
                delay,
                attempt,
                type(exc).__name__,
                exc,
            )
            return
        self._metrics.record_error(_error_type(exc))
        if not conflict:
            # Contention is not an outage: PostgreSQL answers, so database_up and
            # /readyz stay as they are.
            self._database_failed(exc)
        logger.log(
            logging.WARNING if conflict else logging.ERROR,
            "batch of %d votes not written after %d attempts (%s: %s); keeping it and retrying in %.1fs",
            size,
            attempt,
            type(exc).__name__,
            exc,
            delay,
        )

    def _write_isolating(self, batch: list[Delivery], *, whole: bool = True) -> tuple[list[Delivery], list[Delivery]]:
        """Write the batch; split it until each vote that cannot be written is alone, and reject those.

        A vote is rejected when PostgreSQL refuses its data, or when writing it
        raises anything that is not database trouble (a bug, a value the driver
        cannot read back): retrying it would fail the same way, and leaving its
        batch unsettled would hold back every later ack. Returns (committed,
        rejected). Raises DatabaseError (database trouble) for the retry policy.
        """
        refused: Exception | None = None
        if self._systematic.is_set():
            raise SystematicFailure("another flush worker found a systematic failure")
        try:
            outcome = self._db.write_batch([d.vote for d in batch if d.vote is not None])
        except db.DatabaseRejected as exc:
            refused = exc
        except db.NotReplicated as exc:
            # Committed on the primary but not acked: the retry finds these votes stored, so
            # what this commit counted reaches the metrics now. An attempt that counted nothing
            # (the retries themselves) is left out, or every retry would add redeliveries.
            done = exc.outcome
            if isinstance(done, db.BatchOutcome) and (done.new_votes or done.duplicate_attempts):
                self._record_outcome(done, size=len(batch))
            raise
        except (db.DatabaseError, db.IntegrityFailure):
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
                    "writing a batch of %d votes raised %s: %s; splitting it to find the vote",
                    len(batch),
                    type(refused).__name__,
                    refused,
                )
            middle = len(batch) // 2
            first = self._write_isolating(batch[:middle], whole=False)
            second = self._write_isolating(batch[middle:], whole=False)
            return first[0] + second[0], first[1] + second[1]
        if unexpected:
            self._admit_unexpected(refused)
        self._reject(batch[0], refused, unexpected=unexpected)
        return [], list(batch)

    def _admit_unexpected(self, exc: Exception | None) -> None:
        """Allow one more vote to be refused as `unexpected`, or raise SystematicFailure.

        One vote that trips a bug is isolated and dead-lettered, and counting goes on. But
        when every write raises (a bug in a new release, a driver change), isolation would
        dead-letter the whole queue one vote at a time, with liveness green: past
        MAX_UNEXPECTED_REJECTIONS in UNEXPECTED_REJECTIONS_WINDOW_SECONDS the service stops
        instead (exit 1), and the votes stay in RabbitMQ until the fault is fixed.
        """
        limit, window = self._config.max_unexpected_rejections, self._config.unexpected_rejections_window_s
        now = time.monotonic()
        with self._unexpected_lock:
            recent = self._unexpected
            while recent and now - recent[0] > window:
                recent.popleft()
            if len(recent) < limit and not self._systematic.is_set():
                recent.append(now)
                return
            already = self._systematic.is_set()
            self._systematic.set()
        if not already:
            self._metrics.record_error("systematic_failure")
            logger.critical(
                "a systematic failure: %d votes refused as unexpected within %.0fs (MAX_UNEXPECTED_REJECTIONS=%d, "
                "UNEXPECTED_REJECTIONS_WINDOW_SECONDS=%g), the last with %s: %s; the votes not yet refused stay in "
                "RabbitMQ until the fault is fixed",
                limit + 1,
                window,
                limit,
                window,
                type(exc).__name__,
                exc,
            )
        raise SystematicFailure(
            f"a systematic failure: more than {limit} votes refused as unexpected within {window:g}s "
            f"(last: {type(exc).__name__})"
        )

    def _reject(self, delivery: Delivery, exc: Exception | None, *, unexpected: bool) -> None:
        vote, tag = delivery.vote.vote_hash if delivery.vote else "?", delivery.tag
        # The first line only: PostgreSQL's DETAIL line may quote the row, citizen id included.
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        delivery.refusal = ("unexpected" if unexpected else "database_rejected", f"{type(exc).__name__}: {first_line}")
        if unexpected:
            self._metrics.record_rejected("unexpected")
            logger.error(
                "writing vote %s (delivery tag %d) raised an unexpected error; rejecting it to the dead-letter queue",
                vote,
                tag,
                exc_info=exc,
            )
        else:
            self._metrics.record_rejected("database_rejected")
            logger.error("PostgreSQL refused vote %s (delivery tag %d): %s; rejecting it", vote, tag, exc)

    def _record_outcome(self, outcome: db.BatchOutcome, *, size: int) -> None:
        """Metrics and summary of a committed batch. The batch is committed whatever happens here."""
        try:
            self._metrics.record_batch(outcome, size=size)
            self._summary.committed(outcome)
        except Exception:
            self._metrics.record_error("unexpected")
            logger.exception("could not record the metrics of a committed batch")

    # -- database health, for /readyz and database_up ---------------------------------

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
        self._write_failed = False
        if self.database_error is not None:
            logger.info("PostgreSQL is answering again")
        self.database_error = None
        self._metrics.database_up.set(1)

    def _database_failed(self, exc: BaseException | None) -> None:
        self._last_database_check = time.monotonic()
        self.database_error = (str(exc) or type(exc).__name__) if exc is not None else "unknown error"
        self._metrics.database_up.set(0)


def _error_type(exc: BaseException | None) -> str:
    if isinstance(exc, db.TransactionConflict):
        return "database_conflict"
    if isinstance(exc, db.RetryableError):
        return "database_unavailable"
    return "database_error"
