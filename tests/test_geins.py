"""geins.parse_delivery: where entity, action, key and time come from."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.app import create_app
from bridge.config import load_settings
from bridge.deadletter import delivery_key
from bridge.errors import (
    BadIdempotencyKey,
    BodyNotJson,
    BridgeError,
    MalformedEventType,
    MissingEventType,
    UnknownEventType,
)
from bridge.geins import ENTITY_ACTIONS, Delivery, Event, parse_delivery, parse_rfc3339
from bridge.metrics import Metrics
from bridge.redaction import Redactor
from tests.fakes import TOKEN, FakePublisher, call_asgi

RECEIVED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
KEY = (b"x-idempotency-key", b"k-1")


def delivery(
    body: bytes = b"",
    *,
    method: str = "POST",
    path: tuple[str | None, str | None] = (None, None),
    query: list[tuple[str, str]] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Delivery:
    return Delivery(
        method=method,
        path="/webhooks/geins",
        path_entity=path[0],
        path_action=path[1],
        query=query or [],
        headers=[KEY] if headers is None else headers,
        body=body,
        received_at=RECEIVED,
    )


def parse(d: Delivery, *, strict: bool = False) -> Event:
    return parse_delivery(d, strict_types=strict)


def test_body_fields_give_type_and_value_is_body_as_received() -> None:
    """Entity/action come from the body; the published value is the exact bytes."""
    body = b'{"entity":"Order", "action":"create","id":"7"}'
    event = parse(delivery(body))
    assert (event.entity, event.action, event.known_type) == ("Order", "create", True)
    assert event.value == body
    assert event.subject == "7"


def test_path_beats_query_beats_body() -> None:
    """The path wins over the query, which wins over the body."""
    body = b'{"entity":"Brand","action":"delete"}'
    event = parse(delivery(body, path=("order", None), query=[("action", "cancel")]))
    assert (event.entity, event.action) == ("Order", "cancel")


@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_query_value_does_not_hide_the_bodys(blank: str) -> None:
    """An empty substitution in the URL (?action=) counts as absent: the body's
    action, id, account and environment are used."""
    body = b'{"entity":"Order","action":"create","id":"7","account":"shop","environment":"qa"}'
    names = ("entity", "action", "id", "account", "environment")
    event = parse(delivery(body, query=[(name, blank) for name in names]))
    assert (event.entity, event.action, event.subject) == ("Order", "create", "7")
    assert (event.account, event.environment) == ("shop", "qa")


def test_a_blank_query_value_and_no_other_is_missing() -> None:
    """With nothing in the body either, the action is missing (not malformed)."""
    with pytest.raises(MissingEventType, match="no action found"):
        parse(delivery(b'{"entity":"Order"}', query=[("action", "")]))


@pytest.mark.parametrize("placeholder", ["{{action}}", " {{ action }} "])
def test_a_placeholder_left_in_the_query_does_not_hide_the_bodys(placeholder: str) -> None:
    """Geins may leave a placeholder it has no value for as it was; like a blank
    value, it counts as absent."""
    body = b'{"entity":"Order","action":"create"}'
    event = parse(delivery(body, query=[("action", placeholder), ("entity", "{{entity}}")]))
    assert (event.entity, event.action) == ("Order", "create")


def test_a_utf8_byte_order_mark_is_accepted_and_not_published() -> None:
    """RFC 8259 lets a parser ignore a byte order mark; consumers get plain JSON."""
    body = b'{"entity":"Order","action":"create","id":"7"}'
    event = parse(delivery(b"\xef\xbb\xbf" + body))
    assert (event.entity, event.action, event.subject) == ("Order", "create", "7")
    assert event.value == body


@pytest.mark.parametrize(
    ("codec", "name"),
    [
        ("utf-16", "UTF-16"),  # with its byte order mark
        ("utf-16-le", "UTF-16"),
        ("utf-16-be", "UTF-16"),
        ("utf-32", "UTF-32"),
        ("utf-32-le", "UTF-32"),
        ("utf-32-be", "UTF-32"),
    ],
)
def test_a_utf16_or_utf32_body_is_refused_saying_so(codec: str, name: str) -> None:
    body = '{"entity":"Order","action":"create"}'.encode(codec)
    with pytest.raises(BodyNotJson, match=f"the body is {name}; JSON .* must be UTF-8"):
        parse(delivery(body))


def test_a_utf8_idempotency_key_is_the_record_key_as_sent() -> None:
    """Header bytes are read as latin-1; a UTF-8 key is read as UTF-8, so that its
    UTF-8 encoding (the record key) is the bytes Geins sent."""
    sent = "order-åäö-1".encode()
    event = parse(
        delivery(b'{"entity":"Order","action":"create"}', headers=[(b"x-idempotency-key", sent)])
    )
    assert event.key == "order-åäö-1"
    assert event.key.encode() == sent
    refused = delivery(b"[]", headers=[(b"x-idempotency-key", sent)])  # a dead letter's key too
    assert delivery_key(refused, Redactor()) == "order-åäö-1"
    assert event.raw_key is not None
    assert event.raw_key.encode("latin-1") == sent
    other = parse(
        delivery(
            b'{"entity":"Order","action":"create"}', headers=[(b"x-idempotency-key", b"k-\xe5")]
        )
    )  # not UTF-8
    assert other.key == "k-å"


def test_names_match_case_insensitively() -> None:
    """Field names and entity names are matched without regard to case."""
    event = parse(delivery(b'{"Entity":"productmonitor","ACTION":"Notify"}'))
    assert (event.entity, event.action, event.known_type) == ("ProductMonitor", "notify", True)


def test_unknown_but_well_formed_type_is_accepted() -> None:
    """Geins adds event types over time: a new one is routed, flagged as unknown."""
    event = parse(delivery(b'{"entity":"Voucher","action":"create"}'))
    assert (event.entity, event.action, event.known_type) == ("Voucher", "create", False)
    assert event.entity not in ENTITY_ACTIONS


def test_unknown_action_of_known_entity_is_flagged() -> None:
    """A known entity with an action outside its list is an unknown type."""
    assert not parse(delivery(b'{"entity":"Brand","action":"cancel"}')).known_type


def test_strict_types_reject_unknown() -> None:
    """BRIDGE_STRICT_TYPES turns unknown types into 422."""
    with pytest.raises(UnknownEventType) as info:
        parse(delivery(b'{"entity":"Voucher","action":"create"}'), strict=True)
    assert info.value.status == 422


def test_spaces_around_entity_and_action_are_no_part_of_them() -> None:
    """A template's `"{{action}} "` or a query's `action=create%20` was a 422, where
    spaces around the id, the key or the account are ignored; the body is published
    as it came."""
    body = b'{"entity":" Order\\t","action":"create "}'
    event = parse(delivery(body))
    assert (event.entity, event.action, event.known_type) == ("Order", "create", True)
    assert event.value == body
    query = parse(delivery(query=[("entity", "Product "), ("action", " update")]))
    assert (query.entity, query.action) == ("Product", "update")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"id":"5"}', MissingEventType),
        (b'{"entity":"Order"}', MissingEventType),
        (b'{"entity":"Order","action":""}', MissingEventType),
        (b'{"entity":"Order","action":" \\t"}', MissingEventType),
        (b'{"entity":"{{entity}}","action":"create"}', MalformedEventType),
        (b'{"entity":"Or der","action":"create"}', MalformedEventType),
        (b'{"entity":5,"action":"create"}', MalformedEventType),
        (b'{"entity":"' + b"A" * 65 + b'","action":"create"}', MalformedEventType),
        (b'{"entity":"Order","action":"create",}', BodyNotJson),
        (b'{"name":"Bob "The" Builder"}', BodyNotJson),
        (b"[1,2]", BodyNotJson),
        (b'"text"', BodyNotJson),
        (b"\xff\xfe", BodyNotJson),
        (b'{"a": NaN}', BodyNotJson),
        (b'{"a": Infinity}', BodyNotJson),
        ('{"a":"é"}'.encode("utf-16"), BodyNotJson),
    ],
)
def test_bad_deliveries_are_refused_with_their_reason(
    body: bytes, error: type[BridgeError]
) -> None:
    """Each kind of bad body gets its own error class (and so status and reason)."""
    with pytest.raises(error):
        parse(delivery(body))


def test_json_beyond_orjson_is_still_json() -> None:
    """A number too large for a double is valid JSON and is accepted as sent."""
    body = b'{"entity":"Order","action":"create","total":1e400}'
    assert parse(delivery(body)).value == body


@pytest.mark.parametrize("text", ["\\ud800", "\\udfff", "a\\ud800b"])
def test_a_lone_surrogate_is_not_json_text(text: str) -> None:
    """The standard library reads a \\u escape of a lone surrogate, which orjson
    refuses, into a str nothing can encode: the record's ce_subject failed with a
    500 (not a 400 with a dead letter). Refused as not JSON instead, anywhere in
    the body. A surrogate pair is a character and stays accepted."""
    for body in (
        b'{"entity":"Order","action":"create","id":"%s"}' % text.encode(),
        b'{"entity":"Order","action":"create","x":{"%s":1}}' % text.encode(),
    ):
        with pytest.raises(BodyNotJson, match="lone UTF-16 surrogate"):
            parse(delivery(body))
    pair = b'{"entity":"Order","action":"create","id":"\\ud83d\\ude00","n":1e400}'
    assert parse(delivery(pair)).subject == "\U0001f600"


def test_empty_body_publishes_query_object_without_token() -> None:
    """A GET (or empty POST) publishes its query parameters, never the token."""
    d = delivery(
        method="GET",
        path=("Category", None),
        query=[("action", "create"), ("id", "42"), ("token", "secret"), ("id", "43")],
    )
    event = parse(d)
    assert orjson.loads(event.value) == {
        "action": "create",
        "id": ["42", "43"],
        "entity": "Category",
    }
    assert b"secret" not in event.value
    assert event.subject == "42,43"  # every id, as the value lists them


def test_empty_body_publishes_no_gateway_credential() -> None:
    """A gateway's credential in the URL (APIM's subscription-key, a SAS sig) was
    published in a GET's event, where its header form never was; a template's own
    key-like parameter and an author are the event's data."""
    d = delivery(
        method="GET",
        path=("Order", "create"),
        query=[
            ("subscription-key", "apim-secret"),
            ("SIG", "sas-secret"),
            ("auth_token", "t-secret"),
            ("orderKey", "o-1"),
            ("author", "ann"),
        ],
    )
    assert orjson.loads(parse(d).value) == {
        "orderKey": "o-1",
        "author": "ann",
        "entity": "Order",
        "action": "create",
    }


