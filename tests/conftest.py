"""Fixtures: every test gets its own queue and its own database, removed afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika.exceptions
import pytest

from tests.support import Service, amqp_connection, pg_connect, scratch_database


@pytest.fixture
def dbname() -> Iterator[str]:
    with scratch_database(pg_connect("postgres"), prefix="agg_test") as name:
        yield name


@pytest.fixture
def queue_names() -> Iterator[list[str]]:
    """Queues registered here are deleted from RabbitMQ after the test, with the
    dead-letter queue and exchange the service names after them."""
    names: list[str] = []
    yield names
    conn = amqp_connection()
    try:
        for name in names:
            for queue_name in (name, f"{name}.dead"):
                with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                    conn.channel().queue_delete(queue_name)
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                conn.channel().exchange_delete(f"{name}.dlx")
    finally:
        conn.close()


@pytest.fixture
def queue(queue_names: list[str]) -> str:
    """A fresh durable queue, declared the way upstream would declare it."""
    name = f"agg.test.{uuid.uuid4().hex[:12]}"
    queue_names.append(name)
    conn = amqp_connection()
    try:
        conn.channel().queue_declare(name, durable=True)
    finally:
        conn.close()
    return name


@pytest.fixture
def make_service(tmp_path: Path, dbname: str, queue: str) -> Iterator[Callable[..., Service]]:
    services: list[Service] = []

    def make(env: dict[str, str] | None = None, *, queue_name: str | None = None) -> Service:
        svc = Service(
            queue=queue_name or queue,
            dbname=dbname,
            log_path=tmp_path / f"service-{len(services)}.log",
            env=env,
        )
        services.append(svc)
        return svc

    yield make
    for svc in services:
        svc.kill()
