"""Dead letters as records: what one keeps of a delivery, and the delivery rebuilt from it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.message_accumulator import DefaultRecordBatchBuilder

from bridge import kafkaadmin
from bridge.ackmodes import BrokerAck
from bridge.app import create_app
from bridge.config import load_settings
from bridge.deadletter import dead_letter, delivery_from_dead_letter, delivery_key
from bridge.errors import (
    BodyNotJson,
    BridgeError,
    MalformedEventType,
    PayloadTooLarge,
    PublishTimeout,
    UnknownEventType,
)
from bridge.geins import Delivery, parse_delivery
from bridge.ingress import parse_query
from bridge.metrics import Metrics
from bridge.pipeline import Pipeline
from bridge.redaction import Redactor
from bridge.routing import Destination, Router
from tests.fakes import TOKEN, FakePublisher, call_asgi, voucher_delivery

RECEIVED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
REFUSED = UnknownEventType("Voucher/create is not a known Geins event type")


def refused(headers: list[tuple[bytes, bytes]]) -> Delivery:
    return voucher_delivery(headers, b'{"code":"X"}', RECEIVED)


def round_trip(delivery: Delivery, tokens: list[str] | None = None) -> Delivery:
    letter = dead_letter(delivery, REFUSED, "geins.deadletter", Redactor(tokens or []))
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


def test_request_headers_are_kept_as_utf8_text_and_replayed_byte_for_byte() -> None:
    """The JSON of the request headers read every value as latin-1, so a UTF-8 key
    arrived as mojibake ("dead-ÐºÐ»Ñ\u008eÑ\u0087-r1") for whoever read it. UTF-8 is
    text now, other bytes a latin-1 character each, with the encoding read where the
    pair alone would not give the bytes back: a replay sends the bytes that came.
    Without it, bytes that were not UTF-8 came back as UTF-8, and UTF-8 that reads as
    mojibake ("Ã©") as other bytes: another key. Pairs elsewhere, so that a bridge
    rolled back to a version that reads only pairs can replay them."""
    sent = [(b"x-idempotency-key", "dead-ключ-r1".encode()), (b"x-note", "é ✓".encode())]
    letter = dead_letter(refused(sent), REFUSED, "geins.deadletter", Redactor([]))
    kept = dict(letter.headers)["x-bridge-request-headers"]
    assert orjson.loads(kept) == [
        ["x-idempotency-key", "dead-ключ-r1"],
        ["x-note", "é ✓"],
    ]
    assert round_trip(refused(sent)).headers == sent
    for odd, encoding in (
        (b"k-\xe5", "latin-1"),
        ("k-Ã©".encode(), "utf-8"),  # a pair would read it as an older version's latin-1
        (b"\xc3(", "latin-1"),
        (b"lundi 2 d\xe9c", "latin-1"),
    ):
        headers = [(b"x-idempotency-key", odd), (b"x-timestamp", odd)]
        letter = dead_letter(refused(headers), REFUSED, "geins.deadletter", Redactor([]))
        stored = orjson.loads(dict(letter.headers)["x-bridge-request-headers"])
        assert [entry[2:] for entry in stored] == [[encoding], [encoding]]
        assert round_trip(refused(headers)).headers == headers
        assert parse_delivery(round_trip(refused(headers))).key == (
            parse_delivery(refused(headers)).key
        )


def rebuilt_from(stored: object) -> Delivery:
    """The delivery a replay rebuilds from a dead letter whose request headers are
    ``stored`` (as JSON): those written by other versions, say."""
    letter = dead_letter(refused([]), REFUSED, "geins.deadletter", Redactor([]))
    headers = [
        (n, orjson.dumps(stored) if n == "x-bridge-request-headers" else v)
        for n, v in letter.headers
    ]
    return delivery_from_dead_letter(headers, letter.value)


def test_request_headers_kept_as_pairs_replay_as_before() -> None:
    """Dead letters of the versions that kept [name, value] pairs: UTF-8 as UTF-8, other
    bytes as UTF-8 too (the same key: key_text reads both alike)."""
    rebuilt = rebuilt_from([["x-idempotency-key", "k-å"], ["x-note", "é ✓"]])
    assert rebuilt.headers == [(b"x-idempotency-key", "k-å".encode()), (b"x-note", "é ✓".encode())]
    assert (
        parse_delivery(rebuilt).key
        == parse_delivery(refused([(b"x-idempotency-key", b"k-\xe5")])).key
    )


def test_a_request_header_read_with_another_encoding_is_no_dead_letter_to_replay() -> None:
    with pytest.raises(ValueError, match="rot13"):
        rebuilt_from([["x-idempotency-key", "k", "rot13"]])


def test_request_headers_kept_by_earlier_versions_replay_as_they_came() -> None:
    """Dead letters written before kept every value as latin-1 characters: a UTF-8 key
    is mojibake in them, and a replay sends its bytes as they came."""
    utf8 = "dead-ключ-r1".encode()
    rebuilt = rebuilt_from([["x-idempotency-key", utf8.decode("latin-1")], ["x-a", "plain"]])
    assert rebuilt.headers == [(b"x-idempotency-key", utf8), (b"x-a", b"plain")]


def test_a_stored_query_means_what_the_bridge_reads_and_replays_the_same() -> None:
    """Kept form-encoded (a space as '+'), the query `deadletter list` showed meant
    something else pasted back into the bridge, which keeps a '+' as a '+'. Now a
    space is %20 and a '+' %2B, and a replay still reads it as sent; so does an older
    dead letter's '+' for a space."""
    query = [("email", "a+b@x.com"), ("note", "a b"), ("plus", "+")]
    letter = dead_letter(dataclasses.replace(refused([]), query=query), REFUSED, "dl", Redactor())
    stored = dict(letter.headers)["x-bridge-query"]
    assert stored == b"email=a%2Bb%40x.com&note=a%20b&plus=%2B"
    assert parse_query(stored) == query
    assert round_trip(dataclasses.replace(refused([]), query=query)).query == query
    older = [(n, v) for n, v in letter.headers if n != "x-bridge-query"]
    older.append(("x-bridge-query", b"email=a%2Bb%40x.com&note=a+b&plus=%2B"))
    assert delivery_from_dead_letter(older, b"").query == query


