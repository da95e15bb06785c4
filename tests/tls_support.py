"""TLS test helpers: throwaway certificates, a TLS-terminating proxy, a throwaway PostgreSQL with ssl=on.

Certificates are made with trustme (a test CA in a few lines; it brings `cryptography`).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.pg_servers import PgServer


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A throwaway certificate authority (trustme) that signs server and client certificates."""

    directory: Path
    name: str
    cert: Path
    ca: trustme.CA

    @classmethod
    def create(cls, directory: Path, name: str) -> Authority:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name=f"{name} test CA")
        cert = directory / f"{name}-ca.pem"
        ca.cert_pem.write_to_path(str(cert))
        return cls(directory=directory, name=name, cert=cert, ca=ca)

    def issue(self, stem: str, *, common_name: str, dns_names: tuple[str, ...] = ()) -> KeyPair:
        """A leaf certificate signed by this CA, for servers (naming `dns_names`) and clients alike.

        A client certificate names its common name as its one identity: cryptography refuses a
        subjectAltName with no name in it (since 51), and trustme always writes one.
        """
        leaf = self.ca.issue_cert(*(dns_names or (common_name,)), common_name=common_name)
        cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return KeyPair(cert=cert, key=key)


# -- RabbitMQ behind TLS -----------------------------------------------------------


class TlsProxy:
    """Terminates TLS on 127.0.0.1:<port> and forwards the plaintext to a target (RabbitMQ's AMQP port).

    With `client_ca`, the proxy requires a client certificate signed by it, as a broker with
    `ssl_options.fail_if_no_peer_cert = true` does.
    """

    def __init__(
        self, target: tuple[str, int], *, server: KeyPair, client_ca: Path | None = None, handshake_timeout: float = 10
    ) -> None:
        self.target = target
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_cert_chain(server.cert, server.key)
        if client_ca is not None:
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(client_ca)
        self._handshake_timeout = handshake_timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.handshakes = 0  # TLS sessions established and forwarded
        self.handshake_errors: list[str] = []  # why the others failed, as the server saw it
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_loop, name=f"tls-proxy-{self.port}", daemon=True)
        self._accepter.start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> TlsProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            self._track(raw)
            thread = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(self._handshake_timeout)
        try:
            tls = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self._lock:
                self.handshake_errors.append(f"{type(exc).__name__}: {exc}")
            _close_after_alert(raw)
            return
        self._track(tls)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            tls.close()
            return
        self._track(upstream)
        with self._lock:
            self.handshakes += 1
        tls.settimeout(None)
        upstream.settimeout(None)
        self._pump(tls, upstream)

    def _pump(self, tls: ssl.SSLSocket, plain: socket.socket) -> None:
        # One thread per connection: an SSL object must not be read and written from two threads.
        peers: dict[socket.socket, socket.socket] = {tls: plain, plain: tls}
        try:
            while not self._closed.is_set():
                # Bytes already decrypted inside the SSL object do not make the socket readable.
                readable = [tls] if tls.pending() else select.select([tls, plain], [], [], 0.1)[0]
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    peers[src].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (tls, plain):
                with contextlib.suppress(OSError):
                    sock.close()


# -- PostgreSQL with TLS ---------------------------------------------------------------------


def postgres_with_tls(server: KeyPair) -> PgServer:
    """A throwaway cluster (not started) with ssl=on and `server`'s certificate, TCP on 127.0.0.1
    only, TLS required by pg_hba.conf; the tests' own connections use TLS too."""
    return PgServer(
        settings={"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"},
        hba=["hostssl all all 127.0.0.1/32 trust", "hostnossl all all 127.0.0.1/32 reject"],
        files={"server.crt": server.cert, "server.key": server.key},
        connect_options={"sslmode": "require"},
    )


def _close_after_alert(raw: socket.socket) -> None:
    """Close gracefully after a failed handshake, so the client reads the TLS alert.

    With TLS 1.3 the client has already sent its first bytes when the server
    refuses its (missing) certificate; closing with those bytes unread would
    reset the connection, and the client could see the reset before the alert.
    """
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(1.0)
        while raw.recv(4096):
            pass
    with contextlib.suppress(OSError):
        raw.close()
