"""The per-law metrics on their own: what a scrape shows after batches, the law cap, the embargo."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from db import BatchOutcome
from metrics import EMBARGOED, OTHER_LAWS, Metrics


def _outcome(counted: dict[tuple[str, str], int], totals: dict[str, tuple[int, int]]) -> BatchOutcome:
    outcome = BatchOutcome()
    outcome.counted.update(counted)
    outcome.totals.update(totals)
    return outcome


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["law_id"], s.labels["choice"]): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_a_batch_shows_its_counts_and_totals_for_both_choices_of_each_law() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record_batch(_outcome({("law-1", "oui"): 3}, {"law-1": (3, 0)}), size=3)
    metrics.record_batch(
        _outcome({("law-1", "oui"): 2, ("law-2", "non"): 1}, {"law-1": (5, 0), "law-2": (0, 1)}), size=3
    )

    assert _samples(registry, "votes_aggregated_total") == {
        ("law-1", "oui"): 5,
        ("law-1", "non"): 0,
        ("law-2", "oui"): 0,
        ("law-2", "non"): 1,
    }
    assert _samples(registry, "current_vote_totals") == {
        ("law-1", "oui"): 5,
        ("law-1", "non"): 0,
        ("law-2", "oui"): 0,
        ("law-2", "non"): 1,
    }
    assert set(_samples(registry, "votes_aggregated_created")) == set(_samples(registry, "votes_aggregated_total"))
    assert registry.get_sample_value("batch_size_processed_total") == 6
    text = generate_latest(registry).decode()
    assert "# TYPE votes_aggregated_total counter" in text
    assert "# TYPE current_vote_totals gauge" in text
    assert 'votes_aggregated_total{choice="oui",law_id="law-1"} 5.0' in text


def test_totals_only_grow_whatever_order_batches_commit_in() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_totals({"law-1": (10, 4)})
    metrics.set_totals({"law-1": (8, 6)})  # an earlier commit's read-back, recorded late

    assert _samples(registry, "current_vote_totals") == {("law-1", "oui"): 10, ("law-1", "non"): 6}
    assert _samples(registry, "votes_aggregated_total") == {("law-1", "oui"): 0, ("law-1", "non"): 0}


def test_laws_past_the_cap_are_counted_under_other() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_laws=1)
    metrics.record_batch(
        _outcome({("law-1", "oui"): 1, ("law-2", "oui"): 2, ("law-3", "oui"): 4}, {"law-1": (1, 0), "law-2": (2, 0)}),
        size=7,
    )

    assert _samples(registry, "votes_aggregated_total") == {
        ("law-1", "oui"): 1,
        ("law-1", "non"): 0,
        (OTHER_LAWS, "oui"): 6,
    }
    assert set(_samples(registry, "current_vote_totals")) == {("law-1", "oui"), ("law-1", "non")}
    assert registry.get_sample_value("votes_over_law_label_cap_total") == 6


def test_under_the_embargo_one_series_counts_and_no_law_shows() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, embargo=True)
    assert _samples(registry, "votes_aggregated_total") == {(EMBARGOED, EMBARGOED): 0}

    metrics.record_batch(
        _outcome({("law-1", "oui"): 2, ("law-2", "non"): 1}, {"law-1": (2, 0), "law-2": (0, 1)}), size=3
    )
    metrics.set_totals({"law-1": (2, 0)})

    assert _samples(registry, "votes_aggregated_total") == {(EMBARGOED, EMBARGOED): 3}
    assert _samples(registry, "current_vote_totals") == {}
    assert "law-1" not in generate_latest(registry).decode()