def test_credentials_are_still_left_out() -> None:
    """Credential headers and values holding an accepted token are not kept."""
    sent = [
        (b"authorization", b"Bearer s3cret"),
        (b"cookie", b"a=b"),
        (b"x-forwarded-note", b"has s3cret inside"),
        (b"x-idempotency-key", b"k-1"),
    ]
    letter = dead_letter(refused(sent), REFUSED, "geins.deadletter", Redactor(["s3cret"]))
    stored = dict(letter.headers)["x-bridge-request-headers"]
    assert orjson.loads(stored) == [["x-idempotency-key", "k-1"]]
    assert b"s3cret" not in b"".join(v for _, v in letter.headers)


def test_credentials_in_the_query_are_left_out() -> None:
    """A gateway's credential in the URL (APIM's subscription-key, OAuth's access_token,
    a SAS sig) was kept in x-bridge-query, though its header form was left out; the
    template's own parameters, a key-like name among them, are the event's data."""
    query = [
        ("subscription-key", "apim-secret"),
        ("access_token", "oauth-secret"),
        ("Sig", "sas-secret"),
        ("X-Amz-Signature", "aws-secret"),
        ("auth_token", "t-secret"),
        ("x-api-key", "k-secret"),
        ("action", "create"),
        ("orderKey", "o-1"),
    ]
    letter = dead_letter(dataclasses.replace(refused([]), query=query), REFUSED, "dl", Redactor())
    assert dict(letter.headers)["x-bridge-query"] == b"action=create&orderKey=o-1"


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
    assert delivery_key(refused(sent), Redactor()) == nbsp
    assert dead_letter(refused(sent), REFUSED, "dl", Redactor()).key == nbsp.encode()
    assert delivery_key(refused([(b"x-idempotency-key", b"order\x01")]), Redactor()) is None


PLUS = "plus+Secret2"
HEX = "0123456789abcdef" * 4