def test_whitespace_body_counts_as_empty() -> None:
    """A body of only whitespace is treated like no body."""
    event = parse(delivery(b"  \r\n", query=[("entity", "Order"), ("action", "lock")]))
    assert orjson.loads(event.value)["action"] == "lock"


def test_missing_key_is_generated_and_marked() -> None:
    """Without x-Idempotency-Key a UUID is generated and the event says so."""
    event = parse(delivery(b'{"entity":"Order","action":"create"}', headers=[]))
    assert event.key_generated
    assert len(event.key) == 36
    assert event.raw_key is None


@pytest.mark.parametrize("sent", [b"   ", b"\t", b""])
def test_a_blank_key_is_generated_and_no_header_kept(sent: bytes) -> None:
    """A blank x-Idempotency-Key is no key (one is generated), and the record had an
    empty x-idempotency-key header beside it, unlike a delivery without the header."""
    event = parse(
        delivery(b'{"entity":"Order","action":"create"}', headers=[(b"x-idempotency-key", sent)])
    )
    assert event.key_generated
    assert event.raw_key is None


def test_the_spaces_after_a_header_value_are_not_part_of_it() -> None:
    """HTTP counts no spaces or tabs around a header value as part of it; the HTTP
    parser drops those before it, not those after, so the record's x-idempotency-key
    header kept them ("ows-r1\t ") where its key and ce_id did not."""
    headers = [(b"x-idempotency-key", b"ows-r1\t "), (b"x-timestamp", b"2024-01-15T10:30:00Z ")]
    event = parse(delivery(b'{"entity":"Order","action":"create"}', headers=headers))
    assert (event.key, event.raw_key) == ("ows-r1", "ows-r1")
    assert event.raw_timestamp == "2024-01-15T10:30:00Z"
    assert event.time_from_header
    twice = [*headers, (b"x-timestamp", b"2024-01-15T10:30:00Z")]  # the same value, twice
    assert parse(delivery(b'{"entity":"Order","action":"create"}', headers=twice)).time_from_header


