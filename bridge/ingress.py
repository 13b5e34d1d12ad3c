"""The app's HTTP edge: requests in, answers out.

The HTTP server's connection protocol (bridge.httpprotocol) speaks HTTP too: it
writes its own answers to requests it refuses before the app sees them (with
:func:`problem`) and the endpoint's 2xx answers through ``RESPOND_WHOLE``.

The webhook endpoint is a plain ASGI callable mounted in Starlette's router:
it reads the body itself (to enforce the size cap while reading), so it skips
the Request/Response objects it does not need on the hot path. Operations
endpoints (/healthz, /readyz, /metrics) are ordinary Starlette routes.
Every error answer is ``application/problem+json`` (RFC 9457).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from bridge.ackmodes import AckMode
from bridge.auth import TokenAuthenticator
from bridge.errors import (
    BridgeError,
    ClientDisconnected,
    IncompleteRequest,
    MalformedQuery,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ShuttingDown,
    Unauthorized,
)
from bridge.geins import IDEMPOTENCY_HEADER, Delivery, Event, key_text
from bridge.logs import REDACTED_WITH
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.pipeline import Accepted, Pipeline
from bridge.redaction import LOGGED_LENGTH, cut

log = logging.getLogger(__name__)
access_log = logging.getLogger("bridge.access")

WEBHOOK_PATH = "/webhooks/geins"
#: Longest wait to write the 503 of a delivery cut off at a stop (its client reads
#: none meanwhile): then it is dropped (see answer_or_drop).
STOP_ANSWER_SECONDS = 1.0
#: Set in the scope by the HTTP protocol to the BridgeError it answered (and logged)
#: for a request whose app was waiting for the body (a late one: 408; a malformed
#: one: 400): the app, which hears a disconnect, counts the request as that.
REFUSED_BY_PROTOCOL = "bridge.refused_by_protocol"
#: Set in the scope by the HTTP protocol when the client half-closed the connection
#: before the request's body was whole: the rest can never come (read_body refuses it).
HALF_CLOSED = "bridge.half_closed"
#: Set in the scope by the HTTP protocol (bridge.httpprotocol): a function
#: ``(scope, status, header lines, body) -> bool`` that writes a whole response
#: at once, skipping ASGI's two ``send`` messages, or answers False when the app
#: must use ``send`` after all.
RESPOND_WHOLE = "bridge.respond_whole"
#: Set in the scope by the HTTP protocol: a function ``(scope) -> None`` that ends the
#: request without an answer when none was begun, the connection closed: uvicorn then
#: neither logs an app that returned without answering (an ERROR) nor writes its
#: text/plain 500 (see ErrorAnswer.send_or_drop).
DROP_UNANSWERED = "bridge.drop_unanswered"
#: Scope key: the event of a delivery cut off (cancelled at a stop) after parsing, for
#: its labels and log line (else "none", as for a delivery parsing refused).
CUT_OFF_EVENT = "bridge.cut_off_event"
#: Methods that are never a delivery. Geins' method is free text (POST usually, GET
#: named as possible, nothing ruled out), so every other one is taken like POST, PUT
#: or GET: PATCH and DELETE were refused (405), and the event lost after Geins'
#: retries. HEAD's answer can carry no body; OPTIONS and TRACE are HTTP's own;
#: CONNECT is refused by the HTTP protocol already.
REFUSED_METHODS = frozenset({"HEAD", "OPTIONS", "TRACE", "CONNECT"})
MAX_QUERY_FIELDS = 200
PROBLEM_JSON = b"application/problem+json"
JSON = b"application/json"
_ALLOW_HEADER = (b"allow", b"GET, POST, PUT, PATCH, DELETE")
_AUTH_CHALLENGE = (b"www-authenticate", b'Bearer realm="geins-bridge"')
#: Longest idempotency key a log line shows (a longer one is refused anyway).
LOGGED_KEY_LENGTH = 200


class Redact(Protocol):
    """Makes a client's text fit for a log line: without the webhook tokens, and cut
    after ``limit`` characters (a Redactor's :meth:`~bridge.redaction.Redactor.logged`)."""

    def __call__(self, text: str, limit: int = LOGGED_LENGTH) -> str: ...


def no_redaction(text: str, limit: int = LOGGED_LENGTH) -> str:
    return cut(text, limit)


@dataclass
class RuntimeState:
    """What the operations endpoints report; flipped by the server on SIGTERM."""

    draining: bool = False
    app_stopping: bool = False  # the app's shutdown (drain and flush) has begun


#: The answers that say how long to wait before a retry (RFC 9110 10.2.3, RFC 6585 4):
#: a 408's or a 400's retry need not wait.
_WAIT_STATUSES = frozenset({429, 503})


def outcome_of(error: BridgeError) -> str:
    """The ``outcome`` label of a refusal. A 429 is retriable too, but it is one
    client's excess, not the bridge failing: it is kept apart from the 503s that
    the server-error alert watches; so are a 408's and a 400's that a retry may mend
    (a client too slow, or one that half-closed before its request was whole)."""
    if isinstance(error, RateLimited):
        return "rate_limited"
    return "unavailable" if error.retriable and error.status >= 500 else "rejected"


def parse_query(raw: bytes) -> list[tuple[str, str]]:
    """The query's ``name=value`` pairs in order, percent-decoded as UTF-8 (a name
    without ``=`` has an empty value). A ``+`` stays a ``+``: Geins substitutes its
    placeholders as plain text, so ``?email={{email}}`` brings an address's ``+``
    as it is, where form decoding (``parse_qsl``) published a space. MalformedQuery
    for more than MAX_QUERY_FIELDS pairs, or bytes that are not UTF-8 (they were
    published as U+FFFD)."""
    # (empty pieces, of `a=1&&b=2` or a trailing `&`, are no parameters: not counted)
    parts = [part for part in raw.split(b"&") if part]
    if len(parts) > MAX_QUERY_FIELDS:
        raise MalformedQuery(f"the query string has more than {MAX_QUERY_FIELDS} parameters")
    pairs: list[tuple[str, str]] = []
    try:
        for part in parts:
            name, _, value = part.partition(b"=")
            pairs.append((unquote_to_bytes(name).decode(), unquote_to_bytes(value).decode()))
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise MalformedQuery(
            f"the query string is not UTF-8 once percent-decoded (byte {byte:#04x})"
        ) from None
    return pairs


class ErrorAnswer:
    """Writes the problem+json answer of a BridgeError, with the headers it calls for."""

    def __init__(self, retry_after: int) -> None:
        self._retry_after = retry_after

    def headers(self, error: BridgeError) -> list[tuple[bytes, bytes]]:
        if isinstance(error, Unauthorized):
            return [_AUTH_CHALLENGE]
        if isinstance(error, MethodNotAllowed):
            return [_ALLOW_HEADER]
        if error.retriable and error.status in _WAIT_STATUSES:
            seconds = error.retry_after or self._retry_after
            return [(b"retry-after", str(seconds).encode())]
        return []

    async def send(self, send: Send, error: BridgeError) -> None:
        await _respond(send, error.status, problem(error), PROBLEM_JSON, self.headers(error))

    async def send_or_drop(self, scope: Scope, send: Send, error: BridgeError) -> None:
        """send(), or, should uvicorn cancel the request meanwhile, drop it (see
        answer_or_drop)."""
        await answer_or_drop(scope, self.send(send, error))


async def answer_or_drop(
    scope: Scope, answering: Coroutine[Any, Any, None], within: float | None = None
) -> None:
    """Await ``answering`` (the request's answer), or, should uvicorn cancel the
    request meanwhile (or ``within`` seconds pass), drop it.

    uvicorn cancels, as BRIDGE_SHUTDOWN_TIMEOUT runs out at a stop (and asyncio again
    as the process exits), a request whose answer waits (before it began) for a
    client that reads none. Raised on, it was an error in the application to uvicorn
    (a traceback); ended quietly, an app that returned without answering (an ERROR):
    either way a text/plain 500 followed, in place of the answer logged and counted.
    Dropped instead (DROP_UNANSWERED); the caller logs and counts what it answered."""
    try:
        async with asyncio.timeout(within):
            await answering
    except (asyncio.CancelledError, TimeoutError):
        drop = scope.get(DROP_UNANSWERED)
        if drop is not None:
            drop(scope)


class GuardRefusal:
    """How a request refused before the endpoint (by the guards, bridge.guards, or for
    a path under the webhook prefix that is no webhook route) is answered, logged (its
    tokens redacted by ``redact``) and counted."""

    def __init__(self, answer: ErrorAnswer, metrics: Metrics, redact: Redact) -> None:
        self._answer = answer
        self._metrics = metrics
        self._redact = redact

    async def __call__(self, scope: Scope, send: Send, error: BridgeError, started: float) -> None:
        if scope.get(REFUSED_BY_PROTOCOL) is not None:
            return  # answered, logged and counted by the HTTP protocol; this goes nowhere
        await self._answer.send_or_drop(scope, send, error)
        if scope.get(REFUSED_BY_PROTOCOL) is not None:
            # Refused by the protocol (a late or malformed body) while this answer
            # waited to be written, to a client that reads none: counted there.
            return
        log_refusal(error, scope, self._redact)
        seconds = time.perf_counter() - started
        self._metrics.record_request(outcome_of(error), None, error.reason, seconds)


def problem(error: BridgeError) -> bytes:
    """The RFC 9457 problem document for ``error``."""
    return orjson.dumps(
        {
            "type": f"urn:geins-bridge:problem:{error.reason}",
            "title": error.title,
            "status": error.status,
            "detail": error.detail,
            "reason": error.reason,
            "retriable": error.retriable,
        }
    )


class WebhookEndpoint:
    """ASGI endpoint for ``/webhooks/geins[/{entity}[/{action}]]``."""

    def __init__(
        self,
        pipeline: Pipeline,
        authenticator: TokenAuthenticator,
        metrics: Metrics,
        answer: ErrorAnswer,
        *,
        max_body_bytes: int,
        max_bodies_bytes: int,
        access_log: bool = False,
    ) -> None:
        self._pipeline = pipeline
        self._auth = authenticator
        self._metrics = metrics
        self._answer = answer
        self._max_body = max_body_bytes
        self._bodies = bodies = BodyBudget(max_bodies_bytes)
        metrics.bodies_bytes.set_function(lambda: bodies.held)
        self._access_log = access_log
        self._redact: Redact = authenticator.redactor.logged
        self._ack_header = (b"x-bridge-ack", pipeline.ack_mode.name.encode())
        # The same headers as header lines, for the server's RESPOND_WHOLE.
        self._accepted_head = b"content-type: %s\r\n%s: %s\r\n" % (JSON, *self._ack_header)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        event: Event | None = None
        names: tuple[str, str] | None = None  # of a refusal parsing made
        outcome, reason = "accepted", None
        try:
            accepted = await self._accept(scope, receive)
            event = accepted.event
            outcome = "duplicate" if accepted.duplicate else "accepted"
            body = orjson.dumps(
                {
                    "status": outcome,
                    "topic": accepted.topic,
                    "key": event.key,
                    "ack": accepted.ack,
                }
            )
            status = 200 if accepted.duplicate else 202
            respond_whole = scope.get(RESPOND_WHOLE)
            if respond_whole is None or not respond_whole(scope, status, self._accepted_head, body):
                await _respond(send, status, body, JSON, [self._ack_header])
        except BridgeError as exc:
            event, names = exc.event, exc.names
            outcome, reason = outcome_of(exc), exc.reason
            await self._refused(scope, send, exc)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when BRIDGE_SHUTDOWN_TIMEOUT
            # runs out at a stop; its own answer was a text/plain 500, counted here as
            # accepted. A retriable problem+json 503 instead, counted as one. Not raised
            # again: the task ends here, answered, and uvicorn would log the
            # cancellation as an error in the application, with a traceback.
            stopping = ShuttingDown(
                "the bridge stopped before this delivery was answered; retry it (it "
                "may have been made safe already, and then be published once more)"
            )
            outcome, reason = outcome_of(stopping), stopping.reason
            cut_off: Event | None = scope.get(CUT_OFF_EVENT)
            if cut_off is not None and cut_off.key_generated:
                # Parsed again, it got a new key, which no record has: its type alone.
                names = stopping.names = (cut_off.entity, cut_off.action)
            else:
                event = stopping.event = cut_off
            # Not waited for long: nothing cancels this wait again but the process's
            # exit (an ERROR then), and a client that reads none held the stop until
            # its write timer (BRIDGE_READ_TIMEOUT) gave up on it (a review's test).
            with contextlib.suppress(Exception):  # a connection already gone
                answering = self._answer.send(send, stopping)
                await answer_or_drop(scope, answering, within=STOP_ANSWER_SECONDS)
            if scope.get(REFUSED_BY_PROTOCOL) is None:  # else see finally
                log_refusal(stopping, scope, self._redact)
        except Exception:  # a bug: answer 500 (Geins retries) and say so loudly
            error = BridgeError("unexpected internal error; the delivery was not accepted")
            error.retriable = True  # not accepted: a retry may be (it said false)
            outcome, reason = "error", error.reason  # "internal", as its problem says
            # The method and path are the client's: fields, which the text format
            # quotes, never the message (a path with ' outcome=...' would forge a field).
            log.exception(
                "unexpected error handling a webhook request",
                extra=_logged(_request_fields(scope, event, self._redact), self._redact),
            )
            await answer_or_drop(scope, _respond(send, 500, problem(error), PROBLEM_JSON, []))
        finally:
            seconds = time.perf_counter() - started
            refused: BridgeError | None = scope.get(REFUSED_BY_PROTOCOL)
            if refused is None:
                self._metrics.record_request(outcome, event, reason, seconds, names)
            else:
                # The HTTP protocol refused the body (or found it late) and answered,
                # logged and counted that; what the app met after it (a disconnect, a
                # 401 of its own, when the head and a bad body came in one packet)
                # went nowhere. Its answer is the request's outcome.
                outcome, reason = outcome_of(refused), refused.reason
            if self._access_log:
                self._log_access(
                    scope, event, names, outcome=outcome, reason=reason, seconds=seconds
                )

    async def _refused(self, scope: Scope, send: Send, error: BridgeError) -> None:
        """Answer and log a refusal, unless the HTTP protocol refused the request: it
        answered, logged and counted that (the finally of __call__ takes its outcome),
        before this or while this answer waited to be written to a client that reads
        none (which logged two lines)."""
        if scope.get(REFUSED_BY_PROTOCOL) is not None:
            return
        if not isinstance(error, ClientDisconnected):  # else nobody to answer
            await self._answer.send_or_drop(scope, send, error)
            if scope.get(REFUSED_BY_PROTOCOL) is not None:
                return
        log_refusal(error, scope, self._redact)

    def _log_access(
        self,
        scope: Scope,
        event: Event | None,
        names: tuple[str, str] | None,
        *,
        outcome: str,
        reason: str | None,
        seconds: float,
    ) -> None:
        """The access log's line of a webhook request (BRIDGE_ACCESS_LOG)."""
        fields = _request_fields(scope, event, self._redact, names)
        fields["outcome"] = outcome
        if reason is not None:  # an accepted one has none: no "reason=None"
            fields["reason"] = reason
        fields["ms"] = round(seconds * 1000, 3)
        access_log.info("webhook request", extra=_logged(fields, self._redact))

    async def _accept(self, scope: Scope, receive: Receive) -> Accepted:
        method: str = scope["method"]
        if method in REFUSED_METHODS:
            raise MethodNotAllowed(
                f"{method} is no delivery; use POST (or PUT, GET, PATCH, DELETE)"
            )
        raw_query: bytes = scope["query_string"]
        query = parse_query(raw_query) if raw_query else []
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        started = time.perf_counter()
        self._auth.check(headers, query)  # before reading a byte of the body
        self._metrics.observe_stage("auth", time.perf_counter() - started)
        # No deadline here: the HTTP protocol (bridge.httpprotocol) gives the whole
        # request BRIDGE_READ_TIMEOUT, answers 408 and hangs up; this read then ends
        # with a disconnect. One timer per connection instead of one per request.
        body = await read_body(receive, scope, self._max_body, self._bodies)
        try:
            params: dict[str, str] = scope.get("path_params", {})
            delivery = Delivery(
                method=method,
                path=scope["path"],
                path_entity=params.get("entity"),
                path_action=params.get("action"),
                query=query,
                headers=headers,
                body=body,
                received_at=datetime.now(UTC),
            )
            return await self._pipeline.handle(delivery)
        except asyncio.CancelledError:
            scope[CUT_OFF_EVENT] = self._pipeline.event_of(delivery)
            raise
        finally:  # held until the answer: parsed, handed to Kafka, awaited
            self._bodies.release(len(body))


class BodyBudget:
    """The bytes of request bodies that webhook requests in progress hold, at most
    ``limit`` (BRIDGE_MAX_BODIES_BYTES): past it a body is refused (503, retry) before
    it is read, or as soon as it grows past it. BRIDGE_MAX_CONCURRENCY alone allowed
    that many bodies as large as BRIDGE_MAX_BODY_BYTES, some 940 MB at the defaults.
    A request alone in holding bodies is always let through: one event as large as
    BRIDGE_MAX_BODY_BYTES can always be delivered."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int, own: int) -> None:
        """Hold ``size`` more bytes for a request that holds ``own`` already, or raise
        Overloaded."""
        if size and self.held + size > self.limit and self.held > own:
            raise Overloaded(
                f"request bodies in progress hold {self.held} bytes; {size} more would "
                f"pass BRIDGE_MAX_BODIES_BYTES={self.limit}",
                retry_after=1,
            )
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size


async def read_body(receive: Receive, scope: Scope, cap: int, bodies: BodyBudget) -> bytes:
    """The request body, refusing (413) as soon as it passes ``cap`` bytes, (503) when
    it does not fit ``bodies``, and (400) once the client has half-closed the
    connection before sending all of it. On success the body's bytes are held in
    ``bodies``: the caller releases them."""
    declared = 0
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            declared = int(value)
            if declared > cap:
                raise PayloadTooLarge(f"the body is {declared} bytes; at most {cap} accepted")
    bodies.take(declared, 0)  # the whole body before a byte of it is read
    held = declared
    try:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the client disconnected before sending the whole body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise PayloadTooLarge(f"the body is larger than {cap} bytes")
            if size > held:  # chunked (uvicorn stops a body at its Content-Length)
                bodies.take(size - held, held)
                held = size
            chunks.append(chunk)
            if not message.get("more_body", False):
                if held > size:  # never (llhttp reads to the Content-Length): no drift
                    bodies.release(held - size)
                    held = size
                return b"".join(chunks)
            if scope.get(HALF_CLOSED):
                # The protocol woke this read for a body that will never be whole. Only
                # between pieces: a body that came with its head (nearly every one)
                # never gets here.
                raise IncompleteRequest(
                    f"the client half-closed the connection after {size} bytes of the "
                    "body, before the rest"
                )
    except BaseException:
        bodies.release(held)
        raise


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra_headers: list[tuple[bytes, bytes]],
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: Scope key: the request's method and path as its log lines show them (redacted).
LOGGED_ONCE = "bridge.logged_once"


def _request_fields(
    scope: Scope, event: Event | None, redact: Redact, names: tuple[str, str] | None = None
) -> dict[str, object]:
    """What a log line may say about a request: never the query (it may hold the token)
    nor headers other than the idempotency key; and in what it says, no token (it
    may be in the path, the key, or even the method), and at most about a kilobyte of
    each: a path of 8 KB redacted whole, then again by the log's filter, cost up to a
    hundred times what the rest of a refusal without a token does."""
    fields: dict[str, object] = {}
    # Redacted once per request: a refusal's line and its access line both show them,
    # and a long path of percent signs costs a redaction up to ~100 µs.
    once: dict[str, object] = scope.setdefault(LOGGED_ONCE, {})
    for name in ("method", "path"):  # unknown when the protocol refused a head
        if scope.get(name) is not None:
            if name not in once:
                once[name] = redact(scope[name])
            fields[name] = once[name]
    if event is not None:
        fields.update(
            key=redact(event.key), entity=redact(event.entity), action=redact(event.action)
        )
    else:
        for name, value in scope.get("headers", ()):
            if name == IDEMPOTENCY_HEADER:
                fields["key"] = redact(key_text(value.decode("latin-1")), LOGGED_KEY_LENGTH)
                break
        if names is not None:
            fields.update(entity=redact(names[0]), action=redact(names[1]))
    return fields


#: The bridge's own refusals (5xx) of one reason are a WARNING at most once in this
#: many seconds, INFO in between: in an outage every delivery is refused alike, and a
#: reviewer counted 1,705 WARNING lines in 7 minutes at 4 requests a second.
WARN_AGAIN_AFTER_SECONDS = 60.0
#: reason -> time.monotonic() of its last WARNING (reset by the tests, see conftest)
warned_at: dict[str, float] = {}


def log_refusal(error: BridgeError, scope: Scope, redact: Redact) -> None:
    """One line per refused or failed delivery (also those the HTTP protocol refuses),
    without the tokens ``redact`` knows.

    INFO when the client caused it, so that no client can flood the log at
    WARNING (a rate-limited one, say); WARNING when the bridge could not take it
    (5xx: spool full, Kafka unreachable, overloaded), once a minute for each reason
    (the others of the minute at INFO: a log at WARNING shows each trouble, not each
    delivery it refuses).
    """
    fields = _request_fields(scope, error.event, redact, error.names)
    fields.update(status=error.status, reason=error.reason, detail=redact(error.detail))
    level = logging.INFO
    if error.status >= 500 and error.status != 501:  # a 501 is the client's coding
        now = time.monotonic()
        if now - warned_at.get(error.reason, -WARN_AGAIN_AFTER_SECONDS) >= WARN_AGAIN_AFTER_SECONDS:
            warned_at[error.reason] = now
            level = logging.WARNING
    log.log(level, "delivery refused: %s", error.reason, extra=_logged(fields, redact))


def _logged(fields: dict[str, object], redact: Redact) -> dict[str, object]:
    """The ``extra`` of a line with ``fields``, redacted by ``redact`` already: the
    log's filter (bridge.logs.Redacting) need not redact them again when its Redactor
    is the one that did."""
    return {"fields": fields, REDACTED_WITH: redact}


#: The operations endpoints served on BRIDGE_OPS_PORT only, when it is set (the others,
#: /healthz and /readyz, answer on both ports: bridge.app), and as they are named in text.
OPS_PORT_ONLY = ("/metrics", "/openapi.json")
OPS_PORT_ONLY_NAMED = " and ".join(OPS_PORT_ONLY)


def operation_routes(
    metrics: Metrics, ack_mode: AckMode, state: RuntimeState, openapi: bytes
) -> list[BaseRoute]:
    """/healthz, /readyz, /metrics and /openapi.json."""

    async def healthz(_: Request) -> Response:
        return Response(b'{"status":"alive"}', media_type="application/json")

    async def readyz(_: Request) -> Response:
        # Why not, said: "accepting": false alone sent the operator to the log.
        refusing = ack_mode.unready_reason  # asked once: ready is its being None
        reason = "the bridge is stopping" if state.draining else refusing
        answer: dict[str, object] = {
            "status": "unavailable" if reason else "ready",
            "ack": ack_mode.name,
            "accepting": refusing is None,
            "draining": state.draining,
        }
        if reason:
            answer["reason"] = reason
        return Response(
            orjson.dumps(answer),
            status_code=503 if reason else 200,
            media_type="application/json",
        )

    async def prometheus(_: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    async def openapi_json(_: Request) -> Response:
        return Response(openapi, media_type="application/json")

    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]


def is_webhook_path(path: str) -> bool:
    return path.startswith(WEBHOOK_PATH) and (
        len(path) == len(WEBHOOK_PATH) or path[len(WEBHOOK_PATH)] == "/"
    )


NO_WEBHOOK_ROUTE = (
    f"no webhook route for this path: they are {WEBHOOK_PATH}, {WEBHOOK_PATH}/{{entity}} "
    f"and {WEBHOOK_PATH}/{{entity}}/{{action}}, each with or without a trailing slash"
)


class WebhookDispatch:
    """Matches the webhook paths without a regex router (the same paths as
    :func:`webhook_routes`: up to two segments, one optional trailing slash) and
    hands them to the endpoint with ``path_params`` set; anything else under the
    prefix is a problem+json 404, logged and counted like any refusal (a webhook URL
    set up wrong, most likely)."""

    def __init__(self, endpoint: WebhookEndpoint, refuse: GuardRefusal) -> None:
        self._endpoint = endpoint
        self._refuse = refuse

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        # A plain function returning the endpoint's coroutine: see BridgeApp.__call__.
        rest = scope["path"][len(WEBHOOK_PATH) :]
        if rest.endswith("/"):
            rest = rest[:-1]
        parts = rest[1:].split("/") if rest else []
        if len(parts) > 2 or "" in parts:
            # The path is the log line's field, redacted once; the client knows it.
            error = NotFound(NO_WEBHOOK_ROUTE)
            return self._refuse(scope, send, error, time.perf_counter())
        scope["path_params"] = dict(zip(("entity", "action"), parts, strict=False))
        return self._endpoint(scope, receive, send)


def webhook_routes(endpoint: WebhookEndpoint) -> list[BaseRoute]:
    """The webhook paths, each also with a trailing slash: a sender that does not
    follow redirects (Geins is not documented to) must not be sent a 307."""
    paths = (WEBHOOK_PATH, WEBHOOK_PATH + "/{entity}", WEBHOOK_PATH + "/{entity}/{action}")
    # methods=None: the endpoint answers 405 itself, as problem+json.
    return [Route(path + slash, endpoint) for path in paths for slash in ("", "/")]


async def http_exception_as_problem(_: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 answers, as problem+json like every other error."""
    assert isinstance(exc, HTTPException)  # noqa: S101  # registered for HTTPException only
    # The bridge's own problem types for the statuses it has one for (RFC 9457: one
    # title per type): Starlette's title ("Method Not Allowed") and a type of its own
    # ("http_error") for the same problem as a webhook path's 405 met clients keyed on
    # the type.
    known: dict[int, type[BridgeError]] = {404: NotFound, 405: MethodNotAllowed}
    if (kind := known.get(exc.status_code)) is not None:
        error: BridgeError = kind(exc.detail)
    else:
        error = BridgeError(exc.detail)
        error.status, error.title, error.reason = exc.status_code, exc.detail, "http_error"
    return Response(
        problem(error),
        status_code=exc.status_code,
        headers=exc.headers,  # Starlette's 405 carries Allow
        media_type=PROBLEM_JSON.decode(),
    )
