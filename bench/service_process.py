"""python aggregator.py as users run it: started, watched and stopped by the benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_resources import queue_consumers
from bench_settings import ROOT, BenchError, Endpoints, Settings
from procstat import process_cpu_seconds

from tools.ports import free_port

# Variables the service reads are removed from the inherited environment, so that
# "defaults" means the service's defaults, not whatever this shell exports.
SERVICE_ENV_PREFIXES = ("RABBITMQ_", "POSTGRES_", "BATCH_", "MAX_", "RETRY_", "SHUTDOWN_", "PROMETHEUS_", "LOG_LEVEL")


class ServiceProcess:
    """`python aggregator.py` as users run it, configured through the environment."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    def start(cls, s: Settings, *, queue: str, dbname: str, log_path: Path) -> ServiceProcess:
        e = s.endpoints
        env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_ENV_PREFIXES)}
        env.update(
            RABBITMQ_HOST=e.rabbitmq_host,
            RABBITMQ_PORT=str(e.rabbitmq_port),
            RABBITMQ_QUEUE=queue,
            POSTGRES_HOST=e.postgres_host,
            POSTGRES_PORT=str(e.postgres_port),
            POSTGRES_USER=e.postgres_user,
            POSTGRES_DB=dbname,
            PROMETHEUS_PORT=str(free_port()),
            PYTHONUNBUFFERED="1",
        )
        env.update(s.service_env)
        with log_path.open("ab") as log:
            # A session of its own: a Ctrl-C on the bench must not reach it (the bench stops it).
            proc = subprocess.Popen(
                [sys.executable, "aggregator.py"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the service exited with {self.proc.returncode}:\n{self.log_tail()}")

    def wait_consuming(self, endpoints: Endpoints, queue: str, timeout_s: float = 30.0) -> None:
        """Until the service is a consumer of `queue` (asked of RabbitMQ, not read from the log)."""
        deadline = time.monotonic() + timeout_s
        while queue_consumers(endpoints, queue) < 1:
            self.check_running()
            if time.monotonic() > deadline:
                raise BenchError(f"the service did not start consuming within {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def status_kb(self, key: str) -> int | None:
        """A `VmRSS`/`VmHWM`-style line of /proc/<pid>/status, in kB."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the service process (all its threads)."""
        return process_cpu_seconds(self.pid)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as systemd or docker would; returns the exit code (-9 if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_levels(self) -> dict[str, int]:
        text = self.log_text()
        return {level: text.count(f" {level} ") for level in ("WARNING", "ERROR", "CRITICAL")}
