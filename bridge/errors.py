"""One hierarchy for everything the bridge can refuse or fail at.

Each error knows its HTTP status, a short machine-readable ``reason`` (used as a
bounded metric label and in the problem+json body) and whether the sender
should retry. :mod:`bridge.ingress` turns these into HTTP answers, and
:mod:`bridge.httpprotocol` with its problem document for a request refused
before the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from bridge.geins import Event


class BridgeError(Exception):
    """Base class: a delivery the bridge did not accept."""

    status: int = 500
    reason: str = "internal"
    title: str = "Internal error"
    #: True when the same delivery may succeed later (the sender should retry).
    retriable: bool = False
    #: True when the delivery was authenticated and refused for its content, so
    #: it is worth keeping as a dead letter for an operator to inspect.
    content_rejection: bool = False

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        #: Seconds for Retry-After when this error knows better than the setting.
        self.retry_after = retry_after
        #: The parsed event, when the failure came after parsing (for metrics and logs).
        self.event: Event | None = None
        #: Entity and action as parsing read them, when it refused the pair itself
        #: (an unknown type in strict mode): metrics and logs say which it was.
        self.names: tuple[str, str] | None = None


class ConfigError(Exception):
    """A setting is missing or invalid; the bridge refuses to start."""

    #: The log format the settings ask for, as given (a file's or a variable's), when
    #: they were read: the failure is said in it (bridge.cli).
    log_format: object = None


class SpoolUnusable(Exception):
    """The spool cannot be opened, read or written; the bridge must not start on it."""


class SpoolOpeningStopped(Exception):
    """A stop signal ended the spool's opening (its check, see bridge.spool): no news
    about the spool, which a mode that can serve without it must not take for an
    unusable one (bridge.leftover); the bridge stops before serving (bridge.server)."""


# --- 4xx: the sender must change something -------------------------------------------


class MethodNotAllowed(BridgeError):
    status = 405
    reason = "method_not_allowed"
    title = "Method not allowed"


class NotFound(BridgeError):
    status = 404
    reason = "not_found"
    title = "Not found"


class Unauthorized(BridgeError):
    status = 401
    reason = "unauthorized"
    title = "Missing or invalid token"


class TooManyCredentials(BridgeError):
    """More Authorization headers and ``token`` parameters than auth.MAX_CREDENTIALS:
    refused before any is compared with a token."""

    status = 400
    reason = "too_many_credentials"
    title = "Too many credentials"


class PayloadTooLarge(BridgeError):
    status = 413
    reason = "body_too_large"
    title = "Body too large"


class MalformedRequest(BridgeError):
    """Not HTTP/1.1 the server can parse (a header line without a colon, two
    Content-Length headers, ...): refused by the HTTP protocol, before the app."""

    status = 400
    reason = "malformed_request"
    title = "Malformed HTTP request"


class IncompleteRequest(BridgeError):
    """The client shut down its sending side (a half-close) before the whole request
    arrived: it can never be whole (RFC 9112 6.3), so it is refused, never accepted."""

    status = 400
    reason = "incomplete_request"
    title = "Incomplete request"
    retriable = True  # sent whole again, it may be accepted


class UnsupportedTransferCoding(BridgeError):
    """A Transfer-Encoding with a coding besides chunked (``gzip, chunked``): the parser
    would hand over the coded bytes as the body. RFC 9112 6.1: a 501, refused by the HTTP
    protocol before the app."""

    status = 501
    reason = "unsupported_transfer_coding"
    title = "Transfer coding not supported"


class MalformedQuery(BridgeError):
    status = 400
    reason = "malformed_query"
    title = "Query string cannot be read"


class ClientDisconnected(BridgeError):
    """The sender went away before the body arrived; nobody hears the answer."""

    status = 499
    reason = "client_disconnected"
    title = "Client disconnected"


class ClientNotAllowed(BridgeError):
    status = 403
    reason = "client_not_allowed"
    title = "Client address not allowed"


class RequestTimeout(BridgeError):
    status = 408
    reason = "request_timeout"
    title = "The request was not received in time"
    # RFC 9110 15.5.9: the client may send it again; "retriable": false told a client
    # that honours the field to drop an event that was never accepted
    retriable = True


class UrlTooLong(BridgeError):
    status = 414
    reason = "url_too_long"
    title = "URL too long"


class HeadersTooLarge(BridgeError):
    status = 431
    reason = "headers_too_large"
    title = "Request headers too large"


class RateLimited(BridgeError):
    status = 429
    reason = "rate_limited"
    title = "Too many requests from this address"
    retriable = True


class TooManyPipelined(RateLimited):
    """More requests sent ahead on one connection than the HTTP protocol queues
    (bridge.httpprotocol.MAX_PIPELINED): each queued one holds its parsed head."""

    reason = "too_many_pipelined"
    title = "Too many requests pipelined on one connection"


class BadIdempotencyKey(BridgeError):
    status = 400
    reason = "bad_idempotency_key"
    title = "Invalid x-Idempotency-Key header"


class TokenInPath(BridgeError):
    """An authenticated delivery whose URL path holds a webhook token: refused before
    routing, so that no topic is named after a token. Kept as a dead letter (with the
    token left out), as the event it carries may be needed once the URL is fixed."""

    status = 400
    reason = "token_in_path"
    title = "Token in the URL path"
    content_rejection = True


class BodyNotJson(BridgeError):
    status = 400
    reason = "body_not_json"
    title = "Body is not a JSON object"
    content_rejection = True


class MissingEventType(BridgeError):
    status = 422
    reason = "missing_event_type"
    title = "Entity or action missing"
    content_rejection = True


class MalformedEventType(BridgeError):
    status = 422
    reason = "malformed_event_type"
    title = "Entity or action malformed"
    content_rejection = True


class UnknownEventType(BridgeError):
    status = 422
    reason = "unknown_event_type"
    title = "Unknown entity or action"
    content_rejection = True


# --- 5xx: the bridge cannot accept right now; the sender should retry ------------------


class Unavailable(BridgeError):
    """The event could not be made safe in time."""

    status = 503
    reason = "unavailable"
    title = "Service unavailable, retry later"
    retriable = True


class Overloaded(Unavailable):
    reason = "overloaded"
    title = "Too many requests in progress"


class TooManyConnections(Overloaded):
    """A connection beyond BRIDGE_MAX_CONNECTIONS, answered as it opens: each one holds
    a file descriptor, which Kafka and the spool need too."""

    reason = "too_many_connections"
    title = "Too many open connections"


class SpoolFull(Unavailable):
    reason = "spool_full"
    title = "The local spool is full"


class SpoolWriteFailed(Unavailable):
    reason = "spool_write_failed"
    title = "The local spool cannot be written"


class MemoryQueueFull(Unavailable):
    reason = "memory_queue_full"
    title = "The in-memory queue is full"


class PublishTimeout(Unavailable):
    reason = "publish_timeout"
    title = "Kafka did not acknowledge in time"

    #: The future of the record's batch, when it was handed over and is still queued:
    #: the record may yet land (a 503 is no promise that it will not), and resolves
    #: it without an exception if it does. None when that cannot be known.
    landing: asyncio.Future[Any] | None = None


class PublishFailed(Unavailable):
    reason = "publish_failed"
    title = "Kafka refused the record"


class ShuttingDown(Unavailable):
    """A delivery still in progress when BRIDGE_SHUTDOWN_TIMEOUT ran out at a stop."""

    reason = "shutting_down"
    title = "The bridge is stopping"


def stopping() -> ShuttingDown:
    """What a delivery that reaches an ack mode or a spool that has stopped gets: a new
    refusal each time (a request's refusal is its own to add to), saying the bridge is
    stopping, not that a disk failed (spool_write_failed made a rolling restart look like
    disk trouble)."""
    return ShuttingDown("the bridge is stopping; retry this delivery")


#: Every reason a rejection can carry: metric labels are pre-created from this list.
ALL_ERRORS: tuple[type[BridgeError], ...] = (
    BridgeError,  # "internal": a bug, answered 500
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    TooManyCredentials,
    PayloadTooLarge,
    MalformedRequest,
    IncompleteRequest,
    UnsupportedTransferCoding,
    MalformedQuery,
    ClientDisconnected,
    ClientNotAllowed,
    RequestTimeout,
    UrlTooLong,
    HeadersTooLarge,
    RateLimited,
    TooManyPipelined,
    Overloaded,
    TooManyConnections,
    BadIdempotencyKey,
    TokenInPath,
    BodyNotJson,
    MissingEventType,
    MalformedEventType,
    UnknownEventType,
    Unavailable,
    SpoolFull,
    SpoolWriteFailed,
    MemoryQueueFull,
    PublishTimeout,
    PublishFailed,
    ShuttingDown,
)

#: The reason of a dead letter kept for an event Kafka refused for good (too large for
#: its topic, say): the event was accepted, so no rejection above carries it.
KAFKA_REJECTED = "kafka_rejected"

#: Every reason a dead letter can carry: the content rejections, and Kafka's refusal.
DEAD_LETTER_REASONS: tuple[str, ...] = (
    *(error.reason for error in ALL_ERRORS if error.content_rejection),
    KAFKA_REJECTED,
)