def test_credentials_in_any_form_or_header_are_left_out() -> None:
    """A copy of a token in another form (Basic-encoded, percent-encoded, the raw '+'
    of a query), and headers whose names say they carry a credential of another
    system, are not kept; what a replay needs, and harmless headers, are."""
    sent = [
        (b"x-forwarded-authorization", b"Basic " + base64.b64encode(f"user:{HEX}".encode())),
        (b"x-original-url", b"/webhooks/geins?token=plus%2BSecret2"),
        (b"x-copy", b"Basic " + base64.b64encode(b"geins:" + PLUS.encode())),
        (b"x-auth-token", b"third-party-1"),
        (b"x-forwarded-access-token", b"third-party-2"),
        (b"ocp-apim-subscription-key", b"third-party-3"),
        (b"x-goog-iap-jwt-assertion", b"third-party-4"),
        (b"X-Client_Secret", b"third-party-5"),
        (b"set-cookie", b"third-party-6"),
        (b"x-idempotency-key", b"k-1"),
        (b"x-timestamp", b"2024-01-15T10:30:00Z"),
        (b"user-agent", b"Geins-Webhooks/1.0"),
        (b"x-forwarded-for", b"192.0.2.7"),
    ]
    delivery = dataclasses.replace(
        refused(sent), query=[("token", PLUS), ("ref", "plus Secret2"), ("n", "1")]
    )
    letter = dead_letter(delivery, REFUSED, "geins.deadletter", Redactor([PLUS, HEX]))
    stored = dict(letter.headers)
    assert orjson.loads(stored["x-bridge-request-headers"]) == [
        ["x-idempotency-key", "k-1"],
        ["x-timestamp", "2024-01-15T10:30:00Z"],
        ["user-agent", "Geins-Webhooks/1.0"],
        ["x-forwarded-for", "192.0.2.7"],
    ]
    assert stored["x-bridge-query"] == b"ref=%3Ctoken%3E&n=1"
    everything = b"".join(v for _, v in letter.headers) + letter.key
    assert b"third-party" not in everything
    assert b"Secret2" not in everything
    assert HEX.encode() not in everything


def test_a_url_in_a_header_loses_the_credentials_of_its_query() -> None:
    """A proxy's copy of the request URL (x-original-url, a referer) keeps its path and
    its other parameters, not those that carry another system's credential, as the
    request's own query; the headers a replay reads are kept as they came."""
    sent = [
        (b"x-original-url", b"/webhooks/geins?subscription-key=third-party-1&n=1"),
        (b"x-forwarded-uri", b"/webhooks/geins?Access_Token=third-party-2"),
        (b"referer", b"https://gw.example/h?a=1&sig=third-party-3&b=%2B#top"),
        (b"x-rewrite-url", b"/w?subscription%2Dkey=third-party-4&&x"),
        (b"x-idempotency-key", b"k?token=1"),
        (b"x-timestamp", b"2024-01-15T10:30:00Z"),
    ]
    letter = dead_letter(refused(sent), REFUSED, "geins.deadletter", Redactor())
    stored = dict(letter.headers)
    assert orjson.loads(stored["x-bridge-request-headers"]) == [
        ["x-original-url", "/webhooks/geins?n=1"],
        ["x-forwarded-uri", "/webhooks/geins"],
        ["referer", "https://gw.example/h?a=1&b=%2B#top"],
        ["x-rewrite-url", "/w?&x"],
        ["x-idempotency-key", "k?token=1"],
        ["x-timestamp", "2024-01-15T10:30:00Z"],
    ]
    assert b"third-party" not in b"".join(v for _, v in letter.headers)
    assert letter.key == b"k?token=1"


def test_a_token_in_the_path_or_the_detail_is_replaced() -> None:
    """The path keeps its shape with a marker for the token; the segment that held it
    is no entity or action, so its header is left out and a replay reads them from
    the query or the body, as the sender meant. The detail is redacted too."""
    delivery = Delivery(
        method="POST",
        path=f"/webhooks/geins/Order/{HEX}",
        path_entity="Order",
        path_action=HEX,
        query=[("action", "create")],
        headers=[(b"x-idempotency-key", f"r4-{HEX}".encode())],
        body=b'{"id":"1"}',
        received_at=RECEIVED,
    )
    error = UnknownEventType(f"Order/{HEX} is not a known Geins event type")
    letter = dead_letter(delivery, error, "geins.deadletter", Redactor([HEX]))
    stored = dict(letter.headers)
    assert stored["x-bridge-path"] == b"/webhooks/geins/Order/<token>"
    assert stored["x-bridge-path-entity"] == b"Order"
    assert "x-bridge-path-action" not in stored
    assert stored["x-bridge-detail"] == b"Order/<token> is not a known Geins event type"
    assert stored["x-bridge-request-headers"] == b"[]"  # the key held it: a new key
    assert HEX.encode() not in b"".join(v for _, v in letter.headers) + letter.key
    replayed = parse_delivery(delivery_from_dead_letter(letter.headers, letter.value))
    assert (replayed.entity, replayed.action) == ("Order", "create")


