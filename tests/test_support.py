"""The polling helpers keep one connection per test, and never hand out one the server ended."""

from __future__ import annotations

from tests import support
from tests.support import declare_queue, query, queue_state


def test_a_kept_connection_the_server_ended_is_replaced_before_use(dbname: str) -> None:
    (first,) = query(dbname, "SELECT pg_backend_pid()")[0]
    assert query(dbname, "SELECT pg_backend_pid()") == [(first,)]  # kept
    # Ended from another session, as a restart, a crash or DROP DATABASE ... WITH (FORCE) ends it
    # (each of them returns once the session is gone; pg_terminate_backend does not wait for it).
    assert query("postgres", "SELECT pg_terminate_backend(%s, 10000)", (first,)) == [(True,)]
    (second,) = query(dbname, "SELECT pg_backend_pid()")[0]
    assert second != first


def test_a_kept_broker_connection_that_closed_is_replaced(queue_names: list[str]) -> None:
    name = declare_queue(queue_names)
    assert queue_state(name) == (0, 0)
    (kept,) = [conn for conn, _channel in support._amqp_open.values()]
    kept.close()
    assert queue_state(name) == (0, 0)
    (renewed,) = [conn for conn, _channel in support._amqp_open.values()]
    assert renewed is not kept
