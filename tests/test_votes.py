"""Unit tests of votes.parse_vote: what becomes a Vote and why everything else is refused."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from votes import CHOICES, REASONS, InvalidVote, Vote, parse_vote

MAX_BYTES = 4096
GOOD_HASH = "a3f5c8e1" * 8  # 64 hex characters
GOOD: dict[str, Any] = {
    "vote_hash": GOOD_HASH,
    "citizen_id": "citizen-123",
    "law_id": "law-001",
    "choice": "oui",
    "timestamp": "2025-11-14T12:00:00Z",
}
GOOD_INSTANT = datetime(2025, 11, 14, 12, 0, 0, tzinfo=UTC)


def vote_dict(**changes: Any) -> dict[str, Any]:
    obj = dict(GOOD)
    obj.update(changes)
    return obj


def body(obj: object, *, ensure_ascii: bool = True) -> bytes:
    return json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def good_body(**changes: Any) -> bytes:
    return body(vote_dict(**changes))


def parse(data: bytes, *, max_bytes: int = MAX_BYTES) -> Vote:
    return parse_vote(data, max_bytes=max_bytes)


def reason_for(data: bytes, *, max_bytes: int = MAX_BYTES) -> str:
    """The reason parse_vote gives for refusing `data` (fails the test if it accepts it)."""
    with pytest.raises(InvalidVote) as excinfo:
        parse_vote(data, max_bytes=max_bytes)
    reason = excinfo.value.reason
    assert reason in REASONS
    assert str(excinfo.value).startswith(f"{reason}: ")
    return reason


def make_vote(**changes: Any) -> Vote:
    fields: dict[str, Any] = {
        "vote_hash": GOOD_HASH,
        "citizen_id": "citizen-123",
        "law_id": "law-001",
        "choice": "oui",
        "timestamp": GOOD_INSTANT,
    }
    fields.update(changes)
    return Vote(**fields)


# --- accepted votes ---------------------------------------------------------------------------


def test_good_vote_parses() -> None:
    vote = parse(good_body())

    assert vote == Vote(
        vote_hash=GOOD_HASH,
        citizen_id="citizen-123",
        law_id="law-001",
        choice="oui",
        timestamp=GOOD_INSTANT,
    )
    assert vote.timestamp.tzinfo is not None
    assert vote.timestamp.utcoffset() == timedelta(0)


def test_non_is_accepted() -> None:
    assert parse(good_body(choice="non")).choice == "non"


def test_uppercase_hash_is_stored_lowercase() -> None:
    assert parse(good_body(vote_hash=GOOD_HASH.upper())).vote_hash == GOOD_HASH


@pytest.fixture
def local_zone_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with the process's local time zone at UTC-5, so "local" and "UTC" differ."""
    monkeypatch.setenv("TZ", "EST+05")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_zone_not_utc")
def test_timestamp_without_zone_is_utc() -> None:
    assert datetime(2025, 11, 14, 12).astimezone(UTC).hour == 17, "the fixture did not change the local zone"
    vote = parse(good_body(timestamp="2025-11-14T12:00:00"))

    assert vote.timestamp == GOOD_INSTANT
    assert vote.timestamp.utcoffset() == timedelta(0)


def test_timestamp_with_offset_is_the_same_instant_in_utc() -> None:
    vote = parse(good_body(timestamp="2025-11-14T14:00:00+02:00"))

    assert vote.timestamp == GOOD_INSTANT
    assert vote.timestamp.utcoffset() == timedelta(0)
    assert vote.timestamp.hour == 12


def test_fractional_seconds_are_kept() -> None:
    vote = parse(good_body(timestamp="2025-11-14T12:00:00.250000Z"))

    assert vote.timestamp == GOOD_INSTANT + timedelta(milliseconds=250)


@pytest.mark.parametrize("vote_hash", ["0", "deadbeef", "ABCDEF12", "f" * 64])
def test_short_and_long_hex_hashes_are_accepted(vote_hash: str) -> None:
    assert parse(good_body(vote_hash=vote_hash)).vote_hash == vote_hash.lower()


def test_citizen_id_of_100_characters_is_accepted() -> None:
    citizen_id = "c" * 100
    assert parse(good_body(citizen_id=citizen_id)).citizen_id == citizen_id


def test_law_id_of_50_characters_is_accepted() -> None:
    law_id = "L" * 50
    assert parse(good_body(law_id=law_id)).law_id == law_id


