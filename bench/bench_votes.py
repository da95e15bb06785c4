"""The benchmark's votes: one per citizen, reproducible from a seed, and the totals they must add up to."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True, slots=True)
class BenchVote:
    vote_hash: str
    citizen_id: str
    law_id: str
    choice: str
    timestamp: str

    def body(self) -> bytes:
        return json.dumps(
            {
                "vote_hash": self.vote_hash,
                "citizen_id": self.citizen_id,
                "law_id": self.law_id,
                "choice": self.choice,
                "timestamp": self.timestamp,
            }
        ).encode()


def make_votes(count: int, *, laws: int, seed: int, first_citizen: int = 0) -> list[BenchVote]:
    """One vote per citizen, on a random law, cast during one election day."""
    rng = random.Random(seed)
    width = max(6, len(str(first_citizen + count)))
    day = datetime(2025, 11, 14, 7, 0, tzinfo=UTC)
    votes = []
    for i in range(first_citizen, first_citizen + count):
        citizen = f"citizen-{i:0{width}d}"
        law = f"law-{rng.randrange(laws) + 1:03d}"
        cast_at = day + timedelta(milliseconds=rng.randrange(12 * 3600 * 1000))
        votes.append(
            BenchVote(
                vote_hash=hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(),
                citizen_id=citizen,
                law_id=law,
                choice=rng.choice(("oui", "non")),
                timestamp=cast_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            )
        )
    return votes


def expected_totals(votes: Iterable[BenchVote]) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = {}
    for v in votes:
        totals.setdefault(v.law_id, [0, 0])[0 if v.choice == "oui" else 1] += 1
    return {law: (oui, non) for law, (oui, non) in totals.items()}
