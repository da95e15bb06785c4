"""A small TCP proxy for fault injection: pause traffic, cut connections, refuse new ones, rewrite
what clients send."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Callable

# Made once per connection: takes each chunk a client sends, returns the bytes to forward (it may
# hold some back until the rest arrives).
Rewriter = Callable[[bytes], bytes]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target, under the test's control."""

    def __init__(self, target_host: str, target_port: int, *, rewrite: Callable[[], Rewriter] | None = None) -> None:
        self.target = (target_host, target_port)
        self._rewrite = rewrite
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._paused = threading.Event()
        self._refusing = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held = 0  # chunks read just as a pause began, held back until it ends
        self._accepter = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self._accepter.start()

    # -- control ------------------------------------------------------------------

    def pause(self) -> None:
        """Stop forwarding bytes; connections stay open (a hung peer)."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self._refusing.clear()

    def refuse(self) -> None:
        """Close new connections at once (a peer that is down)."""
        self._refusing.set()

    def cut(self) -> None:
        """Reset every open connection."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def holding(self) -> bool:
        """While paused: some peer sent bytes the proxy holds back (a request the other side never got)."""
        with self._lock:
            if self._held:
                return True
            sockets = [sock for pair in self._pairs for sock in pair]
        if not sockets:
            return False
        try:
            readable, _, _ = select.select(sockets, [], [], 0)
        except (OSError, ValueError):  # a connection closed meanwhile
            return False
        return bool(readable)

    # -- forwarding -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            rewriter = self._rewrite() if self._rewrite is not None else None
            threading.Thread(target=self._pump, args=(client, upstream, rewriter), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, rewriter: Rewriter | None) -> None:
        peers = {a: b, b: a}
        try:
            while not self._closed.is_set():
                if self._paused.is_set():
                    self._closed.wait(0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    # Bytes read just as a pause began are held back too.
                    if self._paused.is_set():
                        with self._lock:
                            self._held += 1
                        try:
                            while self._paused.is_set() and not self._closed.is_set():
                                self._closed.wait(0.05)
                        finally:
                            with self._lock:
                                self._held -= 1
                    if src is a and rewriter is not None:
                        data = rewriter(data)
                    peers[src].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))
            _reset(a)
            _reset(b)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # Linger 0: close with RST, as a crashed peer or a dropped route looks.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