@pytest.mark.parametrize("law_id", ["law-001", "LAW_2025.03", "eu:2025:12", "7"])
def test_usual_law_ids_are_accepted(law_id: str) -> None:
    assert parse(good_body(law_id=law_id)).law_id == law_id


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_non_ascii_printable_citizen_id_is_accepted(ensure_ascii: bool) -> None:
    data = body(vote_dict(citizen_id="élodie-42"), ensure_ascii=ensure_ascii)

    assert parse(data).citizen_id == "élodie-42"


def test_citizen_id_with_inner_space_is_accepted() -> None:
    assert parse(good_body(citizen_id="Jean Dupont")).citizen_id == "Jean Dupont"


def test_key_order_and_whitespace_do_not_matter() -> None:
    data = b'\n {  "timestamp" : "2025-11-14T12:00:00Z", "choice":"oui", "law_id":"law-001",\n'
    data += b'"citizen_id":"citizen-123",\t"vote_hash":"' + GOOD_HASH.encode() + b'" }  \n'

    assert parse(data) == parse(good_body())


def test_body_of_exactly_max_bytes_is_accepted() -> None:
    data = good_body()
    data += b" " * (MAX_BYTES - len(data))
    assert len(data) == MAX_BYTES

    assert parse(data).citizen_id == "citizen-123"
    assert reason_for(data + b" ") == "too_large"


# --- refused messages -------------------------------------------------------------------------


def test_body_over_max_bytes_is_too_large() -> None:
    assert reason_for(good_body(), max_bytes=50) == "too_large"


def test_ten_megabyte_body_is_too_large() -> None:
    data = good_body(citizen_id="x" * 10_000_000)

    assert reason_for(data) == "too_large"


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b'{"citizen_id": "\xc3"}', b"\xed\xa0\x80", b"\x80"])
def test_invalid_utf8_is_invalid_encoding(data: bytes) -> None:
    assert reason_for(data) == "invalid_encoding"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"{",
        b'{"vote_hash": }',
        b"{'vote_hash': 'abc'}",
        good_body()[:-1],
        good_body() + b",",
        good_body() + b"{}",
        good_body().replace(b'"oui"', b"oui"),
        b'{"vote_hash": "abc",}',
    ],
)
def test_malformed_json_is_invalid_json(data: bytes) -> None:
    assert reason_for(data) == "invalid_json"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("key", ["vote_hash", "timestamp"])
def test_non_standard_constants_are_invalid_json(constant: str, key: str) -> None:
    data = good_body().replace(json.dumps(GOOD[key]).encode(), constant.encode())
    assert constant.encode() in data

    assert reason_for(data) == "invalid_json"


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json_is_invalid_json_not_recursion_error(opener: str) -> None:
    data = (opener * 100_000).encode()

    assert reason_for(data, max_bytes=10_000_000) == "invalid_json"


@pytest.mark.parametrize(
    "data", [b"[]", b"[1, 2]", b'"vote"', b"42", b"-1.5", b"null", b"true", b"[" + good_body() + b"]"]
)
def test_json_that_is_not_an_object_is_refused(data: bytes) -> None:
    assert reason_for(data) == "not_an_object"


def test_duplicate_key_is_refused() -> None:
    data = good_body()[:-1] + b', "choice": "non"}'

    assert reason_for(data) == "duplicate_key"


def test_duplicate_key_with_same_value_is_refused() -> None:
    data = good_body()[:-1] + b', "law_id": "law-001"}'

    assert reason_for(data) == "duplicate_key"


@pytest.mark.parametrize("missing", sorted(GOOD))
def test_each_missing_field_is_refused(missing: str) -> None:
    obj = vote_dict()
    del obj[missing]

    with pytest.raises(InvalidVote) as excinfo:
        parse(body(obj))
    assert excinfo.value.reason == "missing_field"
    assert missing in str(excinfo.value)


def test_empty_object_is_missing_field() -> None:
    assert reason_for(b"{}") == "missing_field"


def test_extra_field_is_refused() -> None:
    with pytest.raises(InvalidVote) as excinfo:
        parse(body(vote_dict(comment="hello")))
    assert excinfo.value.reason == "unexpected_field"
    assert "comment" in str(excinfo.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("vote_hash", 123456),
        ("vote_hash", 1.5),
        ("citizen_id", ["citizen-123"]),
        ("citizen_id", {"id": "citizen-123"}),
        ("choice", True),
        ("timestamp", None),
        ("timestamp", 1731585600),
        ("law_id", 1),
    ],
)
def test_wrong_types_are_refused(key: str, value: object) -> None:
    with pytest.raises(InvalidVote) as excinfo:
        parse(good_body(**{key: value}))
    assert excinfo.value.reason == "wrong_type"
    assert key in str(excinfo.value)


