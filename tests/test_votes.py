"""Unit tests of votes.parse_message and parse_vote: what becomes a Vote and why everything else is refused."""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from votes import (
    CHOICES,
    EXTRA_FIELD_NAME_MAX,
    EXTRA_FIELDS_MAX,
    FIELDS,
    MAX_NESTING,
    REASONS,
    InvalidVote,
    ParsedVote,
    Vote,
    parse_message,
    parse_vote,
)

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


def extras(**fields: Any) -> tuple[str, ...]:
    """The extra field names parse_message reports for a good vote carrying `fields`."""
    parsed = parse_message(good_body(**fields), max_bytes=MAX_BYTES)
    assert parsed.vote == parse(good_body()), "an extra field changed the vote"
    return parsed.extra_fields


def instant(timestamp: str) -> datetime:
    return parse(good_body(timestamp=timestamp)).timestamp


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


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2025-11-14T12:00:00Z", GOOD_INSTANT),
        ("2025-11-14t12:00:00z", GOOD_INSTANT),
        ("2025-11-14 12:00:00Z", GOOD_INSTANT),
        ("2025-11-14T12:00:00", GOOD_INSTANT),
        ("2025-11-14 12:00:00", GOOD_INSTANT),
        ("2025-11-14T12:00:00+00:00", GOOD_INSTANT),
        ("2025-11-14T12:00:00-00:00", GOOD_INSTANT),
        ("2025-11-14T13:00:00+01:00", GOOD_INSTANT),
        ("2025-11-14T06:30:00-05:30", GOOD_INSTANT),
        ("2025-11-14T17:45:00+05:45", GOOD_INSTANT),
        ("2025-11-15T11:59:00+23:59", GOOD_INSTANT),
        ("2025-11-13T12:01:00-23:59", GOOD_INSTANT),
        ("2025-11-14T12:00:00.5Z", GOOD_INSTANT + timedelta(microseconds=500_000)),
        ("2025-11-14T12:00:00.12Z", GOOD_INSTANT + timedelta(microseconds=120_000)),
        ("2025-11-14T12:00:00.123Z", GOOD_INSTANT + timedelta(microseconds=123_000)),
        ("2025-11-14T12:00:00.000001Z", GOOD_INSTANT + timedelta(microseconds=1)),
        ("2025-11-14T12:00:00.123456", GOOD_INSTANT + timedelta(microseconds=123_456)),
        ("2025-11-14 13:00:00.123456789+01:00", GOOD_INSTANT + timedelta(microseconds=123_456)),
        ("2024-02-29T00:00:00Z", datetime(2024, 2, 29, tzinfo=UTC)),
        ("2000-02-29T23:59:59Z", datetime(2000, 2, 29, 23, 59, 59, tzinfo=UTC)),
        ("2025-12-31T23:59:59Z", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_rfc3339_forms_are_accepted(timestamp: str, expected: datetime) -> None:
    parsed = instant(timestamp)

    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("fraction", "microseconds"),
    [
        ("1234567", 123_456),
        ("12345678", 123_456),
        ("123456789", 123_456),
        ("0000009", 0),
        ("000000999", 0),
        ("9999999", 999_999),
        ("999999999", 999_999),
    ],
)
def test_seventh_to_ninth_fractional_digits_are_truncated(fraction: str, microseconds: int) -> None:
    # Truncated, not rounded: .9999999 stays in its second instead of carrying into the next.
    assert instant(f"2025-11-14T12:00:00.{fraction}Z") == GOOD_INSTANT + timedelta(microseconds=microseconds)


