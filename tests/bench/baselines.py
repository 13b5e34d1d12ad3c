"""The baselines the bridge is measured against, each an ASGI app for uvicorn.

- ``raw_asgi``: reads the body and answers 202, nothing else: uvicorn's ceiling.
- ``starlette_noop``: the same behind a Starlette route: the framework's cost.
- ``naive_bridge`` (a factory): what a user would write from the Geins quick
  start: parse the JSON body, ``await producer.send_and_wait(...)`` on one shared
  ``AIOKafkaProducer(acks="all")``, then answer 202.

Every app also answers ``GET /readyz`` with 200 (the harness waits for it) and
404 elsewhere (the harness's drain requests go to a path that exists nowhere).
The naive bridge reads its settings from ``BENCH_KAFKA_BOOTSTRAP``,
``BENCH_TOPIC_PREFIX`` and ``BENCH_TOKEN``.

Run one with e.g. ``uvicorn tests.bench.baselines:raw_asgi --loop uvloop
--http httptools --no-access-log``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

ACCEPTED = b'{"status":"accepted"}'
_ACCEPTED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(ACCEPTED)).encode()),
]
_EMPTY_HEADERS = [(b"content-length", b"0")]
WEBHOOK_PATHS = (
    "/webhooks/geins",
    "/webhooks/geins/{entity}",
    "/webhooks/geins/{entity}/{action}",
)
METHODS = ["GET", "POST", "PUT"]


# --------------------------------------------------------------------------
# raw ASGI


async def raw_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """Read the whole body, answer 202: the least any webhook receiver must do."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    path: str = scope["path"]
    if path.startswith("/webhooks/"):
        await send({"type": "http.response.start", "status": 202, "headers": _ACCEPTED_HEADERS})
        await send({"type": "http.response.body", "body": ACCEPTED})
        return
    status = 200 if path == "/readyz" else 404
    await send({"type": "http.response.start", "status": status, "headers": _EMPTY_HEADERS})
    await send({"type": "http.response.body", "body": b""})


# --------------------------------------------------------------------------
# Starlette no-op


async def _noop(request: Request) -> Response:
    await request.body()
    return Response(ACCEPTED, status_code=202, media_type="application/json")


async def _ready(_: Request) -> Response:
    return Response(b"", status_code=200)


starlette_noop = Starlette(
    routes=[
        *(Route(path, _noop, methods=METHODS) for path in WEBHOOK_PATHS),
        Route("/readyz", _ready, methods=["GET"]),
    ]
)


# --------------------------------------------------------------------------
# The naive bridge


def naive_bridge() -> Starlette:
    """The quick-start bridge: one shared producer, one ``send_and_wait`` per request."""
    bootstrap = os.environ.get("BENCH_KAFKA_BOOTSTRAP", "localhost:9092")
    prefix = os.environ.get("BENCH_TOPIC_PREFIX", "geins")
    token = os.environ.get("BENCH_TOKEN", "dev-token")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")

    async def webhook(request: Request) -> Response:
        supplied = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in (supplied, request.query_params.get("token")):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.body()
        data: dict[str, Any]
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                return JSONResponse({"error": "body is not JSON"}, status_code=400)
        else:
            data = {k: v for k, v in request.query_params.items() if k != "token"}
            body = json.dumps(data).encode()
        if not isinstance(data, dict):
            return JSONResponse({"error": "body is not a JSON object"}, status_code=400)

        def field(name: str) -> str:
            value = (
                request.path_params.get(name)
                or request.query_params.get(name)
                or data.get(name)
                or ""
            )
            return str(value).lower()

        entity, action = field("entity"), field("action")
        if not entity or not action:
            return JSONResponse({"error": "entity and action are required"}, status_code=422)
        key = request.headers.get("x-idempotency-key", "")
        await producer.send_and_wait(f"{prefix}.{entity}.{action}", body, key=key.encode())
        return JSONResponse({"status": "accepted"}, status_code=202)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await producer.start()
        try:
            yield
        finally:
            await producer.stop()

    return Starlette(
        routes=[
            *(Route(path, webhook, methods=METHODS) for path in WEBHOOK_PATHS),
            Route("/readyz", _ready, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
