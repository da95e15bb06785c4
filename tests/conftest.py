"""Fixtures: every test gets its own queue and its own database, removed afterwards.

And no skip goes unnoticed: with TEST_SKIPS_FAIL=1 (`.ci/run` sets it) a skipped test, or a module
skipped whole, is reported as a failure carrying the skip's reason; without it, the end of the run
lists every skip under a banner that says CI would fail.

And the `ha` marker kept true: a test that starts, stops or kills a throwaway server without it fails.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from psycopg2 import sql

from tests import skips
from tests.patroni_cluster import Member
from tests.pg_servers import PgServer
from tests.rabbitmq_cluster import RabbitNode
from tests.roles import Server, ServiceRole, create_service_role, service_role
from tests.support import (
    Service,
    close_reused_connections,
    declare_queue,
    pg_connect,
    scratch_database,
    scratch_queues,
    stop_all,
)


def _keep_bytecode() -> None:
    """Compiled bytecode kept for the run, outside the checkout, under PYTHONDONTWRITEBYTECODE too.

    The run starts some two hundred Python processes (the service, its commands, the tools) and
    every xdist worker imports the test modules: with bytecode not written (a Docker-style shell
    sets PYTHONDONTWRITEBYTECODE=1) each of them compiled the same sources again, a third of what
    a command costs. They keep it instead in a directory of this user's under the system temporary
    directory (PYTHONPYCACHEPREFIX), never in the checkout; the workers, started after this, and
    every subprocess inherit it. Without PYTHONDONTWRITEBYTECODE, `__pycache__` does the same.
    """
    if not sys.flags.dont_write_bytecode:
        return
    prefix = Path(tempfile.gettempdir()) / f"vote-aggregator-test-bytecode-{os.getuid()}"
    try:
        prefix.mkdir(mode=0o700, exist_ok=True)
        owned = prefix.lstat()
    except OSError:
        return
    # Only a directory of this user's that no one else can write: bytecode found there is run.
    if not stat.S_ISDIR(owned.st_mode) or owned.st_uid != os.getuid() or owned.st_mode & 0o022:
        return
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    sys.pycache_prefix = str(prefix)
    sys.dont_write_bytecode = False


_keep_bytecode()


@pytest.fixture(scope="session")
def _spent_databases() -> Iterator[list[str]]:
    """The tests' databases, dropped when the worker's tests are done rather than after each test.

    DROP DATABASE makes PostgreSQL flush every dirty page of the server and wait (a checkpoint): one
    after each test made every other worker's writes start again with full-page images in the WAL.
    """
    names: list[str] = []
    yield names
    admin = pg_connect("postgres")
    try:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        admin.close()


@pytest.fixture
def dbname(_spent_databases: list[str]) -> Iterator[str]:
    """A new, empty database of the test's own; its sessions are ended after the test, the database
    itself with the worker's others (_spent_databases)."""
    name = f"agg_test_{uuid.uuid4().hex[:12]}"
    admin = pg_connect("postgres")
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        _spent_databases.append(name)
        yield name
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    finally:
        admin.close()


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


@pytest.fixture(autouse=True)
def _reused_connections() -> Iterator[None]:
    """The connections the polling helpers keep are the test's own: ended when it ends."""
    yield
    close_reused_connections()


@pytest.fixture
def make_service(tmp_path: Path, dbname: str, queue: str) -> Iterator[Callable[..., Service]]:
    """The service as users run it, connecting with the least-privilege role (service_role.sql).

    The schema is applied by an administrator first, as docs/security.md says; a test about the
    service applying the schema itself passes `as_superuser=True`. By default it writes to the
    test's database (`dbname`) on the shared server and consumes `queue`; a test of its own
    servers passes `server` (where the role is made: the primary) and `dbname`, with settings that
    name the hosts, and `queue_name` for a queue elsewhere.
    """
    shared_dbname = dbname
    services: list[Service] = []
    made: dict[tuple[int, str], ServiceRole] = {}
    with ExitStack() as roles:

        def role_for(database: str, server: Server | None) -> ServiceRole:
            key = (id(server), database)
            if key not in made:
                if server is None:
                    made[key] = roles.enter_context(service_role(database))
                else:  # a throwaway server: the role goes with it
                    made[key] = create_service_role(database, server=server)
            return made[key]

        def make(
            env: dict[str, str] | None = None,
            *,
            queue_name: str | None = None,
            as_superuser: bool = False,
            server: Server | None = None,
            dbname: str | None = None,
        ) -> Service:
            settings = dict(env or {})
            if server is not None and dbname is None:
                raise TypeError("make_service(server=...) needs the dbname on that server")
            database = dbname or shared_dbname
            elsewhere = server is None and any(name in settings for name in _ELSEWHERE)
            if not as_superuser and not elsewhere:
                settings = {**role_for(database, server).env(), **settings}
            svc = Service(
                queue=queue_name or queue,
                dbname=database,
                log_path=tmp_path / f"service-{len(services)}.log",
                env=settings,
            )
            services.append(svc)
            return svc

        yield make
        stop_all(services)


# -- skips are failures in CI, and loud everywhere ------------------------------------------------


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    # A skip's longrepr is (path, line, "Skipped: <reason>"), a list once it came from an xdist worker.
    if isinstance(longrepr, (tuple, list)) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped, and a skip fails the run here ({skips.STRICT}=1): {_skip_reason(report)}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # An expected failure (xfail) is reported as skipped too; it is not a missing tool.
    if report.skipped and not hasattr(report, "wasxfail") and skips.strict():
        _as_failure(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.skipped and skips.strict():  # pytest.skip(..., allow_module_level=True), importorskip
        _as_failure(report)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"{len(skipped)} SKIPPED: NOT TESTED, AND CI WOULD FAIL", sep="!", red=True, bold=True)
    for report in skipped:
        write(f"SKIPPED {report.nodeid or report.fspath}: {_skip_reason(report)}", red=True, bold=True)
    write(
        f"What these tests check was not checked here. With {skips.STRICT}=1, as `.ci/run` sets it, "
        "each of them fails the run.",
        red=True,
        bold=True,
    )


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
    (Member, ("start", "kill", "stop")),
):
    for _name in _methods:
        setattr(_server, _name, _marked_ha(getattr(_server, _name)))
