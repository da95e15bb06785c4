"""The polling helpers keep one connection per test, and never hand out one the server ended; the
ports handed to the servers the tests start are ones no outgoing connection can take."""

from __future__ import annotations

import socket

import pytest

from tests import support
from tests.support import declare_queue, query, queue_state
from tools import ports


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


def test_ports_come_from_below_the_ephemeral_range_once_each_and_free_on_every_address() -> None:
    low, _high = ports.ephemeral_range()
    handed = [ports.free_port() for _ in range(200)]
    assert len(set(handed)) == len(handed)
    assert all(port in ports.pool() and port < low for port in handed)
    for port in handed[:20]:
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))  # what the service does with PROMETHEUS_BIND_ADDRESS's default


@pytest.mark.parametrize(("worker", "count"), [("gw0", "4"), ("gw3", "4"), ("gw1", "2")])
def test_each_xdist_worker_has_a_slice_of_its_own(monkeypatch: pytest.MonkeyPatch, worker: str, count: str) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    slices = []
    for index in range(int(count)):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        slices.append(set(ports.pool()))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    mine = set(ports.pool())
    assert mine in slices
    assert all(not (a & b) for i, a in enumerate(slices) for b in slices[i + 1 :])
    assert len(mine) >= 1000
