"""Prometheus metrics: defined once, against a registry that tests can replace.

The first five are the seed's interface, unchanged in name, type and labels.
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.process_collector import ProcessCollector

from db import BatchOutcome
from votes import REASONS

logger = logging.getLogger(__name__)

# Label value for votes of laws beyond METRICS_MAX_LAWS.
OTHER_LAWS = "_other"

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
)
# Distinct field names in vote_unknown_fields_total; later names go under OTHER_FIELDS.
MAX_UNKNOWN_FIELDS = 50
OTHER_FIELDS = "_other"


@dataclass(frozen=True, slots=True)
class _LawSeries:
    counted: dict[str, Counter]  # choice -> votes_aggregated_total child
    totals: dict[str, Gauge]  # choice -> current_vote_totals child
    last: list[int]  # [oui, non] last set; totals only grow


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_laws: int = 1000, version: str = "unknown"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # law_id comes from message data: the label set is capped so that a
        # flood of distinct ids cannot grow Prometheus' series without bound.
        self._max_laws = max_laws
        self._series: dict[str, _LawSeries] = {}
        self._totals_lock = threading.RLock()
        self._unknown_field_names: set[str] = set()
        self._define_seed_metrics(self.registry)
        self._define_counting_metrics(self.registry)
        self._define_health_metrics(self.registry)
        self._define_ha_metrics(self.registry)
        Info("vote_aggregator_build", "Version of the service and of Python", registry=self.registry).info(
            {"version": version, "python": platform.python_version()}
        )
        ProcessCollector(registry=self.registry)

    def _define_seed_metrics(self, r: CollectorRegistry) -> None:
        """The seed's five, unchanged in name, type and labels."""
        self.votes_aggregated = Counter(
            "votes_aggregated", "Votes newly counted, by law and choice", ["law_id", "choice"], registry=r
        )
        self.current_vote_totals = Gauge(
            "current_vote_totals",
            "Vote totals per law and choice as stored in vote_results (read back on each update)",
            ["law_id", "choice"],
            registry=r,
        )
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
        self.buffer_depth = Gauge("vote_buffer_depth", "Valid votes received and not yet written", registry=r)
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

    def record_rabbitmq_node(self, nodes: Iterable[str], current: str | None) -> None:
        """Mark `current` (or none) as the node the service is connected to."""
        for node in nodes:
            self.rabbitmq_node_connected.labels(node).set(1 if node == current else 0)

    def _law_series(self, law_id: str) -> _LawSeries | None:
        """The series of a law, or None once METRICS_MAX_LAWS laws have theirs.

        Children are looked up once per law, not once per batch: label lookups
        are the costliest part of recording a batch.
        """
        series = self._series.get(law_id)
        if series is None and len(self._series) < self._max_laws:
            series = self._series[law_id] = _LawSeries(
                counted={c: self.votes_aggregated.labels(law_id, c) for c in ("oui", "non")},
                totals={c: self.current_vote_totals.labels(law_id, c) for c in ("oui", "non")},
                last=[-1, -1],
            )
        return series

    def set_totals(self, totals: dict[str, tuple[int, int]]) -> None:
        # Past the cap, a law has no per-law gauge: its totals are in vote_results.
        with self._totals_lock:
            for law_id in sorted(totals):
                series = self._law_series(law_id)
                if series is None:
                    continue
                # Writers commit in any order; stored totals only grow, so the
                # larger figure is the later one.
                for i, choice in enumerate(("oui", "non")):
                    value = totals[law_id][i]
                    if value > series.last[i]:
                        series.last[i] = value
                        series.totals[choice].set(value)

    def record_batch(self, outcome: BatchOutcome, *, size: int) -> None:
        with self._totals_lock:  # several flush workers record batches
            for (law_id, choice), count in outcome.counted.items():
                series = self._law_series(law_id)
                if series is None:
                    self.votes_aggregated.labels(OTHER_LAWS, choice).inc(count)
                    self.laws_over_label_cap.inc(count)
                else:
                    series.counted[choice].inc(count)
        self.set_totals(outcome.totals)
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

    def record_rejected(self, reason: str) -> None:
        self.aggregation_errors.labels(reason).inc()
        self.votes_rejected.labels(reason).inc()

    def serve(self, *, port: int, addr: str, readiness: Readiness, liveness: Readiness) -> WSGIServer:
        """/metrics, /healthz (it is still counting) and /readyz (it can take votes now) on one port."""
        metrics_app = make_wsgi_app(self.registry)
        checks = {"/healthz": liveness, "/readyz": readiness}

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            check = checks.get(environ.get("PATH_INFO", "/"))
            if check is not None:
                ok, reason = check()
                return _text(start_response, "200 OK" if ok else "503 Service Unavailable", reason + "\n")
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        # An IPv6 address (":" in it, e.g. "::") needs an AF_INET6 socket; "::" also takes IPv4.
        server_class = _ThreadingWSGIServer6 if ":" in addr else _ThreadingWSGIServer
        server = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        return server


def _text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds are not worth a log line."""
