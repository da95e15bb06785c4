"""Parsing and validation of vote messages: pure functions, no I/O.

Everything that could make PostgreSQL refuse a row, or hand back a value other
than the one stored, is refused here, before the vote is buffered. Fields beyond
the five are ignored (a producer may add one during a rolling upgrade); their
names come back bounded and printable, so the caller can use them as metric
label values and log text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

FIELDS = frozenset({"vote_hash", "citizen_id", "law_id", "choice", "timestamp"})
CHOICES = ("oui", "non")

VOTE_HASH_MAX = 64
CITIZEN_ID_MAX = 100
LAW_ID_MAX = 50
# Deepest JSON nesting accepted (a vote has one level; extra fields may nest a little).
MAX_NESTING = 32
TIMESTAMP_MAX = 40
# Names of ignored fields become metric label values and log text: at most this
# many per message, each at most this long once escaped.
EXTRA_FIELDS_MAX = 10
EXTRA_FIELD_NAME_MAX = 64

# Bounded set of rejection reasons: each is an `error_type` label value.
REASONS = (
    "too_large",
    "invalid_encoding",
    "invalid_json",
    "not_an_object",
    "duplicate_key",
    "missing_field",
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

# RFC 3339 date-time (section 5.6), with the space separator its note allows and
# the zone optional. [0-9], not \d: \d also matches other scripts' digits, which
# int() would then happily read.
_RFC3339 = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"[Tt ]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]{1,9}))?"
    r"(?:(?P<utc>[Zz])|(?P<sign>[+-])(?P<offset_hour>[0-9]{2}):(?P<offset_minute>[0-9]{2}))?"
)
# The form producers send (UTC, `T`, `Z`, at most microseconds): a subset of _RFC3339 that
# datetime.fromisoformat reads to the same instant, in C, at a fifteenth of the cost of the
# general path (docs/performance.md). Anything else, or anything it refuses, takes that path.
_COMMON_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z")


class InvalidVote(ValueError):
    """A message that can never become a vote. `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Not frozen: a frozen dataclass sets each field through object.__setattr__, four times the
# cost of building this one, once per vote (docs/performance.md). Nothing changes a Vote.
@dataclass(slots=True)
class Vote:
    """A valid vote. `timestamp` is an aware datetime in UTC.

    `timestamp_text`, when set, is the timestamp as the producer wrote it, in the one form
    (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`) that PostgreSQL reads to exactly `timestamp`: the batch
    statement sends it as it came instead of formatting the datetime again. It takes no part in
    comparisons: two votes are equal when their instants are.
    """

    vote_hash: str
    citizen_id: str
    law_id: str
    choice: str
    timestamp: datetime
    timestamp_text: str | None = field(default=None, compare=False)

    def same_content(self, other: Vote) -> bool:
        """True when `other` is the same ballot (a redelivery), not a conflicting one."""
        return (
            self.citizen_id == other.citizen_id
            and self.law_id == other.law_id
            and self.choice == other.choice
            and self.timestamp == other.timestamp
        )


class ParsedVote(NamedTuple):
    """A valid vote and the names of the fields it carried beyond the five.

    `extra_fields` is sorted, without repeats, at most EXTRA_FIELDS_MAX names of
    at most EXTRA_FIELD_NAME_MAX characters each, escaped by `_field_name`.
    """

    vote: Vote
    extra_fields: tuple[str, ...]


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


def _field_name(key: str) -> str:
    """`key` made safe as a label value and log text: escaped, at most EXTRA_FIELD_NAME_MAX characters.

    Non-printable characters (controls, NUL, lone surrogates, format and
    separator characters such as U+200B or U+2028) are escaped as Python writes
    them (\\x00, \\u200b, \\U000e0001) rather than dropped, so "admin\\u200b" does
    not pass for "admin"; a backslash becomes \\\\ so no name can imitate an
    escape. A lone surrogate left in would also make the /metrics page
    unencodable. The cut falls between escapes, never inside one.
    """
    pieces: list[str] = []
    length = 0
    # Each character yields at least one, so the first EXTRA_FIELD_NAME_MAX are enough.
    for char in key[:EXTRA_FIELD_NAME_MAX]:
        code = ord(char)
        if char == "\\":
            piece = "\\\\"
        elif char.isprintable():
            piece = char
        elif code < 0x100:
            piece = f"\\x{code:02x}"
        elif code < 0x10000:
            piece = f"\\u{code:04x}"
        else:
            piece = f"\\U{code:08x}"
        length += len(piece)
        if length > EXTRA_FIELD_NAME_MAX:
            break
        pieces.append(piece)
    return "".join(pieces)


def parse_timestamp(value: str) -> datetime:
    """An RFC 3339 date-time as an aware datetime in UTC, or InvalidVote("invalid_timestamp").

    Accepted: `YYYY-MM-DDTHH:MM:SS`, with `T`, `t` or one space between date and
    time, an optional `.` and 1 to 9 fractional digits, then `Z`, `z`, a
    `+HH:MM`/`-HH:MM` offset up to 23:59, or nothing: **no zone is read as UTC**.
    Digits beyond the sixth are truncated, never rounded: datetime and
    PostgreSQL hold microseconds, truncation gives one instant per text without
    ever carrying into the next second, day or year, and redeliveries are
    compared with the stored vote for equality. Leap seconds (`:60`) are refused:
    datetime cannot hold them.

    The UTC instant must fall in years 1 to 9999: PostgreSQL, whose sessions run
    with TimeZone=UTC, then hands back exactly this instant (it would otherwise
    show a BC or 5-digit year that datetime cannot read back).
    """
    return _read_timestamp(value)[0]


def _read_timestamp(value: str) -> tuple[datetime, str | None]:
    """parse_timestamp's instant, and `value` itself when it is in the form PostgreSQL reads
    to exactly that instant (the common form, which datetime.fromisoformat reads too)."""
    if _COMMON_UTC.fullmatch(value):
        try:
            return datetime.fromisoformat(value), value
        except ValueError:
            pass  # out of range (a leap second, year 0, 30 February): the general path says which
    return _parse_rfc3339(value), None


def _parse_rfc3339(value: str) -> datetime:
    if len(value) > TIMESTAMP_MAX:
        raise InvalidVote("invalid_timestamp", f"timestamp is longer than {TIMESTAMP_MAX} characters")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidVote("invalid_timestamp", "timestamp is not an RFC 3339 date-time")
    if match["second"] == "60":
        raise InvalidVote("invalid_timestamp", "leap seconds cannot be represented")
    fraction = match["fraction"] or ""
    try:
        local = datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
            int(fraction[:6].ljust(6, "0")),
            tzinfo=UTC,
        )
    except ValueError:
        raise InvalidVote("invalid_timestamp", "a date or time field is out of range") from None
    if match["sign"] is None:
        return local
    offset_hours, offset_minutes = int(match["offset_hour"]), int(match["offset_minute"])
    if offset_hours > 23 or offset_minutes > 59:
        raise InvalidVote("invalid_timestamp", "zone offset is out of range")
    offset = timedelta(hours=offset_hours, minutes=offset_minutes)
    try:
        return local + offset if match["sign"] == "-" else local - offset
    except OverflowError:
        raise InvalidVote("invalid_timestamp", "timestamp is before year 1 or after year 9999 in UTC") from None


def _check_nesting(text: str) -> None:
    """Refuse JSON nested deeper than MAX_NESTING, before the decoder recurses into it.

    Python's decoder recurses once per level, so without this bound the limit
    would be the interpreter's recursion limit (which differs between versions
    and can be raised). A vote has one level; counting brackets first keeps the
    exact scan off the common path.
    """
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise InvalidVote("invalid_json", f"JSON nested deeper than {MAX_NESTING} levels")
        elif char in "]}":
            depth -= 1


def parse_message(
    body: bytes, *, max_bytes: int, law_id_pattern: re.Pattern[str] = DEFAULT_LAW_ID_PATTERN
) -> ParsedVote:
    """Turn one message body into a ParsedVote, or raise InvalidVote saying why not."""
    if len(body) > max_bytes:
        raise InvalidVote("too_large", f"body is {len(body)} bytes, limit {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidVote("invalid_encoding", "body is not UTF-8") from None
    _check_nesting(text)
    try:
        obj = _DECODER.decode(text)
    except InvalidVote:
        raise
    except ValueError:
        raise InvalidVote("invalid_json", "body is not valid JSON") from None
    if type(obj) is not dict:
        raise InvalidVote("not_an_object", f"body is a JSON {type(obj).__name__}, not an object")
    try:
        vote_hash, citizen_id, law_id = obj["vote_hash"], obj["citizen_id"], obj["law_id"]
        choice, timestamp = obj["choice"], obj["timestamp"]
    except KeyError:
        raise InvalidVote("missing_field", f"missing {', '.join(sorted(FIELDS - obj.keys()))}") from None
    # One test for the usual case; _text names the first field that is not a string.
    if not (type(vote_hash) is type(citizen_id) is type(law_id) is type(choice) is type(timestamp) is str):
        for key in ("vote_hash", "citizen_id", "law_id", "choice", "timestamp"):
            _text(obj, key)

    if not vote_hash or len(vote_hash) > VOTE_HASH_MAX or not _HEX.fullmatch(vote_hash):
        raise InvalidVote("invalid_vote_hash", f"vote_hash must be 1-{VOTE_HASH_MAX} hex characters")
    _printable_id(citizen_id, "citizen_id", CITIZEN_ID_MAX)
    if not law_id or len(law_id) > LAW_ID_MAX or not law_id.isprintable() or not law_id_pattern.fullmatch(law_id):
        raise InvalidVote("invalid_law_id", f"law_id must be 1-{LAW_ID_MAX} characters matching LAW_ID_PATTERN")
    if choice not in CHOICES:
        raise InvalidVote("invalid_choice", "choice must be 'oui' or 'non'")
    instant, timestamp_text = _read_timestamp(timestamp)
    # Positional: keywords double the cost of building it, once per vote.
    # A hex digest names the same vote in either case; store one spelling.
    vote = Vote(vote_hash.lower(), citizen_id, law_id, choice, instant, timestamp_text)
    if len(obj) == len(FIELDS):  # the five and nothing else: the usual case
        return ParsedVote(vote, ())
    # Only their names are kept: the values are never looked at, whatever their type.
    extra = tuple(sorted({_field_name(key) for key in obj.keys() - FIELDS})[:EXTRA_FIELDS_MAX])
    return ParsedVote(vote, extra)


def parse_vote(body: bytes, *, max_bytes: int, law_id_pattern: re.Pattern[str] = DEFAULT_LAW_ID_PATTERN) -> Vote:
    """The Vote of parse_message, for callers that ignore extra fields."""
    return parse_message(body, max_bytes=max_bytes, law_id_pattern=law_id_pattern).vote