@dataclasses.dataclass
class Record:
    """What a replay reads of a dead letter's ConsumerRecord."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


#: A token that can be an entity name (letters and digits).
NAME_TOKEN = "Secret0123456789abcdefXYZ"


def kept(body: bytes, error: BridgeError, *, token: str = NAME_TOKEN) -> Record:
    """The dead letter a bridge with ``token`` keeps of a POST of ``body`` it refused."""
    delivery = dataclasses.replace(
        refused([]), path="/webhooks/geins", path_entity=None, path_action=None, body=body
    )
    letter = dead_letter(delivery, error, "geins.deadletter", Redactor([token]))
    return Record(letter.key, letter.value, letter.headers)


def replay(
    monkeypatch: pytest.MonkeyPatch,
    letters: list[Record],
    publisher: FakePublisher | None = None,
    **env: str,
) -> tuple[list[tuple[str | None, str]], list[Destination]]:
    """(topic or None, outcome) of each dead letter ``bridge deadletter replay`` runs again
    with the settings ``env`` (publishing with ``publisher``), and what it published."""
    settings = load_settings(environ={"BRIDGE_TOKENS": NAME_TOKEN, **env})
    publisher = publisher or FakePublisher()

    async def started(_: object) -> FakePublisher:
        return publisher

    monkeypatch.setattr(kafkaadmin, "_started_publisher", started)

    async def records() -> AsyncIterator[Record]:
        for letter in letters:
            yield letter

    async def run() -> list[tuple[str | None, str]]:
        results = kafkaadmin.replay_dead_letters(
            settings, Router.from_settings(settings), records(), dry_run=False
        )
        return [(replayed.topic, replayed.outcome) async for replayed in results]

    return asyncio.run(run()), publisher.records


def test_a_replay_whose_record_lands_after_the_publish_timeout_says_it_replayed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record Kafka acknowledges after BRIDGE_PUBLISH_TIMEOUT is still in the producer:
    it was reported "not published" (exit 1) and then landed, so replaying it again
    published it twice. Its landing is waited for as long again; one that neither lands
    nor fails by then is said to be maybe on Kafka."""
    plan = ["lands", "silent", "fails"]
    publisher = FakePublisher()

    async def timing_out(destination: Destination) -> None:
        loop = asyncio.get_running_loop()
        landing: asyncio.Future[None] = loop.create_future()
        then = plan.pop(0)
        if then == "lands":
            loop.call_later(0.05, landing.set_result, None)
        elif then == "fails":
            loop.call_later(0.05, landing.set_exception, KafkaTimeoutError())
        timeout = PublishTimeout(f"Kafka did not acknowledge the record for {destination.topic}")
        timeout.landing = landing
        raise timeout

    monkeypatch.setattr(publisher, "publish", timing_out)
    body = b'{"entity":"Voucher","action":"create"}'
    results, _ = replay(
        monkeypatch,
        [kept(body, REFUSED) for _ in plan],
        publisher,
        BRIDGE_STRICT_TYPES="false",
        BRIDGE_PUBLISH_TIMEOUT="0.3",
    )
    not_acknowledged = (
        "not published: Kafka did not acknowledge the record for geins.voucher.create"
    )
    assert results == [
        ("geins.voucher.create", "accepted"),
        (None, f"{not_acknowledged} (it may still reach Kafka: {kafkaadmin.MAYBE_ON_KAFKA})"),
        (None, not_acknowledged),
    ]


