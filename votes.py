"""Parsing and validation of vote messages: pure functions, no I/O.

Everything that could make PostgreSQL refuse a row, or make a metric label set
grow without bound, is refused here, before the vote is buffered.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

FIELDS = frozenset({"vote_hash", "citizen_id", "law_id", "choice", "timestamp"})
CHOICES = ("oui", "non")

VOTE_HASH_MAX = 64
CITIZEN_ID_MAX = 100
LAW_ID_MAX = 50

# Bounded set of rejection reasons: each is an `error_type` label value.
REASONS = (
    "too_large",
    "invalid_encoding",
    "invalid_json",
    "not_an_object",
    "duplicate_key",
    "missing_field",
    "unexpected_field",
    "wrong_type",
    "invalid_vote_hash",
    "invalid_citizen_id",
    "invalid_law_id",
    "invalid_choice",
    "invalid_timestamp",
)

_HEX = re.compile(r"[0-9a-fA-F]+")
# Laws are referenced by short identifiers; anything else is refused rather than
# becoming a database row and a Prometheus label. LAW_ID_PATTERN replaces it.
DEFAULT_LAW_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]*")


class InvalidVote(ValueError):
    """A message that can never become a vote. `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Vote:
    vote_hash: str
    citizen_id: str
    law_id: str
    choice: str
    timestamp: datetime

    def same_content(self, other: Vote) -> bool:
        """True when `other` is the same ballot (a redelivery), not a conflicting one."""
        return (
            self.citizen_id == other.citizen_id
            and self.law_id == other.law_id
            and self.choice == other.choice
            and self.timestamp == other.timestamp
        )


def _reject_constant(name: str) -> Any:
    raise InvalidVote("invalid_json", f"non-standard JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise InvalidVote("duplicate_key", "an object repeats a key")
    return obj


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if type(value) is not str:
        raise InvalidVote("wrong_type", f"{key} must be a string, got {type(value).__name__}")
    return value


def _printable_id(value: str, key: str, maximum: int) -> str:
    if not value:
        raise InvalidVote(f"invalid_{key}", f"{key} is empty")
    if len(value) > maximum:
        raise InvalidVote(f"invalid_{key}", f"{key} is longer than {maximum} characters")
    # isprintable() is False for NUL, other control characters and lone
    # surrogates, none of which PostgreSQL text (UTF-8) can store.
    if not value.isprintable() or value != value.strip():
        raise InvalidVote(f"invalid_{key}", f"{key} has control, surrogate or surrounding space characters")
    return value


def parse_timestamp(value: str) -> datetime:
    """ISO 8601 timestamp; one without a zone is read as UTC."""
    if len(value) > 40:
        raise InvalidVote("invalid_timestamp", "timestamp is too long")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidVote("invalid_timestamp", "timestamp is not ISO 8601") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidVote("invalid_timestamp", "timestamp is out of range") from None


def parse_vote(body: bytes, *, max_bytes: int, law_id_pattern: re.Pattern[str] = DEFAULT_LAW_ID_PATTERN) -> Vote:
    """Turn one message body into a Vote, or raise InvalidVote saying why not."""
    if len(body) > max_bytes:
        raise InvalidVote("too_large", f"body is {len(body)} bytes, limit {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidVote("invalid_encoding", "body is not UTF-8") from None
    try:
        obj = _DECODER.decode(text)
    except InvalidVote:
        raise
    except (ValueError, RecursionError):
        raise InvalidVote("invalid_json", "body is not valid JSON") from None
    if type(obj) is not dict:
        raise InvalidVote("not_an_object", f"body is a JSON {type(obj).__name__}, not an object")
    keys = obj.keys()
    if keys != FIELDS:
        missing = FIELDS - keys
        if missing:
            raise InvalidVote("missing_field", f"missing {', '.join(sorted(missing))}")
        extra = sorted(keys - FIELDS)
        shown = ", ".join(repr(k[:40]) for k in extra[:5])
        raise InvalidVote("unexpected_field", f"unexpected {shown}")

    vote_hash = _text(obj, "vote_hash")
    citizen_id = _text(obj, "citizen_id")
    law_id = _text(obj, "law_id")
    choice = _text(obj, "choice")
    timestamp = _text(obj, "timestamp")

    if not vote_hash or len(vote_hash) > VOTE_HASH_MAX or not _HEX.fullmatch(vote_hash):
        raise InvalidVote("invalid_vote_hash", f"vote_hash must be 1-{VOTE_HASH_MAX} hex characters")
    _printable_id(citizen_id, "citizen_id", CITIZEN_ID_MAX)
    if not law_id or len(law_id) > LAW_ID_MAX or not law_id.isprintable() or not law_id_pattern.fullmatch(law_id):
        raise InvalidVote("invalid_law_id", f"law_id must be 1-{LAW_ID_MAX} characters matching LAW_ID_PATTERN")
    if choice not in CHOICES:
        raise InvalidVote("invalid_choice", "choice must be 'oui' or 'non'")
    return Vote(
        # A hex digest names the same vote in either case; store one spelling.
        vote_hash=vote_hash.lower(),
        citizen_id=citizen_id,
        law_id=law_id,
        choice=choice,
        timestamp=parse_timestamp(timestamp),
    )
