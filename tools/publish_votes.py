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
import math
import os
import random
import signal
import ssl
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

import pika
import pika.exceptions

import exits
from amqp import open_connection, refused_by_broker
from config import ConfigError, load_config, load_env_file
from tools.progress import Progress
from tools.publish_processes import PROG, Settings, publish


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
        summary = publish(s, Progress(s.count, mode=s.progress, out=sys.stderr, label=PROG))
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
