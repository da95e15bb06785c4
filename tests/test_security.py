"""Security: the least-privilege role, the append-only audit, the results embargo, and the locked metrics port.

The service runs under the role service_role.sql makes (tests/roles.py); the metrics port is
scraped over TLS with basic auth by a real Prometheus (Debian's package, as in test_monitoring.py).
"""

from __future__ import annotations

import base64
import json
import math
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import psycopg2
import psycopg2.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families

import httpauth
from tests.prometheus import JOB, Prometheus
from tests.roles import ServiceRole, apply_scripts
from tests.support import (
    Service,
    VoteMsg,
    assert_all_counted_once,
    audit_count,
    pg_connect,
    problems,
    publish,
    query,
    results,
    run_cli,
    service_env,
    wait_for,
)
from tests.tls_support import Authority, KeyPair

MakeService = Callable[..., Service]


# -- the role and the append-only tables ---------------------------------------------------------


def role_connect(dbname: str, role: ServiceRole) -> psycopg2.extensions.connection:
    conn = pg_connect(dbname)
    dsn = conn.get_dsn_parameters()
    conn.close()
    as_role = psycopg2.connect(
        host=dsn["host"], port=dsn["port"], dbname=dbname, user=role.name, password=role.password
    )
    as_role.autocommit = True
    return as_role


def run_as(conn: psycopg2.extensions.connection, statement: str) -> str | None:
    """None when the statement went through, else the SQLSTATE it failed with."""
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    except psycopg2.Error as exc:
        return exc.pgcode
    return None


def seed_one_vote(dbname: str) -> None:
    query(
        dbname,
        'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") '
        "VALUES ('ab', 'c-1', 'law-1', 'oui', now())",
    )
    query(dbname, "INSERT INTO vote_results (law_id, oui_count, non_count) VALUES ('law-1', 1, 0)")
    query(
        dbname,
        "INSERT INTO duplicate_attempts (vote_hash, citizen_id, law_id, choice, vote_timestamp) "
        "VALUES ('ab', 'c-1', 'law-1', 'non', now())",
    )


REFUSED_TO_THE_ROLE = [
    "UPDATE vote_audit SET choice = 'non'",
    "DELETE FROM vote_audit",
    "TRUNCATE vote_audit CASCADE",
    "UPDATE duplicate_attempts SET choice = 'oui'",
    "DELETE FROM duplicate_attempts",
    "DELETE FROM vote_chain",
    "UPDATE vote_chain SET seq = 2",
    "DELETE FROM vote_results",
    "UPDATE vote_results SET law_id = 'law-2'",
    "CREATE TABLE vote_shadow (id int)",
    "ALTER TABLE vote_audit DISABLE TRIGGER append_only_rows",
    "SET session_replication_role = replica",
]


@pytest.mark.parametrize("statement", REFUSED_TO_THE_ROLE)
def test_the_service_role_cannot_rewrite_the_audit_trail(dbname: str, svc_role: ServiceRole, statement: str) -> None:
    seed_one_vote(dbname)
    conn = role_connect(dbname, svc_role)
    try:
        assert run_as(conn, statement) == "42501"  # insufficient_privilege
    finally:
        conn.close()
    assert query(dbname, "SELECT vote_hash, choice FROM vote_audit") == [("ab", "oui")]


def test_the_service_role_has_what_the_service_needs(dbname: str, svc_role: ServiceRole) -> None:
    seed_one_vote(dbname)
    conn = role_connect(dbname, svc_role)
    try:
        # Counts move forward (the trigger), never back.
        assert run_as(conn, "UPDATE vote_results SET oui_count = oui_count + 1") is None
        assert run_as(conn, "UPDATE vote_results SET oui_count = oui_count - 1") == "42501"
        assert run_as(conn, "SELECT * FROM vote_results, vote_chain, vote_audit, duplicate_attempts") is None
        # Officials read the statistics under a role of their own; the service never does.
        assert run_as(conn, "SELECT * FROM vote_statistics") == "42501"
    finally:
        conn.close()
    assert results(dbname) == {"law-1": (2, 0)}