def test_truncation_never_carries_into_the_next_year() -> None:
    assert instant("2025-12-31T23:59:59.9999999Z") == datetime(2025, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("0001-01-01T00:00:00", datetime(1, 1, 1, tzinfo=UTC)),
        ("0001-01-01T01:00:00+01:00", datetime(1, 1, 1, tzinfo=UTC)),
        ("0001-01-01T00:00:00-00:01", datetime(1, 1, 1, 0, 1, tzinfo=UTC)),
        ("9999-12-31T23:59:59.999999Z", datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
        ("9999-12-31T23:59:59.999999999Z", datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
        ("9999-12-31T22:59:59.999999-01:00", datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
        ("9999-12-31T23:59:59+23:59", datetime(9999, 12, 31, 0, 0, 59, tzinfo=UTC)),
    ],
)
def test_range_boundaries_in_utc_are_accepted(timestamp: str, expected: datetime) -> None:
    assert instant(timestamp) == expected


@pytest.mark.parametrize(
    "timestamp",
    [
        "2025-11-14T12:00:00Z",
        "2025-11-14 13:00:00.123456789+01:00",
        "2025-11-14t06:59:59.9999999-05:00",
        "2025-11-14T12:00:00",
        "9999-12-31T23:59:59.999999999Z",
    ],
)
def test_same_text_gives_the_same_instant_every_time(timestamp: str) -> None:
    first = parse(good_body(timestamp=timestamp))
    again = parse(good_body(timestamp=timestamp))

    assert first.timestamp == again.timestamp
    assert first == again
    assert first.same_content(again)


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


@pytest.mark.parametrize("recursion_limit", [200, 1_000_000])
def test_the_nesting_limit_is_the_services_own_whatever_the_recursion_limit(recursion_limit: int) -> None:
    # The bound is MAX_NESTING, not the interpreter's recursion limit: a low one
    # does not refuse what is allowed, a high one does not let deeper JSON through.
    allowed = json.dumps(vote_dict(extra=json.loads("[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)))).encode()
    too_deep = json.dumps(vote_dict(extra=json.loads("[" * MAX_NESTING + "]" * MAX_NESTING))).encode()
    in_strings = json.dumps(vote_dict(extra="[{" * 500)).encode()  # brackets inside a string are text
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(recursion_limit)
    try:
        assert parse_message(allowed, max_bytes=MAX_BYTES).extra_fields == ("extra",)
        assert parse_message(in_strings, max_bytes=MAX_BYTES).extra_fields == ("extra",)
        with pytest.raises(InvalidVote, match=f"nested deeper than {MAX_NESTING} levels") as excinfo:
            parse_message(too_deep, max_bytes=MAX_BYTES)
        with pytest.raises(InvalidVote, match=f"nested deeper than {MAX_NESTING} levels"):
            parse_message(b"[" * 2_000 + b"]" * 2_000, max_bytes=MAX_BYTES)
    finally:
        sys.setrecursionlimit(previous)
    assert excinfo.value.reason == "invalid_json"


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


# --- extra fields: ignored, their names reported -------------------------------------------------


def test_extra_field_is_ignored_and_named() -> None:
    parsed = parse_message(body(vote_dict(comment="hello")), max_bytes=MAX_BYTES)

    assert parsed == ParsedVote(vote=parse(good_body()), extra_fields=("comment",))
    assert parse(body(vote_dict(comment="hello"))) == parse(good_body())


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("2026-11-29T10:00:00Z", True),
        ("2026-11-29T10:00:00.123456Z", True),
        ("2026-11-29T10:00:00.5Z", True),
        ("2026-11-29T10:00:00.1234567Z", False),  # truncated to microseconds: not what PostgreSQL would read
        ("2026-11-29T11:00:00+01:00", False),
        ("2026-11-29 10:00:00Z", False),
        ("2026-11-29t10:00:00z", False),
        ("2026-11-29T10:00:00", False),
    ],
)
def test_timestamp_text_is_kept_only_in_the_form_postgresql_reads_to_the_same_instant(text: str, kept: bool) -> None:
    vote = parse(good_body(timestamp=text))

    assert vote.timestamp_text == (text if kept else None)
    # Equality is by instant, whichever spelling the vote came with.
    assert vote == Vote(vote.vote_hash, vote.citizen_id, vote.law_id, vote.choice, vote.timestamp)


def test_vote_without_extra_fields_names_none() -> None:
    assert parse_message(good_body(), max_bytes=MAX_BYTES).extra_fields == ()


def test_parsed_vote_is_frozen() -> None:
    parsed = parse_message(good_body(), max_bytes=MAX_BYTES)

    with pytest.raises(AttributeError):
        parsed.extra_fields = ("x",)  # type: ignore[misc]


@pytest.mark.parametrize("value", [None, 1, 1.5, True, "", [1, [2]], {"nested": {"deeper": []}}, "x" * 1000])
def test_extra_field_of_any_type_is_ignored(value: object) -> None:
    assert extras(producer_version=value) == ("producer_version",)


def test_extra_field_names_are_sorted() -> None:
    assert extras(zeta=1, alpha=2, Mid=3, _under=4) == ("Mid", "_under", "alpha", "zeta")


def test_at_most_ten_extra_field_names_the_first_in_order() -> None:
    names = [f"field_{n:02d}" for n in range(25)]

    reported = extras(**dict.fromkeys(reversed(names), 0))

    assert EXTRA_FIELDS_MAX == 10
    assert reported == tuple(names[:10])


def test_long_extra_field_name_is_cut_to_64_characters() -> None:
    assert EXTRA_FIELD_NAME_MAX == 64
    assert extras(**{"n" * 3_000: 1}) == ("n" * 64,)
    assert extras(**{"n" * 64: 1}) == ("n" * 64,)


def test_names_equal_once_cut_are_reported_once() -> None:
    assert extras(**{"p" * 64 + "a": 1, "p" * 64 + "b": 2}) == ("p" * 64,)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("a\u0000b", "a\\x00b"),
        ("line\nbreak", "line\\x0abreak"),
        ("tab\tstop", "tab\\x09stop"),
        ("del\x7f", "del\\x7f"),
        ("\x85nel", "\\x85nel"),
        ("lone\ud800", "lone\\ud800"),
        ("admin\u200b", "admin\\u200b"),
        ("\u2028sep", "\\u2028sep"),
        ("\u00a0nbsp", "\\xa0nbsp"),
        ("tag\U000e0041", "tag\\U000e0041"),
        ("back\\slash", "back\\\\slash"),
        ("été_2025", "été_2025"),
        ("with space", "with space"),
        ("", ""),
    ],
)
def test_non_printable_characters_in_names_are_escaped(key: str, name: str) -> None:
    # Escaped, not dropped: "admin\u200b" must not pass for "admin". Escaping the
    # backslash too keeps every name distinct from an escape.
    (reported,) = extras(**{key: 1})

    assert reported == name
    assert reported.isprintable()
    reported.encode("utf-8")  # a lone surrogate would break the /metrics page


def test_escaped_name_is_cut_between_escapes() -> None:
    assert extras(**{"a" * 62 + "\u0000": 1}) == ("a" * 62,)
    assert extras(**{"a" * 60 + "\u0000": 1}) == ("a" * 60 + "\\x00",)
    assert extras(**{"\u0000" * 64: 1}) == ("\\x00" * 16,)


def test_differently_cased_field_is_an_extra_not_the_field() -> None:
    assert extras(Choice="non", CHOICE="non") == ("CHOICE", "Choice")
    assert parse(body(vote_dict(Choice="non"))).choice == "oui"


def test_missing_field_is_refused_even_with_extra_fields() -> None:
    obj = vote_dict(choix="oui")
    del obj["choice"]

    assert reason_for(body(obj)) == "missing_field"


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_duplicate_of_a_known_field_is_refused_even_with_extra_fields(key: str) -> None:
    data = body(vote_dict(extra=1))[:-1] + b", " + json.dumps(key).encode() + b": " + json.dumps(GOOD[key]).encode()
    data += b"}"

    assert reason_for(data) == "duplicate_key"


def test_duplicate_extra_field_is_refused() -> None:
    # Duplicate keys are refused wherever they are, as before: which copy would count is unknowable.
    assert reason_for(good_body()[:-1] + b', "x": 1, "x": 1}') == "duplicate_key"
    assert reason_for(good_body()[:-1] + b', "x": {"y": 1, "y": 2}}') == "duplicate_key"


def test_extra_field_with_non_standard_constant_is_invalid_json() -> None:
    assert reason_for(good_body()[:-1] + b', "x": NaN}') == "invalid_json"


def test_bad_known_field_is_refused_even_with_extra_fields() -> None:
    assert reason_for(good_body(choice="maybe", extra=1)) == "invalid_choice"
    assert reason_for(good_body(timestamp=1, extra=1)) == "wrong_type"


def test_law_id_pattern_is_applied_by_parse_message() -> None:
    only_digits = re.compile(r"[0-9]+")

    with pytest.raises(InvalidVote) as excinfo:
        parse_message(good_body(extra=1), max_bytes=MAX_BYTES, law_id_pattern=only_digits)
    assert excinfo.value.reason == "invalid_law_id"
    parsed = parse_message(good_body(law_id="42", extra=1), max_bytes=MAX_BYTES, law_id_pattern=only_digits)
    assert parsed.vote.law_id == "42"
    assert parsed.extra_fields == ("extra",)


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
        # not RFC 3339 date-times, though ISO 8601 or datetime.fromisoformat accept them
        "2025-11-14",
        "2025-11-14Z",
        "2025-W46-5",
        "2025-W46-5T12:00:00Z",
        "2025-318",
        "2025-318T12:00:00Z",
        "20251114T120000Z",
        "20251114",
        "2025-11-14T120000Z",
        "2025-11-14T12:00Z",
        "2025-11-14T12Z",
        "2025-11-14T12:00:00+01",
        "2025-11-14T12:00:00+0100",
        "2025-11-14T12:00:00+01:00:00",
        "2025-11-14T12:00:00+01:00:00.5",
        "2025-11-14T12:00:00,5Z",
        "2025-11-14T12:00:00.Z",
        "2025-11-14T12:00:00.1234567890Z",
        "2025-11-14T12:00:00 Z",
        "2025-11-14T12:00:00UTC",
        "2025-11-14T12:00:00+01:00[Europe/Paris]",
        "2025-11-14T12:00:00ZZ",
        "2025-11-14T12:00:00Z\n",
        " 2025-11-14T12:00:00Z",
        "2025-11-14  12:00:00Z",
        "2025-11-14_12:00:00Z",
        "2025-11-14\t12:00:00Z",
        "2025-11-14T1:00:00Z",
        "25-11-14T12:00:00Z",
        "+2025-11-14T12:00:00Z",
        "-0001-11-14T12:00:00Z",
        "12025-11-14T12:00:00Z",
        "\uff12\uff10\uff12\uff15-11-14T12:00:00Z",
        "\u0662\u0660\u0662\u0665-11-14T12:00:00Z",
        # out-of-range fields
        "0000-01-01T00:00:00Z",
        "2025-00-14T12:00:00Z",
        "2025-13-01T00:00:00Z",
        "2025-11-00T12:00:00Z",
        "2025-11-31T12:00:00Z",
        "2025-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-11-14T24:00:00Z",
        "2025-11-14T25:00:00Z",
        "2025-11-14T12:60:00Z",
        "2025-11-14T12:00:61Z",
        "2016-12-31T23:59:60Z",
        "2025-11-14T12:00:00+24:00",
        "2025-11-14T12:00:00-24:00",
        "2025-11-14T12:00:00+01:60",
        "2025-11-14T12:00:00+99:99",
        # longer than 40 characters
        "2025-11-14T12:00:00" + "0" * 81,
        "2025-11-14T12:00:00." + "0" * 20 + "Z",
        "x" * 100,
        # before year 1 or after year 9999 once in UTC
        "0001-01-01T00:00:00+01:00",
        "0001-01-01T00:00:00+00:01",
        "0001-01-01T00:00:00.999999+00:01",
        "0001-01-01T23:58:59+23:59",
        "9999-12-31T23:59:59-01:00",
        "9999-12-31T23:30:00-01:00",
        "9999-12-31T23:59:00-00:01",
        "9999-12-31T00:01:00-23:59",
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
    """parse_message's outcome for `data`: 'vote' or the reason; any other exception fails the test."""
    try:
        parsed = parse_message(data, max_bytes=max_bytes)
    except InvalidVote as exc:
        reason = exc.reason
    else:
        reason = "vote"
    if reason != "vote":
        assert reason in REASONS, (data, reason)
        return reason
    vote = parsed.vote
    assert isinstance(vote, Vote)
    assert parse_vote(data, max_bytes=max_bytes) == vote
    names = parsed.extra_fields
    assert len(names) <= EXTRA_FIELDS_MAX
    assert list(names) == sorted(set(names))
    for name in names:
        assert len(name) <= EXTRA_FIELD_NAME_MAX
        assert name.isprintable()
        name.encode("utf-8")
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


def _random_key(rng: random.Random) -> str:
    alphabet = rng.choice(["abcdefghij_", "\x00\n\\\x7f\u200b\ud800\udfff\u2028é\U0001f600a"])
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))


