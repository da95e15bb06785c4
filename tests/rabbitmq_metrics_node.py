"""A throwaway RabbitMQ node with the rabbitmq_prometheus plugin, for the monitoring tests.

The shared broker (127.0.0.1:5672) has no metrics plugin and is never reconfigured, so the queue
alerts and panels are checked against a node of their own, as in
shared/recipes/throwaway-servers.md: its own config file (AMQP and metrics listeners on free
loopback ports), its own enabled-plugins file, node name, distribution port and data/log
directories, owned by the `rabbitmq` OS user. Everything lives in one directory under the temporary
directory, named `agg-rmqmon-<pid of the test run>-...`. The node is stopped with
`rabbitmqctl -n <node> stop`, never by process name. A run killed half-way leaves its directory
behind: the next run stops the node of a run that is gone (by its node name, or by the pid in its
pid file once /proc confirms that process serves that very directory) and removes it
(`remove_leftovers`).

A node boots in about 5 s here; a module-scoped fixture starts it once.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path

import pika
import pika.exceptions

from tests.support import alive, rabbitmq_node_of, wait_for
from tools.ports import free_port
from tools.publisher import publish_all

_PREFIX = "agg-rmqmon-"
# rabbitmq_prometheus' families with one series per queue (what the queue alerts read).
QUEUE_FAMILIES = ("queue_coarse_metrics", "queue_consumer_count")


def _rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # Debian's rabbitmqctl switches to the rabbitmq user, whose Erlang cookie the node uses too.
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)


def _stop(base: Path, node_name: str) -> None:
    """Stop the node of directory `base`: by rabbitmqctl, then by its verified pid if it still runs."""
    pid_file = base / "pid"
    pid = int(pid_file.read_text().strip()) if pid_file.exists() and pid_file.read_text().strip().isdigit() else None
    if pid is None or not rabbitmq_node_of(pid, base):
        return
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _rabbitmqctl("-n", node_name, "stop", timeout=60)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not alive(pid), timeout=30, interval=0.2, what=f"node {node_name} to exit")
    if alive(pid) and rabbitmq_node_of(pid, base):
        os.kill(pid, signal.SIGKILL)


def remove_leftovers() -> None:
    """Stop and remove the nodes of test runs that no longer exist."""
    for base in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        match = re.fullmatch(rf"{_PREFIX}(\d+)-.*", base.name)
        if not match or alive(int(match.group(1))):
            continue
        node_file = base / "node"
        if node_file.exists():
            _stop(base, node_file.read_text().strip())
        shutil.rmtree(base, ignore_errors=True)


class MetricsNode:
    """One standalone node: AMQP on 127.0.0.1:`amqp_port` (guest/guest, allowed from loopback),
    rabbitmq_prometheus on 127.0.0.1:`metrics_port`."""

    def __init__(self, *, config: str = "") -> None:
        """`config`: more rabbitmq.conf lines (for example `consumer_timeout = 5000`)."""
        self._config = config
        self.base = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        self.amqp_port = free_port()
        self.metrics_port = free_port()
        self.dist_port = free_port()
        self.name = f"agg_rmqmon_{os.getpid()}_{uuid.uuid4().hex[:8]}@localhost"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),  # .conf is appended
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "plugins"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
        }

    def start(self) -> MetricsNode:
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}\n"
            f"prometheus.tcp.port = {self.metrics_port}\n"
            "prometheus.tcp.ip = 127.0.0.1\n" + self._config
        )
        (self.base / "plugins").write_text("[rabbitmq_prometheus].\n")
        (self.base / "node").write_text(self.name + "\n")
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir()
        self.base.chmod(0o755)
        for path in (self.base, *self.base.rglob("*")):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, capture_output=True, timeout=60)
        wait_for(self._started, timeout=90, interval=0.5, what=f"RabbitMQ node {self.name} to start")
        wait_for(self._serving_metrics, timeout=30, interval=0.2, what="rabbitmq_prometheus to answer")
        return self

    def _started(self) -> bool:
        return _rabbitmqctl("-q", "-n", self.name, "await_startup", "--timeout", "5", timeout=30).returncode == 0

    def _serving_metrics(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.metrics_url}?family=queue_consumer_count", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    @property
    def metrics_url(self) -> str:
        """The plugin's per-object endpoint (add ?family=... to choose what it returns)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics/detailed"

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((self.base / "log").glob("*.log")))

    def stop(self) -> None:
        _stop(self.base, self.name)
        shutil.rmtree(self.base, ignore_errors=True)

    # -- AMQP --------------------------------------------------------------------------------------

    def params(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            "127.0.0.1", self.amqp_port, credentials=pika.PlainCredentials("guest", "guest")
        )

    def publish(self, queue: str, bodies: Iterable[bytes]) -> int:
        """Publish in order with confirms: every body is in the queue when this returns."""
        messages = list(bodies)
        publish_all(self.params(), queue, messages)
        return len(messages)

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