# -- hardening: the bypasses found in review, tried as the service role and as a DBA --------------

# A temporary pg_class that names `role` the owner of vote_results, as the catalog's stand-in.
_SHADOW_PG_CLASS = (
    "CREATE TEMP TABLE pg_class AS SELECT c.oid, r.oid AS relowner, c.relname FROM pg_catalog.pg_class c, "
    "pg_catalog.pg_roles r WHERE c.relname = 'vote_results' AND r.rolname = current_user"
)


def test_the_service_role_may_not_create_temporary_tables(dbname: str, svc_role: ServiceRole) -> None:
    conn = role_connect(dbname, svc_role)
    try:
        assert run_as(conn, _SHADOW_PG_CLASS) == "42501"
    finally:
        conn.close()


def test_a_shadowed_pg_class_does_not_open_the_maintenance_path(dbname: str, svc_role: ServiceRole) -> None:
    """Even for a role some administrator let create temporary tables: the functions read pg_catalog's."""
    seed_one_vote(dbname)
    query(dbname, "UPDATE vote_results SET oui_count = 100")
    query(dbname, f"GRANT TEMPORARY ON DATABASE {dbname} TO {svc_role.name}")
    conn = role_connect(dbname, svc_role)
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(_SHADOW_PG_CLASS)
            cur.execute("SET LOCAL search_path = pg_temp, public, pg_catalog")
            cur.execute("SET LOCAL vote_aggregator.maintenance = 'on'")
            with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="append-only"):
                cur.execute("UPDATE public.vote_results SET oui_count = 10")
        conn.rollback()
    finally:
        conn.close()
    assert results(dbname) == {"law-1": (100, 0)}


def test_a_temporary_table_does_not_stand_in_for_the_replication_view(dbname: str, svc_role: ServiceRole) -> None:
    """The SECURITY DEFINER function reads pg_catalog's pg_stat_replication, even for a role some
    administrator let create temporary tables (pg_temp comes last in its search_path)."""
    query(dbname, f"GRANT TEMPORARY ON DATABASE {dbname} TO {svc_role.name}")
    conn = role_connect(dbname, svc_role)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE pg_stat_replication AS "
                "SELECT 'forged-standby'::text AS application_name, 'sync'::text AS sync_state, "
                "pg_catalog.pg_current_wal_lsn() AS flush_lsn"
            )
            cur.execute("SELECT application_name FROM vote_replication_standbys()")
            assert "forged-standby" not in [name for (name,) in cur.fetchall()]
    finally:
        conn.close()


def test_replica_mode_does_not_switch_the_append_only_triggers_off(dbname: str) -> None:
    """As a DBA (a superuser): session_replication_role = replica skips ordinary triggers, not ALWAYS ones."""
    apply_scripts(dbname)
    seed_one_vote(dbname)
    conn = pg_connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SET session_replication_role = replica")
            for statement in (
                "UPDATE vote_audit SET choice = 'non'",
                "DELETE FROM duplicate_attempts",
                "TRUNCATE vote_audit CASCADE",
                "UPDATE vote_results SET oui_count = 0",
            ):
                with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="append-only"):
                    cur.execute(statement)
                conn.rollback()
                cur.execute("SET session_replication_role = replica")
    finally:
        conn.close()
    assert query(dbname, "SELECT vote_hash, choice FROM vote_audit") == [("ab", "oui")]


def test_replica_mode_granted_to_the_service_role_does_not_let_it_lower_a_count(
    dbname: str, svc_role: ServiceRole
) -> None:
    """As the service role, once a DBA let it set session_replication_role (PostgreSQL 15's GRANT SET
    ON PARAMETER): its UPDATE right on vote_results still cannot lower a count."""
    seed_one_vote(dbname)
    query(dbname, f"GRANT SET ON PARAMETER session_replication_role TO {svc_role.name}")
    conn = role_connect(dbname, svc_role)
    try:
        assert run_as(conn, "SET session_replication_role = replica") is None
        assert run_as(conn, "UPDATE vote_results SET oui_count = 0") == "42501"
        assert run_as(conn, "INSERT INTO vote_results (law_id, oui_count) VALUES ('law-1', 0) "
                            "ON CONFLICT (law_id) DO UPDATE SET oui_count = 0") == "42501"  # fmt: skip
    finally:
        conn.close()
        query(dbname, f"REVOKE SET ON PARAMETER session_replication_role FROM {svc_role.name}")
    assert results(dbname) == {"law-1": (1, 0)}


