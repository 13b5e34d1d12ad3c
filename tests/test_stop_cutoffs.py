"""Answers cut off at a stop (uvicorn cancels the request as BRIDGE_SHUTDOWN_TIMEOUT runs
out) while they wait for a client that reads none: dropped (ingress.answer_or_drop),
never uvicorn's ERROR with a traceback and its text/plain 500 (a review's tests, after
those of the refusals in test_httpprotocol)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from bridge import ingress
from bridge.ingress import WebhookEndpoint
from tests.test_httpprotocol import Connection, kafka_waits_for, webhook


async def _cut_off_while_waiting(
    connection: Connection,
    request: bytes,
    caplog: pytest.LogCaptureFixture,
    then: Any = lambda: None,
) -> tuple[list[str], bytes]:
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
    uvicorn_errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("uvicorn")
    ]
    return uvicorn_errors, b"".join(connection.transport.writes[first:])


async def test_the_endpoints_500_cut_off_at_a_stop_is_no_uvicorn_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint's problem+json 500 (a bug): the cancellation escaped its handler."""
    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch)
    try:

        async def broken(self: Any, scope: Any, receive: Any) -> Any:
            raise RuntimeError("a bug")

        errors, written = await _cut_off_while_waiting(
            connection,
            webhook("k2"),
            caplog,
            lambda: monkeypatch.setattr(WebhookEndpoint, "_accept", broken),
        )
        assert errors == [], errors
        assert b"text/plain" not in written, written
    finally:
        connection.close()


async def test_an_ops_only_paths_404_cut_off_at_a_stop_is_no_uvicorn_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The 404 of /metrics on BRIDGE_PORT, with BRIDGE_OPS_PORT set."""
    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch, ops_port=9090)
    try:
        errors, written = await _cut_off_while_waiting(
            connection, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n", caplog
        )
        assert errors == [], errors
        assert b"text/plain" not in written, written
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
        waiting = not task.done()  # still in drain, for a client that reads none
    finally:
        for task in list(connection.state.tasks):
            task.cancel()  # asyncio.Runner.close, as the process exits
        await asyncio.sleep(0.05)
        uvicorn_errors = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith("uvicorn")
        ]
        connection.close()
    assert (uvicorn_errors, waiting) == ([], False)
