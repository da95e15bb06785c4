"""What a test needs from the machine, and the one way to say it is missing: a skip with the reason.

A skip is never quiet (tests/conftest.py): with TEST_SKIPS_FAIL=1, which `.ci/run` sets, every skip
fails the run with its reason; without it, the end of the run lists every skip and says so.
"""

from __future__ import annotations

import os
import shutil

import pytest

# The environment variable that turns every skip into a failure.
STRICT = "TEST_SKIPS_FAIL"


def strict() -> bool:
    return os.environ.get(STRICT, "") not in ("", "0")


def tool(name: str, *, install: str, path: str | None = None) -> str:
    """The program `name` on PATH (or on `path`); the test is skipped, saying how to install it, without it."""
    found = (path and shutil.which(name, path=path)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: {install}")
    return found


def unless(reason: str | None) -> pytest.MarkDecorator:
    """Skip where `reason` (a check's answer: None when everything needed is here) says why not."""
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def require(reason: str | None) -> None:
    """Inside a test or fixture: skip where `reason` (a check's answer, None when all is here) says why not."""
    if reason is not None:
        pytest.skip(reason)
