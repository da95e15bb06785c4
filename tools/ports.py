"""A free TCP port, for servers the tests and the bench start.

Not port 0's: the kernel hands that one out of its ephemeral range (ip_local_port_range), the range
every outgoing connection takes its local port from. A test run opens hundreds of connections to
PostgreSQL and RabbitMQ, and one of them once took such a port between the moment it was handed out
and the moment the service bound it ("Address already in use"). The ports here come from below
that range, where nothing takes a port unasked; each pytest-xdist worker draws from a slice of its
own, and no process is handed the same port twice.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

LOWEST = 10000
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default if unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def pool() -> range:
    """This process's ports: below the ephemeral range, this xdist worker's slice of them."""
    ports = range(LOWEST, ephemeral_range()[0])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        size = len(ports) // count
        index = int(worker[2:]) % count
        ports = range(ports.start + index * size, ports.start + (index + 1) * size)
    return ports


def free_port() -> int:
    """A port nothing is bound to right now, on any address, and not handed out before here."""
    ports = pool()
    if len(ports) < 100:  # an ephemeral range that starts low leaves nothing below it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for port in random.sample(ports, k=min(len(ports), 500)):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every address: the service listens on 0.0.0.0 by default
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")
