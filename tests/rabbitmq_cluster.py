"""Throwaway RabbitMQ nodes: a three-node cluster and standalone nodes, for tests that kill, stop,
restart or reconfigure a broker, or read its metrics (rabbitmq_prometheus, which the shared broker
does not run). The shared broker (127.0.0.1:5672) is never touched.

Each node has a directory of its own under the temporary directory, named
`agg-rmq-<pid of the test run>-...` (config file, data, logs, pid file), listens on free loopback
ports and runs as the `rabbitmq` OS user with that user's Erlang cookie, as the recipe in
shared/recipes/throwaway-servers.md does. A node is stopped by the pid in its pid file, after
checking that the process serves that very directory; never by process name. A run that was killed
half-way leaves such directories behind: the next run stops and removes those whose test run is gone
(`remove_leftovers`).

Nodes boot in parallel (about 10 s here), so a module-scoped fixture that starts them once keeps
the tests fast (`standalone_node` for one node on its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from tests import skips
from tests.support import (
    RABBITMQ_PASSWORD,
    RABBITMQ_USER,
    alive,
    drain_with_headers,
    queue_state,
    rabbitmq_node_of,
    wait_for,
)
from tools.ports import free_port
from tools.publisher import publish_all

RABBITMQ_BIN = Path(os.environ.get("TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
_PREFIX = "agg-rmq-"
# The rabbitmq user's home: its Erlang cookie is the one both the nodes and the CLI tools use.
_HOME = "/var/lib/rabbitmq"


def unavailable() -> str | None:
    """None if throwaway nodes can be started here, else why not (for pytest.skip)."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return f"no RabbitMQ in {RABBITMQ_BIN} (set TEST_RABBITMQ_BIN)"
    if os.geteuid() != 0:
        return "the tests must run as root to start a node as the rabbitmq user"
    if shutil.which("runuser") is None:
        return "runuser is missing"
    return None


