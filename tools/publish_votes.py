"""Load and demo publisher: realistic votes into RabbitMQ, with publisher confirms.

Run from the repository root:

    python -m tools.publish_votes --count 10000 --laws 5
    python -m tools.publish_votes --count 50000 --laws 20 --rate 2000 --duplicates 0.01 --replays 0.01 --invalid 0.01
    python -m tools.publish_votes --count 200000 --connections 2 --json

Every message is persistent, published with `mandatory` on a channel in confirm
mode, with up to --window messages per connection awaiting their confirm (so a
connection is not held up by a broker round trip per message). With
--connections N, N processes publish a share each.

What is published (each kind a fraction of --count, rounded per connection):
- votes: one per citizen ("citizen-<run id>-<n>"), on a random law among law-001..law-K,
  with a per-law lean towards oui or non, an ISO 8601 UTC timestamp (when it was
  sent), and vote_hash = sha256("<citizen_id>:<law_id>") in hex;
- --duplicates P: duplicate attempts: the hash, citizen and law of a vote already
  published, the other choice and a later timestamp. The service counts the first
  vote and records the attempt in duplicate_attempts;
- --replays P: exact copies of a vote already published, as a redelivery looks;
  the service absorbs them (votes_redelivered_total);
- --invalid P: malformed messages of several kinds, each named after the
  error_type the service rejects it with (invalid_json, missing_field, ...).

Duplicates and replays reuse votes published at least --reuse-after messages
earlier on the same connection (at most half of its messages), so that the
original is counted first even when the service writes several batches at once.

Connection settings come from the options, else from RABBITMQ_HOST, RABBITMQ_PORT,
RABBITMQ_USER, RABBITMQ_PASSWORD, RABBITMQ_VHOST and RABBITMQ_QUEUE (environment,
then .env, as for the service). The queue must exist (the service declares it on
its first start), unless --declare is given.

Exit status: 0 when the broker confirmed every message; 1 when a message was
nacked, returned unroutable or left unconfirmed (a lost connection); 2 for bad
options or when RabbitMQ or the queue cannot be used; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import queue as queue_module
import random
import signal
import ssl
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, TextIO

import pika
import pika.exceptions

import exits
from amqp import amqp_parameters, open_connection, refused_by_broker
from config import Config, ConfigError, load_config, load_env_file
from tools.publisher import ConfirmedPublisher, Counts

PROG = "publish_votes"
MP = multiprocessing.get_context("fork")

VOTE, DUPLICATE, REPLAY, INVALID = 0, 1, 2, 3
# Each is the error_type (and votes_rejected_total reason) the service gives it.
INVALID_KINDS = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "invalid_vote_hash",
    "invalid_choice",
    "invalid_timestamp",
    "not_an_object",
)
# Votes a connection remembers as targets for duplicates and replays.
MAX_TARGETS = 50_000

# Slots of one connection's counters in the shared array.
_PUBLISHED, _ACKED, _NACKED, _RETURNED = range(4)
_SLOTS = 4


@dataclass(frozen=True)
class Settings:
    count: int
    laws: int
    rate: float
    duplicates: float
    replays: float
    invalid: float
    connections: int
    queue: str
    host: str
    port: int
    user: str
    vhost: str = "/"
    # RABBITMQ_PASSWORD and the RABBITMQ_TLS_* settings, read from the environment as the service
    # reads them (a password on the command line would show in `ps`).
    broker: Config = field(default_factory=Config, repr=False)
    declare: bool = False
    window: int = 1000
    reuse_after: int = 1000
    seed: int = 0
    run_id: str = "demo"
    json_output: bool = False
    progress: str = "auto"

    def amqp(self, name: str) -> pika.ConnectionParameters:
        """The service's own connection parameters (TLS included), with this tool's host, port, user and vhost."""
        broker = replace(
            self.broker,
            rabbitmq_host=self.host,
            rabbitmq_port=self.port,
            rabbitmq_user=self.user,
            rabbitmq_vhost=self.vhost,
        )
        return amqp_parameters(broker, name=name)


def share(total: int, parts: int, index: int) -> int:
    """Part `index` of `total` split as evenly as possible into `parts`."""
    return total // parts + (1 if index < total % parts else 0)


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentVote:
    vote_hash: str
    citizen_id: str
    law_id: str
    choice: str
    timestamp: datetime


def iso(ts: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as upstream sends it."""
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def encode(vote_hash: str, citizen_id: str, law_id: str, choice: object, timestamp: str) -> bytes:
    return json.dumps(
        {"vote_hash": vote_hash, "citizen_id": citizen_id, "law_id": law_id, "choice": choice, "timestamp": timestamp}
    ).encode()