def test_every_trigger_fires_always_and_every_function_pins_its_search_path(dbname: str) -> None:
    apply_scripts(dbname)
    triggers = query(
        dbname,
        "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2",
    )
    assert len(triggers) == 8
    assert {enabled for _rel, _name, enabled in triggers} == {"A"}
    functions = query(
        dbname,
        "SELECT proname, proconfig FROM pg_proc WHERE proname LIKE 'vote\\_%%' ORDER BY proname",
    )
    assert [name for name, _config in functions] == [
        "vote_aggregator_grant", "vote_append_only", "vote_maintenance_allowed", "vote_replication_standbys"
    ]  # fmt: skip
    for name, config in functions:
        assert config is not None, name
        assert any(c.startswith("search_path=pg_catalog") for c in config), (name, config)
    # Whatever its name: every function a trigger runs, and every SECURITY DEFINER function, resolves
    # pg_catalog first and pg_temp last (named, or PostgreSQL searches pg_temp first for relations).
    unpinned = query(
        dbname,
        "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p "
        "WHERE (p.oid IN (SELECT tgfoid FROM pg_trigger WHERE NOT tgisinternal) OR p.prosecdef) "
        "AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\\_path=pg\\_catalog,%%pg\\_temp')",
    )
    assert unpinned == []
    assert query(dbname, "SELECT count(*) FROM pg_proc WHERE prosecdef AND pronamespace = 'public'::regnamespace") \
        == [(1,)]  # fmt: skip


@pytest.mark.parametrize(
    "statement",
    ["UPDATE vote_audit SET choice = 'non'", "DELETE FROM vote_audit", "TRUNCATE vote_audit CASCADE",
     "DELETE FROM vote_results", "UPDATE vote_results SET oui_count = 0", "DELETE FROM duplicate_attempts"],
)  # fmt: skip
def test_the_trigger_refuses_even_a_superuser_outside_the_maintenance_path(dbname: str, statement: str) -> None:
    apply_scripts(dbname)
    seed_one_vote(dbname)
    with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="append-only"):
        query(dbname, statement)
    assert query(dbname, "SELECT count(*) FROM vote_audit") == [(1,)]


def test_the_maintenance_path_needs_the_owner_and_says_so(dbname: str, svc_role: ServiceRole) -> None:
    apply_scripts(dbname)
    seed_one_vote(dbname)
    # A role granted DELETE by mistake still cannot use the maintenance path: it does not own the table.
    query(dbname, f"GRANT DELETE ON vote_audit, duplicate_attempts TO {svc_role.name}")
    conn = role_connect(dbname, svc_role)
    try:
        maintenance = "SET vote_aggregator.maintenance = 'on'; DELETE FROM duplicate_attempts"
        assert run_as(conn, maintenance) == "42501"
    finally:
        conn.close()
    # The owner, saying so in the transaction: allowed, with a warning in the server's log.
    owner = pg_connect(dbname)
    try:
        owner.autocommit = False
        with owner.cursor() as cur:
            cur.execute("SET LOCAL vote_aggregator.maintenance = 'on'")
            cur.execute("DELETE FROM duplicate_attempts")
            cur.execute("UPDATE vote_audit SET choice = 'non'")
        owner.commit()
        assert any("maintenance: UPDATE on vote_audit" in notice for notice in owner.notices)
    finally:
        owner.close()
    assert query(dbname, "SELECT choice FROM vote_audit") == [("non",)]


