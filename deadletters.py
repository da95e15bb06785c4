"""The dead-letter queue: how the service puts a refused vote there, and the operator's command for it.

The service does not let RabbitMQ dead-letter a refused message (a reject keeps no reason). It
publishes a copy to RABBITMQ_DEAD_LETTER_EXCHANGE with why in the headers named here
(deadletter_publisher.py, on a connection of its own, a batch's refusals at once), waits for the
broker's confirms, and only then acks the originals. A crash between the two leaves the originals
unacked: they are redelivered, refused again, and the dead-letter queue holds them twice; nothing
is lost.

`python aggregator.py dead-letters` lists what the queue holds (by reason, oldest first, citizen
ids hidden unless asked), shows one message, and replays messages to the vote queue: each copy is
confirmed by the vote queue before its dead-letter original is acked, so an interrupted replay
loses nothing (a message may then be in both queues; the service counts a vote once).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

import exits
from amqp import open_connection
from config import Config

logger = logging.getLogger(__name__)

REASON = "x-rejected-reason"  # the error_type: invalid_timestamp, database_rejected, unexpected, ...
DETAIL = "x-rejected-detail"  # one line saying why (never a field's value)
AT = "x-rejected-at"  # ISO 8601, UTC
BY = "x-rejected-by"  # vote-aggregator@host:pid
QUEUE = "x-original-queue"
_DETAIL_MAX = 300
# x-death's reason for a message RabbitMQ dead-lettered for its delivery count.
DELIVERY_LIMIT = "delivery_limit"


# -- the command ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """One message of the dead-letter queue, as read (not acked)."""

    tag: int
    body: bytes
    headers: dict[str, Any]

    @property
    def reason(self) -> str:
        reason = self.headers.get(REASON)
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        return str(reason) if reason else _rabbitmq_reason(self.headers)

    @property
    def at(self) -> str:
        value = self.headers.get(AT)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if value:
            return str(value)
        deaths = self.headers.get("x-death") or [{}]
        time = deaths[0].get("time")
        return time.isoformat() if isinstance(time, datetime) else ""

    def fields(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return {}
        return value if isinstance(value, dict) else {}


def _rabbitmq_reason(headers: dict[str, Any]) -> str:
    """A message RabbitMQ dead-lettered itself carries x-death, without the service's reason."""
    deaths = headers.get("x-death")
    if deaths:
        why = deaths[0].get("reason", b"")
        why = why.decode() if isinstance(why, bytes) else str(why)
        if why == DELIVERY_LIMIT:
            # Delivered more often than the queue's x-delivery-limit: never refused by the
            # service, so most likely a valid vote that was never counted.
            return DELIVERY_LIMIT
        return f"({why} by RabbitMQ, reason not recorded)"
    return "(unknown)"


def read_all(connection: BlockingConnection, queue: str, *, limit: int) -> list[Letter]:
    """Up to `limit` messages from the head of the queue, each moved unchanged to its back.

    Reading without taking must not age a message: a message got and returned counts as a
    delivery, and a dead-letter queue with a delivery limit (a quorum queue's x-delivery-limit,
    or RabbitMQ 4's default of 20) would drop or divert a message listed that many times. So
    each message read is published again to the back of the same queue, properties and headers
    as they were (less the broker's x-delivery-count), and acked once the broker confirmed the
    copy. Reading every message present (the queue holds no more than `limit`) leaves the queue
    in its order; with more, the ones read end up behind the others. Interrupted between a
    confirm and its ack, a message is in the queue twice (the copy at the back, the original
    back at the head): never lost.
    """
    source = connection.channel()
    target = connection.channel()
    target.confirm_delivery()
    letters: list[Letter] = []
    for tag, properties, body in _present(source, queue, limit=limit):
        letters.append(Letter(tag, body, dict(properties.headers or {})))
        _to_the_back(target, queue, body, properties)
        source.basic_ack(tag)  # only now: the copy is in the queue
    return letters


def _present(channel: BlockingChannel, queue: str, *, limit: int) -> Iterator[tuple[int, pika.BasicProperties, bytes]]:
    """The messages in `queue` when this starts, at most `limit`, got one by one (not acked).

    How many there are comes from the first basic.get's answer (messages left behind it), which
    the queue itself computes: the message count of a passive queue.declare is a statistic, and
    RabbitMQ 3.10 answers 0 for a quorum queue whose leader does not answer it within 250 ms
    (rabbit_quorum_queue:stat/1; seen once under load), which would read an empty queue.
    """
    count = limit
    taken = 0
    while taken < count:
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None or properties is None or body is None:
            return
        if taken == 0:
            count = min(limit, 1 + int(method.message_count or 0))
        taken += 1
        yield int(method.delivery_tag or 0), properties, body


