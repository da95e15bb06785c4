"""Running `python aggregator.py <options>` as an operator does, against the test servers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from tests.support import POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, RABBITMQ_HOST, RABBITMQ_PORT, ROOT


def cli_env(*, dbname: str, queue: str = "votes.aggregation", **overrides: str) -> dict[str, str]:
    """The environment of a run against the shared test servers; `overrides` win."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "POSTGRES_"))},
        "RABBITMQ_HOST": RABBITMQ_HOST,
        "RABBITMQ_PORT": str(RABBITMQ_PORT),
        "RABBITMQ_QUEUE": queue,
        "POSTGRES_HOST": POSTGRES_HOST,
        "POSTGRES_PORT": str(POSTGRES_PORT),
        "POSTGRES_USER": POSTGRES_USER,
        "POSTGRES_DB": dbname,
        **overrides,
    }


def run_cli(*args: str, env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "aggregator.py", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The `problem:` lines of a --check run."""
    return [line for line in result.stderr.splitlines() if line.startswith("problem: ")]
