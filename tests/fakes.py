"""Test doubles and helpers shared by the unit tests (never used against real Kafka)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bridge.errors import BridgeError, PublishFailed, Unavailable
from bridge.geins import Delivery
from bridge.routing import Destination

SAMPLES = Path(__file__).resolve().parent / "samples" / "deliveries.jsonl"
TOKEN = "dev-token"  # the token the shared samples assume


def samples() -> list[dict[str, Any]]:
    """The shared real-shaped Geins deliveries."""
    with SAMPLES.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def voucher_delivery(
    headers: list[tuple[bytes, bytes]], body: bytes, received_at: datetime, action: str = "create"
) -> Delivery:
    """A POST of Voucher/create (by its path; or another ``action``), an event type
    Geins does not document: refused in strict mode, the dead-letter tests' usual
    delivery."""
    return Delivery(
        method="POST",
        path=f"/webhooks/geins/Voucher/{action}",
        path_entity="Voucher",
        path_action=action,
        query=[],
        headers=headers,
        body=body,
        received_at=received_at,
    )


@dataclass
class FakePublisher:
    """Records what would reach Kafka; can be told to fail or to stall."""

    records: list[Destination] = field(default_factory=list)
    connected: bool = True
    stalled: bool = False  # Kafka answers metadata but takes no record (broker mode)
    throttled: bool = False  # Kafka holds the producer back (a client quota)
    clock_refused: bool = False  # Kafka refuses the records' timestamps (broker mode)
    answering: bool = True  # Kafka answers (its metadata refreshes, say), if not this topic
    fail_with: BridgeError | None = None
    denied: str | None = None  # Kafka's authorizer refuses the producer its start
    started: bool = False
    stopped: bool = False

    async def start(self) -> None:
        self.started = True

    async def publish(self, destination: Destination) -> None:
        await (await self.hand_over(destination))

    async def send(self, destination: Destination) -> asyncio.Future[Any]:
        return await self.hand_over(destination)

    async def hand_over(self, destination: Destination) -> asyncio.Future[Any]:
        await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        self.records.append(destination)
        return acked

    def ready_for(self, topic: str) -> bool:
        return True

    def metadata_lacks(self, topic: str, since: float) -> bool:
        return self.answering and not self.ready_for(topic)

    def refuse_at_once(self) -> None:
        if not self.connected:
            raise Unavailable("not connected to Kafka yet")

    def answered_since(self, since: float) -> bool:
        return self.answering

    def failure(self, exc: BaseException) -> BridgeError:
        return exc if isinstance(exc, BridgeError) else PublishFailed(repr(exc))

    async def stop(self, deadline: float | None = None) -> None:
        self.stopped = True


@dataclass
class AsgiResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body_chunks: Sequence[bytes] = (),
    client: str = "127.0.0.1",
) -> AsgiResponse:
    """Drive an ASGI app with a hand-made scope: raw paths and headers no HTTP client sends."""
    chunks = list(body_chunks) or [b""]
    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # a real server would wait for the client
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query,
        "root_path": "",
        "headers": headers or [],
        "client": (client, 50000),
        "server": ("127.0.0.1", 8080),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return AsgiResponse(
        status=start["status"],
        headers={k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]},
        body=body,
    )