def _now_ms() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


class MessageFactory:
    """The messages of one connection, in publishing order.

    Which message is of which kind, the laws and the choices follow the seed; the
    timestamps follow the clock. The kinds are fixed up front: duplicates and
    replays only after the first `lag` messages, and only of votes published at
    least `lag` messages earlier.
    """

    def __init__(
        self,
        *,
        count: int,
        laws: int,
        duplicates: float,
        replays: float,
        invalid: float,
        reuse_after: int,
        seed: int,
        run_id: str,
        connection: int = 0,
        connections: int = 1,
        clock: Callable[[], datetime] = _now_ms,
    ) -> None:
        rng = self._rng = random.Random(f"{seed}:{connection}")
        law_rng = random.Random(f"{seed}:laws")
        width = max(3, len(str(laws)))
        self._laws = [f"law-{i:0{width}d}" for i in range(1, laws + 1)]
        self._oui_share = [law_rng.uniform(0.3, 0.7) for _ in self._laws]
        self._run_id = run_id
        self._connection = connection
        self._connections = connections
        self._clock = clock

        n_dup, n_replay, n_invalid = round(count * duplicates), round(count * replays), round(count * invalid)
        n_votes = count - n_dup - n_replay - n_invalid
        self._lag = lag = min(reuse_after, count // 2)
        pool = [VOTE] * n_votes + [INVALID] * n_invalid
        rng.shuffle(pool)
        tail = pool[lag:] + [DUPLICATE] * n_dup + [REPLAY] * n_replay
        rng.shuffle(tail)
        kinds = pool[:lag] + tail
        if n_votes and kinds[0] != VOTE:
            first = kinds.index(VOTE)
            kinds[0], kinds[first] = kinds[first], kinds[0]
        self._kinds = bytes(kinds)
        self._position = 0
        self._pending: deque[tuple[int, SentVote]] = deque()  # published, not yet old enough to reuse
        self._targets: list[SentVote] = []
        self._last_attempt: dict[str, datetime] = {}

        self.votes = 0
        self.duplicates = 0
        self.replays = 0
        self.invalid: Counter[str] = Counter()
        self.totals: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._kinds)

    def next(self) -> bytes:
        p = self._position
        self._position += 1
        kind = self._kinds[p]
        while self._pending and self._pending[0][0] <= p - self._lag:
            self._remember(self._pending.popleft()[1])
        if kind in (DUPLICATE, REPLAY) and not self._targets:
            kind = VOTE  # nothing old enough to reuse (only with tiny counts)
        if kind == VOTE:
            return self._vote(p)
        if kind == INVALID:
            return self._invalid(p)
        target = self._targets[self._rng.randrange(len(self._targets))]
        if kind == REPLAY:
            self.replays += 1
            return encode(target.vote_hash, target.citizen_id, target.law_id, target.choice, iso(target.timestamp))
        # Another choice, and a timestamp later than the vote and than any earlier
        # attempt on it: each attempt is distinct content, recorded once.
        self.duplicates += 1
        previous = self._last_attempt.get(target.vote_hash, target.timestamp)
        ts = max(self._clock(), previous + timedelta(milliseconds=1))
        self._last_attempt[target.vote_hash] = ts
        flipped = "non" if target.choice == "oui" else "oui"
        return encode(target.vote_hash, target.citizen_id, target.law_id, flipped, iso(ts))

    def _vote(self, p: int) -> bytes:
        citizen = f"citizen-{self._run_id}-{self.votes * self._connections + self._connection + 1:07d}"
        i = self._rng.randrange(len(self._laws))
        law = self._laws[i]
        choice = "oui" if self._rng.random() < self._oui_share[i] else "non"
        vote = SentVote(hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(), citizen, law, choice, self._clock())
        self.votes += 1
        self.totals.setdefault(law, [0, 0])[0 if choice == "oui" else 1] += 1
        self._pending.append((p, vote))
        return encode(vote.vote_hash, vote.citizen_id, vote.law_id, vote.choice, iso(vote.timestamp))

    def _remember(self, vote: SentVote) -> None:
        if len(self._targets) < MAX_TARGETS:
            self._targets.append(vote)
        else:
            self._targets[self._rng.randrange(MAX_TARGETS)] = vote

    def _invalid(self, p: int) -> bytes:
        # Round robin, so that every kind shows up once there are a few.
        reason = INVALID_KINDS[(sum(self.invalid.values()) + self._connection) % len(INVALID_KINDS)]
        self.invalid[reason] += 1
        citizen = f"citizen-{self._run_id}-invalid-{self._connection}-{p}"
        law = self._laws[self._rng.randrange(len(self._laws))]
        fields: dict[str, object] = {
            "vote_hash": hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(),
            "citizen_id": citizen,
            "law_id": law,
            "choice": "oui",
            "timestamp": iso(self._clock()),
        }
        if reason == "invalid_json":
            return json.dumps(fields).encode()[:-1]  # cut off before the closing brace
        if reason == "not_an_object":
            return json.dumps(list(fields.values())).encode()
        if reason == "missing_field":
            del fields["timestamp"]
        elif reason == "wrong_type":
            fields["choice"] = 1
        elif reason == "invalid_vote_hash":
            fields["vote_hash"] = "not-a-sha256-digest"
        elif reason == "invalid_choice":
            fields["choice"] = "peut-être"
        elif reason == "invalid_timestamp":
            fields["timestamp"] = "14/11/2025 12:00"
        return json.dumps(fields).encode()

    def report(self) -> dict[str, Any]:
        return {
            "votes": self.votes,
            "duplicates": self.duplicates,
            "replays": self.replays,
            "invalid": dict(self.invalid),
            "totals": {law: list(t) for law, t in self.totals.items()},
        }