def _to_the_back(channel: BlockingChannel, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
    """Publish a confirmed copy of a message to the back of `queue` (the channel is in confirm mode)."""
    headers = {key: value for key, value in (properties.headers or {}).items() if key != "x-delivery-count"}
    properties.headers = headers or None
    channel.basic_publish("", queue, body, properties, mandatory=True)


def list_letters(letters: Sequence[Letter], *, show_citizens: bool, out: TextIO) -> None:
    counts = Counter(letter.reason for letter in letters)
    print(f"{len(letters)} messages", file=out)
    for reason, count in counts.most_common():
        print(f"  {count:6d}  {reason}", file=out)
    if counts[DELIVERY_LIMIT]:
        print(
            f"{counts[DELIVERY_LIMIT]} dead-lettered by RabbitMQ after too many deliveries (x-delivery-limit), "
            "not refused by the service: valid votes among them are NOT counted; "
            f"count them with `dead-letters replay --reason {DELIVERY_LIMIT}`",
            file=out,
        )
    print(file=out)
    print(f"{'#':>5}  {'rejected at':29}  {'reason':22}  {'law':12}  {'citizen':14}  vote_hash", file=out)
    for index, letter in sorted(enumerate(letters, 1), key=lambda item: item[1].at):
        fields = letter.fields()
        citizen = str(fields.get("citizen_id", "")) if show_citizens else "(hidden)"
        print(
            f"{index:5d}  {letter.at:29}  {letter.reason[:22]:22}  {str(fields.get('law_id', ''))[:12]:12}  "
            f"{citizen[:14]:14}  {str(fields.get('vote_hash', ''))[:16]}",
            file=out,
        )


def show_letter(letter: Letter, *, show_citizens: bool, out: TextIO) -> None:
    for key in sorted(letter.headers):
        if key.startswith("x-") and key != "x-death":
            value = letter.headers[key]
            print(f"{key}: {value.decode(errors='replace') if isinstance(value, bytes) else value}", file=out)
    fields = letter.fields()
    if fields and not show_citizens and "citizen_id" in fields:
        fields["citizen_id"] = "(hidden: --show-citizens)"
        print(json.dumps(fields, ensure_ascii=False), file=out)
    else:
        print(letter.body.decode(errors="replace"), file=out)


def replay(
    connection: BlockingConnection, config: Config, *, reasons: set[str], hashes: set[str], everything: bool
) -> tuple[int, int]:
    """Move the selected messages to the vote queue; returns (replayed, left).

    Each copy is confirmed by the vote queue (mandatory, persistent) before its dead-letter
    original is acked. Messages refused again by the service come back to the dead-letter
    queue behind the ones read here, so the loop reads what was there when it started.
    """
    source = connection.channel()
    target = connection.channel()
    target.confirm_delivery()
    replayed = left = 0
    for tag, properties, body in _present(source, config.dead_letter_queue, limit=sys.maxsize):
        letter = Letter(tag, body, dict(properties.headers or {}))
        chosen = everything or letter.reason in reasons or str(letter.fields().get("vote_hash", "")) in hashes
        if not chosen:
            # Moved to the back rather than returned: a return would count as a delivery (read_all).
            _to_the_back(target, config.dead_letter_queue, body, properties)
            source.basic_ack(letter.tag)
            left += 1
            continue
        headers = {key: value for key, value in letter.headers.items() if not key.startswith("x-")}
        headers["x-replayed-from"] = config.dead_letter_queue
        copy = pika.BasicProperties(
            delivery_mode=2, content_type=properties.content_type or "application/json", headers=headers
        )
        target.basic_publish("", config.rabbitmq_queue, body, copy, mandatory=True)
        source.basic_ack(letter.tag)  # only now: the vote queue holds the copy
        replayed += 1
    return replayed, left


def run(config: Config, args: Any, *, parameters: pika.ConnectionParameters, out: TextIO = sys.stdout) -> int:
    """`dead-letters list|show|replay`; exit codes as every command's (exits.py)."""
    connection = open_connection(parameters)
    try:
        if args.action == "replay":
            if not (args.all or args.reason or args.vote_hash):
                print("replay what? --all, --reason R or --vote-hash H", file=sys.stderr)
                return exits.CONFIG
            replayed, left = replay(
                connection,
                config,
                reasons=set(args.reason or ()),
                hashes=set(args.vote_hash or ()),
                everything=args.all,
            )
            print(f"replayed {replayed} messages to {config.rabbitmq_queue}; {left} left in {config.dead_letter_queue}")
            return exits.OK
        letters = read_all(connection, config.dead_letter_queue, limit=args.limit)
        if args.action == "show":
            if not 1 <= args.index <= len(letters):
                print(f"no message #{args.index}: the queue holds {len(letters)}", file=sys.stderr)
                return exits.FAILURE
            show_letter(letters[args.index - 1], show_citizens=args.show_citizens, out=out)
        else:
            list_letters(letters, show_citizens=args.show_citizens, out=out)
        return exits.OK
    finally:
        if connection.is_open:
            connection.close()