def test_random_extra_fields_give_bounded_printable_names() -> None:
    rng = random.Random(7)
    outcomes: set[str] = set()
    widest = 0
    for _ in range(500):
        obj = vote_dict()
        for _ in range(rng.randint(1, 30)):
            obj.setdefault(_random_key(rng), _random_value(rng))
        # Raw (not \u-escaped) lone surrogates are invalid UTF-8: refused before any name is read.
        outcomes.add(_check_outcome(body(obj, ensure_ascii=False), 1_000_000))
        parsed = parse_message(body(obj), max_bytes=1_000_000)
        assert parsed.vote == parse(good_body())
        widest = max(widest, len(parsed.extra_fields))
    assert outcomes == {"vote", "invalid_encoding"}
    assert widest == EXTRA_FIELDS_MAX


def test_random_timestamps_are_refused_or_in_range() -> None:
    rng = random.Random(3339)
    outcomes: set[str] = set()
    for _ in range(2000):
        text = "".join(
            rng.choice(["0", "1", "2", "9", "-", ":", "T", " ", "Z", "+", ".", "60", "24", "9999", "0001"])
            for _ in range(rng.randint(10, 30))
        )
        outcomes.add(_check_outcome(good_body(timestamp=text), MAX_BYTES))
    stamps = [
        "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}".format(*(rng.randint(0, 99) for _ in range(6))) for _ in range(2000)
    ]
    for stamp in stamps:
        outcomes.add(_check_outcome(good_body(timestamp=stamp + rng.choice(["", "Z", "+23:59", "-23:59"])), MAX_BYTES))
    assert outcomes == {"vote", "invalid_timestamp"}
