"""Prometheus metrics: defined once, against a registry that tests can replace.

The first five are the seed's interface, unchanged in name, type and labels.
"""

from __future__ import annotations

import logging
import platform
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from db import BatchOutcome
from httpauth import HANDSHAKE_TIMEOUT_S, BasicAuth
from votes import CHOICES, REASONS

logger = logging.getLogger(__name__)

# Label value for votes of laws beyond METRICS_MAX_LAWS.
OTHER_LAWS = "_other"
# law_id and choice of the one votes_aggregated_total series kept under RESULTS_EMBARGO.
EMBARGOED = "_embargoed"

BATCH_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (ok, reason) for /readyz and /healthz.
Readiness = Callable[[], tuple[bool, str]]
# Every error_type the service records besides the validation REASONS. Each series
# exists from the start at 0, so rate() and increase() see the first error.
ERROR_TYPES = (
    "database_rejected",
    "database_unavailable",
    "database_error",
    "database_conflict",
    "rabbitmq_connection",
    "consumer_cancelled",
    "unexpected",
    "systematic_failure",
)
# Distinct field names in vote_unknown_fields_total; later names go under OTHER_FIELDS.
MAX_UNKNOWN_FIELDS = 50
OTHER_FIELDS = "_other"


class _VoteCounts:
    """votes_aggregated_total and current_vote_totals, kept as plain numbers and exported when scraped.

    A batch touches nearly every law it could (200 votes on 50 laws: some 90 counters and 100
    gauges); as prometheus_client children each was a metric call and a lock round, a sixth of
    the flush worker's CPU. Here a batch is that many dict updates under one lock. The series,
    their values, their `_created` samples and when each series appears are the children's.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (law_id, choice) -> [votes counted, Unix time the series appeared]
        self.counted: dict[tuple[str, str], list[float]] = {}
        self.totals: dict[tuple[str, str], float] = {}  # (law_id, choice) -> current total

    def add_counted(self, law_id: str, choice: str) -> list[float]:
        """A votes_aggregated_total series at 0 (call with the lock held)."""
        series = self.counted[(law_id, choice)] = [0.0, time.time()]
        return series

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "votes_aggregated", "Votes newly counted, by law and choice", labels=["law_id", "choice"]
            ),
            GaugeMetricFamily(
                "current_vote_totals",
                "Vote totals per law and choice as stored in vote_results (read back on each update)",
                labels=["law_id", "choice"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            counted = [(labels, value, created) for labels, (value, created) in self.counted.items()]
            totals = list(self.totals.items())
        counters, gauges = self._families()
        for labels, value, created in counted:
            counters.add_metric(labels, value, created=created)
        for labels, value in totals:
            gauges.add_metric(labels, value)
        yield counters
        yield gauges


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_laws: int = 1000,
        version: str = "unknown",
        embargo: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Under the results embargo no series carries a law or a choice: votes counted
        # are summed into one (the throughput the alerts and dashboard need), and
        # current_vote_totals has no series at all.
        self._embargo = embargo
        # law_id comes from message data: the label set is capped so that a
        # flood of distinct ids cannot grow Prometheus' series without bound.
        self._max_laws = max_laws
        # law -> [oui, non] totals last set (totals only grow), for every law with series of its own.
        self._laws: dict[str, list[float]] = {}
        self._counts = _VoteCounts()
        self._unknown_field_names: set[str] = set()
        self._define_seed_metrics(self.registry)
        self._define_counting_metrics(self.registry)
        self._define_health_metrics(self.registry)
        self._define_ha_metrics(self.registry)
        self._define_security_metrics(self.registry)
        Info("vote_aggregator_build", "Version of the service and of Python", registry=self.registry).info(
            {"version": version, "python": platform.python_version()}
        )
        ProcessCollector(registry=self.registry)

    def _define_seed_metrics(self, r: CollectorRegistry) -> None:
        """The seed's five, unchanged in name, type and labels."""
        # votes_aggregated_total and current_vote_totals (law_id, choice)
        r.register(self._counts)
        self.batch_processing_duration = Gauge(
            "batch_processing_duration_seconds", "Duration of the last batch write, retries included", registry=r
        )
        self.batch_size_processed = Counter(
            "batch_size_processed", "Votes in committed batches (new, redelivered and duplicate attempts)", registry=r
        )
        self.aggregation_errors = Counter(
            "aggregation_errors", "Messages rejected and failures, by type", ["error_type"], registry=r
        )
        for error_type in (*REASONS, *ERROR_TYPES):
            self.aggregation_errors.labels(error_type)

    def _define_counting_metrics(self, r: CollectorRegistry) -> None:
        """What the seed's five cannot show about the votes themselves."""
        self.votes_redelivered = Counter(
            "votes_redelivered",
            "Messages for votes already counted with the same content (absorbed, not counted again)",
            registry=r,
        )
        self.duplicate_vote_attempts = Counter(
            "duplicate_vote_attempts",
            "Messages reusing a counted vote_hash with different content (recorded in duplicate_attempts)",
            registry=r,
        )
        self.laws_over_label_cap = Counter(
            "votes_over_law_label_cap",
            'Votes counted in the database whose law_id is beyond METRICS_MAX_LAWS (exported as law_id="_other")',
            registry=r,
        )
        self.batch_duration = Histogram(
            "batch_duration_seconds",
            "Duration of each batch write, retries included",
            buckets=BATCH_DURATION_BUCKETS,
            registry=r,
        )
        self.messages_received = Counter("messages_received", "Messages received from RabbitMQ", registry=r)
        self.votes_rejected = Counter(
            "votes_rejected", "Messages rejected without requeue, by reason", ["reason"], registry=r
        )
        for reason in (*REASONS, "database_rejected", "unexpected"):
            self.votes_rejected.labels(reason)
        self.unknown_fields = Counter(
            "vote_unknown_fields",
            "Votes carrying a field beyond the five, by field name (ignored; capped at "
            f"{MAX_UNKNOWN_FIELDS} names, then {OTHER_FIELDS!r})",
            ["field"],
            registry=r,
        )

    def _define_health_metrics(self, r: CollectorRegistry) -> None:
        """Whether the service is counting: buffer, stalls, flushes, connections."""
        self.buffer_depth = Gauge(
            "vote_buffer_depth",
            "Messages received and not yet in a batch: votes, and refused messages on their way to the dead-letter "
            "queue",
            registry=r,
        )
        self.oldest_unacked_age = Gauge(
            "oldest_unacked_delivery_age_seconds",
            "Age of the oldest vote the service holds without having acked it (buffered or being written)",
            registry=r,
        )
        self.last_flush = Gauge(
            "last_successful_flush_timestamp_seconds", "Unix time of the last committed batch", registry=r
        )
        self.database_up = Gauge(
            "database_up", "1 when the last PostgreSQL operation succeeded, 0 while it is failing", registry=r
        )
        self.database_retries = Counter("database_retries", "Failed batch-write attempts that were retried", registry=r)
        self.rabbitmq_connected = Gauge(
            "rabbitmq_connected", "1 while the service is consuming from RabbitMQ", registry=r
        )
        self.dead_letter_publishing_blocked = Gauge(
            "dead_letter_publishing_blocked",
            "1 while RabbitMQ blocks the connection that copies refused messages to the dead-letter exchange "
            "(a memory or disk alarm): their acks, and those of the votes behind them, wait",
            registry=r,
        )

    def _define_ha_metrics(self, r: CollectorRegistry) -> None:
        """Which RabbitMQ node the service is on, and what a PostgreSQL failover could lose."""
        self.rabbitmq_node_connected = Gauge(
            "rabbitmq_node_connected",
            "1 for the RabbitMQ node (a RABBITMQ_HOST entry) the service is connected to, 0 for the others",
            ["node"],
            registry=r,
        )
        self.database_failover_safe = Gauge(
            "database_failover_safe",
            "1 when every commit waits for an attached synchronous standby (a failover to it loses no acked vote); "
            "0 when a failover could lose acked votes, or the replication state could not be read",
            registry=r,
        )
        self.database_synchronous_standbys = Gauge(
            "database_synchronous_standbys", "Standbys attached to the primary as synchronous ones", registry=r
        )
        self.database_standbys = Gauge(
            "database_standbys", "Standbys streaming from the primary, synchronous or not", registry=r
        )
        self.consumption_held = Gauge(
            "vote_consumption_held",
            "1 while the service does not consume because POSTGRES_REQUIRE_SYNC_STANDBY is set and no synchronous "
            "standby has every commit",
            registry=r,
        )
        self.queue_ready = Gauge(
            "vote_queue_ready_messages",
            "Messages ready in RABBITMQ_QUEUE (not yet delivered to any consumer), read by the service every few "
            "seconds; with nothing received for STALL_TIMEOUT_SECONDS, /healthz fails",
            registry=r,
        )

    def record_rabbitmq_node(self, nodes: Iterable[str], current: str | None) -> None:
        """Mark `current` (or none) as the node the service is connected to."""
        for node in nodes:
            self.rabbitmq_node_connected.labels(node).set(1 if node == current else 0)

    def _define_security_metrics(self, r: CollectorRegistry) -> None:
        """The results embargo and the metrics port's lock."""
        Gauge("results_embargo", "1 while RESULTS_EMBARGO withholds per-law counts from the metrics", registry=r).set(
            1 if self._embargo else 0
        )
        if self._embargo:
            with self._counts.lock:
                self._counts.add_counted(EMBARGOED, EMBARGOED)
        self.auth_failures = Counter(
            "metrics_auth_failures",
            "Requests to the metrics port refused with 401: no basic credentials (missing) or wrong ones",
            ["reason"],
            registry=r,
        )
        for reason in ("missing", "wrong"):
            self.auth_failures.labels(reason)
        self.tls_failures = Counter(
            "metrics_tls_handshake_failures",
            "Connections to the metrics port dropped because their TLS handshake failed (or was plain HTTP)",
            registry=r,
        )
        self.integrity_failures = Counter(
            "vote_integrity_failures",
            "Batches PostgreSQL stored otherwise than sent, or whose hash chain did not end where this instance "
            "left it: left unacked, and the service stops",
            registry=r,
        )

    def _has_series(self, law_id: str) -> bool:
        """Whether a law has series of its own, which it gets while fewer than METRICS_MAX_LAWS have
        theirs (call with the counts' lock held)."""
        if law_id in self._laws:
            return True
        if len(self._laws) >= self._max_laws:
            return False
        self._laws[law_id] = [-1, -1]
        counts = self._counts
        for choice in CHOICES:
            counts.add_counted(law_id, choice)
            counts.totals[(law_id, choice)] = 0.0
        return True

    def set_totals(self, totals: dict[str, tuple[int, int]]) -> None:
        # Past the cap, a law has no per-law gauge: its totals are in vote_results.
        if self._embargo:
            return
        with self._counts.lock:
            self._set_totals(totals)

    def _set_totals(self, totals: dict[str, tuple[int, int]]) -> None:
        gauges = self._counts.totals
        for law_id in sorted(totals):
            if not self._has_series(law_id):
                continue
            # Writers commit in any order; stored totals only grow, so the
            # larger figure is the later one.
            last = self._laws[law_id]
            oui, non = totals[law_id]
            if oui > last[0]:
                last[0] = gauges[(law_id, "oui")] = float(oui)
            if non > last[1]:
                last[1] = gauges[(law_id, "non")] = float(non)

    def record_batch(self, outcome: BatchOutcome, *, size: int) -> None:
        counts = self._counts
        if self._embargo:
            if outcome.new_votes:
                with counts.lock:
                    counts.counted[(EMBARGOED, EMBARGOED)][0] += outcome.new_votes
            self._record_the_rest(outcome, size=size)
            return
        over_cap = 0
        with counts.lock:  # several flush workers record batches, and scrapes read
            counted = counts.counted
            for key, count in outcome.counted.items():
                if self._has_series(key[0]):
                    counted[key][0] += count
                else:
                    other = (OTHER_LAWS, key[1])
                    (counted.get(other) or counts.add_counted(*other))[0] += count
                    over_cap += count
            self._set_totals(outcome.totals)
        if over_cap:
            self.laws_over_label_cap.inc(over_cap)
        self._record_the_rest(outcome, size=size)

    def _record_the_rest(self, outcome: BatchOutcome, *, size: int) -> None:
        self.batch_size_processed.inc(size)
        if outcome.redeliveries:
            self.votes_redelivered.inc(outcome.redeliveries)
        if outcome.duplicate_attempts:
            self.duplicate_vote_attempts.inc(outcome.duplicate_attempts)

    def record_error(self, error_type: str, count: int = 1) -> None:
        self.aggregation_errors.labels(error_type).inc(count)

    def record_unknown_fields(self, names: Iterable[str]) -> list[str]:
        """Count votes' extra fields by name; returns the names seen for the first time (to log once)."""
        first_seen = []
        for name in names:
            if name not in self._unknown_field_names:
                if len(self._unknown_field_names) >= MAX_UNKNOWN_FIELDS:
                    self.unknown_fields.labels(OTHER_FIELDS).inc()
                    continue
                self._unknown_field_names.add(name)
                first_seen.append(name)
            self.unknown_fields.labels(name).inc()
        return first_seen

    def record_rejected(self, reason: str, count: int = 1) -> None:
        self.aggregation_errors.labels(reason).inc(count)
        self.votes_rejected.labels(reason).inc(count)

    def serve(
        self,
        *,
        port: int,
        addr: str,
        readiness: Readiness,
        liveness: Readiness,
        tls: ssl.SSLContext | None = None,
        auth: BasicAuth | None = None,
    ) -> WSGIServer:
        """/metrics, /healthz (it is still counting) and /readyz (it can take votes now) on one port.

        With `tls`, every connection is TLS. With `auth`, everything but the two
        health endpoints (open for probes) needs basic credentials: 401 otherwise.
        """
        metrics_app = make_wsgi_app(self.registry)
        checks = {"/healthz": liveness, "/readyz": readiness}

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            check = checks.get(environ.get("PATH_INFO", "/"))
            if check is not None:
                ok, reason = check()
                return _text(start_response, "200 OK" if ok else "503 Service Unavailable", reason + "\n")
            if auth is not None:
                refused = auth.refusal(environ.get("HTTP_AUTHORIZATION"))
                if refused is not None:
                    self.auth_failures.labels(refused).inc()
                    return _text(start_response, "401 Unauthorized", "unauthorized\n", _CHALLENGE)
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        # An IPv6 address (":" in it, e.g. "::") needs an AF_INET6 socket; "::" also takes IPv4.
        server_class = _ThreadingWSGIServer6 if ":" in addr else _ThreadingWSGIServer
        server = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
        server.tls = tls
        server.on_tls_failure = self.tls_failures.inc
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        return server


_CHALLENGE = [("WWW-Authenticate", 'Basic realm="vote-aggregator", charset="UTF-8"')]


def _text(
    start_response: Callable[..., Any], status: str, body: str, headers: list[tuple[str, str]] | None = None
) -> list[bytes]:
    data = body.encode()
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data))), *(headers or [])],
    )
    return [data]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None
    on_tls_failure: Callable[[], None] = staticmethod(lambda: None)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake happens here, on the connection's own thread, never on the accepting one."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # Bounds the handshake and every later read: a client that stalls cannot hold a thread.
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            secured = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.on_tls_failure()
            logger.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(secured, client_address)
        finally:
            self.shutdown_request(secured)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-request is not worth a traceback on stderr (socketserver's default)."""
        logger.debug("HTTP connection from %s ended with an error: %r", client_address, sys.exc_info()[1])


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds are not worth a log line."""
