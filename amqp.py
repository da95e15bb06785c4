"""RabbitMQ connection parameters, the queues the service declares, and what a pika error means.

Shared by the consumer, the start-up check (`--check`) and the publishing tool; nothing here
keeps a connection or a thread.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from config import Config

logger = logging.getLogger(__name__)


def amqp_parameters(
    c: Config, node: tuple[str, int] | None = None, *, name: str = "vote-aggregator"
) -> pika.ConnectionParameters:
    """Connection parameters for one RabbitMQ node (default: the first of RABBITMQ_HOST), TLS included;
    `name` is what the broker's UI shows."""
    host, port = node or c.rabbitmq_nodes[0]
    ssl_options = None
    if c.rabbitmq_tls:
        context = ssl.create_default_context(cafile=c.rabbitmq_tls_ca_file or None)
        context.check_hostname = c.rabbitmq_tls_verify_hostname
        if c.rabbitmq_tls_cert_file:
            context.load_cert_chain(c.rabbitmq_tls_cert_file, c.rabbitmq_tls_key_file)
        # Each node's certificate is checked against its own name, unless one name is given for all.
        ssl_options = pika.SSLOptions(context, c.rabbitmq_tls_server_name or host)
    return pika.ConnectionParameters(
        ssl_options=ssl_options,
        host=host,
        port=port,
        virtual_host=c.rabbitmq_vhost,
        credentials=pika.PlainCredentials(c.rabbitmq_user, c.rabbitmq_password),
        heartbeat=c.rabbitmq_heartbeat_s,
        blocked_connection_timeout=300,
        # One attempt per call: the connection loop goes on with the next node itself.
        connection_attempts=1,
        socket_timeout=10,
        client_properties={"connection_name": name},
    )


def open_connection(parameters: pika.ConnectionParameters) -> BlockingConnection:
    """A BlockingConnection; a failed attempt raises a pika AMQPError or an OSError, never anything else.

    pika raises a bare ValueError ("Expected connected socket, but getpeername() failed") when the
    peer resets the connection between the TCP handshake and pika's first look at the socket, as a
    proxy or load balancer in front of a node that is down does: a refused connection like any
    other, retried as one rather than ending the process.
    """
    try:
        return pika.BlockingConnection(parameters)
    except ssl.SSLError:
        raise  # ssl.SSLCertVerificationError is a ValueError too: a certificate refused, said as such
    except ValueError as exc:
        raise pika.exceptions.AMQPConnectionError(f"connection reset while it was being set up ({exc})") from exc


def queue_arguments(c: Config) -> dict[str, str | int]:
    """The arguments of RABBITMQ_QUEUE when the service declares it."""
    arguments: dict[str, str | int] = {"x-queue-type": c.rabbitmq_queue_type}
    if not c.rabbitmq_dead_lettering:
        # No delivery limit either: past it, a message with nowhere to be dead-lettered is dropped.
        return arguments
    # Rejected messages are kept for audit instead of being discarded.
    arguments["x-dead-letter-exchange"] = c.dead_letter_exchange
    if c.rabbitmq_queue_type == "quorum":
        # A message that keeps killing consumers (or losing their connections) is
        # dead-lettered after this many deliveries instead of looping forever.
        arguments["x-delivery-limit"] = c.rabbitmq_delivery_limit
        # A quorum queue keeps a dead-lettered message until the dead-letter queue
        # has confirmed it; the default (at-most-once) drops it if that queue is
        # unavailable. RabbitMQ requires reject-publish overflow for this.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def declare_queues(connection: BlockingConnection, c: Config) -> None:
    """Declare RABBITMQ_QUEUE, durable, of RABBITMQ_QUEUE_TYPE, and its dead-letter exchange and queue.

    A dead-letter queue that already exists is used as it is, like RABBITMQ_QUEUE:
    declaring it again with another type would fail.
    """
    channel = connection.channel()
    arguments = queue_arguments(c)
    if c.rabbitmq_dead_lettering:
        channel.exchange_declare(c.dead_letter_exchange, "fanout", durable=True)
        if not _queue_exists(connection, c.dead_letter_queue):
            channel.queue_declare(c.dead_letter_queue, durable=True, arguments={"x-queue-type": c.rabbitmq_queue_type})
        channel.queue_bind(c.dead_letter_queue, c.dead_letter_exchange)
    channel.queue_declare(c.rabbitmq_queue, durable=True, arguments=arguments)
    close_quietly(channel.close)
    limit = arguments.get("x-delivery-limit")
    logger.info(
        "declared durable queue %s (%s)%s%s",
        c.rabbitmq_queue,
        c.rabbitmq_queue_type,
        f" dead-lettering to {c.dead_letter_exchange} -> {c.dead_letter_queue}" if c.rabbitmq_dead_lettering else "",
        f" after {limit} deliveries" if limit else "",
    )
    if c.rabbitmq_queue_type == "quorum" and not c.rabbitmq_dead_lettering:
        logger.warning(
            "quorum queue %s has no delivery limit (RABBITMQ_DEAD_LETTERING=false): a message that keeps killing "
            "consumers is delivered again and again (RabbitMQ 4 drops it after 20 deliveries)",
            c.rabbitmq_queue,
        )


