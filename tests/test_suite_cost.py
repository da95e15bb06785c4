"""tests/suite_counter.py sorts what the tests start into the units scripts/suite_cost.py prices."""

from __future__ import annotations

import sys

import pytest

from tests.suite_counter import kind_of
from tests.support import aggregator_command, tool_command


@pytest.mark.parametrize(
    ("command", "unit"),
    [
        (aggregator_command(), "service run"),
        ([sys.executable, "-X", "importtime", "-S", "aggregator.py"], "service run"),
        (aggregator_command("verify", "--heads", "h.jsonl"), "aggregator.py command"),
        (aggregator_command("--check"), "aggregator.py command"),
        (tool_command("--count=10"), "other Python process"),
        ([sys.executable, "-c", "import ssl"], "other Python process"),
        (["/usr/bin/promtool", "test", "rules"], "other program"),
        ("uname -p", "other program"),
        ([sys.executable, "-u", "-c", "import sys;exec(eval(sys.stdin.readline()))"], None),
    ],
)
def test_each_command_line_is_one_unit(command: list[str] | str, unit: str | None) -> None:
    assert kind_of(command) == unit
