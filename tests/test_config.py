"""Unit tests of config.load_config: defaults, every variable, bad values, secrets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import config
from config import Config, ConfigError, load_config
from tests.support import run_cli, service_env

REPO_ROOT = Path(__file__).resolve().parent.parent

RABBIT_SECRET = "rabbit-S3cret-pw-7f1c"
PG_SECRET = "pg-S3cret-pw-9a2e"

# One non-default, valid value for every variable the service reads, and the
# field value it must produce.
A_FILE = __file__  # any readable file will do where a certificate path is expected

NON_DEFAULTS: dict[str, tuple[str, str, object]] = {
    "RABBITMQ_HOST": ("rabbit.example.org", "rabbitmq_host", "rabbit.example.org"),
    "RABBITMQ_PORT": ("5673", "rabbitmq_port", 5673),
    "RABBITMQ_USER": ("voter", "rabbitmq_user", "voter"),
    "RABBITMQ_PASSWORD": (RABBIT_SECRET, "rabbitmq_password", RABBIT_SECRET),
    "RABBITMQ_VHOST": ("/elections", "rabbitmq_vhost", "/elections"),
    "RABBITMQ_QUEUE": ("votes.other-queue", "rabbitmq_queue", "votes.other-queue"),
    "RABBITMQ_PREFETCH_COUNT": ("250", "rabbitmq_prefetch_count", 250),
    "RABBITMQ_HEARTBEAT_SECONDS": ("45", "rabbitmq_heartbeat_s", 45),
    "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": ("12.5", "rabbitmq_reconnect_max_delay_s", 12.5),
    "RABBITMQ_DEAD_LETTERING": ("false", "rabbitmq_dead_lettering", False),
    "RABBITMQ_DEAD_LETTER_EXCHANGE": ("audit.dlx", "rabbitmq_dead_letter_exchange", "audit.dlx"),
    "RABBITMQ_DEAD_LETTER_QUEUE": ("audit.rejected", "rabbitmq_dead_letter_queue", "audit.rejected"),
    "RABBITMQ_QUEUE_TYPE": ("classic", "rabbitmq_queue_type", "classic"),
    "RABBITMQ_DELIVERY_LIMIT": ("7", "rabbitmq_delivery_limit", 7),
    "RABBITMQ_TLS": ("true", "rabbitmq_tls", True),
    "RABBITMQ_TLS_CA_FILE": (A_FILE, "rabbitmq_tls_ca_file", A_FILE),
    "RABBITMQ_TLS_CERT_FILE": (A_FILE, "rabbitmq_tls_cert_file", A_FILE),
    "RABBITMQ_TLS_KEY_FILE": (A_FILE, "rabbitmq_tls_key_file", A_FILE),
    "RABBITMQ_TLS_VERIFY_HOSTNAME": ("false", "rabbitmq_tls_verify_hostname", False),
    "RABBITMQ_TLS_SERVER_NAME": ("broker.internal", "rabbitmq_tls_server_name", "broker.internal"),
    "POSTGRES_HOST": ("db.example.org", "postgres_host", "db.example.org"),
    "POSTGRES_PORT": ("6543", "postgres_port", 6543),
    "POSTGRES_DB": ("other_votes", "postgres_db", "other_votes"),
    "POSTGRES_USER": ("aggregator", "postgres_user", "aggregator"),
    "POSTGRES_PASSWORD": (PG_SECRET, "postgres_password", PG_SECRET),
    "POSTGRES_MIN_CONNECTIONS": ("3", "postgres_min_connections", 3),
    "POSTGRES_MAX_CONNECTIONS": ("20", "postgres_max_connections", 20),
    "POSTGRES_CONNECT_TIMEOUT_SECONDS": ("9", "postgres_connect_timeout_s", 9),
    "POSTGRES_QUERY_TIMEOUT_SECONDS": ("12", "postgres_query_timeout_s", 12.0),
    "POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": ("45", "postgres_idle_in_transaction_timeout_s", 45.0),
    "POSTGRES_SSLMODE": ("verify-full", "postgres_sslmode", "verify-full"),
    "POSTGRES_SSLROOTCERT": (A_FILE, "postgres_sslrootcert", A_FILE),
    "POSTGRES_SSLCERT": (A_FILE, "postgres_sslcert", A_FILE),
    "POSTGRES_SSLKEY": (A_FILE, "postgres_sslkey", A_FILE),
    "POSTGRES_REQUIRE_SYNC_STANDBY": ("true", "postgres_require_sync_standby", True),
    "POSTGRES_REPLICATION_CHECK_INTERVAL_SECONDS": ("2.5", "postgres_replication_check_interval_s", 2.5),
    "BATCH_SIZE": ("500", "batch_size", 500),
    "BATCH_TIMEOUT_SECONDS": ("2.5", "batch_timeout_s", 2.5),
    "FLUSH_WORKERS": ("3", "flush_workers", 3),
    "MAX_RETRY_ATTEMPTS": ("7", "max_retry_attempts", 7),
    "RETRY_DELAY_SECONDS": ("0.25", "retry_delay_s", 0.25),
    "RETRY_MAX_DELAY_SECONDS": ("60", "retry_max_delay_s", 60.0),
    "MAX_MESSAGE_BYTES": ("8192", "max_message_bytes", 8192),
    "LAW_ID_PATTERN": ("law-[0-9]{3}", "law_id_pattern", re.compile("law-[0-9]{3}")),
    "METRICS_MAX_LAWS": ("50", "metrics_max_laws", 50),
    "SHUTDOWN_TIMEOUT_SECONDS": ("30", "shutdown_timeout_s", 30.0),
    "STALL_TIMEOUT_SECONDS": ("45", "stall_timeout_s", 45.0),
    "MAX_UNEXPECTED_REJECTIONS": ("3", "max_unexpected_rejections", 3),
    "UNEXPECTED_REJECTIONS_WINDOW_SECONDS": ("30", "unexpected_rejections_window_s", 30.0),
    "PROMETHEUS_PORT": ("9100", "prometheus_port", 9100),
    "PROMETHEUS_BIND_ADDRESS": ("127.0.0.1", "prometheus_bind_address", "127.0.0.1"),
    "PROMETHEUS_TLS_CERT_FILE": (A_FILE, "prometheus_tls_cert_file", A_FILE),
    "PROMETHEUS_TLS_KEY_FILE": (A_FILE, "prometheus_tls_key_file", A_FILE),
    "PROMETHEUS_BASIC_AUTH_USERS_FILE": (A_FILE, "prometheus_basic_auth_users_file", A_FILE),
    "RESULTS_EMBARGO": ("false", "results_embargo", False),
    "LOG_LEVEL": ("WARNING", "log_level", "WARNING"),
    "LOG_FORMAT": ("json", "log_format", "json"),
    "LOG_SUMMARY_INTERVAL_SECONDS": ("60", "log_summary_interval_s", 60.0),
    "CHAIN_SIGNING_KEY_FILE": (A_FILE, "chain_signing_key_file", A_FILE),
    "CHAIN_HEADS_FILE": (
        "/var/lib/vote-aggregator/heads.jsonl",
        "chain_heads_file",
        "/var/lib/vote-aggregator/heads.jsonl",
    ),
    "CHAIN_HEADS_EXCHANGE": ("audit.heads", "chain_heads_exchange", "audit.heads"),
    "CHAIN_HEADS_INTERVAL_SECONDS": ("30", "chain_heads_interval_s", 30.0),
}


def full_environment() -> dict[str, str]:
    return {name: raw for name, (raw, _attr, _value) in NON_DEFAULTS.items()}


def test_empty_environment_gives_documented_defaults() -> None:
    cfg = load_config({})

    assert cfg.rabbitmq_host == "localhost"
    assert cfg.rabbitmq_port == 5672
    assert cfg.rabbitmq_user == "guest"
    assert cfg.rabbitmq_password == "guest"
    assert cfg.rabbitmq_queue == "votes.aggregation"
    # Changed from the seed's 100/100 by measurement (docs/performance.md).
    assert cfg.rabbitmq_prefetch_count == 1000
    assert cfg.postgres_host == "localhost"
    assert cfg.postgres_port == 5432
    assert cfg.postgres_db == "election_votes"
    assert cfg.postgres_user == "postgres"
    assert cfg.postgres_password == ""
    assert cfg.postgres_min_connections == 2
    assert cfg.postgres_max_connections == 10
    assert cfg.batch_size == 200
    assert cfg.batch_timeout_s == 1.0
    assert cfg.max_retry_attempts == 3
    assert cfg.retry_delay_s == 1.0
    assert cfg.prometheus_port == 8001
    assert cfg.log_level == "INFO"


def test_default_value_types() -> None:
    cfg = load_config({})

    for name in ("rabbitmq_port", "rabbitmq_prefetch_count", "postgres_port", "batch_size", "prometheus_port"):
        assert type(getattr(cfg, name)) is int, name
    for name in ("batch_timeout_s", "retry_delay_s"):
        assert type(getattr(cfg, name)) is float, name


def test_empty_environment_equals_dataclass_defaults() -> None:
    assert load_config({}) == Config()


def test_unrelated_variables_are_ignored() -> None:
    assert load_config({"PATH": "/usr/bin", "HOME": "/root", "BATCH": "abc"}) == Config()


def test_non_defaults_table_covers_every_variable() -> None:
    assert set(NON_DEFAULTS) == set(config.variables())
    assert {attr for _raw, attr, _value in NON_DEFAULTS.values()} == {f.name for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_every_variable_is_read(name: str) -> None:
    raw, attr, expected = NON_DEFAULTS[name]
    assert getattr(Config(), attr) != expected, "the test value must differ from the default"

    # A client certificate and its key only come together.
    partners = {
        "RABBITMQ_TLS_CERT_FILE": "RABBITMQ_TLS_KEY_FILE",
        "RABBITMQ_TLS_KEY_FILE": "RABBITMQ_TLS_CERT_FILE",
        "PROMETHEUS_TLS_CERT_FILE": "PROMETHEUS_TLS_KEY_FILE",
        "PROMETHEUS_TLS_KEY_FILE": "PROMETHEUS_TLS_CERT_FILE",
    }
    environ = {name: raw}
    if name in partners:
        environ[partners[name]] = A_FILE
    cfg = load_config(environ)

    assert getattr(cfg, attr) == expected
    assert type(getattr(cfg, attr)) is type(expected)
    # Nothing else changed.
    others = {f.name for f in dataclasses.fields(Config)} - {attr} - {NON_DEFAULTS[p][1] for p in environ}
    for other in others:
        assert getattr(cfg, other) == getattr(Config(), other), other


def test_all_variables_at_once() -> None:
    cfg = load_config(full_environment())

    for name, (_raw, attr, expected) in NON_DEFAULTS.items():
        assert getattr(cfg, attr) == expected, name


def test_surrounding_whitespace_is_stripped_from_numbers_and_names() -> None:
    cfg = load_config({"BATCH_SIZE": " 42 ", "RABBITMQ_HOST": "  broker  ", "BATCH_TIMEOUT_SECONDS": "\t0.5\n"})

    assert cfg.batch_size == 42
    assert cfg.rabbitmq_host == "broker"
    assert cfg.batch_timeout_s == 0.5


def test_passwords_are_kept_verbatim() -> None:
    cfg = load_config({"RABBITMQ_PASSWORD": " pass word ", "POSTGRES_PASSWORD": "  "})

    assert cfg.rabbitmq_password == " pass word "
    assert cfg.postgres_password == "  "


@pytest.mark.parametrize(
    ("name", "raw", "shown"),
    [
        ("BATCH_SIZE", "abc", "abc"),
        ("BATCH_SIZE", "0", "0"),
        ("BATCH_SIZE", "-5", "-5"),
        ("BATCH_SIZE", "1.5", "1.5"),
        ("BATCH_TIMEOUT_SECONDS", "-1", "-1"),
        ("BATCH_TIMEOUT_SECONDS", "0", "0"),
        ("BATCH_TIMEOUT_SECONDS", "nan", "nan"),
        ("BATCH_TIMEOUT_SECONDS", "inf", "inf"),
        ("BATCH_TIMEOUT_SECONDS", "soon", "soon"),
        ("RABBITMQ_PORT", "70000", "70000"),
        ("RABBITMQ_PORT", "0", "0"),
        ("RABBITMQ_PORT", "amqp", "amqp"),
        ("POSTGRES_PORT", "0", "0"),
        ("POSTGRES_PORT", "65536", "65536"),
        ("POSTGRES_PORT", "-1", "-1"),
        ("PROMETHEUS_PORT", "abc", "abc"),
        ("PROMETHEUS_PORT", "99999", "99999"),
        ("LOG_LEVEL", "LOUD", "LOUD"),
        ("LOG_FORMAT", "xml", "xml"),
        ("POSTGRES_SSLMODE", "always", "always"),
        ("RABBITMQ_TLS_CA_FILE", "/no/such/ca.pem", "/no/such/ca.pem"),
        ("POSTGRES_SSLROOTCERT", "/no/such/root.crt", "/no/such/root.crt"),
        ("RABBITMQ_DEAD_LETTERING", "maybe", "maybe"),
        ("RABBITMQ_DEAD_LETTER_QUEUE", "bad queue!", "bad queue!"),
        ("LAW_ID_PATTERN", "law-(", "law-("),
        ("METRICS_MAX_LAWS", "0", "0"),
        ("POSTGRES_QUERY_TIMEOUT_SECONDS", "0.5", "0.5"),
        ("LOG_LEVEL", "WARN", "WARN"),
        ("RETRY_DELAY_SECONDS", "0", "0"),
        ("RETRY_DELAY_SECONDS", "-0.5", "-0.5"),
        ("RETRY_MAX_DELAY_SECONDS", "0", "0"),
        ("MAX_RETRY_ATTEMPTS", "0", "0"),
        ("MAX_RETRY_ATTEMPTS", "three", "three"),
        ("RABBITMQ_PREFETCH_COUNT", "0", "0"),
        ("RABBITMQ_HEARTBEAT_SECONDS", "-1", "-1"),
        ("RABBITMQ_RECONNECT_MAX_DELAY_SECONDS", "0", "0"),
        ("RABBITMQ_QUEUE", "bad queue", "bad queue"),
        ("POSTGRES_MIN_CONNECTIONS", "0", "0"),
        ("POSTGRES_MAX_CONNECTIONS", "0", "0"),
        ("POSTGRES_CONNECT_TIMEOUT_SECONDS", "0", "0"),
        ("MAX_MESSAGE_BYTES", "100", "100"),
        ("SHUTDOWN_TIMEOUT_SECONDS", "-3", "-3"),
        ("STALL_TIMEOUT_SECONDS", "0", "0"),
    ],
)
def test_bad_value_raises_config_error_naming_variable_and_value(name: str, raw: str, shown: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config({name: raw})

    message = str(excinfo.value)
    assert name in message
    assert shown in message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="BATCH_SIZE"):
        load_config({"BATCH_SIZE": "abc"})


def test_min_connections_above_max_is_refused() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config({"POSTGRES_MIN_CONNECTIONS": "11", "POSTGRES_MAX_CONNECTIONS": "4"})

    message = str(excinfo.value)
    assert "POSTGRES_MIN_CONNECTIONS" in message
    assert "POSTGRES_MAX_CONNECTIONS" in message
    assert "11" in message
    assert "4" in message


def test_min_connections_above_default_max_is_refused() -> None:
    with pytest.raises(ConfigError, match="POSTGRES_MIN_CONNECTIONS"):
        load_config({"POSTGRES_MIN_CONNECTIONS": "11"})


def test_min_connections_equal_to_max_is_accepted() -> None:
    cfg = load_config({"POSTGRES_MIN_CONNECTIONS": "5", "POSTGRES_MAX_CONNECTIONS": "5"})

    assert (cfg.postgres_min_connections, cfg.postgres_max_connections) == (5, 5)


@pytest.mark.parametrize(("name", "raw"), [("RABBITMQ_PORT", "1"), ("RABBITMQ_PORT", "65535"), ("BATCH_SIZE", "1")])
def test_boundary_values_are_accepted(name: str, raw: str) -> None:
    _value, attr, _expected = NON_DEFAULTS[name]
    assert getattr(load_config({name: raw}), attr) == int(raw)


def test_passwords_never_appear_in_repr_or_log_targets() -> None:
    cfg = load_config(full_environment())

    for text in (repr(cfg), str(cfg), cfg.rabbitmq_url_for_logs(), cfg.postgres_target_for_logs()):
        assert RABBIT_SECRET not in text
        assert PG_SECRET not in text


def test_log_targets_say_where_the_services_are() -> None:
    cfg = load_config(full_environment())

    rabbit = cfg.rabbitmq_url_for_logs()
    assert "voter" in rabbit
    assert "rabbit.example.org" in rabbit
    assert "5673" in rabbit
    postgres = cfg.postgres_target_for_logs()
    assert postgres == "postgresql://aggregator@db.example.org:6543/other_votes"


def test_config_is_frozen() -> None:
    cfg = load_config({})

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 5  # type: ignore[misc]
    assert cfg.batch_size == 200


@pytest.mark.parametrize(
    ("raw", "expected", "number"),
    [("debug", "DEBUG", 10), ("Info", "INFO", 20), ("warning", "WARNING", 30), (" error ", "ERROR", 40)],
)
def test_log_level_is_case_insensitive(raw: str, expected: str, number: int) -> None:
    cfg = load_config({"LOG_LEVEL": raw})

    assert cfg.log_level == expected
    assert cfg.log_level_number == number


@pytest.mark.parametrize(("name", "raw"), [("BATCH_SIZE", "abc"), ("RABBITMQ_PORT", "70000")])
def test_service_exits_2_with_one_line_on_bad_configuration(name: str, raw: str) -> None:
    result = run_cli(env=service_env(dbname="postgres", **{name: raw}), timeout=30)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert raw in lines[0]
    assert "Traceback" not in result.stderr


def test_client_certificate_without_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="RABBITMQ_TLS_CERT_FILE and RABBITMQ_TLS_KEY_FILE"):
        load_config({"RABBITMQ_TLS_CERT_FILE": A_FILE})


def test_every_variable_has_help_and_is_in_env_example() -> None:
    example = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    assert set(config.HELP) == set(config.variables())
    for name in config.variables():
        assert f"\n{name}=" in example or f"\n# {name}=" in example, name


def test_env_example_gives_the_defaults() -> None:
    from dotenv import dotenv_values

    values = dotenv_values(Path(__file__).resolve().parent.parent / ".env.example")
    assert load_config({k: v for k, v in values.items() if v is not None}) == Config()


def test_flush_workers_must_leave_a_connection_free() -> None:
    with pytest.raises(ConfigError, match="FLUSH_WORKERS"):
        load_config({"FLUSH_WORKERS": "10"})
    assert load_config({"FLUSH_WORKERS": "9"}).flush_workers == 9


# -- secrets from files (*_PASSWORD_FILE): Kubernetes and Docker mount secrets as files -------------


def test_passwords_are_read_from_files(tmp_path: Path) -> None:
    rabbit, pg = tmp_path / "rabbitmq-password", tmp_path / "postgres-password"
    rabbit.write_text(f" {RABBIT_SECRET} \n")  # one trailing newline dropped, the spaces kept
    pg.write_text(PG_SECRET)

    cfg = load_config({"RABBITMQ_PASSWORD_FILE": str(rabbit), "POSTGRES_PASSWORD_FILE": str(pg)})

    assert cfg.rabbitmq_password == f" {RABBIT_SECRET} "
    assert cfg.postgres_password == PG_SECRET
    assert RABBIT_SECRET not in repr(cfg)
    assert PG_SECRET not in repr(cfg)


@pytest.mark.parametrize(("file_name", "name"), sorted(config.SECRET_FILES.items()))
def test_a_password_and_its_file_together_are_refused(tmp_path: Path, name: str, file_name: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-the-file\n")
    with pytest.raises(ConfigError, match=f"{name} and {file_name} are both set"):
        load_config({name: "from-the-environment", file_name: str(secret)})
    # Set but empty is still set: an empty password is a password.
    with pytest.raises(ConfigError, match=f"{name} and {file_name} are both set"):
        load_config({name: "", file_name: str(secret)})


def test_an_unreadable_password_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="POSTGRES_PASSWORD_FILE must name a readable file"):
        load_config({"POSTGRES_PASSWORD_FILE": str(tmp_path / "missing")})


def test_both_set_exits_2_with_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "rabbitmq-password"
    secret.write_text("guest\n")
    result = run_cli(env=service_env(dbname="postgres", RABBITMQ_PASSWORD_FILE=str(secret)), timeout=30)

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "configuration error: RABBITMQ_PASSWORD and RABBITMQ_PASSWORD_FILE are both set: set one of them"
    ]


def test_the_service_logs_in_with_the_password_from_the_file(tmp_path: Path) -> None:
    """--check against the test broker: the password in the file is the one sent (the database
    named has no schema, so only the RabbitMQ lines are looked at)."""
    env = service_env(dbname="postgres")
    secret = tmp_path / "rabbitmq-password"
    secret.write_text(env.pop("RABBITMQ_PASSWORD") + "\n")
    good = run_cli("--check", env={**env, "RABBITMQ_PASSWORD_FILE": str(secret)}, timeout=60)
    assert "ok: RabbitMQ" in good.stdout, good.stdout + good.stderr
    assert "problem: RabbitMQ" not in good.stderr, good.stderr

    secret.write_text("not-the-password\n")
    bad = run_cli("--check", env={**env, "RABBITMQ_PASSWORD_FILE": str(secret)}, timeout=60)
    assert "problem: RabbitMQ" in bad.stderr, bad.stderr
    assert "ok: RabbitMQ" not in bad.stdout, bad.stdout
