"""Locking the metrics port: TLS and HTTP basic authentication with bcrypt password hashes.

In the spirit of Prometheus' exporter-toolkit web configuration (`tls_server_config`,
`basic_auth_users`): a certificate and key, and users whose passwords are stored only as
bcrypt hashes, one `user:hash` line each, as `htpasswd -nB user` prints them. The health
endpoints stay open (docs/security.md#the-metrics-port).
"""

from __future__ import annotations

import base64
import hmac
import os
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from config import Config

# $2a$, $2b$ or $2y$ (htpasswd writes 2y), a cost of 04 to 31, 22 characters of salt and 31 of hash.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# Credentials found good are remembered (as an HMAC under a key of this process), so that a
# scrape every few seconds does not cost a bcrypt check each; a full set is simply emptied.
_VERIFIED_MAX = 64
# The longest a client may take over the TLS handshake and each read of its request.
HANDSHAKE_TIMEOUT_S = 10.0


class BasicAuth:
    """Checks `Authorization: Basic ...` headers against bcrypt hashes.

    bcrypt is slow on purpose (tens to hundreds of milliseconds): one check runs at a time, so
    a flood of guesses takes one core at most and queues; a known scraper's credentials are
    answered from memory without queueing. An unknown user is checked against a dummy hash
    of the same cost, so that the answer's timing does not tell which users exist.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._one_at_a_time = threading.Semaphore(1)
        cost = int(next(iter(users.values()))[4:6]) if users else 10
        self._dummy = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(rounds=cost))

    def refusal(self, header: str | None) -> str | None:
        """None when the header carries a known user's password, else why not: "missing" or "wrong"."""
        if not header:
            return "missing"
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return "missing"
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except ValueError:  # binascii.Error: not base64
            return "wrong"
        user, colon, password = decoded.partition(b":")
        if not colon:
            return "wrong"
        key = hmac.new(self._key, decoded, "sha256").digest()
        with self._lock:
            if key in self._verified:
                return None
        if not self._bcrypt_matches(user, password):
            return "wrong"
        with self._lock:
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified.add(key)
        return None

    def _bcrypt_matches(self, user: bytes, password: bytes) -> bool:
        hashed = self._users.get(user.decode("utf-8", errors="replace"))
        with self._one_at_a_time:
            try:
                matches = bcrypt.checkpw(password, hashed if hashed is not None else self._dummy)
            except ValueError:  # bcrypt 5 refuses passwords longer than 72 bytes
                return False
        return matches and hashed is not None


def load_users(path: str) -> dict[str, bytes]:
    """`user:bcrypt-hash` lines (blank lines and `#` comments skipped); ValueError names the line, never its hash."""
    users: dict[str, bytes] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise ValueError(f"line {number} is not <user>:<bcrypt hash>")
        if not _BCRYPT_HASH.fullmatch(hashed):
            raise ValueError(
                f"line {number}: the password of {user!r} is not a bcrypt hash (make one with: htpasswd -nB {user})"
            )
        if user in users:
            raise ValueError(f"line {number}: user {user!r} appears twice")
        users[user] = hashed.encode()
    if not users:
        raise ValueError("no user in it")
    return users


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


@dataclass(frozen=True)
class Lock:
    """What guards the metrics port; both None when it is open."""

    tls: ssl.SSLContext | None
    auth: BasicAuth | None


def load(config: Config) -> Lock:
    """The metrics port's TLS and users, from the configuration; ValueError names the variable."""
    tls = None
    if config.prometheus_tls_cert_file:
        try:
            tls = server_context(config.prometheus_tls_cert_file, config.prometheus_tls_key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                "PROMETHEUS_TLS_CERT_FILE/PROMETHEUS_TLS_KEY_FILE: cannot use "
                f"{config.prometheus_tls_cert_file} with {config.prometheus_tls_key_file}: {exc}"
            ) from None
    auth = None
    if config.prometheus_basic_auth_users_file:
        try:
            auth = BasicAuth(load_users(config.prometheus_basic_auth_users_file))
        except (ValueError, OSError) as exc:
            raise ValueError(
                f"PROMETHEUS_BASIC_AUTH_USERS_FILE {config.prometheus_basic_auth_users_file}: {exc}"
            ) from None
    return Lock(tls=tls, auth=auth)
