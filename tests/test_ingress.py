"""ingress: HTTP answers for every kind of delivery, with a fake publisher."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import Message

from bridge import ingress
from bridge.app import create_app
from bridge.config import Settings, load_settings
from bridge.errors import BridgeError, MethodNotAllowed, NotFound, PayloadTooLarge, PublishTimeout
from bridge.metrics import Metrics
from bridge.routing import Destination
from tests.fakes import TOKEN, FakePublisher, call_asgi, samples

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORDER = b'{"entity":"Order","action":"create","id":"1"}'


def make(**env: str) -> tuple[Starlette, FakePublisher, Metrics]:
    """The app with a fake publisher; broker ack mode unless ``BRIDGE_ACK`` says otherwise."""
    settings: Settings = load_settings(
        environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker", **env}
    )
    publisher, metrics = FakePublisher(), Metrics()
    return create_app(settings, publisher=publisher, metrics=metrics), publisher, metrics


@pytest.fixture
def bridge() -> Any:
    app, publisher, metrics = make()
    with TestClient(app) as client:
        yield client, publisher, metrics


@pytest.mark.parametrize("sample", samples(), ids=lambda s: s["name"])
def test_shared_samples(sample: dict[str, Any], bridge: Any) -> None:
    """Each shared sample gets its expected status, topic and key; rejects publish nothing."""
    client, publisher, _ = bridge
    response = client.request(
        sample["method"], sample["path"], headers=sample["headers"], content=sample["body"]
    )
    expect = sample["expect"]
    if expect["status"] == "2xx":
        assert response.status_code == 202, response.text
        assert response.json() == {
            "status": "accepted",
            "topic": expect["topic"],
            "key": expect["key"],
            "ack": "broker",
        }
        assert response.headers["x-bridge-ack"] == "broker"
        [record] = publisher.records
        assert (record.topic, record.key) == (expect["topic"], expect["key"].encode())
        if sample["body"]:
            assert record.value == sample["body"].encode()
        else:
            assert isinstance(orjson.loads(record.value), dict)
    else:
        assert 400 <= response.status_code < 500
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"]
        if "dead-letter" in sample["note"]:
            [kept] = publisher.records
            assert kept.topic == "geins.deadletter"
            assert kept.value == sample["body"].encode()
            assert kept.key == sample["headers"]["x-Idempotency-Key"].encode()
            assert dict(kept.headers)["x-bridge-reason"] == response.json()["reason"].encode()
        else:
            assert publisher.records == []


@pytest.mark.parametrize("ack", ["durable", "broker", "memory"])
def test_geins_retry_is_answered_duplicate(ack: str, tmp_path: Any) -> None:
    """The same delivery three times (a Geins retry): 202, then 200 duplicate; one record."""
    app, publisher, metrics = make(BRIDGE_ACK=ack, BRIDGE_SPOOL_DIR=str(tmp_path))
    headers = {**AUTH, "x-Idempotency-Key": "retry-me"}
    with TestClient(app) as client:
        answers = [client.post("/webhooks/geins", content=ORDER, headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 200, 200]
    assert answers[1].json() == {
        "status": "duplicate",
        "topic": "geins.order.create",
        "key": "retry-me",
        "ack": ack,
    }
    assert answers[0].headers["x-bridge-ack"] == ack
    assert len(publisher.records) == 1
    assert "bridge_duplicates_total 2.0" in metrics.exposition().decode()


@pytest.mark.parametrize("ack", ["durable", "broker", "memory"])
def test_an_event_too_large_for_kafka_is_413_in_every_mode(ack: str, tmp_path: Any) -> None:
    """A body within BRIDGE_MAX_BODY_BYTES can still make a record the producer refuses
    (its id is copied to ce_subject): 413 at once, rather than 2xx and a record that
    could never be delivered, not even as a dead letter. Nothing is published."""
    app, publisher, _ = make(
        BRIDGE_ACK=ack, BRIDGE_SPOOL_DIR=str(tmp_path), BRIDGE_MAX_BODY_BYTES="200000"
    )
    limit = load_settings(
        environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_MAX_BODY_BYTES": "200000"}
    ).max_event_record_bytes()
    huge = orjson.dumps({"entity": "Order", "action": "create", "id": "1" * 150_000})
    with TestClient(app) as client:
        refused = client.post("/webhooks/geins", content=huge, headers=AUTH)
        fits = client.post("/webhooks/geins", content=ORDER, headers=AUTH)
    assert refused.status_code == 413, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert f"at most {limit} bytes" in refused.json()["detail"]
    assert fits.status_code == 202
    assert [r.value for r in publisher.records] == [ORDER]


@pytest.mark.parametrize("ack", ["durable", "broker", "memory"])
def test_a_dead_letter_too_large_for_kafka_is_not_kept_and_the_4xx_goes_out(
    ack: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused delivery whose dead letter (body plus request headers) would be larger
    than the producer takes is logged, not handed to a mode that could never deliver it
    (in broker mode it was published, and Kafka would refuse it)."""
    app, publisher, _ = make(
        BRIDGE_ACK=ack,
        BRIDGE_SPOOL_DIR=str(tmp_path),
        BRIDGE_MAX_BODY_BYTES="200000",
        BRIDGE_MAX_HEADER_BYTES="200000",
    )
    headers = {**AUTH, "x-note": "n" * 150_000}  # keyless: kept without de-duplication
    with TestClient(app) as client:
        refused = client.post("/webhooks/geins", content=b"<" * 150_000, headers=headers)
    assert refused.status_code == 400, refused.text
    assert refused.json()["reason"] == "body_not_json"
    assert publisher.records == []
    assert "could not keep a dead letter (body_not_json)" in caplog.text


