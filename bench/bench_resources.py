"""Every queue, database and child process the benchmark creates, and what asks RabbitMQ about a queue."""

from __future__ import annotations

import multiprocessing
import signal
import uuid
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
from bench_settings import SCHEMA_FILE, Endpoints
from psycopg2 import sql

if TYPE_CHECKING:
    from service_process import ServiceProcess

MP = multiprocessing.get_context("fork")


def child_signals() -> None:
    """Children leave Ctrl-C to the parent, which terminates them while cleaning up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Resources:
    """Every queue, database and process the bench creates, removed by cleanup()."""

    def __init__(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints
        self._queues: list[str] = []
        self._databases: list[str] = []
        self._children: list[BaseProcess] = []
        self._services: list[ServiceProcess] = []

    def new_queue(self) -> str:
        name = f"bench.{uuid.uuid4().hex}"
        self._queues.append(name)
        connection = pika.BlockingConnection(self._endpoints.amqp())
        try:
            connection.channel().queue_declare(name, durable=True)
        finally:
            connection.close()
        return name

    def delete_queue(self, name: str) -> None:
        connection = pika.BlockingConnection(self._endpoints.amqp())
        try:
            connection.channel().queue_delete(name)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
        finally:
            if connection.is_open:
                connection.close()
        self._queues.remove(name)

    def new_database(self, *, schema: bool) -> str:
        name = f"bench_{uuid.uuid4().hex[:16]}"
        self._databases.append(name)
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if schema:
            conn = self._endpoints.pg(name)
            try:
                with conn.cursor() as cur:
                    cur.execute(SCHEMA_FILE.read_text(encoding="utf-8"))
            finally:
                conn.close()
        return name

    def drop_database(self, name: str) -> None:
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self._databases.remove(name)

    def _admin(self, statement: sql.Composed) -> None:
        conn = self._endpoints.pg("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def child(self, target: Callable[..., None], *args: Any) -> BaseProcess:
        proc = MP.Process(target=target, args=args, daemon=True)
        self._children.append(proc)
        proc.start()
        return proc

    def service(self, service: ServiceProcess) -> ServiceProcess:
        self._services.append(service)
        return service

    def cleanup(self) -> list[str]:
        """Stop what runs, delete what was created; returns what could not be cleaned."""
        problems: list[str] = []
        for svc in self._services:
            svc.stop(timeout_s=5)
        for proc in self._children:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
        for queue in list(self._queues):
            try:
                self.delete_queue(queue)
            except Exception as exc:
                problems.append(f"queue {queue}: {exc}")
        for dbname in list(self._databases):
            try:
                self.drop_database(dbname)
            except Exception as exc:
                problems.append(f"database {dbname}: {exc}")
        return problems


def _queue_state(endpoints: Endpoints, queue: str) -> Any:
    connection = pika.BlockingConnection(endpoints.amqp())
    try:
        return connection.channel().queue_declare(queue, passive=True).method
    finally:
        connection.close()


def queue_depth(endpoints: Endpoints, queue: str) -> int:
    """Messages ready in a queue (unacked ones are not counted)."""
    return int(_queue_state(endpoints, queue).message_count)


def queue_consumers(endpoints: Endpoints, queue: str) -> int:
    return int(_queue_state(endpoints, queue).consumer_count)