@pytest.mark.parametrize("choice", ["OUI", "Non", "yes", "no", "", " oui", "oui ", "abstention"])
def test_invalid_choice(choice: str) -> None:
    assert reason_for(good_body(choice=choice)) == "invalid_choice"


@pytest.mark.parametrize(
    "vote_hash",
    ["", "a" * 65, "xyz", "abc def", " abcdef", "abcdef ", "abcdef\n", "0x1234", "\uff11\uff12\uff13", "ab-cd"],
)
def test_invalid_vote_hash(vote_hash: str) -> None:
    assert reason_for(good_body(vote_hash=vote_hash)) == "invalid_vote_hash"


@pytest.mark.parametrize(
    "citizen_id",
    [
        "",
        "c" * 101,
        "citizen\u0000123",
        "citizen\ud800",
        "citizen\n123",
        "citizen\t123",
        " citizen-123",
        "citizen-123 ",
        "\u00a0citizen",
        "citizen\u200b",
        "citizen\x7f",
    ],
)
def test_invalid_citizen_id(citizen_id: str) -> None:
    assert reason_for(good_body(citizen_id=citizen_id)) == "invalid_citizen_id"


def test_lone_surrogate_is_sent_as_a_json_escape() -> None:
    data = good_body(citizen_id="citizen\ud800")
    assert b"\\ud800" in data

    assert reason_for(data) == "invalid_citizen_id"


@pytest.mark.parametrize(
    "citizen_id",
    ["secret-citizen-\u0000-4242", "secret-citizen-4242" * 6, " secret-citizen-4242", "secret-citizen-\n4242"],
)
def test_message_for_bad_citizen_id_never_contains_the_id(citizen_id: str) -> None:
    with pytest.raises(InvalidVote) as excinfo:
        parse(good_body(citizen_id=citizen_id))

    assert excinfo.value.reason == "invalid_citizen_id"
    assert "secret-citizen" not in str(excinfo.value)
    assert "4242" not in str(excinfo.value)
    assert citizen_id not in excinfo.value.detail


@pytest.mark.parametrize(
    "law_id",
    [
        "",
        "L" * 51,
        "x'); DROP TABLE vote_audit;--",
        "law 001",
        "law/001",
        "-law-001",
        ".law",
        "law-001\n",
        "loi-été",
        "law\u0000",
    ],
)
def test_invalid_law_id(law_id: str) -> None:
    assert reason_for(good_body(law_id=law_id)) == "invalid_law_id"


@pytest.mark.parametrize(
    "timestamp",
    [
        "yesterday",
        "",
        "2025-13-01T00:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-11-14T25:00:00Z",
        "2025-11-14T12:00:00" + "0" * 81,
        "x" * 100,
        "2025-11-14T12:00:00+24:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
    ],
)
def test_invalid_timestamp(timestamp: str) -> None:
    assert reason_for(good_body(timestamp=timestamp)) == "invalid_timestamp"


def test_every_reason_is_reachable() -> None:
    samples = {
        "too_large": (good_body(), 10),
        "invalid_encoding": (b"\xff", MAX_BYTES),
        "invalid_json": (b"{", MAX_BYTES),
        "not_an_object": (b"[]", MAX_BYTES),
        "duplicate_key": (b'{"a": 1, "a": 2}', MAX_BYTES),
        "missing_field": (b"{}", MAX_BYTES),
        "unexpected_field": (good_body(extra=1), MAX_BYTES),
        "wrong_type": (good_body(choice=1), MAX_BYTES),
        "invalid_vote_hash": (good_body(vote_hash="g"), MAX_BYTES),
        "invalid_citizen_id": (good_body(citizen_id=""), MAX_BYTES),
        "invalid_law_id": (good_body(law_id=""), MAX_BYTES),
        "invalid_choice": (good_body(choice="peut-être"), MAX_BYTES),
        "invalid_timestamp": (good_body(timestamp="soon"), MAX_BYTES),
    }
    assert set(samples) == set(REASONS)
    for reason, (data, max_bytes) in samples.items():
        assert reason_for(data, max_bytes=max_bytes) == reason


# --- Vote.same_content ------------------------------------------------------------------------


def test_same_content_for_identical_fields() -> None:
    assert make_vote().same_content(make_vote())