def _queue_exists(connection: BlockingConnection, name: str) -> bool:
    channel = connection.channel()
    try:
        channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        return False
    close_quietly(channel.close)
    return True


def refused_by_broker(exc: BaseException) -> bool:
    """True when RabbitMQ itself refused the login (403) or the vhost (530).

    pika raises ProbableAuthenticationError / ProbableAccessDeniedError for any
    connection lost during the handshake; only a broker's explicit Connection.Close
    with one of these reply codes is certain, and retrying cannot fix it.
    """
    text = " ".join(str(arg) for arg in exc.args)
    return text.startswith(("ConnectionClosedByBroker: (403)", "ConnectionClosedByBroker: (530)"))


def describe_error(exc: BaseException) -> str:
    """One line naming an error. pika's connection errors have an empty str(): the cause is in args."""
    text = str(exc) or "; ".join(str(arg) or repr(arg) for arg in exc.args)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def close_quietly(close: Callable[[], None]) -> None:
    """Close a channel or connection that may already be broken."""
    try:
        close()
    except Exception as exc:  # closing something already broken
        logger.debug("ignored while closing: %s", exc)


# RabbitMQ's answer to a queue.declare whose arguments differ from the queue's: "... inequivalent arg
# 'x-delivery-limit' for queue 'q' in vhost '/': received the value '3' of type 'signedint' but current
# is none". The broker names one argument per answer, with the queue's own value.
_INEQUIVALENT = re.compile(
    r"inequivalent arg '([^']+)' .*but current is (none|the value '([^']*)' of type '(\w+)'|'([^']*)')"
)
_MAX_PROBES = 8


def existing_queue_arguments(connection: BlockingConnection, c: Config) -> dict[str, object] | None:
    """The arguments RABBITMQ_QUEUE really has (as far as declare can tell), or None if not found out.

    The service uses a queue that already exists as it is. What happens there to a refused
    or over-delivered message is in the queue's arguments, which AMQP cannot read; but a
    declare with other arguments is refused with a 406 naming one differing argument and its
    current value. Each answer corrects one argument, on a throwaway channel, until the
    broker accepts: a declare equivalent to the queue changes nothing. Policies
    (`rabbitmqctl set_policy`) are not seen this way.
    """
    arguments: dict[str, object] = dict(queue_arguments(c))
    durable = True
    for _ in range(_MAX_PROBES):
        channel = connection.channel()
        try:
            channel.queue_declare(c.rabbitmq_queue, durable=durable, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            logger.debug("probing the arguments of %s: %s", c.rabbitmq_queue, exc.reply_text)
            match = _INEQUIVALENT.search(str(exc.reply_text))
            if exc.reply_code != 406 or match is None:
                return None
            name, _current, value, kind, flag = match.groups()
            if name == "durable":
                durable = flag == "true"
            elif value is None and flag is None:
                arguments.pop(name, None)
            elif kind == "bool" or (kind is None and flag in ("true", "false")):
                arguments[name] = (value if value is not None else flag) == "true"
            elif kind in ("signedint", "long", "short", "byte", "unsignedint", "unsignedshort", "unsignedbyte"):
                arguments[name] = int(value)
            elif value is None and isinstance(arguments.get(name), int) and flag.lstrip("-").isdigit():
                arguments[name] = int(flag)  # the short answer ("received '20' but current is '5'") has no type
            else:
                arguments[name] = value if value is not None else flag
            continue
        close_quietly(channel.close)
        return arguments
    return None


def what_happens_to_refused(arguments: dict[str, object], c: Config) -> str:
    """One line: where a refused or over-delivered message of RABBITMQ_QUEUE goes, from its arguments."""
    exchange = arguments.get("x-dead-letter-exchange")
    queue_type = arguments.get("x-queue-type", "classic")
    # Only quorum queues count deliveries; a classic queue accepts the argument and ignores it.
    limit = arguments.get("x-delivery-limit") if queue_type == "quorum" else None
    if exchange:
        where = f"dead-lettered by RabbitMQ to exchange {exchange!r}"
    else:
        where = "DROPPED by RabbitMQ (no x-dead-letter-exchange)"
    copied = (
        f"refused messages are copied to {c.dead_letter_exchange!r} by the service; one it cannot copy is {where}"
        if c.rabbitmq_dead_lettering
        else f"a refused message is {where}"
    )
    if limit is not None:
        over = f"a message delivered more than {limit} times is {where}"
    elif queue_type == "quorum":
        over = "no x-delivery-limit (RabbitMQ 4 applies 20 to quorum queues)"
    else:
        over = "no delivery limit"
    return f"existing {queue_type} queue {c.rabbitmq_queue}: {copied}; {over} (policies not shown)"
