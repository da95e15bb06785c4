"""TLS to RabbitMQ and to PostgreSQL, for real, with throwaway certificates.

RabbitMQ: the shared broker speaks plain AMQP, so a TLS-terminating proxy in the test stands in
for its TLS listener (tests/tls_support.py). PostgreSQL: the shared server runs with ssl=off and
a certificate the tests do not control, so the PostgreSQL tests start a cluster of their own with
ssl=on, a certificate from the test CA, and a pg_hba.conf that refuses connections without TLS.

The certificates name "localhost" only, so connecting as 127.0.0.1 is a name mismatch.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import pg_servers, skips
from tests.pg_servers import PgServer
from tests.support import (
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    RABBITMQ_USER,
    Service,
    audit_count,
    expected_totals,
    make_votes,
    outside_checkout,
    problems,
    publish,
    queue_state,
    results,
    run_cli,
    scratch_database,
    service_env,
    tool_command,
    tool_env,
    wait_for,
)
from tests.tls_support import Authority, KeyPair, TlsProxy, postgres_with_tls


@dataclass(frozen=True)
class Pki:
    ca: Authority
    wrong_ca: Authority  # a CA nobody here trusts: what a stale or mistyped CA file looks like
    server: KeyPair  # for "localhost", signed by `ca`
    client: KeyPair  # a client certificate signed by `ca`


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority.create(directory, "votes")
    return Pki(
        ca=ca,
        wrong_ca=Authority.create(directory, "other"),
        server=ca.issue("server", common_name="localhost", dns_names=("localhost",)),
        client=ca.issue("client", common_name="vote-aggregator"),
    )


# -- RabbitMQ ----------------------------------------------------------------------------------


@pytest.fixture
def tls_proxy(pki: Pki) -> Iterator[TlsProxy]:
    with TlsProxy((RABBITMQ_HOST, RABBITMQ_PORT), server=pki.server) as proxy:
        yield proxy


def rabbitmq_tls_env(proxy: TlsProxy, ca: Path, **extra: str) -> dict[str, str]:
    return {
        "RABBITMQ_TLS": "true",
        "RABBITMQ_HOST": "localhost",
        "RABBITMQ_PORT": str(proxy.port),
        "RABBITMQ_TLS_CA_FILE": str(ca),
        **extra,
    }


def test_rabbitmq_over_tls_counts_votes(
    make_service: Callable[..., Service], queue: str, dbname: str, tls_proxy: TlsProxy, pki: Pki
) -> None:
    svc = make_service(rabbitmq_tls_env(tls_proxy, pki.ca.cert)).start()
    assert f"consuming {queue} on amqp://{RABBITMQ_USER}@localhost:{tls_proxy.port}/" in svc.logs()
    # Each connection of the service is a TLS session of its own: the consumer's and the dead-letter
    # publisher's from the start, the chain heads' once it first publishes; none reconnects.
    wait_for(lambda: tls_proxy.handshakes >= 2, timeout=10, what="the dead-letter publisher's TLS handshake")
    assert tls_proxy.handshakes <= 3
    assert tls_proxy.handshake_errors == []

    votes = make_votes(300, laws=4, seed=11)
    publish(queue, [v.body() for v in votes])
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted over TLS")
    assert results(dbname) == expected_totals(votes)
    assert queue_state(queue) == (0, 1)
    assert svc.stop() == 0


def test_the_publisher_speaks_tls_with_the_services_settings(queue: str, tls_proxy: TlsProxy, pki: Pki) -> None:
    env = tool_env(**rabbitmq_tls_env(tls_proxy, pki.ca.cert))
    done = subprocess.run(
        tool_command("--count=200", f"--queue={queue}", "--host=localhost", f"--port={tls_proxy.port}"),
        cwd=outside_checkout(),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "confirmed=200" in done.stdout
    assert tls_proxy.handshakes >= 1
    assert queue_state(queue) == (200, 0)
    # The CA file is checked as the service checks it: the wrong one is refused, exit code 2.
    wrong = subprocess.run(
        tool_command("--count=10", f"--queue={queue}", "--host=localhost", f"--port={tls_proxy.port}"),
        cwd=outside_checkout(),
        env=tool_env(**rabbitmq_tls_env(tls_proxy, pki.wrong_ca.cert)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 2
    assert "CERTIFICATE_VERIFY_FAILED" in wrong.stderr or "certificate verify failed" in wrong.stderr


def test_rabbitmq_with_the_wrong_ca_consumes_nothing(
    make_service: Callable[..., Service], queue: str, dbname: str, tls_proxy: TlsProxy, pki: Pki
) -> None:
    votes = make_votes(20, laws=2, seed=12)
    publish(queue, [v.body() for v in votes])
    svc = make_service(rabbitmq_tls_env(tls_proxy, pki.wrong_ca.cert)).start(wait_consuming=False)

    wait_for(
        lambda: "certificate verify failed" in svc.logs().lower(), timeout=30, what="the certificate failure in the log"
    )
    # The broker's certificate was refused before a single AMQP byte went through.
    wait_for(lambda: tls_proxy.handshake_errors, timeout=10, what="the proxy to see the failed handshake")
    assert any("unknown ca" in error.lower() for error in tls_proxy.handshake_errors), tls_proxy.handshake_errors
    assert tls_proxy.handshakes == 0
    assert queue_state(queue) == (len(votes), 0)
    assert audit_count(dbname) == 0
    assert "consuming " not in svc.logs()


def test_rabbitmq_tls_failure_is_one_clear_line(
    make_service: Callable[..., Service], tls_proxy: TlsProxy, pki: Pki
) -> None:
    svc = make_service(rabbitmq_tls_env(tls_proxy, pki.wrong_ca.cert)).start(wait_consuming=False)
    wait_for(lambda: "certificate verify failed" in svc.logs().lower(), timeout=30, what="the certificate failure")
    assert svc.proc is not None
    # Either way is fine: retry (still running), or a configuration error (exit 2). Not a crash.
    assert svc.proc.poll() in (None, 2), svc.logs()
    assert "Traceback" not in svc.logs()
    result = run_cli("--check", env=service_env(dbname="postgres", **rabbitmq_tls_env(tls_proxy, pki.wrong_ca.cert)))
    assert "Traceback" not in result.stderr
    assert any("certificate verify failed" in p for p in problems(result)), result.stderr


def test_rabbitmq_host_name_is_checked(tls_proxy: TlsProxy, pki: Pki) -> None:
    # The certificate names "localhost": reaching the same broker as 127.0.0.1 is refused, unless
    # RABBITMQ_TLS_SERVER_NAME says which name to expect.
    as_ip = service_env(dbname="postgres", **rabbitmq_tls_env(tls_proxy, pki.ca.cert, RABBITMQ_HOST="127.0.0.1"))
    refused = run_cli("--check", env=as_ip)
    assert refused.returncode != 0
    assert "IP address mismatch" in refused.stderr
    assert "ok: RabbitMQ" not in refused.stdout

    named = run_cli("--check", env={**as_ip, "RABBITMQ_TLS_SERVER_NAME": "localhost"})
    assert f"ok: RabbitMQ amqp://{RABBITMQ_USER}@127.0.0.1:" in named.stdout, named.stderr
    assert not [p for p in problems(named) if "RabbitMQ" in p]


def test_rabbitmq_client_certificate(make_service: Callable[..., Service], queue: str, dbname: str, pki: Pki) -> None:
    with TlsProxy((RABBITMQ_HOST, RABBITMQ_PORT), server=pki.server, client_ca=pki.ca.cert) as proxy:
        base = rabbitmq_tls_env(proxy, pki.ca.cert)
        without = run_cli("--check", env=service_env(dbname=dbname, queue=queue, **base))
        (problem,) = [p for p in problems(without) if "RabbitMQ" in p]
        assert f"RabbitMQ amqp://{RABBITMQ_USER}@localhost:{proxy.port}/" in problem
        # The broker's side decides: no client certificate, no handshake. (With TLS 1.3 the client
        # learns it after its own side of the handshake: it reads the "certificate required" alert,
        # or, when the close overtakes it on a loaded machine, only an EOF.)
        assert proxy.handshakes == 0
        (refusal,) = proxy.handshake_errors
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in refusal or "certificate required" in refusal

        client = {"RABBITMQ_TLS_CERT_FILE": str(pki.client.cert), "RABBITMQ_TLS_KEY_FILE": str(pki.client.key)}
        svc = make_service({**base, **client}).start()
        votes = make_votes(100, laws=3, seed=13)
        publish(queue, [v.body() for v in votes])
        wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="votes counted with a client certificate")
        assert results(dbname) == expected_totals(votes)
        # The consumer's, the dead-letter publisher's and, once it published, the chain heads'.
        assert 2 <= proxy.handshakes <= 3
        assert svc.stop() == 0


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[PgServer]:
    skips.require(pg_servers.unavailable())
    server = postgres_with_tls(pki.server)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def tls_dbname(tls_postgres: PgServer) -> Iterator[str]:
    with scratch_database(tls_postgres.connect("postgres"), prefix="agg_tls") as name:
        yield name


def postgres_tls_env(server: PgServer, dbname: str, ca: Path, **extra: str) -> dict[str, str]:
    return {
        "POSTGRES_HOST": "localhost",
        "POSTGRES_PORT": str(server.port),
        # The throwaway cluster's own superuser, whatever TEST_POSTGRES_USER says of the shared server.
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": "",
        "POSTGRES_DB": dbname,
        "POSTGRES_SSLMODE": "verify-full",
        "POSTGRES_SSLROOTCERT": str(ca),
        **extra,
    }


@pytest.mark.ha
def test_postgres_verify_full_counts_votes(
    make_service: Callable[..., Service], queue: str, tls_postgres: PgServer, tls_dbname: str, pki: Pki
) -> None:
    # As the service's least-privilege role, made there after the schema, as an administrator applies them.
    env = postgres_tls_env(tls_postgres, tls_dbname, pki.ca.cert)
    del env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
    svc = make_service(env, server=tls_postgres, dbname=tls_dbname).start()
    role = svc.env["POSTGRES_USER"]
    assert f"connected to PostgreSQL at postgresql://{role}@localhost:{tls_postgres.port}/{tls_dbname}" in svc.logs()
    votes = make_votes(300, laws=4, seed=21)
    publish(queue, [v.body() for v in votes])

    def counted() -> int:
        return int(tls_postgres.execute("SELECT count(*) FROM vote_audit", dbname=tls_dbname)[0][0])

    wait_for(lambda: counted() == len(votes), timeout=30, what="votes counted in the TLS PostgreSQL")
    rows = tls_postgres.execute("SELECT law_id, oui_count, non_count FROM vote_results", dbname=tls_dbname)
    assert {law: (oui, non) for law, oui, non in rows} == expected_totals(votes)
    # The service's own connections are encrypted (the server would refuse any other).
    encrypted = tls_postgres.execute(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = %s",
        ("vote-aggregator",),
        dbname=tls_dbname,
    )
    assert encrypted
    assert all(row[0] is True for row in encrypted)
    assert svc.stop() == 0


@pytest.mark.ha
def test_postgres_with_the_wrong_ca_is_refused(
    make_service: Callable[..., Service], queue: str, tls_postgres: PgServer, tls_dbname: str, pki: Pki
) -> None:
    votes = make_votes(20, laws=2, seed=22)
    publish(queue, [v.body() for v in votes])
    env = postgres_tls_env(tls_postgres, tls_dbname, pki.wrong_ca.cert)
    svc = make_service(env).start(wait_consuming=False)
    assert svc.proc is not None
    # A certificate the CA file cannot verify never will: exit code 2, said once.
    assert svc.proc.wait(30) == 2
    (refusal,) = [line for line in svc.logs().splitlines() if "certificate verify failed" in line]
    assert "ERROR" in refusal
    assert queue_state(queue) == (len(votes), 0)  # it never consumed without a database
    assert tls_postgres.execute("SELECT to_regclass('vote_audit')", dbname=tls_dbname) == [(None,)]

    check = run_cli("--check", env=service_env(dbname=tls_dbname, queue=queue, **env))
    assert check.returncode == 2  # as the service: certain, retrying cannot fix it
    (problem,) = problems(check)
    assert "certificate verify failed" in problem


@pytest.mark.ha
def test_postgres_host_name_is_checked(tls_postgres: PgServer, tls_dbname: str, pki: Pki) -> None:
    as_ip = service_env(dbname=tls_dbname, **postgres_tls_env(tls_postgres, tls_dbname, pki.ca.cert))
    as_ip["POSTGRES_HOST"] = "127.0.0.1"
    (problem,) = [p for p in problems(run_cli("--check", env=as_ip)) if "PostgreSQL" in p]
    assert 'does not match host name "127.0.0.1"' in problem
    # verify-ca checks the chain only.
    init = run_cli("--init-db", env={**as_ip, "POSTGRES_SSLMODE": "verify-ca"})
    assert init.returncode == 0, init.stderr
    assert tls_postgres.execute("SELECT to_regclass('vote_audit') IS NOT NULL", dbname=tls_dbname) == [(True,)]


@pytest.mark.ha
def test_postgres_without_tls_is_refused_by_the_server(
    make_service: Callable[..., Service], tls_postgres: PgServer, tls_dbname: str, pki: Pki
) -> None:
    env = postgres_tls_env(tls_postgres, tls_dbname, pki.ca.cert, POSTGRES_SSLMODE="disable")
    svc = make_service(env).start(wait_consuming=False)
    assert svc.proc is not None
    # pg_hba.conf answers "reject": a configuration problem, exit code 2, said once.
    assert svc.proc.wait(30) == 2
    refusals = [line for line in svc.logs().splitlines() if "pg_hba.conf rejects connection" in line]
    assert len(refusals) == 1, svc.logs()
    assert "ERROR" in refusals[0]
    assert "no encryption" in refusals[0]
    assert "pg_hba.conf rejects connection" in tls_postgres.server_log()