def test_the_service_counts_exactly_once_under_its_role(
    make_service: MakeService, dbname: str, svc_role: ServiceRole, queue: str
) -> None:
    votes = [VoteMsg(f"{i:04x}", f"citizen-{i}", f"law-{i % 3}", ("oui", "non")[i % 2]) for i in range(600)]
    svc = make_service(svc_role.env()).start()
    publish(queue, [v.body() for v in votes])
    publish(queue, [v.body() for v in votes[:100]])  # redeliveries, absorbed
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=30, what="every vote counted")
    wait_for(lambda: svc.metric("votes_redelivered_total") == 100, timeout=30, what="the replays absorbed")
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes)
    assert "superuser" not in svc.logs()
    assert f"connected to PostgreSQL at postgresql://{svc_role.name}@" in svc.logs()


def test_a_role_that_may_not_create_the_schema_stops_with_how_to_fix_it(
    make_service: MakeService, dbname: str, svc_role: ServiceRole
) -> None:
    query(dbname, "DROP TABLE vote_chain")  # as if the schema were from before hash chains
    svc = make_service(svc_role.env()).start(wait_consuming=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2
    assert "schema objects missing (vote_chain)" in svc.logs()
    assert "--init-db with POSTGRES_USER set to an administrator" in svc.logs()


def test_the_service_warns_at_start_when_it_runs_as_a_superuser(make_service: MakeService) -> None:
    svc = make_service(as_superuser=True).start()
    assert svc.stop() == 0
    assert re.search(r"WARNING .*PostgreSQL user \S+ is a superuser: it can rewrite the audit trail", svc.logs())
    # Under its own role (the tests' default) it has nothing to warn about.
    quiet = make_service().start()
    assert quiet.stop() == 0
    assert "superuser" not in quiet.logs()


# -- the results embargo -----------------------------------------------------------------------------

# Two laws with counts no other figure the service shows could match by chance.
EMBARGO_COUNTS = {"law-embargo-a": (1311, 873), "law-embargo-b": (697, 2119)}


def embargo_votes() -> list[VoteMsg]:
    votes = []
    for law, (oui, non) in EMBARGO_COUNTS.items():
        for choice, count in (("oui", oui), ("non", non)):
            votes += [VoteMsg(f"{law[-1]}{choice}{i:06d}".encode().hex(), f"c-{law}-{choice}-{i}", law, choice)
                      for i in range(count)]  # fmt: skip
    return votes


def forbidden_figures() -> set[float]:
    """Per-law counts, per-law totals, and per-choice totals over the laws (a share when there is one law)."""
    figures: set[float] = set()
    for oui, non in EMBARGO_COUNTS.values():
        figures |= {oui, non, oui + non}
    figures.add(sum(oui for oui, _ in EMBARGO_COUNTS.values()))
    figures.add(sum(non for _, non in EMBARGO_COUNTS.values()))
    return figures


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def leaks(text: str) -> list[str]:
    """Law ids, and standalone numbers equal to a per-law figure, found in `text`."""
    found = [law for law in EMBARGO_COUNTS if law in text]
    found += [n for n in _NUMBER.findall(text) if float(n) in forbidden_figures()]
    return found


def test_under_the_embargo_nothing_the_service_serves_or_logs_shows_a_per_law_count(
    make_service: MakeService, dbname: str, svc_role: ServiceRole, queue: str
) -> None:
    votes = embargo_votes()
    svc = make_service(
        {**svc_role.env(), "RESULTS_EMBARGO": "true", "LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json",
         "LOG_SUMMARY_INTERVAL_SECONDS": "0.5"}
    ).start()  # fmt: skip
    publish(queue, [v.body() for v in votes])
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="every vote counted")
    assert results(dbname) == EMBARGO_COUNTS  # the database has them, of course

    served = {}
    for path in ("/metrics", "/healthz", "/readyz", "/", "/metrics?name[]=current_vote_totals"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}{path}", timeout=5) as resp:
                served[path] = resp.read().decode()
        except urllib.error.HTTPError as exc:
            served[path] = exc.read().decode()
    for path, text in served.items():
        assert leaks(text) == [], f"{path} shows per-law figures"
    # Monitoring still works: votes counted, summed over laws and choices, and the embargo shown.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(served["/metrics"])
        for s in family.samples
    }
    counted = {labels: v for (name, labels), v in samples.items() if name == "votes_aggregated_total"}
    assert counted == {(("choice", "_embargoed"), ("law_id", "_embargoed")): float(len(votes))}
    assert not [name for name, _ in samples if name == "current_vote_totals"]
    assert samples[("results_embargo", ())] == 1.0
    assert samples[("batch_size_processed_total", ())] == float(len(votes))

    assert svc.stop() == 0
    entries = [json.loads(line) for line in svc.logs().splitlines() if line.startswith("{")]
    assert any("hash chain head" in e["message"] for e in entries)  # the log is not empty of what matters
    for entry in entries:
        entry.pop("time")
        assert leaks(json.dumps(_without_summary_sums(entry))) == [], entry