# -- one connection ------------------------------------------------------------------------------


def _connection_main(s: Settings, index: int, counters: Any, stop: Any, results: Any) -> None:
    """One publishing process: its share of the messages on its own connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    factory = MessageFactory(
        count=share(s.count, s.connections, index),
        laws=s.laws,
        duplicates=s.duplicates,
        replays=s.replays,
        invalid=s.invalid,
        reuse_after=s.reuse_after,
        seed=s.seed,
        run_id=s.run_id,
        connection=index,
        connections=s.connections,
    )
    base = index * _SLOTS

    def progress(counts: Counts) -> None:
        counters[base + _PUBLISHED] = counts.published
        counters[base + _ACKED] = counts.acked
        counters[base + _NACKED] = counts.nacked
        counters[base + _RETURNED] = counts.returned

    error: str | None
    try:
        error = ConfirmedPublisher(
            s.amqp(f"{PROG}-{s.run_id}-{index + 1}"),
            s.queue,
            factory.next,
            len(factory),
            rate=s.rate / s.connections,
            window=s.window,
            should_stop=stop.is_set,
            on_progress=progress,
        ).run()
    except Exception as exc:  # reported to the parent, which prints it and exits 1
        error = f"{type(exc).__name__}: {exc}"
    results.put({"connection": index, "error": error, **factory.report()})


# -- progress and summary ------------------------------------------------------------------------


class Progress:
    """A progress bar updated in place (\\r) on a terminal, or a line every few seconds elsewhere."""

    def __init__(self, total: int, *, mode: str, out: TextIO) -> None:
        if mode == "auto":
            mode = "bar" if out.isatty() else "lines"
        self._mode = mode
        self._total = total
        self._out = out
        self._samples: deque[tuple[float, int]] = deque()
        self._last_render = time.monotonic()

    def update(self, published: int, confirmed: int, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, confirmed))
        while len(self._samples) > 2 and now - self._samples[1][0] >= 1.0:
            self._samples.popleft()
        if self._mode == "none" or now - self._last_render < (0.2 if self._mode == "bar" else 5.0):
            return
        self._last_render = now
        self._render(published, confirmed)

    def rate(self) -> float:
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def _render(self, published: int, confirmed: int) -> None:
        rate = self.rate()
        done = confirmed / self._total if self._total else 1.0
        if self._mode == "bar":
            width = 30
            filled = min(width, int(done * width))
            eta = f"ETA {math.ceil((self._total - confirmed) / rate)}s" if rate > 0 and confirmed < self._total else ""
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {100 * done:5.1f}%  {confirmed:,}/{self._total:,} confirmed"
                f"  {published - confirmed:,} in flight  {rate:,.0f} msg/s  {eta}"
            )
            self._out.write(f"\r{line:<100}")
        else:
            self._out.write(
                f"{PROG}: {confirmed:,}/{self._total:,} confirmed ({100 * done:.0f}%), "
                f"{published - confirmed:,} in flight, {rate:,.0f} msg/s\n"
            )
        self._out.flush()

    def finish(self, published: int, confirmed: int) -> None:
        if self._mode == "bar":
            self._render(published, confirmed)
            self._out.write("\n")
            self._out.flush()


@dataclass
class Summary:
    queue: str
    connections: int
    published: int = 0
    confirmed: int = 0
    nacked: int = 0
    returned: int = 0
    unconfirmed: int = 0
    votes: int = 0
    duplicates: int = 0
    replays: int = 0
    invalid: int = 0
    invalid_by_reason: dict[str, int] = field(default_factory=dict)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rate: float = 0.0
    run_id: str = ""
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not (self.nacked or self.returned or self.unconfirmed or self.errors or self.interrupted)

    def line(self) -> str:
        return (
            f"published={self.published} confirmed={self.confirmed} nacked={self.nacked} returned={self.returned} "
            f"unconfirmed={self.unconfirmed} votes={self.votes} duplicates={self.duplicates} replays={self.replays} "
            f"invalid={self.invalid} laws={len(self.totals)} connections={self.connections} "
            f"elapsed={self.elapsed_s:.2f}s rate={self.rate:.0f}/s"
        )

    def as_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items()}
        data["ok"] = self.ok
        return json.dumps(data, indent=2, sort_keys=True)


def summarize(s: Settings, counters: Any, reports: dict[int, dict[str, Any]], elapsed: float) -> Summary:
    summary = Summary(queue=s.queue, connections=s.connections, run_id=s.run_id, elapsed_s=elapsed)
    invalid: Counter[str] = Counter()
    totals: dict[str, list[int]] = {}
    for i in range(s.connections):
        published, acked, nacked, returned = (counters[i * _SLOTS + k] for k in range(_SLOTS))
        summary.published += published
        summary.confirmed += acked
        summary.nacked += nacked
        summary.returned += returned
        summary.unconfirmed += published - acked - nacked
        report = reports.get(i)
        if report is None:
            summary.errors.append(f"connection {i + 1}: the publishing process died without reporting")
            continue
        if report["error"]:
            summary.errors.append(f"connection {i + 1}: {report['error']}")
        summary.votes += report["votes"]
        summary.duplicates += report["duplicates"]
        summary.replays += report["replays"]
        invalid.update(report["invalid"])
        for law, (oui, non) in report["totals"].items():
            t = totals.setdefault(law, [0, 0])
            t[0] += oui
            t[1] += non
    summary.invalid = sum(invalid.values())
    summary.invalid_by_reason = dict(sorted(invalid.items()))
    summary.totals = {law: {"oui": oui, "non": non} for law, (oui, non) in sorted(totals.items())}
    summary.rate = summary.published / elapsed if elapsed > 0 else 0.0
    return summary


# -- main ------------------------------------------------------------------------------------------


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {raw!r}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {raw!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {raw!r}")
        return value

    return parse


def _rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of messages per second, got {raw!r}") from None
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 (unlimited) or more, got {raw!r}")
    return value


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    env = environ.get
    p = argparse.ArgumentParser(
        prog=f"python -m tools.{PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=_at_least(1), default=1000, help="messages to publish, of every kind (1000)")
    p.add_argument("--laws", type=_at_least(1), default=5, help="laws voted on: law-001 .. law-K (5)")
    p.add_argument(
        "--rate", type=_rate, default=0.0, help="messages per second, all connections together (0: no limit)"
    )
    p.add_argument("--duplicates", type=_fraction, default=0.0, metavar="P", help="fraction of duplicate attempts (0)")
    p.add_argument("--replays", type=_fraction, default=0.0, metavar="P", help="fraction of exact replays (0)")
    p.add_argument("--invalid", type=_fraction, default=0.0, metavar="P", help="fraction of malformed messages (0)")
    p.add_argument("--connections", type=_at_least(1), default=1, help="publishing processes, one connection each (1)")
    p.add_argument("--queue", default=env("RABBITMQ_QUEUE", "votes.aggregation"), help="queue (RABBITMQ_QUEUE)")
    p.add_argument("--declare", action="store_true", help="declare the queue (durable) if it does not exist")
    p.add_argument("--host", default=env("RABBITMQ_HOST", "localhost"), help="broker host (RABBITMQ_HOST)")
    p.add_argument("--port", type=_at_least(1), default=env("RABBITMQ_PORT", "5672"), help="(RABBITMQ_PORT)")
    p.add_argument("--user", default=env("RABBITMQ_USER", "guest"), help="(RABBITMQ_USER)")
    p.add_argument("--vhost", default=env("RABBITMQ_VHOST", "/"), help="(RABBITMQ_VHOST)")
    p.add_argument("--window", type=_at_least(1), default=1000, help="unconfirmed messages per connection (1000)")
    p.add_argument(
        "--reuse-after",
        type=_at_least(0),
        default=1000,
        metavar="N",
        help="duplicates and replays reuse votes published at least N messages earlier (1000)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed of kinds, laws and choices (random)")
    p.add_argument("--run-id", default=None, help="part of every citizen id (random, 6 hex digits)")
    p.add_argument("--json", action="store_true", dest="json_output", help="print the summary as JSON on stdout")
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="on stderr: a bar on a terminal, a line every 5 s otherwise (auto)",
    )
    return p


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    p = _parser(environ)
    a = p.parse_args(argv)
    try:
        broker = load_config({k: v for k, v in environ.items() if k.startswith("RABBITMQ_")})
    except ConfigError as exc:
        p.error(str(exc))
    if a.duplicates + a.replays > 0.5:
        p.error("--duplicates and --replays add up to more than 0.5")
    if a.duplicates + a.replays + a.invalid > 0.9:
        p.error("--duplicates, --replays and --invalid add up to more than 0.9: leave room for votes")
    if a.connections > a.count:
        p.error(f"--connections {a.connections} is more than --count {a.count}")
    if a.port > 65535:
        p.error(f"--port must be a TCP port, got {a.port}")
    return Settings(
        count=a.count,
        laws=a.laws,
        rate=a.rate,
        duplicates=a.duplicates,
        replays=a.replays,
        invalid=a.invalid,
        connections=a.connections,
        queue=a.queue,
        host=a.host,
        port=int(a.port),
        user=a.user,
        broker=broker,
        vhost=a.vhost,
        declare=a.declare,
        window=a.window,
        reuse_after=a.reuse_after,
        seed=a.seed if a.seed is not None else random.randrange(2**31),
        run_id=a.run_id or uuid.uuid4().hex[:6],
        json_output=a.json_output,
        progress=a.progress,
    )


def check_queue(s: Settings) -> tuple[str, int] | None:
    """None if the queue can be published to; else what is wrong, in one line, and the exit code."""
    where = f"amqp://{s.user}@{s.host}:{s.port}{s.vhost if s.vhost.startswith('/') else '/' + s.vhost}"
    try:
        connection = open_connection(s.amqp(f"{PROG}-{s.run_id}-check"))
    except (pika.exceptions.AMQPError, OSError) as exc:
        if refused_by_broker(exc) or isinstance(exc, ssl.SSLCertVerificationError):
            return f"RabbitMQ refused {where}: {type(exc).__name__}: {exc}", exits.CONFIG
        return f"cannot connect to RabbitMQ at {where}: {type(exc).__name__}: {exc!r}", exits.FAILURE
    try:
        try:
            connection.channel().queue_declare(s.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                return f"queue {s.queue}: {exc.reply_text}", exits.CONFIG
            if not s.declare:
                return (
                    f"queue {s.queue} does not exist on {where}; start the service once (it declares the queue, "
                    "with dead-lettering) or pass --declare"
                ), exits.CONFIG
            connection.channel().queue_declare(s.queue, durable=True)
            print(f"{PROG}: declared durable queue {s.queue}", file=sys.stderr)
    finally:
        if connection.is_open:
            connection.close()
    return None


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def publish(s: Settings, progress: Progress) -> Summary:
    counters = MP.Array("q", s.connections * _SLOTS, lock=False)
    stop = MP.Event()
    results = MP.Queue()
    procs = [
        MP.Process(target=_connection_main, args=(s, i, counters, stop, results), name=f"{PROG}-{i + 1}", daemon=True)
        for i in range(s.connections)
    ]
    reports: dict[int, dict[str, Any]] = {}
    gone_since: dict[int, float] = {}
    interrupted = False
    deadline = math.inf
    started = time.monotonic()
    for proc in procs:
        proc.start()

    def totals() -> tuple[int, int]:
        published = sum(counters[i * _SLOTS + _PUBLISHED] for i in range(s.connections))
        confirmed = sum(counters[i * _SLOTS + k] for i in range(s.connections) for k in (_ACKED, _NACKED))
        return published, confirmed

    while len(reports) < len(procs) and time.monotonic() < deadline:
        try:
            try:
                report = results.get(timeout=0.1)
                reports[report["connection"]] = report
            except queue_module.Empty:
                pass
            progress.update(*totals())
            now = time.monotonic()
            for i, proc in enumerate(procs):
                # A process that died without reporting (killed, out of memory): give
                # its report a moment to arrive through the pipe, then stop waiting.
                if i not in reports and not proc.is_alive() and now - gone_since.setdefault(i, now) > 2.0:
                    reports[i] = {"connection": i, "error": f"exited with status {proc.exitcode} without reporting"}
                    reports[i].update(votes=0, duplicates=0, replays=0, invalid={}, totals={})
        except KeyboardInterrupt:
            if interrupted:
                break  # a second Ctrl-C: stop waiting for confirms
            interrupted = True
            stop.set()
            deadline = time.monotonic() + 10.0
    elapsed = time.monotonic() - started
    for proc in procs:
        proc.join(1.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
    progress.finish(*totals())
    summary = summarize(s, counters, reports, elapsed)
    summary.interrupted = interrupted
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    load_env_file()  # the working directory's .env only; variables already set win, as for the service
    s = parse_args(argv)
    problem = check_queue(s)
    if problem is not None:
        print(f"{PROG}: {problem[0]}", file=sys.stderr)
        return problem[1]
    # Ctrl-C or SIGTERM: stop publishing, wait for the confirms in flight, report.
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = publish(s, Progress(s.count, mode=s.progress, out=sys.stderr))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if summary.interrupted:
        print(f"{PROG}: interrupted after {summary.published} of {s.count} messages", file=sys.stderr)
    for error in summary.errors:
        print(f"{PROG}: {error}", file=sys.stderr)
    if summary.nacked or summary.returned or summary.unconfirmed:
        print(
            f"{PROG}: {summary.nacked} nacked, {summary.returned} returned unroutable, "
            f"{summary.unconfirmed} unconfirmed: not every message is in {s.queue}",
            file=sys.stderr,
        )
    if s.json_output:
        print(summary.line(), file=sys.stderr)
        print(summary.as_json())
    else:
        print(summary.line())
    if summary.interrupted:
        return exits.INTERRUPTED
    return exits.OK if summary.ok else exits.FAILURE


if __name__ == "__main__":
    sys.exit(main())
