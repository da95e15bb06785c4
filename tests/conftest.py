"""Fixtures: every test gets its own queue and its own database, removed afterwards.

And the `ha` marker kept true: a test that starts, stops or kills a throwaway server without it fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.patroni_cluster import Member
from tests.pg_servers import PgServer
from tests.rabbitmq_cluster import RabbitNode
from tests.rabbitmq_metrics_node import MetricsNode
from tests.roles import ServiceRole, service_role
from tests.support import Service, declare_queue, pg_connect, scratch_database, scratch_queues, stop_all
from tests.tls_support import TempPostgres


@pytest.fixture
def dbname() -> Iterator[str]:
    with scratch_database(pg_connect("postgres"), prefix="agg_test") as name:
        yield name


@pytest.fixture
def svc_role(dbname: str) -> Iterator[ServiceRole]:
    """The service's least-privilege role on `dbname`, schema applied (init_db.sql, service_role.sql)."""
    with service_role(dbname) as role:
        yield role


@pytest.fixture(scope="module")
def module_dbname() -> Iterator[str]:
    """A database shared by the tests of one module that only read it."""
    with scratch_database(pg_connect("postgres"), prefix="agg_test") as name:
        yield name


@pytest.fixture
def queue_names() -> Iterator[list[str]]:
    """Queues registered here are deleted from RabbitMQ after the test, with the
    dead-letter queue and exchange the service names after them."""
    with scratch_queues() as names:
        yield names


@pytest.fixture
def queue(queue_names: list[str]) -> str:
    """A fresh durable queue, declared the way upstream would declare it."""
    return declare_queue(queue_names)


# Settings that point the service at another server, database or user: the test's role does not apply.
_ELSEWHERE = ("POSTGRES_HOST", "POSTGRES_DB", "POSTGRES_USER")


@pytest.fixture
def make_service(tmp_path: Path, dbname: str, queue: str) -> Iterator[Callable[..., Service]]:
    """The service as users run it, connecting with the least-privilege role (service_role.sql).

    The schema is applied by an administrator first, as docs/security.md says; a test about the
    service applying the schema itself passes `as_superuser=True`.
    """
    services: list[Service] = []
    with ExitStack() as roles:
        role: list[ServiceRole] = []

        def make(
            env: dict[str, str] | None = None, *, queue_name: str | None = None, as_superuser: bool = False
        ) -> Service:
            settings = dict(env or {})
            if not as_superuser and not any(name in settings for name in _ELSEWHERE):
                if not role:
                    role.append(roles.enter_context(service_role(dbname)))
                settings = {**role[0].env(), **settings}
            svc = Service(
                queue=queue_name or queue,
                dbname=dbname,
                log_path=tmp_path / f"service-{len(services)}.log",
                env=settings,
            )
            services.append(svc)
            return svc

        yield make
        stop_all(services)


# -- the order tests are handed to xdist workers ------------------------------------------------
# `make test` runs `--dist loadfile --no-loadscope-reorder`: each file goes to one worker (its
# module-scoped throwaway servers start once), in the order of the files' first tests here. The
# longest first, so that no worker is still starting a long file when the others are done (sorted
# by test count instead, the one-test soak file came last and ran alone at the end): files with
# throwaway servers, the soak leading, then those with `slow` tests, then the rest.


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        ha = item.get_closest_marker("ha") is not None
        slow = item.get_closest_marker("slow") is not None
        return 0 if ha and slow else 1 if ha else 2 if slow else 3

    items.sort(key=rank)


# -- the `ha` marker ----------------------------------------------------------------------------
# `make test-fast` leaves out the tests marked `ha`; a test that starts, stops or kills a throwaway
# server without the marker would make it slow, or leave a server to a run that expects none. The
# server classes' own methods check the marker of the test that calls them, fixtures included.

# The test being set up or run. Not during teardown: a module's servers are stopped in the
# teardown of its last test, marked or not.
_running: list[pytest.Item] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    _running.append(item)
    try:
        yield
    finally:
        _running.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _running.clear()


def _marked_ha(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def checked(self: object, *args: Any, **kwargs: Any) -> Any:
        if _running and _running[-1].get_closest_marker("ha") is None:
            pytest.fail(
                f"{_running[-1].nodeid} calls {type(self).__name__}.{method.__name__}() of a throwaway server "
                "without the `ha` marker (pyproject.toml; docs/development.md)",
                pytrace=False,
            )
        return method(self, *args, **kwargs)

    return checked


for _server, _methods in (
    (PgServer, ("start", "stop")),
    (RabbitNode, ("start", "kill")),
    (MetricsNode, ("start",)),
    (Member, ("start", "kill", "stop")),
    (TempPostgres, ("start",)),
):
    for _name in _methods:
        setattr(_server, _name, _marked_ha(getattr(_server, _name)))