def test_a_replay_refuses_what_would_put_a_token_in_a_topic_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead letter refused because its entity, or its account under a template that
    names topics after it, holds a token is still refused on replay, with the token
    left out of what it says: it used to be accepted and published to a topic named
    after the token (the replay ran parsing and routing without the token checks)."""
    letters = [
        kept(
            b'{"entity":"%s","action":"create"}' % NAME_TOKEN.encode(),
            MalformedEventType("the entity or action holds a webhook token"),
        ),
        kept(
            b'{"entity":"Order","action":"create","account":"acme-%s"}' % NAME_TOKEN.encode(),
            MalformedEventType("the account or environment holds a webhook token"),
        ),
    ]
    results, published = replay(
        monkeypatch, letters, BRIDGE_TOPIC_TEMPLATE="geins.{entity}.{action}.{account}"
    )
    assert [topic for topic, _ in results] == [None, None]
    assert all(o.startswith("still refused: malformed_event_type") for _, o in results)
    assert NAME_TOKEN not in repr(results)
    assert published == []


def test_a_replay_leaves_out_a_subject_that_holds_a_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Refused under strict types, then replayed without them: the event is published,
    without the ce_subject its id would make (the token is in BRIDGE_TOKENS_FILE only,
    as the authenticator reads it)."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# rotated in\nfile-token-0123456789\n", encoding="utf-8")
    body = b'{"entity":"Voucher","action":"create","id":"v-file-token-0123456789"}'
    letter = kept(body, REFUSED, token="file-token-0123456789")
    results, published = replay(
        monkeypatch,
        [letter],
        BRIDGE_STRICT_TYPES="false",
        BRIDGE_TOKENS_FILE=str(tokens_file),
    )
    assert results == [("geins.voucher.create", "accepted")]
    [record] = published
    assert "ce_subject" not in dict(record.headers)
    assert b"file-token" not in b"".join(v for _, v in record.headers) + record.key
    assert record.value == body  # the event's data, as sent


async def test_broker_mode_keeps_the_dead_letter_of_an_event_at_its_limit() -> None:
    """The room kept below the record limit (DEAD_LETTER_ROOM) is for a refused event's
    dead letter headers, but broker mode weighed the dead letter against the event's
    limit: an event within ~200 bytes of it that Kafka refused got its 413 and no dead
    letter (durable and memory modes kept it)."""
    settings = load_settings(environ={"BRIDGE_TOKENS": "t" * 16, "BRIDGE_ACK": "broker"})
    publisher = FakePublisher()
    event = Destination("geins.order.create", b"k", b"x" * 5000, [("ce_id", b"k")])
    at_its_limit = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        event.key, event.value, event.headers
    )
    pipeline = Pipeline(
        Router.from_settings(settings),
        BrokerAck(publisher, settings),
        Metrics(),
        strict_types=False,
        deadletter_topic="geins.deadletter",
        secrets=Redactor(),
        record_limit=at_its_limit,
    )
    refusal = PayloadTooLarge("larger than the topic's max.message.bytes")
    await pipeline._keep_refused_event(event, "k", refusal)
    assert [r.topic for r in publisher.records] == ["geins.deadletter"]
    assert refusal.detail.endswith("it is kept on geins.deadletter")


class _LateLetters(FakePublisher):
    """Kafka acknowledges the first record only after the publish timeout."""

    landing: asyncio.Future[Any] | None = None

    async def publish(self, destination: Destination) -> None:
        if self.landing is None:
            self.landing = asyncio.get_running_loop().create_future()
            self.records.append(destination)  # queued in the producer: it will land
            timeout = PublishTimeout("Kafka did not acknowledge the record in time")
            timeout.landing = self.landing
            raise timeout
        await super().publish(destination)


async def test_a_dead_letter_that_lands_after_its_timeout_is_counted_once() -> None:
    """Broker mode: a dead letter whose publish timed out (503) and then landed was never
    counted: the sender's retry found it kept already and counted nothing either."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    publisher, metrics = _LateLetters(), Metrics()
    app = create_app(settings, publisher=publisher, metrics=metrics)
    headers = [(b"authorization", b"Bearer " + TOKEN.encode()), (b"x-idempotency-key", b"bad")]

    async def deliver() -> int:
        answer = await call_asgi(
            app, "POST", "/webhooks/geins", headers=headers, body_chunks=[b"not json"]
        )
        return answer.status

    assert await deliver() == 503  # the dead letter could not be kept now
    assert publisher.landing is not None
    publisher.landing.set_result(None)  # ... and then Kafka took it after all
    await asyncio.sleep(0)
    assert await deliver() == 400
    assert await deliver() == 400
    assert [r.topic for r in publisher.records] == ["geins.deadletter"]
    counted = metrics.registry.get_sample_value(
        "bridge_dead_letters_total", {"reason": "body_not_json"}
    )
    assert counted == 1