@pytest.mark.parametrize(
    ("query", "subject"),
    [
        ([("id", "1"), ("id", "2")], "1,2"),
        ([("ID", "1"), ("x", "y"), ("id", "{{id}}"), ("Id", "3")], "1,3"),
        ([("id", "1"), ("id", "")], "1"),
        ([("id", "7")], "7"),
    ],
)
def test_every_id_of_a_query_is_the_subject(query: list[tuple[str, str]], subject: str) -> None:
    """?id=1&id=2 gave ce_subject 1 while the value listed both: joined as a JSON
    array of ids is."""
    event = parse(delivery(method="GET", path=("Order", "create"), query=query))
    assert event.subject == subject


@pytest.mark.parametrize(
    ("written", "subject"),
    [
        (b"1e3", "1000"),
        (b"1000.0", "1000"),
        (b"12.5", "12.5"),
        (b"12345", "12345"),
        # past 2**53 too (they were "1e+16" and "1e+20": a review's find)
        (b"1e16", "10000000000000000"),
        (b"1e20", "100000000000000000000"),
        (b"10000000000000000.0", "10000000000000000"),
        # as written, not the double's binary value 99999999999999991611392 (a review's)
        (b"1e23", "100000000000000000000000"),
        (b"-0.0", "0"),
        (b"1e400", None),  # read as inf by the fallback parser: no number to write
        # past 64 bits, and whole past 2**53 with a fraction: read as doubles, they were
        # 18446744073709552000 both, two orders one subject (a review's find)
        (b"18446744073709551616", "18446744073709551616"),
        (b"18446744073709551617", "18446744073709551617"),
        (b"-9223372036854775809", "-9223372036854775809"),
        (b"123456789012345678901234567890", "123456789012345678901234567890"),
        (b"12345678901234567.0", "12345678901234567"),
        (b"[1.0,18446744073709551617]", "1,18446744073709551617"),
        (b"1e-7", "1e-07"),  # a fraction: the double's text, as ever
        # fractions read exactly by the second reading give the double's text too
        # (they were "1.0" and "1.2345678901234568e+16": a review's test)
        (b"[1.00000000000000000001,18446744073709551617]", "1,18446744073709551617"),
        (b"[12345678901234567.5,18446744073709551617]", "12345678901234568,18446744073709551617"),
    ],
)
def test_a_number_id_is_written_as_a_number(written: bytes, subject: str | None) -> None:
    """JSON's 1e3 is 1000.0 to the parser: the subject was "1000.0"."""
    event = parse(delivery(b'{"entity":"Order","action":"create","id":' + written + b"}"))
    assert event.subject == subject


