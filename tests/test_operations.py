"""What operators watch: health endpoints and the metrics added beside the seed's five."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from tests.proxy import TcpProxy
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    Service,
    audit_count,
    make_votes,
    publish,
    wait_for,
)

pytestmark = pytest.mark.slow  # probes and metrics through outages

MakeService = Callable[..., Service]


def test_readiness_follows_postgres_and_rabbitmq(make_service: MakeService, queue: str, dbname: str) -> None:
    pg = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    amqp = TcpProxy(RABBITMQ_HOST, RABBITMQ_PORT)
    try:
        svc = make_service(
            {
                "POSTGRES_PORT": str(pg.port),
                "RABBITMQ_PORT": str(amqp.port),
                "RABBITMQ_RECONNECT_MAX_DELAY_SECONDS": "2",
                "RETRY_DELAY_SECONDS": "0.2",
                "MAX_RETRY_ATTEMPTS": "1",
            }
        ).start()
        assert svc.http("/healthz") == (200, "ok\n")
        assert svc.http("/readyz") == (200, "ready\n")
        assert svc.metric("database_up") == 1
        assert svc.metric("rabbitmq_connected") == 1

        # PostgreSQL goes away while votes arrive: not ready, process still healthy.
        pg.refuse()
        pg.cut()
        publish(queue, (v.body() for v in make_votes(20, laws=2)))
        wait_for(lambda: svc.http("/readyz")[0] == 503, timeout=30, what="not ready without PostgreSQL")
        status, reason = svc.http("/readyz")
        assert status == 503
        assert "PostgreSQL" in reason
        assert svc.http("/healthz")[0] == 200
        assert svc.metric("database_up") == 0
        wait_for(lambda: svc.metric("database_retries_total") >= 1, timeout=10, what="retries counted")
        pg.resume()
        wait_for(lambda: svc.http("/readyz")[0] == 200, timeout=60, what="ready again")
        assert audit_count(dbname) == 20

        # RabbitMQ goes away: not ready until the service has reconnected.
        amqp.refuse()
        amqp.cut()
        wait_for(lambda: svc.http("/readyz")[0] == 503, timeout=30, what="not ready without RabbitMQ")
        assert "RabbitMQ" in svc.http("/readyz")[1]
        assert svc.metric("rabbitmq_connected") == 0
        amqp.resume()
        wait_for(lambda: svc.http("/readyz")[0] == 200, timeout=30, what="ready after reconnecting")
        assert svc.stop() == 0
    finally:
        pg.close()
        amqp.close()


def test_operator_metrics_describe_what_happened(make_service: MakeService, queue: str, dbname: str) -> None:
    svc = make_service({"BATCH_SIZE": "50"}).start()
    votes = make_votes(500, laws=3)
    before = time.time()
    publish(queue, [b"not json", b"[]"] + [v.body() for v in votes] + [votes[0].body()])
    wait_for(lambda: svc.metric("messages_received_total") == len(votes) + 3, timeout=30, what="all received")
    wait_for(lambda: svc.metric("votes_redelivered_total") == 1, timeout=30, what="the copy absorbed")

    assert svc.metric("votes_rejected_total", reason="invalid_json") == 1
    assert svc.metric("votes_rejected_total", reason="not_an_object") == 1
    assert svc.metric("batch_duration_seconds_count") >= 10
    assert svc.metric("batch_duration_seconds_bucket", le="+Inf") == svc.metric("batch_duration_seconds_count")
    assert svc.metric("last_successful_flush_timestamp_seconds") >= before
    assert svc.metric("vote_buffer_depth") == 0
    assert svc.metric("database_retries_total") == 0
    builds = [labels for (name, labels) in svc.metrics() if name == "vote_aggregator_build_info"]
    assert len(builds) == 1
    assert dict(builds[0])["version"]
    assert audit_count(dbname) == len(votes)
    assert svc.stop() == 0


def test_the_metrics_port_listens_on_ipv6_and_ipv4_with_a_double_colon(make_service: MakeService) -> None:
    svc = make_service({"PROMETHEUS_BIND_ADDRESS": "::"}).start()
    with urllib.request.urlopen(f"http://[::1]:{svc.metrics_port}/healthz", timeout=5) as resp:
        assert (resp.status, resp.read()) == (200, b"ok\n")
    assert svc.http("/healthz") == (200, "ok\n")  # 127.0.0.1: "::" takes IPv4 too
    assert svc.metric("database_up") == 1
    assert svc.stop() == 0