@pytest.mark.parametrize(
    "changes",
    [
        {"choice": "non"},
        {"law_id": "law-002"},
        {"citizen_id": "citizen-124"},
        {"timestamp": GOOD_INSTANT + timedelta(seconds=1)},
        {"timestamp": GOOD_INSTANT + timedelta(microseconds=1)},
    ],
)
def test_different_content(changes: dict[str, Any]) -> None:
    assert not make_vote().same_content(make_vote(**changes))
    assert not make_vote(**changes).same_content(make_vote())


def test_same_instant_in_different_zones_is_same_content() -> None:
    paris = timezone(timedelta(hours=1))
    other = make_vote(timestamp=datetime(2025, 11, 14, 13, 0, 0, tzinfo=paris))

    assert make_vote().same_content(other)
    assert other.same_content(make_vote())


def test_parsed_redelivery_in_another_zone_is_same_content() -> None:
    first = parse(good_body())
    again = parse(good_body(timestamp="2025-11-14T07:00:00-05:00"))

    assert first.same_content(again)


# --- property-style robustness -----------------------------------------------------------------

_TOKENS = [
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\\udfff",
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"-0",
    b"null",
    b"true",
    b" ",
    b"\n",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b'"vote_hash"',
    b'"choice"',
    b'"x":1',
    b"9" * 50,
]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(out))
        operation = rng.randrange(6)
        if operation == 0 and out:
            out[min(position, len(out) - 1)] = rng.randrange(256)
        elif operation == 1:
            out[position:position] = bytes([rng.randrange(256)])
        elif operation == 2:
            del out[position : position + rng.randint(1, 8)]
        elif operation == 3:
            out[position:position] = rng.choice(_TOKENS)
        elif operation == 4:
            out[position : position + rng.randint(0, 3)] = rng.choice(_TOKENS)
        else:
            start = rng.randint(0, len(out))
            out[position:position] = out[start : start + rng.randint(1, 20)]
    return bytes(out)


def _random_value(rng: random.Random) -> object:
    choices: list[object] = [
        None,
        True,
        rng.randint(-(10**20), 10**20),
        rng.random(),
        "",
        "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(1, 10))),
        "".join(rng.choice("0123456789abcdefABCDEFxyz -") for _ in range(rng.randint(0, 70))),
        rng.choice(["oui", "non", "OUI", "2025-11-14T12:00:00+02:00", "2025-11-14", "law-001"]),
        [],
        {},
    ]
    return rng.choice(choices)


def _check_outcome(data: bytes, max_bytes: int) -> str:
    """parse_vote's outcome for `data`: 'vote' or the reason; any other exception fails the test."""
    try:
        vote = parse_vote(data, max_bytes=max_bytes)
    except InvalidVote as exc:
        assert exc.reason in REASONS, (data, exc.reason)
        return exc.reason
    assert isinstance(vote, Vote)
    assert vote.choice in CHOICES
    assert 1 <= len(vote.vote_hash) <= 64
    assert vote.vote_hash == vote.vote_hash.lower()
    assert 1 <= len(vote.citizen_id) <= 100
    assert vote.citizen_id.isprintable()
    assert vote.citizen_id == vote.citizen_id.strip()
    assert 1 <= len(vote.law_id) <= 50
    assert vote.timestamp.utcoffset() == timedelta(0)
    return "vote"


def test_random_bytes_never_raise_anything_but_invalid_vote() -> None:
    rng = random.Random(20251114)
    outcomes: set[str] = set()
    for _ in range(1000):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 120)))
        outcomes.add(_check_outcome(data, rng.choice([16, 64, MAX_BYTES])))
    assert "too_large" in outcomes
    assert "invalid_encoding" in outcomes


def test_mutated_votes_never_raise_anything_but_invalid_vote() -> None:
    rng = random.Random(1114)
    seed = good_body()
    outcomes: set[str] = set()
    for _ in range(1000):
        outcomes.add(_check_outcome(_mutate(seed, rng), MAX_BYTES))
    # The mutations reach deep into the parser, not just the first checks.
    assert {"vote", "invalid_json", "invalid_encoding"} <= outcomes
    assert len(outcomes) >= 6, outcomes


def test_random_field_values_never_raise_anything_but_invalid_vote() -> None:
    rng = random.Random(42)
    outcomes: set[str] = set()
    for _ in range(500):
        obj = vote_dict()
        for key in rng.sample(sorted(GOOD), rng.randint(1, 2)):
            obj[key] = _random_value(rng)
        data = body(obj, ensure_ascii=rng.random() < 0.5) if rng.random() < 0.9 else body([obj])
        outcomes.add(_check_outcome(data, MAX_BYTES))
    assert {"wrong_type", "invalid_vote_hash", "invalid_choice"} <= outcomes
