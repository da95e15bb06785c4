"""PostgreSQL's answers at connection time: exit 2 only for what retrying can never fix.

Run against throwaway clusters (tests/pg_servers.py) whose server messages are in German when the
locale can be made here, so nothing depends on English text: the service classifies by SQLSTATE.
The throwaway servers need root and PostgreSQL's binaries (tests/pg_servers.py); the classification
of messages without an SQLSTATE, and of a port where nothing listens, needs neither.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

import db
import dberrors
from config import Config
from tests import pg_servers, skips
from tests.pg_servers import PgServer
from tests.support import Service, make_votes, publish, queue_state, stop_all, wait_for
from tools.ports import free_port

LANGUAGE = "de_DE.UTF-8"
PASSWORD = "richtig-geheim"


@pytest.fixture(scope="module")
def locpath() -> Path | None:
    """The German messages' LOCPATH; every test with a throwaway server asks for it, so it checks they can be made."""
    skips.require(pg_servers.unavailable())
    return pg_servers.message_locale(LANGUAGE)


def _server_settings(locpath: Path | None) -> dict[str, str]:
    # Without the locale the server speaks English; the tests below still hold, by SQLSTATE.
    return {"lc_messages": f"'{LANGUAGE}'"} if locpath else {}


@pytest.fixture(scope="module")
def server(locpath: Path | None) -> Iterator[PgServer]:
    pg = PgServer(
        settings=_server_settings(locpath),
        hba=[
            "host all postgres 127.0.0.1/32 trust",
            "host all alice 127.0.0.1/32 scram-sha-256",
            "host all limited,nobody,outsider 127.0.0.1/32 trust",
        ],
        locpath=locpath,
    )
    try:
        pg.start()
        pg.execute(f"CREATE ROLE alice LOGIN PASSWORD '{PASSWORD}'")
        pg.execute("CREATE ROLE limited LOGIN CONNECTION LIMIT 0")
        pg.execute("CREATE ROLE outsider LOGIN")
        pg.execute("CREATE DATABASE votes OWNER alice")
        pg.execute("CREATE DATABASE private")
        pg.execute("REVOKE CONNECT ON DATABASE private FROM PUBLIC")
        yield pg
    finally:
        pg.remove()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(env: dict[str, str], *, queue: str | None = None, wait_consuming: bool = False) -> Service:
        svc = Service(
            queue=queue or f"agg.test.unused.{uuid.uuid4().hex[:8]}",
            dbname=env["POSTGRES_DB"],
            log_path=tmp_path / f"service-{len(started)}.log",
            env={"RETRY_MAX_DELAY_SECONDS": "1", **env},
        )
        started.append(svc)
        return svc.start(wait_consuming=wait_consuming)

    yield start
    stop_all(started)


def _exits_2_with_one_line(svc: Service, needle: str) -> str:
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2, svc.logs()
    lines = [line for line in svc.logs().splitlines() if needle in line]
    assert len(lines) == 1, svc.logs()
    assert "Traceback" not in svc.logs()
    assert "retrying" not in svc.logs()
    return lines[0]


def _keeps_retrying(svc: Service, needle: str) -> None:
    def retried_twice() -> bool:
        assert svc.proc is not None
        assert svc.proc.poll() is None, f"the service exited with {svc.proc.returncode}:\n{svc.logs()}"
        retries = [line for line in svc.logs().splitlines() if "retrying in" in line]
        return len(retries) >= 2 and all(needle in line for line in retries)

    wait_for(retried_twice, timeout=30, what=f"two 'retrying' lines naming {needle}")


@pytest.mark.ha
def test_the_throwaway_server_answers_in_german(server: PgServer, locpath: Path | None) -> None:
    skips.require(
        None
        if locpath
        else f"the {LANGUAGE} locale cannot be made here (localedef, or its sources: Debian's locales package)"
    )
    with pytest.raises(psycopg2.OperationalError, match="Passwort-Authentifizierung"):
        server.connect("votes", user="alice", password="falsch")


# -- through the CLI -----------------------------------------------------------------------


@pytest.mark.ha
def test_a_wrong_password_exits_2(server: PgServer, services: Callable[..., Service]) -> None:
    svc = services(server.env("votes", POSTGRES_USER="alice", POSTGRES_PASSWORD="falsch"))
    line = _exits_2_with_one_line(svc, "PostgreSQL refused")
    assert "SQLSTATE 28P01" in line
    assert "falsch" not in svc.logs()


@pytest.mark.ha
def test_a_missing_role_exits_2(server: PgServer, services: Callable[..., Service]) -> None:
    svc = services(server.env("votes", POSTGRES_USER="nobody"))
    assert "SQLSTATE 28000" in _exits_2_with_one_line(svc, "PostgreSQL refused")


