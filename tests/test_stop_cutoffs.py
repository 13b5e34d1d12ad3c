"""Answers cut off at a stop (uvicorn cancels the request as BRIDGE_SHUTDOWN_TIMEOUT runs
out) while they wait for a client that reads none: dropped (ingress.answer_or_drop),
never uvicorn's ERROR with a traceback and its text/plain 500 in place of the answer
logged and counted (reviews' tests: a guard's refusal, then the endpoint's own, whose
cancellation came out of its `except BridgeError`, then its 500, an operations path's
404 and the stop's own 503)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from bridge import ingress
from bridge.ingress import WebhookEndpoint
from tests.test_httpprotocol import ORDER, Connection, kafka_waits_for, webhook


def _uvicorn_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("uvicorn")
    ]


async def _cut_off_while_waiting(
    connection: Connection,
    request: bytes,
    caplog: pytest.LogCaptureFixture,
    then: Callable[[], None] = lambda: None,
) -> bytes:
    """Answer a webhook, do ``then``, stop reading, send ``request`` and cancel it as
    uvicorn does; read again. What was written after the webhook's answer (no uvicorn
    ERROR)."""
    [answer] = await connection.answers(webhook("k1"), 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    then()
    connection.protocol.pause_writing()  # the client stopped reading
    first = len(connection.transport.writes)
    connection.protocol.data_received(request)
    await asyncio.sleep(0.05)
    [task] = list(connection.state.tasks)
    task.cancel()  # uvicorn, as BRIDGE_SHUTDOWN_TIMEOUT runs out
    await asyncio.sleep(0.05)
    connection.protocol.resume_writing()  # the client reads again
    await asyncio.sleep(0.05)
    assert _uvicorn_errors(caplog) == []
    return b"".join(connection.transport.writes[first:])


def _not_json(key: str) -> bytes:
    body = b"{not json"
    return (
        webhook(key)
        .replace(ORDER, body)
        .replace(b"content-length: %d" % len(ORDER), b"content-length: %d" % len(body))
    )


async def _broken(self: Any, scope: Any, receive: Any) -> Any:
    raise RuntimeError("a bug")


@pytest.mark.parametrize(
    ("request_", "settings", "counted"),
    [
        (webhook("k2"), {"BRIDGE_RATE_LIMIT": "0.5", "BRIDGE_RATE_BURST": "1"}, "rate_limited"),
        (webhook("k2", token="wrong-token"), {}, "unauthorized"),
        (_not_json("k2"), {}, "body_not_json"),
        (webhook("k2"), {}, None),  # the endpoint's 500 (a bug)
        (b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n", {"BRIDGE_OPS_PORT": "9090"}, None),
    ],
    ids=["a guard's 429", "the endpoint's 401", "its 400", "its 500", "an ops path's 404"],
)
async def test_an_answer_cut_off_while_it_waits_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    request_: bytes,
    settings: dict[str, str],
    counted: str | None,
) -> None:
    caplog.set_level(logging.INFO)
    ops_port = int(settings.pop("BRIDGE_OPS_PORT", 0)) or None
    connection = Connection(monkeypatch, settings=settings, ops_port=ops_port)
    try:

        def then() -> None:
            if counted is None and ops_port is None:  # the endpoint's 500
                monkeypatch.setattr(WebhookEndpoint, "_accept", _broken)

        assert await _cut_off_while_waiting(connection, request_, caplog, then) == b""
        assert connection.transport.closed
        if counted is not None:
            text = connection.metrics.exposition().decode()
            assert f'bridge_rejections_total{{reason="{counted}"}} 1.0' in text
    finally:
        connection.close()


async def test_the_stops_503_that_waits_for_an_unread_client_is_dropped_soon(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The 503 (shutting_down) of a delivery cut off at a stop waited in uvicorn's drain
    for a client that reads none, past uvicorn's shutdown, until asyncio cancelled the
    task again as the process exited: out of the handler, an ERROR. It waits
    STOP_ANSWER_SECONDS at most now, then the request is dropped."""
    monkeypatch.setattr(ingress, "STOP_ANSWER_SECONDS", 0.01)
    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch)
    try:
        [answer] = await connection.answers(webhook("k1"), 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        kafka_waits_for(monkeypatch, connection.publisher)  # Kafka slow from here
        connection.protocol.data_received(webhook("k2"))
        await asyncio.sleep(0.05)
        connection.protocol.pause_writing()  # the client stopped reading meanwhile
        [task] = list(connection.state.tasks)
        task.cancel()  # uvicorn, as BRIDGE_SHUTDOWN_TIMEOUT runs out
        await asyncio.sleep(0.05)
        assert task.done(), "still waiting for a client that reads none"
    finally:
        for task in list(connection.state.tasks):
            task.cancel()  # asyncio.Runner.close, as the process exits
        await asyncio.sleep(0.05)
        connection.close()
    assert _uvicorn_errors(caplog) == []


@pytest.mark.parametrize(
    ("path", "ops_port"),
    [
        ("/healthz", None),
        ("/readyz", None),
        ("/metrics", None),
        ("/nowhere", None),
        ("/metrics", 9090),
        ("/healthz", 9090),
    ],
    ids=["healthz", "readyz", "metrics", "a 404", "metrics on the ops port", "healthz there"],
)
async def test_an_operations_answer_cut_off_while_it_waits_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    ops_port: int | None,
) -> None:
    """Starlette's own answers (the operations endpoints, its 404) cut off as they
    waited for a client that reads none were uvicorn's ERROR with a traceback and its
    text/plain 500 (noticed last session): dropped now by the protocol, whatever the
    app (httpprotocol's app_or_drop)."""
    caplog.set_level(logging.INFO)
    port = ops_port or 8080
    connection = Connection(monkeypatch, ops_port=ops_port, port=port)
    try:
        connection.protocol.pause_writing()  # the client reads none
        connection.protocol.data_received(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        await asyncio.sleep(0.05)
        [task] = list(connection.state.tasks)
        task.cancel()  # uvicorn, as BRIDGE_SHUTDOWN_TIMEOUT runs out
        await asyncio.sleep(0.05)
        connection.protocol.resume_writing()
        await asyncio.sleep(0.05)
        assert task.done()
        assert _uvicorn_errors(caplog) == []
        assert connection.transport.writes == []
        assert connection.transport.closed
    finally:
        connection.close()


async def test_a_cancelled_error_of_a_bug_is_still_uvicorns_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the task's own cancellation is dropped quietly: a CancelledError out of a
    bug (here while /metrics is collected) is still an ERROR and a 500."""

    def cancelled(_: object) -> bool:
        raise asyncio.CancelledError

    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch)
    monkeypatch.setattr(type(connection.publisher), "connected", property(cancelled))
    try:
        [answer] = await connection.answers(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n", 1)
        assert answer.startswith(b"HTTP/1.1 500 "), answer
        assert _uvicorn_errors(caplog) != []
    finally:
        connection.close()