def test_unauthorized_has_challenge(bridge: Any) -> None:
    """401 carries WWW-Authenticate."""
    client, publisher, _ = bridge
    response = client.post("/webhooks/geins", content=ORDER)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert publisher.records == []


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE"])
def test_methods_that_are_no_delivery_are_405(bridge: Any, method: str) -> None:
    """HEAD (its answer has no body), OPTIONS and TRACE are HTTP's own."""
    client, publisher, _ = bridge
    response = client.request(method, "/webhooks/geins", headers=AUTH, content=ORDER)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST, PUT, PATCH, DELETE"
    assert publisher.records == []


@pytest.mark.parametrize("method", ["PATCH", "DELETE", "MERGE"])
def test_any_other_method_is_a_delivery(bridge: Any, method: str) -> None:
    """Geins' method is free text (nothing but POST and GET is named, nothing ruled
    out): PATCH, DELETE and the like were refused with a 405 and nothing was kept, so
    the event was lost once Geins stopped retrying. Body or query, as for the others."""
    client, publisher, _ = bridge
    response = client.request(method, "/webhooks/geins", headers=AUTH, content=ORDER)
    assert response.status_code == 202, response.text
    query = client.request(
        method, "/webhooks/geins/Order/update?id=7", headers={**AUTH, "x-Idempotency-Key": "q"}
    )
    assert query.status_code == 202, query.text
    assert [r.topic for r in publisher.records] == ["geins.order.create", "geins.order.update"]
    assert publisher.records[0].value == ORDER
    assert orjson.loads(publisher.records[1].value)["id"] == "7"


@pytest.mark.parametrize(
    "query", ["action={{action}}&id=7", "action=&id=7", "entity=&id=7", "Action=%20&id=7"]
)
def test_a_query_name_routing_took_as_absent_is_published_as_routed(
    bridge: Any, query: str
) -> None:
    """A blank or left-as-it-was entity/action counts as absent (README), and the path's
    routed the event; the value said "action": "{{action}}" (or "") all the same, a
    record contradicting its own topic and ce_type (a review's test)."""
    client, publisher, _ = bridge
    answer = client.get(f"/webhooks/geins/Order/create?{query}", headers=AUTH)
    assert answer.status_code == 202, answer.text
    [record] = publisher.records
    assert record.topic == "geins.order.create"
    assert orjson.loads(record.value) == {"id": "7", "entity": "Order", "action": "create"}


def test_a_plus_in_a_query_value_is_published_as_a_plus(bridge: Any) -> None:
    """Geins substitutes placeholders as plain text: ?email={{email}} brings an
    address's '+' as it is, and form decoding published it as a space (202, the data
    changed for good). %20 and %2B decode as usual."""
    client, publisher, _ = bridge
    url = (
        "/webhooks/geins?entity=ProductMonitor&action=notify&email=first.last+shop@example.com"
        "&resetKey=ab+cd/ef==&productName=Blue%20Shirt%2BHat&flag"
    )
    assert client.get(url, headers=AUTH).status_code == 202
    [record] = publisher.records
    assert orjson.loads(record.value) == {
        "entity": "ProductMonitor",
        "action": "notify",
        "email": "first.last+shop@example.com",
        "resetKey": "ab+cd/ef==",
        "productName": "Blue Shirt+Hat",
        "flag": "",
    }


@pytest.mark.parametrize(("parameters", "status"), [(200, 202), (201, 400)])
def test_a_query_of_more_than_200_parameters_is_400(
    bridge: Any, parameters: int, status: int
) -> None:
    """The fixed cap the README names (each parameter is parsed and held)."""
    client, publisher, _ = bridge
    query = "&".join(["entity=Order", "action=create"] + [f"p{i}=x" for i in range(parameters - 2)])
    response = client.get(f"/webhooks/geins?{query}", headers=AUTH)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["reason"] == "malformed_query"
        assert publisher.records == []


def test_empty_query_pieces_are_no_parameters(bridge: Any) -> None:
    """`&&` or a trailing `&` (a Geins template that filled a parameter with nothing)
    counted towards the 200: one parameter and 200 `&` was a 400 (a review's test)."""
    client, publisher, _ = bridge
    query = "id=1" + "&" * 200 + "&".join(f"p{i}=x" for i in range(199))
    response = client.get(f"/webhooks/geins/Order/create?{query}&", headers=AUTH)
    assert response.status_code == 202, response.text
    assert len(publisher.records) == 1


