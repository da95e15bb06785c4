"""Service configuration: read once from the environment into a frozen dataclass.

Nothing else in the service reads the environment. Every variable the seed
description names keeps its name and default; the ones added since are listed
in the README and in `.env.example`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

from votes import DEFAULT_LAW_ID_PATTERN

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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

    postgres_host: str = "localhost"
    postgres_port: int = 5432
    postgres_db: str = "election_votes"
    postgres_user: str = "postgres"
    postgres_password: str = field(default="", repr=False)
    postgres_min_connections: int = 2
    postgres_max_connections: int = 10
    postgres_connect_timeout_s: int = 5
    postgres_query_timeout_s: float = 30.0

    batch_size: int = 200
    batch_timeout_s: float = 1.0

    max_retry_attempts: int = 3
    retry_delay_s: float = 1.0
    retry_max_delay_s: float = 30.0

    max_message_bytes: int = 4096
    law_id_pattern: re.Pattern[str] = DEFAULT_LAW_ID_PATTERN
    metrics_max_laws: int = 1000
    shutdown_timeout_s: float = 15.0

    prometheus_port: int = 8001
    prometheus_bind_address: str = "0.0.0.0"
    log_level: str = "INFO"

    def rabbitmq_url_for_logs(self) -> str:
        """Where RabbitMQ is, for log lines: never the password."""
        vhost = self.rabbitmq_vhost if self.rabbitmq_vhost.startswith("/") else f"/{self.rabbitmq_vhost}"
        return f"amqp://{self.rabbitmq_user}@{self.rabbitmq_host}:{self.rabbitmq_port}{vhost}"

    @property
    def dead_letter_exchange(self) -> str:
        return self.rabbitmq_dead_letter_exchange or f"{self.rabbitmq_queue}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return self.rabbitmq_dead_letter_queue or f"{self.rabbitmq_queue}.dead"

    def postgres_target_for_logs(self) -> str:
        return f"postgresql://{self.postgres_user}@{self.postgres_host}:{self.postgres_port}/{self.postgres_db}"

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
    "RABBITMQ_HOST": ("rabbitmq_host", _parse_str, None),
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
    "POSTGRES_HOST": ("postgres_host", _parse_str, None),
    "POSTGRES_PORT": ("postgres_port", _parse_int, _port),
    "POSTGRES_DB": ("postgres_db", _parse_str, None),
    "POSTGRES_USER": ("postgres_user", _parse_str, None),
    "POSTGRES_PASSWORD": ("postgres_password", _password, None),
    "POSTGRES_MIN_CONNECTIONS": ("postgres_min_connections", _parse_int, _at_least(1)),
    "POSTGRES_MAX_CONNECTIONS": ("postgres_max_connections", _parse_int, _at_least(1)),
    "POSTGRES_CONNECT_TIMEOUT_SECONDS": ("postgres_connect_timeout_s", _parse_int, _at_least(1)),
    "POSTGRES_QUERY_TIMEOUT_SECONDS": ("postgres_query_timeout_s", _parse_float, _at_least(1)),
    "BATCH_SIZE": ("batch_size", _parse_int, _at_least(1)),
    "BATCH_TIMEOUT_SECONDS": ("batch_timeout_s", _parse_float, _positive),
    "MAX_RETRY_ATTEMPTS": ("max_retry_attempts", _parse_int, _at_least(1)),
    "RETRY_DELAY_SECONDS": ("retry_delay_s", _parse_float, _positive),
    "RETRY_MAX_DELAY_SECONDS": ("retry_max_delay_s", _parse_float, _positive),
    "MAX_MESSAGE_BYTES": ("max_message_bytes", _parse_int, _at_least(256)),
    "LAW_ID_PATTERN": ("law_id_pattern", _pattern, None),
    "METRICS_MAX_LAWS": ("metrics_max_laws", _parse_int, _at_least(1)),
    "SHUTDOWN_TIMEOUT_SECONDS": ("shutdown_timeout_s", _parse_float, _positive),
    "PROMETHEUS_PORT": ("prometheus_port", _parse_int, _port),
    "PROMETHEUS_BIND_ADDRESS": ("prometheus_bind_address", _parse_str, None),
    "LOG_LEVEL": ("log_level", _log_level, None),
}

assert {f.name for f in fields(Config)} == {spec[0] for spec in _VARIABLES.values()}


def variables() -> dict[str, object]:
    """Every variable the service reads, with its default (for docs and tests)."""
    defaults = Config()
    values = {name: getattr(defaults, spec[0]) for name, spec in _VARIABLES.items()}
    return {name: v.pattern if isinstance(v, re.Pattern) else v for name, v in values.items()}


def load_config(environ: Mapping[str, str]) -> Config:
    """Build the configuration from `environ`; raise ConfigError on the first bad value."""
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
    if config.postgres_min_connections > config.postgres_max_connections:
        raise ConfigError(
            "POSTGRES_MIN_CONNECTIONS must not exceed POSTGRES_MAX_CONNECTIONS, got "
            f"{config.postgres_min_connections} > {config.postgres_max_connections}"
        )
    return config