def test_a_large_number_account_is_exact() -> None:
    """The account and environment feed topic names: read exactly, as the id is."""
    body = b'{"entity":"Order","action":"create","account":18446744073709551617}'
    assert parse(delivery(body)).account == "18446744073709551617"


def test_a_repeated_query_value_counts_its_first_given_one() -> None:
    """A blank value counts as absent wherever it stands among repeats: `?id=&id=5` gave
    no subject and `?action=&action=create` a 422, where `?id=5&id=` gave 5 (a review's
    tests)."""
    query = [("entity", "Order"), ("action", ""), ("action", "create"), ("id", ""), ("id", "5")]
    event = parse(delivery(method="GET", query=query))
    assert (event.entity, event.action, event.subject) == ("Order", "create", "5")


@pytest.mark.parametrize("body", [b"\x0c", b"\x0b", b" \x0b\r\n"])
def test_a_body_of_what_is_no_json_whitespace_is_no_json(body: bytes) -> None:
    """JSON's whitespace is space, tab, CR and LF (RFC 8259): a body of a form feed was
    taken for no body (bytes.strip) and published bodiless (a review's test)."""
    with pytest.raises(BodyNotJson):
        parse(delivery(body, path=("Order", "create")))


@pytest.mark.parametrize(
    "body",
    [
        b'{"entity":"Order","action":"create","id":"12\\u000034"}',
        b'{"entity":"Order","action":"create","id":"12\\n34"}',
        b'{"entity":"Order","action":"create","id":["1","2\\u009b3"]}',
        '{"entity":"Order","action":"create","id":"1\ufffe"}'.encode(),
        '{"entity":"Order","action":"create","id":"é\U0001fffe"}'.encode(),
    ],
)
def test_an_id_no_cloudevents_string_can_hold_is_no_subject(body: bytes) -> None:
    """CloudEvents strings hold no C0 or C1 control character nor Unicode noncharacter:
    ce_subject "12\\n34" could not be forwarded in an HTTP header (a review's test)."""
    assert parse(delivery(body)).subject is None