# The summary line's fields (summary.py): sums over every law and choice, which the embargo allows.
# Which values they take depends on timing ("697 buffered"), so one may equal a per-law figure by
# chance; the line is checked for anything besides them instead.
_SUMMARY_SUMS = {
    "interval_s", "votes_per_s", "received", "counted", "redelivered", "duplicate_attempts", "rejected",
    "batches", "database_errors", "laws", "buffered",
}  # fmt: skip


def _spellings(value: float) -> set[str]:
    """How the message may write a field's value: its fields are rounded to 0.1, the message to units."""
    if isinstance(value, int):
        return {str(value)}
    return {str(value)} | {str(n) for n in range(math.floor(value - 0.05), math.ceil(value + 0.05) + 1)}


def _without_summary_sums(entry: dict[str, Any]) -> dict[str, Any]:
    """A summary entry without its sums, once the numbers in its message are shown to be just them."""
    if "received" not in entry:
        return entry
    sums = {key: entry[key] for key in _SUMMARY_SUMS if key in entry}
    spelled = {text for value in sums.values() for text in _spellings(value)}
    said = _NUMBER.findall(entry["message"])
    assert set(said) <= spelled, (said, sums)  # the message's numbers are its fields' values
    rest = {key: value for key, value in entry.items() if key not in sums}
    rest["message"] = _NUMBER.sub("#", entry["message"])  # its words are still checked (law ids)
    return rest


# -- the metrics port: TLS and basic auth ------------------------------------------------------------

USER, PASSWORD = "prometheus", "correct horse battery staple"


def users_file(directory: Path, *, htpasswd_style: bool = False) -> Path:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    if htpasswd_style:
        hashed = "$2y$" + hashed[4:]  # what `htpasswd -nB` writes
    path = directory / "metrics-users"
    path.write_text(f"# who may read /metrics\n{USER}:{hashed}\nother:{hashed}\n")
    return path


@pytest.fixture
def metrics_tls(tmp_path: Path) -> tuple[Authority, KeyPair]:
    ca = Authority.create(tmp_path / "tls", "metrics")
    return ca, ca.issue("metrics-server", common_name="localhost", dns_names=("localhost",))


def locked_env(tmp_path: Path, server: KeyPair, **extra: str) -> dict[str, str]:
    return {
        "PROMETHEUS_TLS_CERT_FILE": str(server.cert),
        "PROMETHEUS_TLS_KEY_FILE": str(server.key),
        "PROMETHEUS_BASIC_AUTH_USERS_FILE": str(users_file(tmp_path, htpasswd_style=True)),
        **extra,
    }


