"""Prometheus metrics: defined once, against a registry that tests can replace.

The first five are the seed's interface, unchanged in name, type and labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.process_collector import ProcessCollector

from db import BatchOutcome

# Label value for votes of laws beyond METRICS_MAX_LAWS.
OTHER_LAWS = "_other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, max_laws: int = 1000) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # law_id comes from message data: the label set is capped so that a
        # flood of distinct ids cannot grow Prometheus' series without bound.
        self._max_laws = max_laws
        self._laws: set[str] = set()
        r = self.registry
        # -- the seed's five ----------------------------------------------------
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
        # -- added: what the seed's five cannot show -----------------------------
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
        ProcessCollector(registry=r)

    def _law_label(self, law_id: str) -> str | None:
        """The label for a law, or None once METRICS_MAX_LAWS distinct laws have labels."""
        if law_id in self._laws:
            return law_id
        if len(self._laws) < self._max_laws:
            self._laws.add(law_id)
            return law_id
        return None

    def set_totals(self, totals: dict[str, tuple[int, int]]) -> None:
        # Past the cap, a law has no per-law gauge: its totals are in vote_results.
        for law_id in sorted(totals):
            label = self._law_label(law_id)
            if label is not None:
                oui, non = totals[law_id]
                self.current_vote_totals.labels(label, "oui").set(oui)
                self.current_vote_totals.labels(label, "non").set(non)

    def record_batch(self, outcome: BatchOutcome, *, size: int) -> None:
        for (law_id, choice), count in outcome.counted.items():
            label = self._law_label(law_id)
            if label is None:
                self.votes_aggregated.labels(OTHER_LAWS, choice).inc(count)
                self.laws_over_label_cap.inc(count)
            else:
                self.votes_aggregated.labels(label, choice).inc(count)
        self.set_totals(outcome.totals)
        self.batch_size_processed.inc(size)
        if outcome.redeliveries:
            self.votes_redelivered.inc(outcome.redeliveries)
        if outcome.duplicate_attempts:
            self.duplicate_vote_attempts.inc(outcome.duplicate_attempts)

    def record_error(self, error_type: str, count: int = 1) -> None:
        self.aggregation_errors.labels(error_type).inc(count)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