@pytest.mark.parametrize(
    "key", [b"a" * 201, b"abc\x01def", b"tab\there", "c1-\x85".encode(), "x\uffff".encode()]
)
def test_bad_key_is_refused(key: bytes) -> None:
    """Overlong keys and keys with control characters are 400."""
    with pytest.raises(BadIdempotencyKey):
        parse(delivery(b'{"entity":"Order","action":"create"}', headers=[(KEY[0], key)]))


@pytest.mark.parametrize("key", [b"abc\x1f", b"\x1cabc", b"abc\x0b", b"abc\r"])
def test_a_control_character_at_either_end_of_a_key_is_refused(key: bytes) -> None:
    """Only HTTP's own optional whitespace (spaces, tabs) around the value is dropped:
    str.strip() also took \\x1c-\\x1f and \\x0b, and the key became "abc" instead of a
    400 (a dead letter's key is refused alike)."""
    with pytest.raises(BadIdempotencyKey, match="control characters"):
        parse(delivery(b'{"entity":"Order","action":"create"}', headers=[(KEY[0], key)]))
    assert delivery_key(delivery(b"[]", headers=[(KEY[0], key)]), Redactor()) is None


@pytest.mark.parametrize(
    ("sent", "key"),
    [
        (b" \tabc \t", "abc"),  # HTTP's optional whitespace around a value
        ("abc\u00a0".encode(), "abc\u00a0"),  # no-break space
        ("\u3000abc".encode(), "\u3000abc"),  # ideographic space
        ("\u2003abc\u2028".encode(), "\u2003abc\u2028"),  # em space, line separator
        (b"abc\xa0", "abc\u00a0"),  # a latin-1 no-break space, not UTF-8
    ],
)
def test_a_key_is_byte_for_byte_but_for_spaces_and_tabs_around_it(sent: bytes, key: str) -> None:
    """Unicode whitespace is part of the key: `abc<NBSP>` is not `abc`, so it is not
    taken for a retry of `abc`. The dead letter's key is the event's."""
    event = parse(delivery(b'{"entity":"Order","action":"create"}', headers=[(KEY[0], sent)]))
    assert event.key == key
    assert delivery_key(delivery(b"[]", headers=[(KEY[0], sent)]), Redactor()) == key


def test_conflicting_duplicate_keys_are_refused() -> None:
    """Two different x-Idempotency-Key headers cannot both be the key."""
    headers = [(b"x-idempotency-key", b"a"), (b"X-Idempotency-Key", b"b")]
    with pytest.raises(BadIdempotencyKey):
        parse(delivery(b'{"entity":"Order","action":"create"}', headers=headers))


