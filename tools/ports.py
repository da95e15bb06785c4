"""A free TCP port on the loopback interface, for servers the tests and the bench start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