def https_get(port: int, path: str, ca: Path, *, auth: tuple[str, str] | None = None) -> tuple[int, str, Any]:
    """(status, body, headers) of GET https://127.0.0.1:<port><path>, the chain checked against `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the certificate names localhost; the chain is still verified
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_a_locked_metrics_port_answers_401_without_the_password_and_counts_it(
    make_service: MakeService, tmp_path: Path, metrics_tls: tuple[Authority, KeyPair]
) -> None:
    ca, server = metrics_tls
    svc = make_service(locked_env(tmp_path, server)).start()
    port = svc.metrics_port

    status, body, headers = https_get(port, "/metrics", ca.cert)
    assert (status, body) == (401, "unauthorized\n")
    assert headers["WWW-Authenticate"].startswith('Basic realm="vote-aggregator"')
    assert https_get(port, "/metrics", ca.cert, auth=(USER, "wrong"))[0] == 401
    assert https_get(port, "/metrics", ca.cert, auth=("nobody", PASSWORD))[0] == 401
    for malformed in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer abc", "Basic"):
        request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers={"Authorization": malformed})
        context = ssl.create_default_context(cafile=str(ca.cert))
        context.check_hostname = False
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10, context=context)
        assert refused.value.code == 401
    # Probes need no password.
    assert https_get(port, "/healthz", ca.cert)[:2] == (200, "ok\n")
    assert https_get(port, "/readyz", ca.cert)[0] == 200
    # Plain HTTP on the TLS port: dropped, counted.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)

    status, text, _ = https_get(port, "/metrics", ca.cert, auth=(USER, PASSWORD))
    assert status == 200
    assert sample(text, "metrics_auth_failures_total", reason="missing") == 2.0  # no header; Bearer
    assert sample(text, "metrics_auth_failures_total", reason="wrong") == 5.0
    assert sample(text, "metrics_tls_handshake_failures_total") >= 1.0
    assert svc.stop() == 0
    assert "Traceback" not in svc.logs()
    assert PASSWORD not in svc.logs()


# -- a real Prometheus ---------------------------------------------------------------------------


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prometheus]]:
    """A Prometheus scraping with the given scrape configuration (job vote-aggregator), stopped afterwards."""
    started: list[Prometheus] = []

    def start(scrape: dict[str, Any]) -> Prometheus:
        config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [{"job_name": JOB, **scrape}]}
        started.append(Prometheus.launch(config, tmp_path, f"prometheus-{len(started)}"))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


def test_prometheus_scrapes_the_locked_port_over_tls_with_basic_auth(
    make_service: MakeService,
    tmp_path: Path,
    metrics_tls: tuple[Authority, KeyPair],
    start_prometheus: Callable[[dict[str, Any]], Prometheus],
    queue: str,
    dbname: str,
) -> None:
    ca, server = metrics_tls
    svc = make_service(locked_env(tmp_path, server)).start()
    password_file = tmp_path / "scrape-password"
    password_file.write_text(PASSWORD)
    target = {"static_configs": [{"targets": [f"127.0.0.1:{svc.metrics_port}"]}], "scheme": "https",
              "tls_config": {"ca_file": str(ca.cert), "server_name": "localhost"}}  # fmt: skip
    good = start_prometheus({**target, "basic_auth": {"username": USER, "password_file": str(password_file)}})
    bad = start_prometheus({**target, "basic_auth": {"username": USER, "password": "guess"}})

    publish(queue, [VoteMsg(f"{i:04x}", f"c-{i}", "law-1", "oui").body() for i in range(50)])
    wait_for(lambda: audit_count(dbname) == 50, timeout=30, what="the votes counted")
    wait_for(
        lambda: good.query(f'sum(votes_aggregated_total{{job="{JOB}"}}) == 50'),
        timeout=30,
        what="Prometheus to read the votes over TLS with basic auth",
    )
    assert [s["value"][1] for s in good.query(f'up{{job="{JOB}"}}')] == ["1"]
    # The one with the wrong password sees the target down, and the service counts its attempts.
    assert wait_for(lambda: bad.query(f'up{{job="{JOB}"}} == 0'), timeout=30, what="up == 0 for the wrong password")
    wait_for(
        lambda: good.query(f'metrics_auth_failures_total{{job="{JOB}", reason="wrong"}} > 0'),
        timeout=30,
        what="the failed scrapes counted",
    )
    assert svc.stop() == 0


# -- configuration -----------------------------------------------------------------------------------


def test_a_plain_password_in_the_users_file_stops_start_up_without_echoing_it(
    make_service: MakeService, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text("prometheus:hunter2-plain\n")
    svc = make_service({"PROMETHEUS_BASIC_AUTH_USERS_FILE": str(users)}).start(wait_consuming=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2
    assert "PROMETHEUS_BASIC_AUTH_USERS_FILE" in svc.logs()
    assert "line 1: the password of 'prometheus' is not a bcrypt hash" in svc.logs()
    assert "hunter2" not in svc.logs()
    check = run_cli("--check", env=service_env(dbname="unused", PROMETHEUS_BASIC_AUTH_USERS_FILE=str(users)))
    assert check.returncode == 2  # a configuration error: the service's own code for it
    assert any("metrics port: PROMETHEUS_BASIC_AUTH_USERS_FILE" in line for line in problems(check))


def test_a_certificate_without_its_key_is_a_configuration_error(metrics_tls: tuple[Authority, KeyPair]) -> None:
    _ca, server = metrics_tls
    done = run_cli("--check", env=service_env(dbname="unused", PROMETHEUS_TLS_CERT_FILE=str(server.cert)))
    assert done.returncode == 2  # a configuration error: the service's own code for it
    assert "PROMETHEUS_TLS_CERT_FILE and PROMETHEUS_TLS_KEY_FILE must be set together" in done.stderr


@pytest.mark.parametrize(
    ("header", "refusal"),
    [(None, "missing"), ("", "missing"), ("Bearer x", "missing"), ("Basic", "wrong"), ("Basic %%%", "wrong"),
     ("Basic " + base64.b64encode(b"prometheus").decode(), "wrong"),
     ("Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), "wrong"),
     ("Basic " + base64.b64encode(b"prometheus:" + b"x" * 100).decode(), "wrong"),
     ("basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), None)],
)  # fmt: skip
def test_basic_auth_answers_every_header_without_raising(tmp_path: Path, header: str | None, refusal: str) -> None:
    auth = httpauth.BasicAuth(httpauth.load_users(str(users_file(tmp_path))))
    assert auth.refusal(header) == refusal
    assert auth.refusal(header) == refusal  # the second time from memory when it was good


def test_verify_runs_under_the_service_role_too(dbname: str, svc_role: ServiceRole) -> None:
    seed_one_vote(dbname)  # a row in no chain link: verify says so
    done = run_cli("verify", env=service_env(dbname=dbname, **svc_role.env()))
    assert done.returncode == 1, done.stderr
    assert "added: vote ab in no chain link" in done.stdout


def test_under_the_embargo_results_and_verify_print_no_per_law_figure_unless_the_polls_are_closed(
    dbname: str,
) -> None:
    apply_scripts(dbname)
    query(
        dbname,
        'INSERT INTO vote_audit (vote_hash, citizen_id, law_id, choice, "timestamp") '
        "SELECT to_hex(1000 + i), 'c-' || i, 'law-x', CASE WHEN i < 37 THEN 'oui' ELSE 'non' END, now() "
        "FROM generate_series(0, 58) i",
    )
    query(dbname, "INSERT INTO vote_results (law_id, oui_count, non_count) VALUES ('law-x', 37, 22)")
    env = service_env(dbname=dbname)  # RESULTS_EMBARGO unset: true

    withheld = run_cli("results", "--format", "csv", env=env)
    assert withheld.returncode == 2
    assert withheld.stdout == ""
    assert "RESULTS_EMBARGO is true" in withheld.stderr
    audit = run_cli("verify", env=env)
    assert audit.returncode == 1  # the rows are in no chain link, which it still says
    assert "per-law counts withheld: RESULTS_EMBARGO" in audit.stdout
    assert not re.search(r"\b(37|22)\b", audit.stdout), audit.stdout

    closed = run_cli("results", "--format", "csv", "--polls-closed", env=env)
    assert closed.returncode == 0
    assert "law-x,37,22" in closed.stdout
    assert re.search(r"WARNING .*results: per-law figures printed under RESULTS_EMBARGO because --polls-closed "
                     r"was given \(by \S+\)", closed.stderr), closed.stderr  # fmt: skip
    audit = run_cli("verify", "--polls-closed", env=env)
    assert [line.split()[:5] for line in audit.stdout.splitlines() if line.startswith("law-x")] == [
        ["law-x", "37", "22", "37", "22"]
    ]
    assert "verify: per-law figures printed under RESULTS_EMBARGO" in audit.stderr