@pytest.mark.ha
def test_a_missing_database_exits_2_with_the_createdb_advice(
    server: PgServer, services: Callable[..., Service]
) -> None:
    svc = services(server.env("nowhere"))
    line = _exits_2_with_one_line(svc, "does not exist")
    assert f'database "nowhere" does not exist on 127.0.0.1:{server.port}; create it with: createdb' in line


@pytest.mark.ha
def test_too_many_connections_for_the_role_is_retried(server: PgServer, services: Callable[..., Service]) -> None:
    svc = services(server.env("votes", POSTGRES_USER="limited"))
    _keeps_retrying(svc, "SQLSTATE 53300")


@pytest.mark.ha
def test_a_standby_not_accepting_connections_is_retried_until_promoted(
    locpath: Path | None, services: Callable[..., Service], queue: str
) -> None:
    standby = PgServer(settings=_server_settings(locpath), locpath=locpath)
    try:
        standby.start()
        standby.execute("CREATE DATABASE votes")
        standby.make_standby(hot_standby=False)
        votes = make_votes(50, laws=2, seed=41)
        publish(queue, [v.body() for v in votes])

        svc = services(standby.env("votes"), queue=queue)
        _keeps_retrying(svc, "SQLSTATE 57P03")
        assert queue_state(queue) == (len(votes), 0)  # nothing consumed without a database

        standby.promote()
        svc.wait_consuming()

        def counted() -> int:
            return int(standby.execute("SELECT count(*) FROM vote_audit", dbname="votes")[0][0])

        wait_for(lambda: counted() == len(votes), timeout=30, what="the votes counted once promoted")
        assert svc.stop() == 0
        assert queue_state(queue) == (0, 0)
    finally:
        standby.remove()


# -- the classification on its own ----------------------------------------------------------


def _open(server: PgServer, **overrides: object) -> None:
    settings: dict[str, object] = {
        "postgres_host": "127.0.0.1",
        "postgres_port": server.port,
        "postgres_user": "postgres",
        "postgres_db": "votes",
        **overrides,
    }
    database = db.Database(config=Config(**settings))  # type: ignore[arg-type]
    try:
        database.open()
    finally:
        database.close()


@pytest.mark.parametrize(
    ("overrides", "expected", "sqlstate"),
    [
        ({"postgres_user": "alice", "postgres_password": "falsch"}, db.DatabaseConfigError, "28P01"),
        ({"postgres_user": "nobody"}, db.DatabaseConfigError, "28000"),
        ({"postgres_user": "stranger"}, db.DatabaseConfigError, "28000"),  # no pg_hba.conf entry
        ({"postgres_user": "outsider", "postgres_db": "private"}, db.DatabaseConfigError, "42501"),
        ({"postgres_db": "nowhere"}, db.DatabaseMissing, None),
        ({"postgres_user": "limited"}, db.DatabaseUnavailable, "53300"),
    ],
)
@pytest.mark.ha
def test_connection_errors_are_classified_by_sqlstate(
    server: PgServer, overrides: dict[str, object], expected: type[db.DatabaseError], sqlstate: str | None
) -> None:
    with pytest.raises(db.DatabaseError) as raised:
        _open(server, **overrides)
    assert type(raised.value) is expected
    if sqlstate:
        assert f"SQLSTATE {sqlstate}" in str(raised.value)


@pytest.mark.ha
def test_the_right_password_connects(server: PgServer) -> None:
    _open(server, postgres_user="alice", postgres_password=PASSWORD)


def test_nothing_listening_is_retried() -> None:
    with pytest.raises(db.DatabaseUnavailable, match="cannot reach PostgreSQL"):
        db.Database(config=Config(postgres_host="127.0.0.1", postgres_port=free_port())).open()


# Without an SQLSTATE (libpq's verbose message could not be had), only English phrases that are
# certain exit 2; anything else, in any language, is retried.
@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('FATAL:  password authentication failed for user "alice"', db.DatabaseConfigError),
        (
            'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "x", database "y", no encryption',
            db.DatabaseConfigError,
        ),
        ('FATAL:  role "nobody" does not exist', db.DatabaseConfigError),
        ('FATAL:  database "votes" does not exist', db.DatabaseMissing),
        ("FATAL:  the database system is not yet accepting connections", db.DatabaseUnavailable),
        ('FATAL:  too many connections for role "limited"', db.DatabaseUnavailable),
        ("FATAL:  Passwort-Authentifizierung für Benutzer »alice« fehlgeschlagen", db.DatabaseUnavailable),
        ("FATAL:  something new in a later PostgreSQL", db.DatabaseUnavailable),
        (
            "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
            db.DatabaseUnavailable,
        ),
    ],
)
def test_without_sqlstate_only_certain_english_phrases_exit_2(message: str, expected: type[db.DatabaseError]) -> None:
    config = Config(postgres_db="votes")
    assert type(dberrors._classify_by_text(message, config, dbname="votes")) is expected
