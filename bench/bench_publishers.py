"""The backlog publishers (confirmed, before a consumer starts) and the paced publisher of the latency phase."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

import pika
from bench_resources import Resources, child_signals, queue_depth
from bench_settings import BenchError, Endpoints, Settings

from tools.publisher import PERSISTENT, PublishError, publish_all

PUBLISH_WINDOW = 500  # unconfirmed messages each backlog publisher keeps in flight


def backlog_publisher_main(endpoints: Endpoints, queue: str, bodies: Sequence[bytes]) -> None:
    child_signals()
    try:
        publish_all(endpoints.amqp(), queue, bodies, window=PUBLISH_WINDOW)
    except PublishError as exc:
        print(f"publisher: {exc}", file=sys.stderr)
        sys.exit(1)


def publish_backlog(s: Settings, res: Resources, queue: str, bodies: Sequence[bytes]) -> float:
    """Publish every body into `queue` with confirms; returns the messages/s achieved."""
    started = time.perf_counter()
    workers = min(s.publishers, len(bodies))
    per = math.ceil(len(bodies) / workers)
    procs = [
        res.child(backlog_publisher_main, s.endpoints, queue, bodies[i * per : (i + 1) * per]) for i in range(workers)
    ]
    deadline = time.monotonic() + 120 + len(bodies) / 500
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.1))
    if any(proc.exitcode != 0 for proc in procs):
        raise BenchError(f"backlog publishers exited with {[proc.exitcode for proc in procs]}")
    rate = len(bodies) / (time.perf_counter() - started)
    ready = queue_depth(s.endpoints, queue)
    if ready != len(bodies):
        raise BenchError(f"published {len(bodies)} messages but queue {queue} holds {ready}")
    time.sleep(s.settle_s)  # let the broker finish writing before anything is timed
    return rate


def paced_publisher_main(
    endpoints: Endpoints, queue: str, bodies: Sequence[bytes], rate: float, start_at: float, out: Connection
) -> None:
    """Publishes body i at start_at + i/rate (time.monotonic) and reports when each went out.

    No publisher confirms here: a confirm costs a broker round trip and an fsync,
    which would break the pacing; the exactly-once checks afterwards prove that
    every vote arrived.
    """
    child_signals()
    connection = pika.BlockingConnection(endpoints.amqp())
    channel = connection.channel()
    published = [0.0] * len(bodies)
    for i, body in enumerate(bodies):
        delay = start_at + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        published[i] = time.monotonic()
        channel.basic_publish("", queue, body, PERSISTENT)
        if i % 100 == 0:
            connection.process_data_events(time_limit=0)
    connection.close()  # flushes what is still buffered
    out.send(published)
