"""Dead letters as records: what one keeps of a delivery, and the delivery rebuilt from it."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from bridge.deadletter import dead_letter, delivery_from_dead_letter, delivery_key
from bridge.errors import UnknownEventType
from bridge.geins import Delivery, parse_delivery

RECEIVED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
REFUSED = UnknownEventType("Voucher/create is not a known Geins event type")


def refused(headers: list[tuple[bytes, bytes]]) -> Delivery:
    return Delivery(
        method="POST",
        path="/webhooks/geins/Voucher/create",
        path_entity="Voucher",
        path_action="create",
        query=[],
        headers=headers,
        body=b'{"code":"X"}',
        received_at=RECEIVED,
    )


def round_trip(delivery: Delivery, tokens: list[str] | None = None) -> Delivery:
    letter = dead_letter(delivery, REFUSED, "geins.deadletter", tokens or [])
    return delivery_from_dead_letter(letter.headers, letter.value)


def test_repeated_request_headers_survive_the_round_trip() -> None:
    """Two different x-Timestamp values come back as two (parsing trusts neither); an
    object of headers used to keep only the last, which the replay then trusted."""
    sent = [
        (b"x-idempotency-key", b"k-1"),
        (b"x-timestamp", b"2024-01-15T10:30:00Z"),
        (b"X-Timestamp", b"2024-01-16T11:00:00Z"),
    ]
    rebuilt = round_trip(refused(sent))
    assert rebuilt.headers == [(n.lower(), v) for n, v in sent]
    original = parse_delivery(refused(sent))
    replayed = parse_delivery(rebuilt)
    assert not original.time_from_header
    assert not replayed.time_from_header
    assert replayed.time == original.time == RECEIVED


def test_credentials_are_still_left_out() -> None:
    """Credential headers and values holding an accepted token are not kept."""
    sent = [
        (b"authorization", b"Bearer s3cret"),
        (b"cookie", b"a=b"),
        (b"x-forwarded-note", b"has s3cret inside"),
        (b"x-idempotency-key", b"k-1"),
    ]
    letter = dead_letter(refused(sent), REFUSED, "geins.deadletter", ["s3cret"])
    stored = dict(letter.headers)["x-bridge-request-headers"]
    assert orjson.loads(stored) == [["x-idempotency-key", "k-1"]]
    assert b"s3cret" not in b"".join(v for _, v in letter.headers)


def test_dead_letters_of_the_old_form_are_still_read() -> None:
    """A dead letter written before the list form holds an object of headers; it rebuilds."""
    old = [
        ("x-bridge-method", b"POST"),
        ("x-bridge-path", b"/webhooks/geins/Voucher/create"),
        ("x-bridge-path-entity", b"Voucher"),
        ("x-bridge-path-action", b"create"),
        ("x-bridge-received-at", RECEIVED.isoformat().encode()),
        ("x-bridge-request-headers", b'{"x-idempotency-key":"k-1","x-timestamp":"2024-01-15"}'),
    ]
    rebuilt = delivery_from_dead_letter(old, b"{}")
    assert rebuilt.headers == [(b"x-idempotency-key", b"k-1"), (b"x-timestamp", b"2024-01-15")]
    assert parse_delivery(rebuilt).key == "k-1"


def test_a_dead_letter_keeps_every_key_parsing_accepts() -> None:
    """A key with a no-break space (printable to HTTP, not to str.isprintable) is the
    event's key, so it is the dead letter's too (it used to get a random one); a control
    character is refused by both."""
    nbsp = "order\u00a01"
    sent = [(b"x-idempotency-key", nbsp.encode())]
    accepted = parse_delivery(refused(sent), strict_types=False)
    assert accepted.key == nbsp
    assert delivery_key(refused(sent), []) == nbsp
    assert dead_letter(refused(sent), REFUSED, "dl", []).key == nbsp.encode()
    assert delivery_key(refused([(b"x-idempotency-key", b"order\x01")]), []) is None