def test_a_query_that_is_not_utf8_is_400(bridge: Any) -> None:
    """The README's 'unreadable query': the byte was published as U+FFFD (202)."""
    client, publisher, _ = bridge
    response = client.get(
        "/webhooks/geins?entity=Order&action=create&id=1&name=J%F6rg", headers=AUTH
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["reason"] == "malformed_query"
    assert "not UTF-8" in response.json()["detail"]
    assert publisher.records == []


def test_put_is_accepted(bridge: Any) -> None:
    """PUT works like POST."""
    client, publisher, _ = bridge
    assert client.put("/webhooks/geins", content=ORDER, headers=AUTH).status_code == 202
    assert len(publisher.records) == 1


def test_trailing_slash_is_served_not_redirected(bridge: Any) -> None:
    """/webhooks/geins/Order/create/ is handled in place (no 307)."""
    client, publisher, _ = bridge
    response = client.post("/webhooks/geins/Order/create/", content=b"{}", headers=AUTH)
    assert response.status_code == 202
    assert publisher.records[0].topic == "geins.order.create"


def test_an_empty_query_action_leaves_the_bodys(bridge: Any) -> None:
    """?action= (an empty substitution) does not hide the body's action: 202."""
    client, publisher, _ = bridge
    response = client.post("/webhooks/geins?action=&id=", content=ORDER, headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json()["topic"] == "geins.order.create"
    assert len(publisher.records) == 1


def test_unknown_path_is_problem_json(bridge: Any) -> None:
    """Even Starlette's own 404 is problem+json."""
    client, _, _ = bridge
    response = client.get("/webhooks/other")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_a_path_under_the_webhook_prefix_that_is_no_route_is_counted(bridge: Any) -> None:
    """A webhook URL set up wrong (three segments) is a problem+json 404, counted."""
    client, publisher, metrics = bridge
    response = client.post("/webhooks/geins/order/create/extra", content=ORDER, headers=AUTH)
    assert response.status_code == 404
    assert response.json()["reason"] == "not_found"
    assert publisher.records == []
    assert 'bridge_rejections_total{reason="not_found"} 1.0' in metrics.exposition().decode()


def test_body_cap_by_content_length_and_by_counting() -> None:
    """Bodies over BRIDGE_MAX_BODY_BYTES are 413, declared or streamed."""
    app, publisher, _ = make(BRIDGE_MAX_BODY_BYTES="100")
    headers = [(b"authorization", b"Bearer dev-token")]
    declared = asyncio.run(
        call_asgi(app, "POST", "/webhooks/geins", headers=[*headers, (b"content-length", b"101")])
    )
    assert declared.status == 413
    chunks = [b'{"entity":"Order","action":"create","pad":"', b"x" * 60, b"x" * 60, b'"}']
    streamed = asyncio.run(
        call_asgi(app, "POST", "/webhooks/geins", headers=headers, body_chunks=chunks)
    )
    assert streamed.status == 413
    assert streamed.json()["reason"] == "body_too_large"
    ok = asyncio.run(
        call_asgi(app, "POST", "/webhooks/geins", headers=headers, body_chunks=[ORDER])
    )
    assert ok.status == 202
    assert len(publisher.records) == 1


def test_unauthenticated_body_is_never_read() -> None:
    """Auth is checked before the body is read: a stranger's upload is not buffered."""
    app, publisher, _ = make()
    received: list[str] = []

    async def receive() -> Message:
        received.append("read")
        return {"type": "http.request", "body": ORDER, "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/webhooks/geins", "raw_path": b"/webhooks/geins",
        "query_string": b"", "headers": [], "root_path": "", "scheme": "http",
        "http_version": "1.1", "asgi": {"version": "3.0"},
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401
    assert received == []
    assert publisher.records == []


def test_kafka_failure_is_503_with_retry_after() -> None:
    """When the event cannot be made safe, the sender is told to retry."""
    app, publisher, metrics = make(BRIDGE_RETRY_AFTER="7")
    publisher.fail_with = PublishTimeout("Kafka did not acknowledge in time")
    with TestClient(app) as client:
        response = client.post("/webhooks/geins", content=ORDER, headers=AUTH)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json()["retriable"] is True
    exposition = metrics.exposition().decode()
    assert (
        'bridge_requests_total{action="create",entity="order",outcome="unavailable"} 1.0'
        in exposition
    )
    assert 'bridge_rejections_total{reason="publish_timeout"} 1.0' in exposition


def test_a_delivery_cut_off_by_the_shutdown_timeout_is_a_503_counted_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn cancels a request still running when BRIDGE_SHUTDOWN_TIMEOUT runs out:
    its answer was uvicorn's text/plain 500, and the metrics counted it accepted."""
    app, publisher, metrics = make(BRIDGE_RETRY_AFTER="7")

    async def never_acknowledged(destination: Any) -> None:
        await asyncio.Event().wait()

    publisher.publish = never_acknowledged  # type: ignore[method-assign]  # still running
    headers = [(b"authorization", AUTH["Authorization"].encode())]

    async def scenario() -> Any:
        request = asyncio.create_task(
            call_asgi(app, "POST", "/webhooks/geins", headers=headers, body_chunks=[ORDER])
        )
        await asyncio.sleep(0.05)
        request.cancel()  # as uvicorn's Server.shutdown does past its timeout
        return await request

    with caplog.at_level(logging.INFO, logger="bridge.ingress"):
        response = asyncio.run(scenario())
    assert response.status == 503
    (line,) = [r for r in caplog.records if r.getMessage() == "delivery refused: shutting_down"]
    fields = line.__dict__["fields"]
    assert (fields["entity"], fields["action"]) == ("Order", "create")
    # Keyless: parsed again it got a new key, which no record has; none is named (a
    # review's test: the line named that new key).
    assert "key" not in fields
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "7"
    assert response.json()["reason"] == "shutting_down"
    exposition = metrics.exposition().decode()
    assert 'outcome="accepted"} 1.0' not in exposition
    # Counted with its event type, which parsing read (it said "none"; a review's find).
    assert 'bridge_requests_total{action="create",entity="order",outcome="unavailable"} 1.0' in (
        exposition
    )
    assert 'bridge_rejections_total{reason="shutting_down"} 1.0' in exposition


def test_readiness_follows_publisher_and_draining() -> None:
    """/readyz is 503 while Kafka is unreachable or the bridge is draining, and says
    why ("accepting": false alone sent the operator to the log)."""
    app, publisher, _ = make()
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert "reason" not in ready.json()
        assert client.get("/healthz").status_code == 200
        publisher.connected = False
        away = client.get("/readyz")
        assert away.status_code == 503
        assert away.json()["reason"] == "Kafka is not connected"
        publisher.connected = True
        publisher.stalled = True
        assert client.get("/readyz").json()["reason"].startswith("Kafka takes no record")
        publisher.stalled = False
        app.state.runtime.draining = True
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["draining"] is True
        assert response.json()["reason"] == "the bridge is stopping"
    assert publisher.started
    assert publisher.stopped


def test_metrics_labels_stay_bounded(bridge: Any) -> None:
    """Unknown entity names are counted under 'other', never as their own label."""
    client, _, _ = bridge
    for i in range(5):
        body = orjson.dumps({"entity": f"Novel{i}", "action": f"act{i}"})
        assert client.post("/webhooks/geins", content=body, headers=AUTH).status_code == 202
    text = client.get("/metrics").text
    assert "Novel" not in text
    assert 'bridge_requests_total{action="other",entity="other",outcome="accepted"} 5.0' in text
    assert "bridge_unknown_event_types_total 5.0" in text
    assert 'bridge_request_duration_seconds_bucket{le="0.0001",outcome="accepted"}' in text


def test_an_unknown_type_refused_in_strict_mode_is_counted_and_logged_by_its_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In strict mode, which new Geins type is refused is what an operator needs: its
    422 was counted under entity and action "none" and logged without them, although
    parsing had read both (a reviewer). Labels stay bounded: known entity and action
    names, else "other"."""
    caplog.set_level(logging.INFO)
    app, publisher, metrics = make(BRIDGE_STRICT_TYPES="true")
    with TestClient(app) as client:
        for path in ("/webhooks/geins/Order/Explode", "/webhooks/geins/Frob/Zap"):
            assert client.post(path, content=b"{}", headers=AUTH).status_code == 422
    exposition = metrics.exposition().decode()
    for entity, action in (("order", "other"), ("other", "other")):
        series = f'bridge_requests_total{{action="{action}",entity="{entity}",outcome="rejected"}}'
        assert f"{series} 1.0" in exposition
    assert "Frob" not in exposition
    refused = [
        {k: r.fields[k] for k in ("entity", "action", "reason")}  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "bridge.ingress" and r.getMessage().startswith("delivery refused")
    ]
    assert refused == [
        {"entity": "Order", "action": "explode", "reason": "unknown_event_type"},
        {"entity": "Frob", "action": "zap", "reason": "unknown_event_type"},
    ]
    assert [r.topic for r in publisher.records] == ["geins.deadletter"] * 2


@pytest.mark.parametrize(
    ("env", "capacity"),
    [
        ({"BRIDGE_ACK": "broker"}, "0.0"),
        ({"BRIDGE_ACK": "memory", "BRIDGE_MEMORY_MAX_BYTES": "5000000"}, "5e+06"),
        ({"BRIDGE_ACK": "durable", "BRIDGE_SPOOL_MAX_BYTES": "7000000"}, "7e+06"),
    ],
)
def test_the_spools_limit_is_a_gauge(env: dict[str, str], capacity: str, tmp_path: Any) -> None:
    """bridge_spool_max_bytes gives bridge_spool_bytes its scale, for an alert before the
    spool is full (a reviewer: BridgeSpoolGrowing counts records, and a spool of 51 large
    events was full, every delivery a 503, with nothing firing)."""
    app, _, metrics = make(**env, BRIDGE_SPOOL_DIR=str(tmp_path))
    with TestClient(app):
        assert f"bridge_spool_max_bytes {capacity}\n" in metrics.exposition().decode()


def test_token_never_published_or_exposed(bridge: Any) -> None:
    """The token from the query string reaches neither Kafka nor /metrics."""
    client, publisher, _ = bridge
    response = client.get(f"/webhooks/geins?entity=Order&action=create&token={TOKEN}")
    assert response.status_code == 202
    [record] = publisher.records
    assert TOKEN.encode() not in record.value
    assert all(TOKEN.encode() not in v for _, v in record.headers)
    assert TOKEN not in client.get("/metrics").text


header_names = st.sampled_from(
    [b"x-idempotency-key", b"x-timestamp", b"authorization", b"content-length", b"content-type"]
) | st.binary(max_size=12)


_FUZZ_APP, _FUZZ_PUBLISHER, _ = make(BRIDGE_MAX_BODY_BYTES="120")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    path=st.sampled_from(["/webhooks/geins", "/webhooks/geins/", "/x"])
    | st.text(max_size=40).map(lambda t: "/webhooks/geins/" + t),
    query=st.binary(max_size=80),
    headers=st.lists(st.tuples(header_names, st.binary(max_size=60)), max_size=6),
    chunks=st.lists(st.binary(max_size=80), max_size=3),
    with_token=st.booleans(),
)
def test_any_request_gets_accepted_or_a_clean_4xx(
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    with_token: bool,
) -> None:
    """Arbitrary method, path, query, headers and body: 202 or problem+json 4xx, never 5xx."""
    publisher = _FUZZ_PUBLISHER
    publisher.records.clear()
    if with_token:
        headers = [(b"authorization", b"Bearer dev-token"), *headers]
    response = asyncio.run(
        call_asgi(_FUZZ_APP, method, path, query=query, headers=headers, body_chunks=chunks)
    )
    if response.status == 202:
        assert len(publisher.records) == 1
    else:
        assert 400 <= response.status < 500, response.body
        assert response.headers["content-type"] == "application/problem+json"
        assert all(r.topic == "geins.deadletter" for r in publisher.records)
        if response.status in (401, 405, 413):
            assert publisher.records == []


def test_window_zero_disables_deduplication_even_of_concurrent_copies() -> None:
    """BRIDGE_DEDUP_WINDOW=0: two copies of one delivery arriving together are both
    accepted and published, not the second answered 200 duplicate."""
    app, publisher, _ = make(BRIDGE_DEDUP_WINDOW="0")
    release = asyncio.Event()

    async def slow_publish(destination: Any) -> None:
        await release.wait()
        publisher.records.append(destination)

    publisher.publish = slow_publish  # type: ignore[method-assign]  # both in flight at once
    headers = [(b"authorization", AUTH["Authorization"].encode()), (b"x-idempotency-key", b"k")]

    async def scenario() -> list[int]:
        copies = [
            asyncio.create_task(
                call_asgi(app, "POST", "/webhooks/geins", headers=headers, body_chunks=[ORDER])
            )
            for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        release.set()
        return [response.status for response in await asyncio.gather(*copies)]

    assert asyncio.run(scenario()) == [202, 202]
    assert len(publisher.records) == 2


def test_a_dead_letter_that_cannot_be_kept_now_is_a_503() -> None:
    """A refused delivery whose dead letter cannot be kept now (Kafka away, in broker
    mode) is answered 503, so the sender retries, rather than its 4xx with the dead
    letter lost; once it can be kept, the retry gets the 4xx."""
    app, publisher, _ = make()
    publisher.fail_with = PublishTimeout("Kafka did not acknowledge in time")
    with TestClient(app) as client:
        first = client.post("/webhooks/geins", content=b"not json", headers=AUTH)
        publisher.fail_with = None
        retry = client.post("/webhooks/geins", content=b"not json", headers=AUTH)
    assert first.status_code == 503
    assert first.headers["content-type"] == "application/problem+json"
    assert "retry-after" in first.headers
    detail = first.json()["detail"]
    assert "cannot be kept as a dead letter now" in detail
    assert "body_not_json" in detail
    assert retry.status_code == 400
    assert [r.topic for r in publisher.records] == ["geins.deadletter"]


@pytest.mark.parametrize("ack", ["durable", "broker", "memory"])
def test_a_retried_refusal_is_kept_as_a_dead_letter_once(ack: str, tmp_path: Any) -> None:
    """Geins retries a 4xx too (same idempotency key): every attempt gets its 400, one
    dead letter is kept. Without the key, or with de-duplication off, each is kept."""
    app, publisher, metrics = make(BRIDGE_ACK=ack, BRIDGE_SPOOL_DIR=str(tmp_path / "a"))
    headers = {**AUTH, "x-Idempotency-Key": "refused-1"}
    with TestClient(app) as client:
        answers = [client.post("/webhooks/geins", content=b"not json", headers=headers)]
        answers += [client.post("/webhooks/geins", content=b"not json", headers=headers)]
        answers += [client.post("/webhooks/geins", content=b"not json", headers=AUTH)]
        # an event with the same key is not a duplicate of the dead letter
        event = client.post("/webhooks/geins", content=ORDER, headers=headers)
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert event.status_code == 202
    letters = [r for r in publisher.records if r.topic == "geins.deadletter"]
    assert [r.key for r in letters][:1] == [b"refused-1"]
    assert len(letters) == 2  # the retry is not kept again; the keyless one is
    exposition = metrics.exposition().decode()
    assert 'bridge_dead_letters_total{reason="body_not_json"} 2.0' in exposition

    app, publisher, _ = make(
        BRIDGE_ACK=ack, BRIDGE_SPOOL_DIR=str(tmp_path / "b"), BRIDGE_DEDUP_WINDOW="0"
    )
    with TestClient(app) as client:
        for _ in range(2):
            client.post("/webhooks/geins", content=b"not json", headers=headers)
    assert len([r for r in publisher.records if r.topic == "geins.deadletter"]) == 2


class RefusingTopic(FakePublisher):
    """Kafka refusing every record for ``topic`` as larger than its max.message.bytes;
    ``letters_fail`` makes the dead-letter topic fail too, for now."""

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic
        self.letters_fail: BridgeError | None = None

    async def hand_over(self, destination: Destination) -> asyncio.Future[Any]:
        if destination.topic == self.topic:
            raise PayloadTooLarge("the record is larger than Kafka accepts")
        if self.letters_fail is not None:
            raise self.letters_fail
        return await super().hand_over(destination)


def test_an_event_kafka_refuses_in_broker_mode_is_a_413_with_its_dead_letter() -> None:
    """In broker mode an event within the bridge's limits that Kafka refuses for good
    (larger than its topic's max.message.bytes) is kept as a kafka_rejected dead
    letter before its 413, as the other modes keep it after their 202; it was kept
    nowhere. Not when it cannot be kept now (503: retry), and once per key."""
    settings_ = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    publisher, metrics = RefusingTopic("geins.order.create"), Metrics()
    app = create_app(settings_, publisher=publisher, metrics=metrics)
    headers = {**AUTH, "x-Idempotency-Key": "big-1"}
    with TestClient(app) as client:
        publisher.letters_fail = PublishTimeout("Kafka did not acknowledge in time")
        later = client.post("/webhooks/geins", content=ORDER, headers=headers)
        publisher.letters_fail = None
        answers = [client.post("/webhooks/geins", content=ORDER, headers=headers)]
        answers += [client.post("/webhooks/geins", content=ORDER, headers=headers)]
    assert later.status_code == 503, later.text
    assert "cannot be kept as a dead letter now" in later.json()["detail"]
    assert [a.status_code for a in answers] == [413, 413]
    assert answers[0].headers["content-type"] == "application/problem+json"
    assert "kept on geins.deadletter" in answers[0].json()["detail"]
    assert "on geins.deadletter already" in answers[1].json()["detail"]
    (letter,) = publisher.records
    assert (letter.topic, letter.key, letter.value) == ("geins.deadletter", b"big-1", ORDER)
    extra = dict(letter.headers)
    assert extra["x-bridge-reason"] == b"kafka_rejected"
    assert extra["x-bridge-original-topic"] == b"geins.order.create"
    assert "ce_type" in extra  # the event's own headers come with it
    exposition = metrics.exposition().decode()
    assert 'bridge_dead_letters_total{reason="kafka_rejected"} 1.0' in exposition


def test_a_500_is_counted_with_reason_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug's 500 says reason "internal" in its problem document, and
    bridge_rejections_total counts it under that reason (it counted nothing). It is
    retriable: the delivery was not accepted, and Geins retries a 500 (it said
    "retriable": false, and a client that honours the field dropped the event)."""
    app, publisher, metrics = make()

    def broken(*_: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ingress, "read_body", broken)
    with TestClient(app) as client:
        response = client.post("/webhooks/geins", content=ORDER, headers=AUTH)
    assert response.status_code == 500
    assert response.json()["reason"] == "internal"
    assert response.json()["retriable"] is True
    exposition = metrics.exposition().decode()
    assert 'bridge_rejections_total{reason="internal"} 1.0' in exposition
    assert 'bridge_requests_total{action="none",entity="none",outcome="error"} 1.0' in exposition
    assert publisher.records == []


HEX = "0123456789abcdef" * 4  # a token that is also a well-formed entity name
_ACCENTED = HEX.replace("a", "\u00e1").replace("e", "\u00e9")  # á, é
_FULL_WIDTH = "".join(chr(ord(c) + 0xFEE0) for c in HEX)  # its full-width letters and digits


@pytest.fixture
def secret_bridge(caplog: pytest.LogCaptureFixture) -> Any:
    """The app with a second token that is a valid entity name, and the access log."""
    caplog.set_level(logging.INFO)
    app, publisher, metrics = make(BRIDGE_TOKENS=f"{TOKEN},{HEX}", BRIDGE_ACCESS_LOG="true")
    with TestClient(app) as client:
        yield client, publisher, metrics


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every line the bridge logged: messages and fields."""
    return "\n".join(
        f"{r.getMessage()} {getattr(r, 'fields', '')}"
        for r in caplog.records
        if r.name.startswith("bridge")
    )


def written(publisher: FakePublisher) -> bytes:
    """Everything the records hold: topics, keys, values and headers."""
    return b"".join(
        r.topic.encode() + r.key + r.value + b"".join(v for _, v in r.headers)
        for r in publisher.records
    )


@pytest.mark.parametrize(
    "path",
    [f"/webhooks/geins/{HEX}", f"/webhooks/geins/Order/{HEX}", f"/webhooks/geins/{HEX}/create/"],
)
def test_a_token_in_the_path_is_refused_before_routing(
    secret_bridge: Any, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """An authenticated delivery with a token in its path is a 400 (token_in_path) that
    says where tokens go without echoing it, and is kept as a dead letter with the
    token replaced; no topic is named after it. Unauthenticated, it stays a 401."""
    client, publisher, _ = secret_bridge
    body = b'{"entity":"Order","action":"create","id":"1"}'
    response = client.post(path, content=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["reason"] == "token_in_path"
    assert "Authorization header" in problem["detail"]
    assert "token query parameter" in problem["detail"]
    assert HEX not in response.text
    [letter] = publisher.records
    assert letter.topic == "geins.deadletter"
    assert letter.value == body
    assert dict(letter.headers)["x-bridge-path"] == path.replace(HEX, "<token>").encode()
    assert client.post(path, content=body).status_code == 401
    assert len(publisher.records) == 1
    assert HEX.encode() not in written(publisher)
    assert HEX not in logged(caplog)
    assert "/webhooks/geins/" in logged(caplog)


def test_a_path_that_is_no_route_is_logged_without_its_token(
    secret_bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = secret_bridge[0]
    assert client.post(f"/webhooks/geins/a/b/{HEX}", headers=AUTH).status_code == 404
    assert "/webhooks/geins/a/b/<token>" in logged(caplog)
    assert HEX not in logged(caplog)


def test_an_idempotency_key_holding_a_token_is_refused(
    secret_bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """It would be the record's key and ce_id: a 400 (bad_idempotency_key) instead, the
    key not echoed nor logged, nothing published."""
    client, publisher, _ = secret_bridge
    for key in (f"r4-{HEX}", f"r4-{TOKEN}", "k-dev%2Dtoken"):
        response = client.post(
            "/webhooks/geins", content=ORDER, headers={**AUTH, "x-idempotency-key": key}
        )
        assert response.status_code == 400, response.text
        assert response.json()["reason"] == "bad_idempotency_key"
        assert "contains a webhook token" in response.json()["detail"]
        assert key not in response.text
    assert publisher.records == []
    assert HEX not in logged(caplog)
    assert TOKEN not in logged(caplog)
    assert '"key": "r4-<token>"' in logged(caplog).replace("'", '"')


def test_a_token_in_another_letter_case_is_recognised(
    secret_bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A review sent the token upper-cased: as a key it was published (record key,
    ce_id), in a path logged, as an x-Timestamp or id published as a header (see the
    next test). A hex token upper-cased is the same secret: it is refused, replaced and
    left out as the token."""
    client, publisher, _ = secret_bridge
    upper = HEX.upper()
    assert upper != HEX
    keyed = {**AUTH, "x-idempotency-key": f"r4-{upper}"}
    answer = client.post("/webhooks/geins", content=ORDER, headers=keyed)
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"] == "bad_idempotency_key"
    assert client.post(f"/webhooks/geins/a/b/{upper}", headers=AUTH).status_code == 404
    assert publisher.records == []
    assert upper not in logged(caplog)
    assert "/webhooks/geins/a/b/<token>" in logged(caplog)


@pytest.mark.parametrize("token", [HEX, HEX.upper()], ids=["as-is", "upper-cased"])
def test_an_x_timestamp_or_subject_holding_a_token_is_not_published(
    secret_bridge: Any, token: str
) -> None:
    """x-Timestamp and the id never refuse a delivery: one that holds a token (in any
    letter case) is not published as a header (ce_subject); the body, the event's data,
    is as sent."""
    client, publisher, _ = secret_bridge
    headers = {**AUTH, "x-idempotency-key": "ts-1", "x-timestamp": f"2024-01-15 {token}"}
    body = b'{"entity":"Order","action":"create","id":"' + token.encode() + b'"}'
    assert client.post("/webhooks/geins", content=body, headers=headers).status_code == 202
    [record] = publisher.records
    assert "x-timestamp" not in dict(record.headers)
    assert "ce_subject" not in dict(record.headers)
    assert dict(record.headers)["x-bridge-time-source"] == b"received"
    assert record.value == body
    assert token.encode() not in b"".join(v for _, v in record.headers) + record.key


def test_a_token_in_a_header_sent_as_utf8_is_recognised() -> None:
    """x-Timestamp and x-Idempotency-Key are read a character a byte (latin-1) and
    published as the bytes sent: a token with a character that is not ASCII (the tokens
    file is UTF-8), sent as UTF-8, is recognised there too. The timestamp was published
    with it, and so was a key that is not UTF-8 elsewhere (its reading stays latin-1)."""
    wide = "jätte-hemlig-0123"
    app, publisher, _ = make(BRIDGE_TOKENS=f"{TOKEN},{wide}")
    auth = (b"authorization", f"Bearer {TOKEN}".encode())

    def post(header: tuple[bytes, bytes]) -> Any:
        return asyncio.run(
            call_asgi(app, "POST", "/webhooks/geins", headers=[auth, header], body_chunks=[ORDER])
        )

    assert post((b"x-timestamp", f"2024-01-15 {wide}".encode())).status == 202
    refused = post((b"x-idempotency-key", b"r4-\xff" + wide.encode()))
    assert refused.status == 400
    assert refused.json()["reason"] == "bad_idempotency_key"
    [record] = publisher.records
    assert "x-timestamp" not in dict(record.headers)
    assert wide.encode() not in written(publisher)


@pytest.mark.parametrize(
    ("query", "body"),
    [
        (f"entity=Order&action=create?token={HEX}", b""),  # a '?' typed for a '&'
        ("", b'{"entity":"x ' + HEX.encode() + b'","action":"create"}'),
        ("", b'{"entity":"' + b"y" * 70 + HEX.encode() + b'","action":"create"}'),  # cut at 80
        ("", b'{"entity":["' + HEX.encode() + b'"],"action":"create"}'),
    ],
)
def test_a_malformed_name_holding_a_token_is_not_echoed(
    secret_bridge: Any, caplog: pytest.LogCaptureFixture, query: str, body: bytes
) -> None:
    """The detail of a malformed entity or action shows the value sent, with the
    token replaced (before the value is cut to length), in the answer, the log and the
    dead letter."""
    client, publisher, _ = secret_bridge
    response = client.post(f"/webhooks/geins?{query}", content=body, headers=AUTH)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "is not a name of 1 to 64 letters and digits" in detail
    assert HEX[:8] not in detail
    [letter] = publisher.records
    assert HEX[:8].encode() not in dict(letter.headers)["x-bridge-detail"]
    assert HEX.encode() not in dict(letter.headers)["x-bridge-query"]
    assert HEX[:8] not in logged(caplog)


@pytest.mark.parametrize(
    "body",
    [
        b'{"entity":"' + HEX.encode() + b'","action":"create"}',
        b'{"entity":"Order","action":"' + HEX.upper().encode() + b'"}',
        b'{"entity":"Order","action":"create","account":"' + HEX.encode() + b'"}',
        b'{"entity":"Order","action":"create","environment":"' + HEX.encode() + b'-x"}',
        # cut to 48 characters, only a part of the token would be left in the topic
        b'{"entity":"Order","action":"create","account":"acme-' + HEX.encode() + b'"}',
        # written with accents or in full-width letters, which a topic name makes plain
        # (a review: 17 of a token's 18 characters reached a topic name)
        orjson.dumps({"entity": "Order", "account": "acme-" + _ACCENTED, "action": "create"}),
        orjson.dumps({"entity": "Order", "environment": "x-" + _FULL_WIDTH, "action": "create"}),
    ],
)
def test_no_topic_is_named_after_a_token(caplog: pytest.LogCaptureFixture, body: bytes) -> None:
    """A token in the body's entity, action, account or environment would name a topic:
    a 422 (kept as a dead letter) instead."""
    caplog.set_level(logging.INFO)
    app, publisher, _ = make(
        BRIDGE_TOKENS=f"{TOKEN},{HEX}",
        BRIDGE_TOPIC_TEMPLATE="{account}.{environment}.{entity}.{action}",
    )
    with TestClient(app) as client:
        response = client.post("/webhooks/geins", content=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == "malformed_event_type"
    assert "webhook token" in response.json()["detail"]
    assert [r.topic for r in publisher.records] == ["geins.deadletter"]
    assert HEX.encode() not in b"".join(v for _, v in publisher.records[0].headers)
    assert HEX not in logged(caplog).lower()


def test_an_entity_holding_a_token_is_refused_whatever_the_template(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A template without {entity} puts no token in the topic, but ce_type would hold
    it: refused all the same."""
    caplog.set_level(logging.INFO)
    app, publisher, _ = make(BRIDGE_TOKENS=f"{TOKEN},{HEX}", BRIDGE_TOPIC_TEMPLATE="geins.all")
    body = b'{"entity":"' + HEX.encode() + b'","action":"create"}'
    with TestClient(app) as client:
        response = client.post("/webhooks/geins", content=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert [r.topic for r in publisher.records] == ["geins.deadletter"]
    assert HEX not in logged(caplog).lower()


def test_an_account_holding_a_token_is_data_where_no_topic_names_it(
    secret_bridge: Any,
) -> None:
    """With the default template the account names nothing: one holding a token is
    the event's data, accepted, and published in the body only."""
    client, publisher, _ = secret_bridge
    body = b'{"entity":"Order","action":"create","account":"acme-' + HEX.encode() + b'"}'
    assert client.post("/webhooks/geins", content=body, headers=AUTH).status_code == 202
    [record] = publisher.records
    assert record.topic == "geins.order.create"
    assert HEX.encode() not in b"".join(v for _, v in record.headers) + record.key


def test_too_many_credentials_is_a_400(secret_bridge: Any) -> None:
    client, publisher, _ = secret_bridge
    query = "&".join(["token=nope"] * 5)
    response = client.post(f"/webhooks/geins?{query}", content=ORDER, headers=AUTH)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["reason"] == "too_many_credentials"
    assert publisher.records == []


def test_with_an_operations_port_each_port_answers_only_its_own_paths(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """BRIDGE_OPS_PORT: /metrics and /openapi.json answer there and nowhere else, so they
    can be kept off the internet-facing port; /healthz and /readyz answer on both (a
    load balancer may check the port it sends traffic to: GKE's Ingress marked every
    backend unhealthy, a review). A webhook sent to the operations port is a 404 that
    says where webhooks go, logged and counted (a Geins URL set up with the wrong
    port); /metrics on the webhook port a 404 too, not logged (scanners knock there).
    The guard's size limits hold on both ports."""
    caplog.set_level(logging.INFO)
    app, publisher, _ = make(BRIDGE_PORT="8080", BRIDGE_OPS_PORT="9090")
    with (
        TestClient(app, base_url="http://testserver:8080") as webhooks,
        TestClient(app, base_url="http://testserver:9090") as ops,
    ):
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert ops.get(path).status_code == 200, path
        for path in ("/healthz", "/readyz"):
            assert webhooks.get(path).status_code == 200, path
        for path in ("/metrics", "/openapi.json"):
            refused = webhooks.get(path)
            assert refused.status_code == 404, path
            assert refused.headers["content-type"] == "application/problem+json"
            assert "operations port (BRIDGE_OPS_PORT)" in refused.json()["detail"]
        assert webhooks.get("/favicon.ico").status_code == 404
        assert ops.get("/favicon.ico").status_code == 404
        assert ops.get("/healthz?" + "x" * 9000).status_code == 414
        assert webhooks.post("/webhooks/geins", content=ORDER, headers=AUTH).status_code == 202
        wrong = ops.post("/webhooks/geins/Order/create", content=ORDER, headers=AUTH)
        assert wrong.status_code == 404
        assert wrong.json()["detail"] == (
            "this is the operations port (BRIDGE_OPS_PORT): webhooks are served on BRIDGE_PORT"
        )
        scraped = ops.get("/metrics").text
    assert len(publisher.records) == 1
    assert 'bridge_rejections_total{reason="not_found"} 1.0' in scraped
    logged = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.fields["path"] for r in logged] == [  # type: ignore[attr-defined]
        "/healthz",  # the 414
        "/webhooks/geins/Order/create",
    ]


def test_without_an_operations_port_one_port_answers_everything(bridge: Any) -> None:
    client, publisher, _ = bridge
    assert client.get("/metrics").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.post("/webhooks/geins", content=ORDER, headers=AUTH).status_code == 202
    assert len(publisher.records) == 1


@pytest.mark.parametrize(
    ("secret", "body"),
    [
        # both halves are names: it was a 202, published to geins.<half>.<half>
        ("prodhook2024/s3cretpart9x", b'{"id":"1"}'),
        # base64 padding: a 422, halves kept
        ("Qm9yZWFs/c2VjcmV0MTIzNDU2Nzg5MA==", b'{"id":"1"}'),
        # Ending in '/', which the routes let go of, so that the path checks saw entity
        # and action without it: a name once the '/' is cut, a 422 whose dead letter
        # kept it as path-entity; not a name (a '+'), the 422's detail quoted it, in the
        # log and the dead letter; a '/' inside too, a 202 again.
        ("Zk3nQ7pLw0aR2vYtE9uHc1sXmB4oJdKw/", b'{"action":"create","id":"1"}'),
        ("Zk3nQ+7pLw0aR2vYtE9uHc1sXmB4oJdK/", b'{"action":"create","id":"1"}'),
        ("prodhook2024/s3cretpart9x/", b'{"id":"1"}'),
    ],
)
def test_a_token_with_a_slash_in_the_path_is_token_in_path(
    secret: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A token holding '/' (`openssl rand -base64`) spans both path segments, or ends in
    the trailing '/'; each segment was checked alone, so the event went to
    geins.<half>.<half>, or the parts went to the 422's detail, the log and the dead
    letter's path headers (reviews' tests). It is a 400 token_in_path, and no text
    holds all of its parts."""
    caplog.set_level(logging.INFO)
    environ = {"BRIDGE_TOKENS": f"{TOKEN},{secret}", "BRIDGE_ACK": "broker"}
    publisher = FakePublisher()
    app = create_app(load_settings(environ=environ), publisher=publisher, metrics=Metrics())
    with TestClient(app) as client:
        response = client.post(
            f"/webhooks/geins/{secret}", content=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert response.status_code == 400, response.text
    assert response.json()["reason"] == "token_in_path"
    parts = [part.lower() for part in secret.strip("/").split("/")]
    kafka = b"\n".join(
        r.topic.encode() + b" " + r.key + b" " + b" ".join(v for _, v in r.headers)
        for r in publisher.records
    ).decode()
    logs = "\n".join(  # the bridge's (the test client logs its requests too)
        f"{r.getMessage()} {getattr(r, 'fields', '')}"
        for r in caplog.records
        if r.name.startswith("bridge")
    )
    for where, text in (("kafka", kafka), ("log", logs), ("answer", response.text)):
        assert not all(part in text.lower() for part in parts), (where, text)


def test_starlettes_404_and_405_have_the_bridges_problem_types() -> None:
    """One problem, one type (RFC 9457): a 405 of an operations endpoint answered with
    Starlette's title ("Method Not Allowed") and a type of its own, `http_error`,
    documented nowhere, where a webhook path's 405 is `method_not_allowed`; its 404 had
    Starlette's title too (a review's find)."""
    app, _, _ = make()
    with TestClient(app) as client:
        webhook = client.options("/webhooks/geins/Order/create")
        ops = client.post("/healthz")
        missing = client.get("/nope").json()
    assert ops.status_code == 405
    assert "GET" in ops.headers["allow"]
    problem = ops.json()
    assert (problem["type"], problem["reason"], problem["title"]) == (
        webhook.json()["type"],
        MethodNotAllowed.reason,
        MethodNotAllowed.title,
    )
    assert (missing["reason"], missing["title"]) == (NotFound.reason, NotFound.title)
