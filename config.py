"""Service configuration: read once from the environment into a frozen dataclass.

Nothing else in the service reads the environment. Every variable the seed
description names keeps its name and default; the ones added since are listed
in docs/configuration.md (generated from this file) and in `.env.example`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from votes import DEFAULT_LAW_ID_PATTERN

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PYPROJECT = Path(__file__).with_name("pyproject.toml")


def version() -> str:
    """The service's version: `[project] version` in pyproject.toml, its one home."""
    with PYPROJECT.open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def load_env_file() -> bool:
    """Read `.env` from the working directory only, never from a parent directory.

    Variables already set (systemd's EnvironmentFile=, docker -e) win over it.
    """
    from dotenv import load_dotenv

    return load_dotenv(Path.cwd() / ".env")


class ConfigError(ValueError):
    """A variable is missing a usable value; the message names it and the value."""


@dataclass(frozen=True)
class Config:
    rabbitmq_host: str = "localhost"
    rabbitmq_port: int = 5672
    rabbitmq_user: str = "guest"
    rabbitmq_password: str = field(default="guest", repr=False)
    rabbitmq_vhost: str = "/"
    rabbitmq_queue: str = "votes.aggregation"
    rabbitmq_prefetch_count: int = 1000
    rabbitmq_heartbeat_s: int = 30
    rabbitmq_reconnect_max_delay_s: float = 30.0
    # Dead-lettering, set up only when the service declares the queue itself.
    # Empty names mean "<RABBITMQ_QUEUE>.dlx" and "<RABBITMQ_QUEUE>.dead".
    rabbitmq_dead_lettering: bool = True
    rabbitmq_dead_letter_exchange: str = ""
    rabbitmq_dead_letter_queue: str = ""
    # The type of a queue the service declares itself; an existing queue is used as it is.
    rabbitmq_queue_type: str = "quorum"
    rabbitmq_delivery_limit: int = 20
    rabbitmq_tls: bool = False
    rabbitmq_tls_ca_file: str = ""
    rabbitmq_tls_cert_file: str = ""
    rabbitmq_tls_key_file: str = ""
    rabbitmq_tls_verify_hostname: bool = True
    rabbitmq_tls_server_name: str = ""

    postgres_host: str = "localhost"  # libpq's list: "db1,db2"
    postgres_port: int | tuple[int, ...] = 5432  # one port for every host, or one per host
    postgres_db: str = "election_votes"
    postgres_user: str = "postgres"
    postgres_password: str = field(default="", repr=False)
    postgres_min_connections: int = 2
    postgres_max_connections: int = 10
    postgres_connect_timeout_s: int = 5
    postgres_query_timeout_s: float = 30.0
    postgres_idle_in_transaction_timeout_s: float = 30.0
    postgres_sslmode: str = "prefer"
    postgres_sslrootcert: str = ""
    postgres_sslcert: str = ""
    postgres_sslkey: str = ""
    postgres_require_sync_standby: bool = False
    postgres_replication_check_interval_s: float = 5.0

    batch_size: int = 200
    batch_timeout_s: float = 1.0
    flush_workers: int = 1

    max_retry_attempts: int = 3
    retry_delay_s: float = 1.0
    retry_max_delay_s: float = 30.0

    max_message_bytes: int = 4096
    law_id_pattern: re.Pattern[str] = DEFAULT_LAW_ID_PATTERN
    metrics_max_laws: int = 1000
    shutdown_timeout_s: float = 15.0
    stall_timeout_s: float = 120.0
    # More votes than this refused as `unexpected` within the window is a systematic failure: stop.
    max_unexpected_rejections: int = 10
    unexpected_rejections_window_s: float = 60.0

    prometheus_port: int = 8001
    # All interfaces: Prometheus scrapes from another host or container. Lock the port with
    # PROMETHEUS_TLS_* and PROMETHEUS_BASIC_AUTH_USERS_FILE, or bind 127.0.0.1 (docs/security.md).
    prometheus_bind_address: str = "0.0.0.0"  # noqa: S104
    prometheus_tls_cert_file: str = ""
    prometheus_tls_key_file: str = ""
    prometheus_basic_auth_users_file: str = ""
    # Withhold per-law counts from metrics, logs and health answers (docs/security.md#the-results-embargo).
    results_embargo: bool = True
    log_level: str = "INFO"
    log_format: str = "text"
    log_summary_interval_s: float = 10.0
    # Signed chain heads kept outside the database (docs/security.md#signed-heads).
    chain_signing_key_file: str = ""
    chain_heads_file: str = "chain-heads.jsonl"
    chain_heads_exchange: str = "vote.chain-heads"
    chain_heads_interval_s: float = 10.0

    def rabbitmq_url_for_logs(self, node: tuple[str, int] | None = None) -> str:
        """Where RabbitMQ is (one node, or every node), for log lines: never the password."""
        vhost = self.rabbitmq_vhost if self.rabbitmq_vhost.startswith("/") else f"/{self.rabbitmq_vhost}"
        where = ",".join(node_text(host, port) for host, port in ([node] if node else self.rabbitmq_nodes))
        return f"amqp://{self.rabbitmq_user}@{where}{vhost}"

    @property
    def rabbitmq_nodes(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every RABBITMQ_HOST entry, in the order given."""
        return tuple(_split_node(entry, self.rabbitmq_port) for entry in self.rabbitmq_host.split(","))

    @property
    def dead_letter_exchange(self) -> str:
        return self.rabbitmq_dead_letter_exchange or f"{self.rabbitmq_queue}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return self.rabbitmq_dead_letter_queue or f"{self.rabbitmq_queue}.dead"

    def postgres_target_for_logs(self) -> str:
        where = ",".join(node_text(host, port) for host, port in self.postgres_servers)
        return f"postgresql://{self.postgres_user}@{where}/{self.postgres_db}"

    @property
    def postgres_servers(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every POSTGRES_HOST entry, as libpq pairs them."""
        hosts = self.postgres_host.split(",")
        ports = self.postgres_port if isinstance(self.postgres_port, tuple) else (self.postgres_port,)
        if len(ports) == 1:
            ports = ports * len(hosts)
        return tuple(zip(hosts, ports, strict=True))

    @property
    def postgres_libpq_port(self) -> str:
        """POSTGRES_PORT as libpq's `port` takes it: "5432", or "5451,5452"."""
        ports = self.postgres_port if isinstance(self.postgres_port, tuple) else (self.postgres_port,)
        return ",".join(str(port) for port in ports)

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    return value


def _parse_str(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name} must not be empty")
    return value


def _password(name: str, raw: str) -> str:
    # Kept verbatim (spaces may be part of a password) and never echoed in errors.
    return raw


_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")


def _queue_name(name: str, raw: str) -> str:
    value = raw.strip()
    if not _QUEUE_NAME.fullmatch(value):
        raise ConfigError(f"{name} must be 1-255 letters, digits or . _ : -, got {raw!r}")
    return value


_HOST_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,253}")