def test_timestamp_parsed_or_replaced_by_received_time() -> None:
    """x-Timestamp is used when RFC 3339; otherwise the received time, flagged."""
    body = b'{"entity":"Order","action":"create"}'
    good = parse(delivery(body, headers=[KEY, (b"x-timestamp", b"2024-01-15T10:30:00Z")]))
    assert good.time == datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert good.time_from_header
    bad = parse(delivery(body, headers=[KEY, (b"x-timestamp", b"yesterday")]))
    assert bad.time == RECEIVED
    assert not bad.time_from_header
    assert bad.raw_timestamp == "yesterday"


def test_two_different_timestamps_are_kept_as_sent_and_neither_trusted() -> None:
    """The record's x-timestamp header went missing ('the original Geins headers, as
    sent'); it is both values, joined as HTTP reads a repeated header."""
    stamps = [(b"x-timestamp", b"2024-01-15T10:30:00Z"), (b"X-Timestamp", b"2024-01-15T10:30:01Z")]
    event = parse(delivery(b'{"entity":"Order","action":"create"}', headers=[KEY, *stamps]))
    assert event.time == RECEIVED
    assert not event.time_from_header
    assert event.raw_timestamp == "2024-01-15T10:30:00Z, 2024-01-15T10:30:01Z"
    # Less the spaces and tabs after each value, which httptools keeps (a review's test)
    stamps = [(name, value + b" \t") for name, value in stamps]
    event = parse(delivery(b'{"entity":"Order","action":"create"}', headers=[KEY, *stamps]))
    assert event.raw_timestamp == "2024-01-15T10:30:00Z, 2024-01-15T10:30:01Z"


def test_a_body_that_is_not_utf8_is_named_so_with_where() -> None:
    """A Latin-1 body was refused with orjson's 'str is not valid UTF-8: surrogates not
    allowed: line 1 column 1 (char 0)': neither the cause nor the place."""
    body = '{"entity":"Order","action":"create","name":"Jörg"}'.encode("latin-1")
    with pytest.raises(BodyNotJson, match=r"not UTF-8 \(byte 0xf6 at offset 45\)"):
        parse(delivery(body))
    with pytest.raises(BodyNotJson, match=r"not UTF-8 \(byte 0xf6 at offset 48\)"):
        parse(delivery(b"\xef\xbb\xbf" + body))  # counted in what was sent, its BOM too


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-15T10:30:00Z", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
        ("2024-01-15t10:30:00z", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
        ("2024-01-15T12:30:00+02:00", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
        ("2024-01-15 10:30:00.123456789Z", datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)),
        # any number of fraction digits (RFC 3339), cut to the microsecond
        ("2024-01-15T10:30:00.1234567891Z", datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)),
        ("2024-01-15T10:30:00.5Z", datetime(2024, 1, 15, 10, 30, 0, 500000, tzinfo=UTC)),
        # a leap second: the second after :59
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),
        ("2016-12-31T23:59:60.25+00:00", datetime(2017, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)),
        ("2024-01-15T10:30:61Z", None),
        ("2024-01-15T10:30:00.Z", None),
        ("2024-01-15T10:30:00", None),
        ("2024-01-15", None),
        ("2024-13-15T10:30:00Z", None),
        ("0001-01-01T00:00:00+01:00", None),  # before year 1 in UTC (was a 500)
        ("9999-12-31T23:59:59-01:00", None),  # after year 9999 in UTC
        # no RFC 3339 offsets: +05:99 was read as +06:39 (a review's test)
        ("2024-01-15T10:30:00+05:99", None),
        ("2024-01-15T10:30:00-00:60", None),
        ("2024-01-15T10:30:00+24:00", None),
        ("2024-01-15T10:30:00+23:59", datetime(2024, 1, 14, 10, 31, tzinfo=UTC)),
        ("2024-01-15T10:30:0\u0662Z", None),  # a digit, but not an ASCII one
        ("", None),
    ],
)
def test_rfc3339(text: str, expected: datetime | None) -> None:
    """Only RFC 3339 date-times with an offset are read as timestamps."""
    assert parse_rfc3339(text) == expected


