"""The messages one publishing connection sends: votes, duplicate attempts, replays, malformed messages.

Pure: no broker, no clock other than the one passed in, so tests can check each kind of message
without publishing it. tools/publish_votes.py describes what each kind is for.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

VOTE, DUPLICATE, REPLAY, INVALID = 0, 1, 2, 3
# Each is the error_type (and votes_rejected_total reason) the service gives it.
INVALID_KINDS = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "invalid_vote_hash",
    "invalid_choice",
    "invalid_timestamp",
    "not_an_object",
)
# Votes a connection remembers as targets for duplicates and replays.
MAX_TARGETS = 50_000


@dataclass(frozen=True, slots=True)
class SentVote:
    vote_hash: str
    citizen_id: str
    law_id: str
    choice: str
    timestamp: datetime


def iso(ts: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as upstream sends it."""
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def encode(vote_hash: str, citizen_id: str, law_id: str, choice: object, timestamp: str) -> bytes:
    return json.dumps(
        {"vote_hash": vote_hash, "citizen_id": citizen_id, "law_id": law_id, "choice": choice, "timestamp": timestamp}
    ).encode()


def _now_ms() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


class MessageFactory:
    """The messages of one connection, in publishing order.

    Which message is of which kind, the laws and the choices follow the seed; the
    timestamps follow the clock. The kinds are fixed up front: duplicates and
    replays only after the first `lag` messages, and only of votes published at
    least `lag` messages earlier.
    """

    def __init__(
        self,
        *,
        count: int,
        laws: int,
        duplicates: float,
        replays: float,
        invalid: float,
        reuse_after: int,
        seed: int,
        run_id: str,
        connection: int = 0,
        connections: int = 1,
        clock: Callable[[], datetime] = _now_ms,
    ) -> None:
        rng = self._rng = random.Random(f"{seed}:{connection}")
        law_rng = random.Random(f"{seed}:laws")
        width = max(3, len(str(laws)))
        self._laws = [f"law-{i:0{width}d}" for i in range(1, laws + 1)]
        self._oui_share = [law_rng.uniform(0.3, 0.7) for _ in self._laws]
        self._run_id = run_id
        self._connection = connection
        self._connections = connections
        self._clock = clock

        n_dup, n_replay, n_invalid = round(count * duplicates), round(count * replays), round(count * invalid)
        n_votes = count - n_dup - n_replay - n_invalid
        self._lag = lag = min(reuse_after, count // 2)
        pool = [VOTE] * n_votes + [INVALID] * n_invalid
        rng.shuffle(pool)
        tail = pool[lag:] + [DUPLICATE] * n_dup + [REPLAY] * n_replay
        rng.shuffle(tail)
        kinds = pool[:lag] + tail
        if n_votes and kinds[0] != VOTE:
            first = kinds.index(VOTE)
            kinds[0], kinds[first] = kinds[first], kinds[0]
        self._kinds = bytes(kinds)
        self._position = 0
        self._pending: deque[tuple[int, SentVote]] = deque()  # published, not yet old enough to reuse
        self._targets: list[SentVote] = []
        self._last_attempt: dict[str, datetime] = {}

        self.votes = 0
        self.duplicates = 0
        self.replays = 0
        self.invalid: Counter[str] = Counter()
        self.totals: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._kinds)

    def next(self) -> bytes:
        p = self._position
        self._position += 1
        kind = self._kinds[p]
        while self._pending and self._pending[0][0] <= p - self._lag:
            self._remember(self._pending.popleft()[1])
        if kind in (DUPLICATE, REPLAY) and not self._targets:
            kind = VOTE  # nothing old enough to reuse (only with tiny counts)
        if kind == VOTE:
            return self._vote(p)
        if kind == INVALID:
            return self._invalid(p)
        target = self._targets[self._rng.randrange(len(self._targets))]
        if kind == REPLAY:
            self.replays += 1
            return encode(target.vote_hash, target.citizen_id, target.law_id, target.choice, iso(target.timestamp))
        # Another choice, and a timestamp later than the vote and than any earlier
        # attempt on it: each attempt is distinct content, recorded once.
        self.duplicates += 1
        previous = self._last_attempt.get(target.vote_hash, target.timestamp)
        ts = max(self._clock(), previous + timedelta(milliseconds=1))
        self._last_attempt[target.vote_hash] = ts
        flipped = "non" if target.choice == "oui" else "oui"
        return encode(target.vote_hash, target.citizen_id, target.law_id, flipped, iso(ts))

    def _vote(self, p: int) -> bytes:
        citizen = f"citizen-{self._run_id}-{self.votes * self._connections + self._connection + 1:07d}"
        i = self._rng.randrange(len(self._laws))
        law = self._laws[i]
        choice = "oui" if self._rng.random() < self._oui_share[i] else "non"
        vote = SentVote(hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(), citizen, law, choice, self._clock())
        self.votes += 1
        self.totals.setdefault(law, [0, 0])[0 if choice == "oui" else 1] += 1
        self._pending.append((p, vote))
        return encode(vote.vote_hash, vote.citizen_id, vote.law_id, vote.choice, iso(vote.timestamp))

    def _remember(self, vote: SentVote) -> None:
        if len(self._targets) < MAX_TARGETS:
            self._targets.append(vote)
        else:
            self._targets[self._rng.randrange(MAX_TARGETS)] = vote

    def _invalid(self, p: int) -> bytes:
        # Round robin, so that every kind shows up once there are a few.
        reason = INVALID_KINDS[(sum(self.invalid.values()) + self._connection) % len(INVALID_KINDS)]
        self.invalid[reason] += 1
        citizen = f"citizen-{self._run_id}-invalid-{self._connection}-{p}"
        law = self._laws[self._rng.randrange(len(self._laws))]
        fields: dict[str, object] = {
            "vote_hash": hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest(),
            "citizen_id": citizen,
            "law_id": law,
            "choice": "oui",
            "timestamp": iso(self._clock()),
        }
        if reason == "invalid_json":
            return json.dumps(fields).encode()[:-1]  # cut off before the closing brace
        if reason == "not_an_object":
            return json.dumps(list(fields.values())).encode()
        if reason == "missing_field":
            del fields["timestamp"]
        elif reason == "wrong_type":
            fields["choice"] = 1
        elif reason == "invalid_vote_hash":
            fields["vote_hash"] = "not-a-sha256-digest"
        elif reason == "invalid_choice":
            fields["choice"] = "peut-être"
        elif reason == "invalid_timestamp":
            fields["timestamp"] = "14/11/2025 12:00"
        return json.dumps(fields).encode()

    def report(self) -> dict[str, Any]:
        return {
            "votes": self.votes,
            "duplicates": self.duplicates,
            "replays": self.replays,
            "invalid": dict(self.invalid),
            "totals": {law: list(t) for law, t in self.totals.items()},
        }