def _as_rabbitmq(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    variables = {"HOME": _HOME, **(env or {})}
    command = ["runuser", "-u", "rabbitmq", "--", "env", *(f"{k}={v}" for k, v in variables.items()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=_HOME)


def remove_leftovers() -> None:
    """Kill and remove the nodes of test runs that no longer exist."""
    for base in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        match = re.fullmatch(rf"{_PREFIX}(\d+)-.*", base.name)
        if not match or alive(int(match.group(1))):
            continue
        for pid_file in base.glob("*/pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                if rabbitmq_node_of(pid, pid_file.parent):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


class RabbitNode:
    """One node: `start()` boots it detached, `wait_started()` until it serves AMQP (and, with
    `metrics`, rabbitmq_prometheus on 127.0.0.1:`metrics_port`)."""

    def __init__(self, base: Path, name: str, *, config: str = "", metrics: bool = False) -> None:
        self.dir = base / name
        # Node names are unique on this host while they run: the base directory's name is.
        self.node = f"{base.name.replace('-', '_')}_{name}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.metrics_port = free_port() if metrics else None
        self.dir.mkdir()
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
            # The smallest disk and memory checks: the tests' messages are tiny.
            "disk_free_limit.absolute = 1MB\n"
            + (f"prometheus.tcp.port = {self.metrics_port}\nprometheus.tcp.ip = 127.0.0.1\n" if metrics else "")
            # Lines of the test's own, e.g. a short consumer_timeout.
            + config
        )
        if metrics:
            (self.dir / "plugins").write_text("[rabbitmq_prometheus].\n")

    @property
    def address(self) -> str:
        """What a RABBITMQ_HOST entry for this node says."""
        return f"127.0.0.1:{self.port}"

    @property
    def _env(self) -> dict[str, str]:
        return {
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
        }

    def start(self) -> None:
        """Boot detached; a node that was killed rejoins its cluster from its own data directory."""
        done = _as_rabbitmq(str(RABBITMQ_BIN / "rabbitmq-server"), "-detached", env=self._env)
        assert done.returncode == 0, done.stderr

    def wait_started(self, timeout: float = 90) -> None:
        def started() -> bool:
            # await_startup fails at once until the node has registered its name.
            return self.ctl_result("await_startup", "--timeout", "10").returncode == 0

        wait_for(started, timeout=timeout, interval=0.5, what=f"RabbitMQ node {self.node} to start")
        wait_for(self.answers, timeout=30, what=f"RabbitMQ node {self.node} to accept AMQP connections")
        if self.metrics_port is not None:
            wait_for(self._serving_metrics, timeout=30, interval=0.2, what="rabbitmq_prometheus to answer")

    @property
    def metrics_url(self) -> str:
        """rabbitmq_prometheus' per-object endpoint (add ?family=... to choose what it returns)."""
        assert self.metrics_port is not None, f"{self.node} runs without rabbitmq_prometheus"
        return f"http://127.0.0.1:{self.metrics_port}/metrics/detailed"

    def _serving_metrics(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.metrics_url}?family=queue_consumer_count", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def ctl_result(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _as_rabbitmq(str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.node, *args, timeout=timeout)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = self.ctl_result(*args, timeout=timeout)
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)} on {self.node}: {done.stdout}{done.stderr}"
        return done.stdout

    def pid(self) -> int | None:
        try:
            pid = int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if rabbitmq_node_of(pid, self.dir) else None

    def kill(self) -> None:
        """kill -9, as a machine that dies; returns once the process is gone."""
        pid = self.pid()
        assert pid is not None, f"{self.node} is not running"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), timeout=30, what=f"{self.node} (pid {pid}) to die")

    def remove(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def params(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            "127.0.0.1", self.port, credentials=pika.PlainCredentials(RABBITMQ_USER, RABBITMQ_PASSWORD)
        )

    def answers(self) -> bool:
        try:
            pika.BlockingConnection(self.params()).close()
        except (pika.exceptions.AMQPError, OSError):
            return False
        return True

    def queue_state(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, asked through this node."""
        return queue_state(queue, self.params())

    def publish(self, queue: str, bodies: Iterable[bytes]) -> int:
        """Publish in order with confirms: every body is in the queue when this returns."""
        messages = list(bodies)
        publish_all(self.params(), queue, messages)
        return len(messages)

    def drain(self, queue: str) -> list[bytes]:
        """Take every ready message off a queue of this node."""
        return [body for body, _headers in drain_with_headers(queue, self.params())]

    def delete(self, *, queues: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
        """Delete queues and exchanges, those that do not exist included."""
        conn = pika.BlockingConnection(self.params())
        try:
            for name in queues:
                with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                    conn.channel().queue_delete(name)
            for name in exchanges:
                with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                    conn.channel().exchange_delete(name)
        finally:
            conn.close()

    def queues(self) -> dict[str, dict[str, Any]]:
        """name -> {type, leader, members, arguments, messages} of every queue, as the node reports them."""
        out = self.ctl(
            "list_queues", "name", "type", "leader", "members", "arguments", "messages", "--formatter", "json"
        )
        return {row["name"]: row for row in json.loads(out)}

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted((self.dir / "log").glob("*.log")))


class RabbitNodes:
    """`count` nodes booted in parallel; the first `clustered` of them joined into one cluster."""

    def __init__(self, count: int, *, clustered: int, config: str = "", metrics: bool = False) -> None:
        remove_leftovers()
        self.base = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        os.chmod(self.base, 0o755)
        self.nodes = [RabbitNode(self.base, f"n{i + 1}", config=config, metrics=metrics) for i in range(count)]
        self._clustered = clustered
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        for path in self.base.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def start(self) -> RabbitNodes:
        started = time.monotonic()
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_started()
        first = self.nodes[0]
        for node in self.nodes[1 : self._clustered]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
            node.wait_started()
        print(f"\n{len(self.nodes)} RabbitMQ nodes up in {time.monotonic() - started:.1f}s", flush=True)
        return self

    def revive(self) -> None:
        """Start again every node that is not running: a test that failed half-way may have killed one."""
        dead = [node for node in self.nodes if node.pid() is None]
        for node in dead:
            node.start()
        for node in dead:
            node.wait_started()

    @property
    def cluster(self) -> list[RabbitNode]:
        return self.nodes[: self._clustered]

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def standalone_node(*, config: str = "", metrics: bool = False) -> Iterator[RabbitNode]:
    """One node on its own (more rabbitmq.conf lines in `config`; rabbitmq_prometheus with
    `metrics`), removed afterwards; skipped, saying why, where nodes cannot be started here."""
    skips.require(unavailable())
    nodes = RabbitNodes(1, clustered=1, config=config, metrics=metrics)
    try:
        yield nodes.start().nodes[0]
    finally:
        nodes.remove()