def test_unsubstituted_placeholders_are_not_subjects() -> None:
    """A literal {{id}} left by Geins is treated as no id."""
    event = parse(delivery(b'{"entity":"Order","action":"create","id":"{{id}}"}'))
    assert event.subject is None


@pytest.mark.parametrize(
    ("ids", "subject"),
    [
        (b'["12345", 678]', "12345,678"),
        (b'["1", "{{id}}", "", null, {"x": 1}]', "1"),
        (b"[]", None),
        (b'"12345,678"', "12345,678"),
    ],
)
def test_an_array_of_ids_is_a_subject_as_a_list_in_a_string_is(
    ids: bytes, subject: str | None
) -> None:
    """Geins sends several ids as one comma-separated string; a template that sends
    them as a JSON array got no ce_subject at all: its ids are joined the same way."""
    event = parse(delivery(b'{"entity":"Order","action":"create","id":' + ids + b"}"))
    assert event.subject == subject


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # orjson.dumps' range
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(orjson.dumps),
        st.dictionaries(
            st.sampled_from(["entity", "Entity", "action", "id", "account", "x"]),
            json_values,
        ).map(orjson.dumps),
    ),
    path=st.tuples(st.none() | st.text(max_size=70), st.none() | st.text(max_size=70)),
    query=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=5),
    headers=st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=250)), max_size=5),
    method=st.sampled_from(["GET", "POST", "PUT"]),
    strict=st.booleans(),
)
def test_any_input_gives_an_event_or_a_clean_4xx(
    body: bytes,
    path: tuple[str | None, str | None],
    query: list[tuple[str, str]],
    headers: list[tuple[bytes, bytes]],
    method: str,
    strict: bool,
) -> None:
    """Arbitrary bytes, paths, queries and headers never raise anything but a 4xx."""
    d = delivery(body, method=method, path=path, query=query, headers=headers)
    try:
        event = parse(d, strict=strict)
    except BridgeError as exc:
        error: BridgeError | None = exc
    else:
        error = None
    if error is not None:
        assert 400 <= error.status < 500
        assert error.detail
    else:
        assert event.value
        assert isinstance(orjson.loads(event.value), dict)
        assert len(event.key) <= 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"entity":"Order","Entity":"Product","action":"create"}',
        b'{"entity":"Order","entity":"Product","action":"create"}',
        # the standard library's path (a number orjson refuses) alike
        b'{"entity":"Order","entity":"Product","action":"create","n":1e400}',
    ],
)
def test_the_last_of_two_entity_fields_routes_the_event_whatever_their_case(body: bytes) -> None:
    """As every JSON parser keeps the last of two equal names: the first of two names
    differing in case only was kept, so the topic hung on the second name's case (a
    review's test)."""
    assert parse(delivery(body)).entity == "Product"


@pytest.mark.parametrize("padded", ["entity", "x-timestamp"])
def test_padded_names_and_timestamps_are_not_kept_after_their_deliveries(padded: str) -> None:
    """The caches of event types and timestamps kept each text as sent: spaces around a
    name are no part of it, so 1,024 names padded to the body's limit stayed in memory
    (some 1 GB) after their events were published, and 1,024 timestamps of a header's
    size (a review's test)."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    publisher = FakePublisher()
    app = create_app(settings, publisher=publisher, metrics=Metrics())
    padding = 200_000 if padded == "entity" else 10_000

    async def deliver_all() -> list[int]:
        statuses = []
        for i in range(40):
            headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
            entity = "Order"
            if padded == "entity":
                entity += " " * (padding + i)
            else:
                headers.append((b"x-timestamp", b"x" * (padding + i)))
            body = orjson.dumps({"entity": entity, "action": "create", "id": str(i)})
            response = await call_asgi(
                app, "POST", "/webhooks/geins", headers=headers, body_chunks=[body]
            )
            statuses.append(response.status)
        return statuses

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        statuses = asyncio.run(deliver_all())
        publisher.records.clear()  # what Kafka got is not the bridge's memory
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert statuses == [202] * 40
    assert retained < 40 * padding // 4, f"{retained} bytes kept"