def node_text(host: str, port: int) -> str:
    """host:port for messages and metric labels, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_node(entry: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[ipv6]` or `[ipv6]:port` as (host, port); ValueError when malformed."""
    host, port = entry, None
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(entry)
        port = rest[1:] if rest else None
        ipaddress.IPv6Address(host)
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    elif ":" in entry:
        ipaddress.IPv6Address(entry)  # a bare IPv6 address, without a port
    if ":" not in host and not _HOST_NAME.fullmatch(host):
        raise ValueError(entry)
    if port is None:
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(entry)
    return host, int(port)


def _node_list(name: str, raw: str) -> str:
    """RABBITMQ_HOST: one host, or cluster nodes as `host` / `host:port` entries separated by commas."""
    entries = [entry.strip() for entry in raw.split(",")]
    for entry in entries:
        try:
            _split_node(entry, 1)
        except ValueError:
            raise ConfigError(
                f"{name} must be host or host:port entries (port 1-65535) separated by commas, "
                f"got {raw!r} (entry {entry!r})"
            ) from None
    return ",".join(entries)


def _libpq_hosts(name: str, raw: str) -> str:
    """POSTGRES_HOST: libpq's list of hosts, addresses or socket directories, separated by commas."""
    entries = [entry.strip() for entry in raw.split(",")]
    for entry in entries:
        if not entry or any(c.isspace() for c in entry):
            raise ConfigError(f"{name} must be hosts separated by commas, got {raw!r}")
        if not entry.startswith("/") and ":" in entry and not _is_ipv6(entry):
            # libpq would look up "db1:5433" as a host name and fail on every attempt.
            raise ConfigError(
                f"{name} takes hosts only, ports go in POSTGRES_PORT (one for all, or one per host), "
                f"got {raw!r} (entry {entry!r})"
            )
    return ",".join(entries)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _libpq_ports(name: str, raw: str) -> int | tuple[int, ...]:
    """POSTGRES_PORT: one port (an int, as always), or one per POSTGRES_HOST entry (a tuple)."""
    if "," not in raw:
        return _parse_int(name, raw)  # the range is checked with the other ports (_port)
    ports = []
    for part in raw.split(","):
        port = part.strip()
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{name} must be TCP ports between 1 and 65535 separated by commas, got {raw!r}")
        ports.append(int(port))
    return tuple(ports)


