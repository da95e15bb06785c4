"""A pytest plugin for scripts/suite_cost.py: counts what the tests start, one line per unit.

Loaded with `-p tests.suite_counter` and SUITE_COUNTER_DIR set, it writes to a file of its own
process in that directory one line per unit of fixed cost a test pays before it checks anything:
a process started (classified by its command line), a test database, a service role made with its
schema. Without SUITE_COUNTER_DIR it does nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import pytest

_out: TextIO | None = None


def kind_of(args: Any) -> str | None:
    """The unit a command line is: a service run, an aggregator.py command, another Python process,
    or another program; None for an xdist worker (counted as a pytest process when it starts)."""
    argv = [str(a) for a in args] if isinstance(args, Sequence) and not isinstance(args, str | bytes) else [str(args)]
    program = Path(argv[0]).name if argv else ""
    if any("exec(eval(sys.stdin.readline()))" in a for a in argv):
        return None
    if program.startswith("python"):
        rest = argv[1:]
        while rest and rest[0].startswith("-"):
            option = rest.pop(0)
            if option in ("-c", "-m"):
                return "other Python process"
            if option in ("-X", "-W") and rest:
                rest.pop(0)
        if rest and rest[0].endswith("aggregator.py"):
            return "service run" if len(rest) == 1 else "aggregator.py command"
        return "other Python process"
    return "other program"


def _count(unit: str | None) -> None:
    if _out is not None and unit is not None:
        _out.write(unit + "\n")
        _out.flush()


def pytest_configure(config: pytest.Config) -> None:
    global _out
    directory = os.environ.get("SUITE_COUNTER_DIR")
    if not directory:
        return
    _out = Path(directory, f"{os.getpid()}.txt").open("a")  # noqa: SIM115 - open for the whole run
    original_init = subprocess.Popen.__init__

    def counted_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        _count(kind_of(args))
        original_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = counted_init  # type: ignore[method-assign]

    import tests.conftest
    import tests.roles

    original_role = tests.roles.create_service_role

    def counted_role(dbname: str, *, server: tests.roles.Server | None = None) -> tests.roles.ServiceRole:
        _count("service role with its schema")
        return original_role(dbname, server=server)

    # make_service's roles come through conftest's name for it, svc_role's through roles.service_role.
    tests.roles.create_service_role = counted_role
    tests.conftest.create_service_role = counted_role  # type: ignore[attr-defined]


def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> None:
    if fixturedef.argname in ("dbname", "module_dbname"):
        _count("test database")


def pytest_sessionstart(session: pytest.Session) -> None:
    _count("pytest process")  # the xdist controller and each worker