def test_broker_mode_counts_a_dead_letter_it_can_never_keep_as_dropped() -> None:
    """Durable and memory modes count a dead letter Kafka refuses for good in
    bridge_dropped_records_total; broker mode only logged it."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    metrics = Metrics()
    publisher = FakePublisher(fail_with=PayloadTooLarge("larger than the topic takes"))
    app = create_app(settings, publisher=publisher, metrics=metrics)
    answer = asyncio.run(
        call_asgi(
            app,
            "POST",
            "/webhooks/geins",
            headers=[(b"authorization", b"Bearer " + TOKEN.encode())],
            body_chunks=[b"not json"],
        )
    )
    assert answer.status == 400
    assert metrics.registry.get_sample_value("bridge_dropped_records_total") == 1
    assert (
        metrics.registry.get_sample_value("bridge_dead_letters_total", {"reason": "body_not_json"})
        == 0
    )


class _OneLateBatch(FakePublisher):
    """Kafka slow to acknowledge one batch: every record published now joins it (as
    concurrent records of one partition join its open batch in aiokafka), and its
    publish times out; PublishTimeout.landing is the batch's future, shared by all."""

    batch: asyncio.Future[Any] | None = None

    async def publish(self, destination: Destination) -> None:
        if self.batch is None:
            self.batch = asyncio.get_running_loop().create_future()
        self.records.append(destination)  # queued in the producer: it lands with its batch
        timeout = PublishTimeout("Kafka did not acknowledge the record in time")
        timeout.landing = self.batch
        raise timeout


async def test_two_dead_letters_that_land_in_one_batch_are_both_counted() -> None:
    """The landing watched to count a late dead letter is its batch's future: watched
    once per future, two dead letters of one batch counted 1."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    publisher, metrics = _OneLateBatch(), Metrics()
    app = create_app(settings, publisher=publisher, metrics=metrics)

    async def deliver(key: bytes) -> int:
        headers = [(b"authorization", b"Bearer " + TOKEN.encode()), (b"x-idempotency-key", key)]
        answer = await call_asgi(
            app, "POST", "/webhooks/geins", headers=headers, body_chunks=[b"not json"]
        )
        return answer.status

    assert list(await asyncio.gather(deliver(b"bad-1"), deliver(b"bad-2"))) == [503, 503]
    assert publisher.batch is not None
    publisher.batch.set_result(None)  # the batch lands: both dead letters are in Kafka
    await asyncio.sleep(0)
    assert [r.topic for r in publisher.records] == ["geins.deadletter"] * 2
    counted = metrics.registry.get_sample_value(
        "bridge_dead_letters_total", {"reason": "body_not_json"}
    )
    assert counted == 2


def test_a_lost_dead_letter_counts_once_however_often_its_delivery_is_retried() -> None:
    """A delivery refused 400 whose dead letter Kafka refuses for good is one record
    lost, however often the sender retries it: broker mode counted one at each retry,
    so the alert scaled with Geins' retries (a review's test)."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    metrics = Metrics()
    publisher = FakePublisher(fail_with=PayloadTooLarge("larger than the topic takes"))
    app = create_app(settings, publisher=publisher, metrics=metrics)
    headers = [(b"authorization", b"Bearer " + TOKEN.encode()), (b"x-idempotency-key", b"bad-1")]

    async def three_tries() -> list[int]:
        answers = [
            await call_asgi(
                app, "POST", "/webhooks/geins", headers=headers, body_chunks=[b"not json"]
            )
            for _ in range(3)
        ]
        return [answer.status for answer in answers]

    assert asyncio.run(three_tries()) == [400, 400, 400]
    assert metrics.registry.get_sample_value("bridge_dropped_records_total") == 1


LATIN1_TOKEN = "Räksmörgås-hemlighet-2026"


def test_a_token_sent_as_latin_1_in_a_header_is_kept_out_of_the_dead_letter() -> None:
    """Header values are kept (and the key taken) a character a byte where they are not
    UTF-8, but a token was looked for in their UTF-8 reading only: a non-ASCII token
    sent as latin-1 became the dead letter's record key, and sat in its request
    headers (a review's find)."""
    sent = LATIN1_TOKEN.encode("latin-1")
    delivery = Delivery(
        method="POST",
        path="/webhooks/geins/Order/create",
        path_entity="Order",
        path_action="create",
        query=[],
        headers=[(b"x-idempotency-key", sent), (b"x-shop-ref", sent), (b"x-other", b"kept")],
        body=b"not json",
        received_at=datetime.now(UTC),
    )
    letter = dead_letter(delivery, BodyNotJson("x"), "geins.deadletter", Redactor([LATIN1_TOKEN]))
    stored = letter.key + b" " + b" ".join(v for _, v in letter.headers)
    assert sent not in stored
    assert LATIN1_TOKEN.encode() not in stored
    assert b"kept" in stored