_QUEUE_TYPES = ("quorum", "classic")


def _queue_type(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in _QUEUE_TYPES:
        raise ConfigError(f"{name} must be one of {', '.join(_QUEUE_TYPES)}, got {raw!r}")
    return value


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _pattern(name: str, raw: str) -> re.Pattern[str]:
    try:
        return re.compile(raw.strip())
    except re.error as exc:
        raise ConfigError(f"{name} is not a valid regular expression ({exc}), got {raw!r}") from None


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _sslmode(name: str, raw: str) -> str:
    value = raw.strip()
    if value not in _SSLMODES:
        raise ConfigError(f"{name} must be one of {', '.join(_SSLMODES)}, got {raw!r}")
    return value


def _log_format(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("text", "json"):
        raise ConfigError(f"{name} must be text or json, got {raw!r}")
    return value


def _file(name: str, raw: str) -> str:
    value = raw.strip()
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ConfigError(f"{name} must name a readable file, got {raw!r}")
    return value


def _log_level(name: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in LOG_LEVELS:
        raise ConfigError(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


def _at_least(minimum: float) -> Callable[[str, float], None]:
    def check(name: str, value: float) -> None:
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum:g}, got {value!r}")

    return check


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {value!r}")


def _port(name: str, value: float) -> None:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{name} must be a TCP port between 1 and 65535, got {value!r}")


# variable name -> (dataclass field, parser, extra check)
_VARIABLES: dict[str, tuple[str, Callable[[str, str], object], Callable[[str, float], None] | None]] = {
    "RABBITMQ_HOST": ("rabbitmq_host", _node_list, None),
    "RABBITMQ_PORT": ("rabbitmq_port", _parse_int, _port),
    "RABBITMQ_USER": ("rabbitmq_user", _parse_str, None),
    "RABBITMQ_PASSWORD": ("rabbitmq_password", _password, None),
    "RABBITMQ_VHOST": ("rabbitmq_vhost", _parse_str, None),
    "RABBITMQ_QUEUE": ("rabbitmq_queue", _queue_name, None),
    "RABBITMQ_PREFETCH_COUNT": ("rabbitmq_prefetch_count", _parse_int, _at_least(1)),
    "RABBITMQ_HEARTBEAT_SECONDS": ("rabbitmq_heartbeat_s", _parse_int, _at_least(0)),
    "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": ("rabbitmq_reconnect_max_delay_s", _parse_float, _positive),
    "RABBITMQ_DEAD_LETTERING": ("rabbitmq_dead_lettering", _bool, None),
    "RABBITMQ_DEAD_LETTER_EXCHANGE": ("rabbitmq_dead_letter_exchange", _queue_name, None),
    "RABBITMQ_DEAD_LETTER_QUEUE": ("rabbitmq_dead_letter_queue", _queue_name, None),
    "RABBITMQ_QUEUE_TYPE": ("rabbitmq_queue_type", _queue_type, None),
    "RABBITMQ_DELIVERY_LIMIT": ("rabbitmq_delivery_limit", _parse_int, _at_least(1)),
    "RABBITMQ_TLS": ("rabbitmq_tls", _bool, None),
    "RABBITMQ_TLS_CA_FILE": ("rabbitmq_tls_ca_file", _file, None),
    "RABBITMQ_TLS_CERT_FILE": ("rabbitmq_tls_cert_file", _file, None),
    "RABBITMQ_TLS_KEY_FILE": ("rabbitmq_tls_key_file", _file, None),
    "RABBITMQ_TLS_VERIFY_HOSTNAME": ("rabbitmq_tls_verify_hostname", _bool, None),
    "RABBITMQ_TLS_SERVER_NAME": ("rabbitmq_tls_server_name", _parse_str, None),
    "POSTGRES_HOST": ("postgres_host", _libpq_hosts, None),
    "POSTGRES_PORT": ("postgres_port", _libpq_ports, _port),
    "POSTGRES_DB": ("postgres_db", _parse_str, None),
    "POSTGRES_USER": ("postgres_user", _parse_str, None),
    "POSTGRES_PASSWORD": ("postgres_password", _password, None),
    "POSTGRES_MIN_CONNECTIONS": ("postgres_min_connections", _parse_int, _at_least(1)),
    "POSTGRES_MAX_CONNECTIONS": ("postgres_max_connections", _parse_int, _at_least(1)),
    "POSTGRES_CONNECT_TIMEOUT_SECONDS": ("postgres_connect_timeout_s", _parse_int, _at_least(1)),
    "POSTGRES_QUERY_TIMEOUT_SECONDS": ("postgres_query_timeout_s", _parse_float, _at_least(1)),
    "POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": ("postgres_idle_in_transaction_timeout_s", _parse_float, _positive),
    "POSTGRES_SSLMODE": ("postgres_sslmode", _sslmode, None),
    "POSTGRES_SSLROOTCERT": ("postgres_sslrootcert", _file, None),
    "POSTGRES_SSLCERT": ("postgres_sslcert", _file, None),
    "POSTGRES_SSLKEY": ("postgres_sslkey", _file, None),
    "POSTGRES_REQUIRE_SYNC_STANDBY": ("postgres_require_sync_standby", _bool, None),
    "POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS": ("postgres_replication_check_interval_s", _parse_float, _positive),
    "BATCH_SIZE": ("batch_size", _parse_int, _at_least(1)),
    "BATCH_TIMEOUT_SECONDS": ("batch_timeout_s", _parse_float, _positive),
    "FLUSH_WORKERS": ("flush_workers", _parse_int, _at_least(1)),
    "MAX_RETRY_ATTEMPTS": ("max_retry_attempts", _parse_int, _at_least(1)),
    "RETRY_DELAY_SECONDS": ("retry_delay_s", _parse_float, _positive),
    "RETRY_MAX_DELAY_SECONDS": ("retry_max_delay_s", _parse_float, _positive),
    "MAX_MESSAGE_BYTES": ("max_message_bytes", _parse_int, _at_least(256)),
    "LAW_ID_PATTERN": ("law_id_pattern", _pattern, None),
    "METRICS_MAX_LAWS": ("metrics_max_laws", _parse_int, _at_least(1)),
    "SHUTDOWN_TIMEOUT_SECONDS": ("shutdown_timeout_s", _parse_float, _positive),
    "STALL_TIMEOUT_SECONDS": ("stall_timeout_s", _parse_float, _positive),
    "MAX_UNEXPECTED_REJECTIONS": ("max_unexpected_rejections", _parse_int, _at_least(0)),
    "UNEXPECTED_REJECTIONS_WINDOW_SECONDS": ("unexpected_rejections_window_s", _parse_float, _positive),
    "PROMETHEUS_PORT": ("prometheus_port", _parse_int, _port),
    "PROMETHEUS_BIND_ADDRESS": ("prometheus_bind_address", _parse_str, None),
    "PROMETHEUS_TLS_CERT_FILE": ("prometheus_tls_cert_file", _file, None),
    "PROMETHEUS_TLS_KEY_FILE": ("prometheus_tls_key_file", _file, None),
    "PROMETHEUS_BASIC_AUTH_USERS_FILE": ("prometheus_basic_auth_users_file", _file, None),
    "RESULTS_EMBARGO": ("results_embargo", _bool, None),
    "LOG_LEVEL": ("log_level", _log_level, None),
    "LOG_FORMAT": ("log_format", _log_format, None),
    "LOG_SUMMARY_INTERVAL_SECONDS": ("log_summary_interval_s", _parse_float, _at_least(0)),
    "CHAIN_SIGNING_KEY_FILE": ("chain_signing_key_file", _file, None),
    "CHAIN_HEADS_FILE": ("chain_heads_file", _parse_str, None),
    "CHAIN_HEADS_EXCHANGE": ("chain_heads_exchange", _parse_str, None),
    "CHAIN_HEADS_INTERVAL_SECONDS": ("chain_heads_interval_s", _parse_float, _positive),
}

# One line per variable, for --help (and kept in step with .env.example by a test).
HELP: dict[str, str] = {
    "RABBITMQ_HOST": "broker host, or the nodes of a cluster: host or host:port entries separated by commas",
    "RABBITMQ_PORT": "broker port (5671 is the usual one for TLS), for RABBITMQ_HOST entries without one",
    "RABBITMQ_USER": "broker user",
    "RABBITMQ_PASSWORD": "broker password (never logged)",
    "RABBITMQ_VHOST": "virtual host",
    "RABBITMQ_QUEUE": "queue to consume; used as it is if it exists, declared durable if not",
    "RABBITMQ_PREFETCH_COUNT": "unacked messages at once; bounds memory; keep it >= 2 x BATCH_SIZE",
    "RABBITMQ_HEARTBEAT_SECONDS": "AMQP heartbeat (0 disables)",
    "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": "cap of the reconnection backoff",
    "RABBITMQ_DEAD_LETTERING": "declare a dead-letter exchange and queue with a queue the service declares",
    "RABBITMQ_DEAD_LETTER_EXCHANGE": "dead-letter exchange (default <RABBITMQ_QUEUE>.dlx)",
    "RABBITMQ_DEAD_LETTER_QUEUE": "dead-letter queue (default <RABBITMQ_QUEUE>.dead)",
    "RABBITMQ_QUEUE_TYPE": "quorum (replicated across a cluster) or classic: the type of the queues the service "
    "declares; an existing queue is used as it is",
    "RABBITMQ_DELIVERY_LIMIT": "deliveries of one message from a quorum queue the service declares before it is "
    "dead-lettered (a message that keeps killing consumers)",
    "RABBITMQ_TLS": "connect with TLS (amqps)",
    "RABBITMQ_TLS_CA_FILE": "CA certificates to verify the broker with (default: the system's)",
    "RABBITMQ_TLS_CERT_FILE": "client certificate, for brokers that require one",
    "RABBITMQ_TLS_KEY_FILE": "client certificate's private key",
    "RABBITMQ_TLS_VERIFY_HOSTNAME": "check that the broker's certificate names the host",
    "RABBITMQ_TLS_SERVER_NAME": "name expected in the broker's certificate (default: the host of each "
    "RABBITMQ_HOST entry)",
    "POSTGRES_HOST": "database host, or several separated by commas (primary and standbys): only a server that "
    "accepts writes is used",
    "POSTGRES_PORT": "database port, or one per POSTGRES_HOST entry separated by commas",
    "POSTGRES_DB": "database name",
    "POSTGRES_USER": "database user",
    "POSTGRES_PASSWORD": "database password (never logged)",
    "POSTGRES_MIN_CONNECTIONS": "connections opened at start-up",
    "POSTGRES_MAX_CONNECTIONS": "pool limit",
    "POSTGRES_CONNECT_TIMEOUT_SECONDS": "wait for a new connection",
    "POSTGRES_QUERY_TIMEOUT_SECONDS": "statement timeout; a connection silent 5 s longer is dropped",
    "POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": (
        "the server ends a transaction left idle this long (a frozen or cut-off instance), freeing its row locks"
    ),
    "POSTGRES_SSLMODE": "libpq sslmode: disable, allow, prefer, require, verify-ca or verify-full",
    "POSTGRES_SSLROOTCERT": "CA certificates to verify the server with (verify-ca, verify-full)",
    "POSTGRES_SSLCERT": "client certificate",
    "POSTGRES_SSLKEY": "client certificate's private key",
    "POSTGRES_REQUIRE_SYNC_STANDBY": "stop consuming (votes stay in RabbitMQ) while no synchronous standby has every "
    "commit, and ack a batch only once one is known to have its commit, so that an acked vote survives losing the "
    "primary",
    "POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS": "how often the primary's replication state is read (logged when "
    "it changes, exported as metrics)",
    "BATCH_SIZE": "votes per batch",
    "BATCH_TIMEOUT_SECONDS": "a batch is written once its oldest vote has waited this long",
    "FLUSH_WORKERS": "batches written at once, each on its own connection; acks stay in delivery order",
    "MAX_RETRY_ATTEMPTS": "retries of a failed batch write after the first try",
    "RETRY_DELAY_SECONDS": "first retry wait; doubles each retry",
    "RETRY_MAX_DELAY_SECONDS": "cap of the retry waits; a batch is never dropped",
    "MAX_MESSAGE_BYTES": "larger message bodies are rejected unparsed",
    "LAW_ID_PATTERN": "regular expression a whole law_id must match",
    "METRICS_MAX_LAWS": "distinct law_id label values in the metrics",
    "SHUTDOWN_TIMEOUT_SECONDS": "time budget of a graceful stop; past it (plus 3 s) the process exits even if "
    "RabbitMQ does not answer",
    "STALL_TIMEOUT_SECONDS": "/healthz fails and systemd's watchdog is no longer fed when a vote has waited this "
    "long for its ack while PostgreSQL answers, or when messages are ready in the queue and none has been "
    "received for this long (unless held back on purpose)",
    "MAX_UNEXPECTED_REJECTIONS": "votes whose write raised an unexpected error dead-lettered within "
    "UNEXPECTED_REJECTIONS_WINDOW_SECONDS; one more is a systematic failure: the service stops (exit 1) and "
    "leaves the rest in RabbitMQ",
    "UNEXPECTED_REJECTIONS_WINDOW_SECONDS": "the window MAX_UNEXPECTED_REJECTIONS counts over",
    "PROMETHEUS_PORT": "port of /metrics, /healthz and /readyz",
    "PROMETHEUS_BIND_ADDRESS": "address that port listens on (:: for every IPv6 and IPv4 address)",
    "PROMETHEUS_TLS_CERT_FILE": "serve that port over TLS with this certificate (chain), PEM",
    "PROMETHEUS_TLS_KEY_FILE": "the certificate's private key, PEM",
    "PROMETHEUS_BASIC_AUTH_USERS_FILE": "user:bcrypt-hash lines (htpasswd -nB); /metrics then requires one of them "
    "(/healthz, /readyz stay open)",
    "RESULTS_EMBARGO": "withhold per-law counts and shares from metrics and logs (true while polls are open)",
    "LOG_LEVEL": "DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "LOG_FORMAT": "text, or json for one JSON object per line",
    "LOG_SUMMARY_INTERVAL_SECONDS": "how often an INFO line sums up throughput and errors (0: never)",
    "CHAIN_SIGNING_KEY_FILE": "Ed25519 private key (PEM) that signs this instance's chain heads; unset: a development "
    "key made on first run, with a warning",
    "CHAIN_HEADS_FILE": "signed chain heads are appended here, one JSON line each, periodically and at each stop",
    "CHAIN_HEADS_EXCHANGE": "the same lines are published to this fanout exchange, for observers "
    "(empty: not published)",
    "CHAIN_HEADS_INTERVAL_SECONDS": "how often the heads of the chains that grew are signed and recorded",
}

# Secrets that may be read from a file instead (Kubernetes and Docker mount secrets as files):
# NAME_FILE names the file, whose content less one trailing newline is the value of NAME.
SECRET_FILES: dict[str, str] = {
    "RABBITMQ_PASSWORD_FILE": "RABBITMQ_PASSWORD",
    "POSTGRES_PASSWORD_FILE": "POSTGRES_PASSWORD",
}
SECRET_FILES_HELP: dict[str, str] = {
    file_name: f"file holding {name} (one trailing newline is dropped); set one of the two, not both"
    for file_name, name in SECRET_FILES.items()
}

# Developer invariants, checked on import by every test run; not input validation.
assert {f.name for f in fields(Config)} == {spec[0] for spec in _VARIABLES.values()}  # noqa: S101
assert set(HELP) == set(_VARIABLES)  # noqa: S101


def variables() -> dict[str, object]:
    """Every variable the service reads, with its default (for docs and tests)."""
    defaults = Config()
    values = {name: getattr(defaults, spec[0]) for name, spec in _VARIABLES.items()}
    return {name: v.pattern if isinstance(v, re.Pattern) else v for name, v in values.items()}


def load_config(environ: Mapping[str, str]) -> Config:
    """Build the configuration from `environ`; raise ConfigError on the first bad value."""
    environ = _with_secret_files(environ)
    values: dict[str, object] = {}
    for name, (attr, parse, check) in _VARIABLES.items():
        raw = environ.get(name)
        if raw is None or (raw.strip() == "" and parse is not _password):
            continue
        value = parse(name, raw)
        if check is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            check(name, value)
        values[attr] = value
    config = Config(**values)  # type: ignore[arg-type]
    if bool(config.rabbitmq_tls_cert_file) != bool(config.rabbitmq_tls_key_file):
        raise ConfigError("RABBITMQ_TLS_CERT_FILE and RABBITMQ_TLS_KEY_FILE must be set together")
    if bool(config.prometheus_tls_cert_file) != bool(config.prometheus_tls_key_file):
        raise ConfigError("PROMETHEUS_TLS_CERT_FILE and PROMETHEUS_TLS_KEY_FILE must be set together")
    if config.flush_workers >= config.postgres_max_connections:
        raise ConfigError(
            "FLUSH_WORKERS must be below POSTGRES_MAX_CONNECTIONS (each writer holds a connection), got "
            f"{config.flush_workers} >= {config.postgres_max_connections}"
        )
    _check_server_lists(config)
    if config.postgres_min_connections > config.postgres_max_connections:
        raise ConfigError(
            "POSTGRES_MIN_CONNECTIONS must not exceed POSTGRES_MAX_CONNECTIONS, got "
            f"{config.postgres_min_connections} > {config.postgres_max_connections}"
        )
    return config


def _with_secret_files(environ: Mapping[str, str]) -> Mapping[str, str]:
    """`environ` with each NAME of SECRET_FILES read from the file NAME_FILE names, if one does."""
    read: dict[str, str] = {}
    for file_name, name in SECRET_FILES.items():
        path = environ.get(file_name)
        if path is None or not path.strip():
            continue
        if name in environ:
            # Which one would win is a guess an operator should not have to make (an old
            # password left in an environment file, the new one in the mounted secret).
            raise ConfigError(f"{name} and {file_name} are both set: set one of them")
        try:
            with open(_file(file_name, path), encoding="utf-8") as f:
                value = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file_name} could not be read ({exc.__class__.__name__}), got {path!r}") from None
        # `echo pw > file` and most editors end the file with a newline that is not part of the password.
        read[name] = value.removesuffix("\n").removesuffix("\r")
    return {**environ, **read} if read else environ


def _check_server_lists(config: Config) -> None:
    """libpq takes one port for every host or one per host; anything else fails on every connection."""
    hosts = config.postgres_host.split(",")
    if isinstance(config.postgres_port, tuple) and len(config.postgres_port) != len(hosts):
        raise ConfigError(
            f"POSTGRES_PORT must give one port, or one per POSTGRES_HOST entry: {len(config.postgres_port)} ports "
            f"for {len(hosts)} host{'' if len(hosts) == 1 else 's'}, got POSTGRES_PORT={config.postgres_libpq_port!r} "
            f"POSTGRES_HOST={config.postgres_host!r}"
        )
    if config.postgres_require_sync_standby and (
        config.postgres_replication_check_interval_s >= config.postgres_query_timeout_s
    ):
        # A commit left waiting for a standby that went away is not acked (replication.CommitCheck), but
        # the check should stop consuming before the batches behind it fill the prefetch window.
        raise ConfigError(
            "POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS must be below POSTGRES_QUERY_TIMEOUT_SECONDS with "
            f"POSTGRES_REQUIRE_SYNC_STANDBY=true, got {config.postgres_replication_check_interval_s:g} >= "
            f"{config.postgres_query_timeout_s:g}"
        )
