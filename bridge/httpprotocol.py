"""uvicorn's httptools protocol with the two limits only a server can enforce.

An ASGI app first hears of a request once its headers are complete, so it
cannot stop a client that trickles header bytes forever (slow loris) or that
sends megabytes of headers. This subclass does, per connection: the head of
each request (request line and headers) must arrive within ``read_timeout``
seconds and within ``max_head_bytes`` bytes, and its body within the same
``read_timeout`` from the first byte; otherwise the client gets a problem+json
408 or 431 (414 when the URL is what made the head too large, as the guard
would answer) and the connection is closed. A request the parser cannot read gets
a problem+json 400 instead of uvicorn's text/plain one (uvicorn answers it
through ``send_400_response``; if a release stops doing so, startup warns
and such requests get uvicorn's own answer). A client that half-closes the
connection still gets the answers to its requests, in order, then it is closed;
a request the half-close cut short is refused, 400 (``eof_received``).

It also sends each response in one piece: uvicorn writes the status line and
headers, then the body, and uvloop turns each write into its own ``send()``
on the socket. :class:`OneWritePerResponse` holds the head back until the body
follows, which saves a system call (and a TCP segment the client must read)
per request. Everything else is uvicorn's own code path.

An ``Upgrade`` header (``Upgrade: h2c`` from ``curl --http2``, Java's and Ktor's
HTTP clients) is ignored, as RFC 9110 allows: llhttp stops at the end of such a
head and hands what follows over as another protocol's bytes, so uvicorn ended
the request with an empty body (the app accepted it, and published the path and
query instead of the body). The protocol parses the request again from a head
without the upgrade, with the bytes that followed as its body
(``_unsupported_upgrade_warning``, which uvicorn calls as the parser stops).

One shortcut on top: the webhook endpoint's 2xx answer (the response to almost
every request this server sees) is written whole by
``respond_whole``, which the protocol offers the app in the scope under
``RESPOND_WHOLE``. uvicorn's ASGI ``send`` checks every header against two
regexes and the response in two messages; the endpoint's headers are its own
constants, so the shortcut writes status line, headers and body at once and
then marks the response complete the way ``send`` does (measured: about 6 µs of
CPU per request, 7 %). It relies on uvicorn's ``RequestResponseCycle``
attributes; tests/test_httpprotocol.py checks them against the installed
uvicorn, and at run time the first response checks that the cycle still has
them (uvicorn is not pinned), falling back to ``send`` for good, with a warning,
if one is missing. Anything unusual (a pipelined request, a paused or lost
connection) declines too, and the app uses ``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Generic, TypeVar, cast

import httptools
import uvicorn
from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bridge.config import MAX_URL_BYTES_CEILING, OPS_MAX_CONNECTIONS
from bridge.errors import (
    BridgeError,
    ClientDisconnected,
    ConfigError,
    HeadersTooLarge,
    IncompleteRequest,
    MalformedRequest,
    MethodNotAllowed,
    RequestTimeout,
    TooManyConnections,
    TooManyPipelined,
    UnsupportedTransferCoding,
    UrlTooLong,
)
from bridge.guards import url_too_long
from bridge.ingress import (
    DROP_UNANSWERED,
    HALF_CLOSED,
    REFUSED_BY_PROTOCOL,
    RESPOND_WHOLE,
    ErrorAnswer,
    Redact,
    log_refusal,
    no_redaction,
    problem,
)

log = logging.getLogger(__name__)

#: Most requests a connection may have waiting behind the one being served (HTTP
#: pipelining; Geins sends one at a time). uvicorn parses and queues every request in
#: the bytes received even after it paused reading, some 2.3 KB each: 30 connections
#: of 26-byte `GET /healthz` requests held 700 MB, for ever, and stalled every client
#: for 10 s (a review's find). The next one is refused (429) after the answers to
#: those before it, and nothing after it is read.
MAX_PIPELINED = 16

#: Longest wait, after an answer given before its request's body was all read on a
#: connection that closes, for the client to stop sending (see OneWritePerResponse).
LINGER_SECONDS = 2.0

#: Least time between two log lines about connections refused, or idle ones closed, for
#: BRIDGE_MAX_CONNECTIONS (a flood of them is one line a second, with their count; the
#: metrics count each).
CONNECTION_REFUSALS_LOG_EVERY = 1.0

#: Least time a connection is idle before a new one at BRIDGE_MAX_CONNECTIONS may take
#: its place. uvloop accepts every waiting connection before it reads from any: with
#: no grace, each new connection of a burst closed the one before it, its request sent
#: but unread (no answer, where a 503 told the client to retry; a review's test). And a
#: connection answered a moment ago is the one a proxy's pool reuses next.
IDLE_GRACE_SECONDS = 1.0

#: Most connections refused for BRIDGE_MAX_CONNECTIONS that linger at once (each holds
#: a file descriptor for up to LINGER_SECONDS); past it a refused connection is closed
#: as soon as its answer is written. Without a bound, a flood of new connections
#: kept hundreds lingering and took the descriptors FILE_RESERVE keeps for Kafka and the
#: spool (a review: 150 a second against a limit of 1024 left most unanswered).
MAX_LINGERING_REFUSALS = 32

#: The headers a refusal calls for (a 405's Allow); a retriable one's Retry-After is
#: its own or 1 s (the app's answers use BRIDGE_RETRY_AFTER).
_REFUSAL_ANSWER = ErrorAnswer(1)

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

# What respond_whole reads and sets on uvicorn's RequestResponseCycle.
CYCLE_ATTRIBUTES = (
    "scope",
    "response_started",
    "response_complete",
    "disconnected",
    "waiting_for_100_continue",
    "default_headers",
    "keep_alive",
    "message_event",
    "on_response",
)
_cycle_fits: dict[type, bool] = {}  # per cycle class: has every attribute above


def cycle_fits(protocol: object, cycle: object) -> bool:
    """Whether ``cycle`` (and ``protocol``'s flow control) have what respond_whole
    needs; warns once when they do not."""
    kind = type(cycle)
    fits = _cycle_fits.get(kind)
    if fits is None:
        missing = [name for name in CYCLE_ATTRIBUTES if not hasattr(cycle, name)]
        if not hasattr(getattr(protocol, "flow", None), "write_paused"):
            missing.append("flow.write_paused")
        fits = _cycle_fits[kind] = not missing
        if missing:
            log.warning(
                "this uvicorn's request cycle has no %s: every response goes through "
                "ASGI send (correct, a few µs slower)",
                ", ".join(missing),
            )
    return fits


_UVICORNS_400_MESSAGE = "Invalid HTTP request received."


class _WithoutUvicorns400Warning(logging.Filter):
    """Drops uvicorn's WARNING about a request it cannot parse: the bridge answers
    that request itself and logs it at INFO, like every refusal a client causes,
    so that no client can flood the log at WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _UVICORNS_400_MESSAGE


#: Where uvicorn starts each request's app, queued ones in turn: the protocol keeps
#: its answers in order from there (_answered_all). Without it, it took a request
#: still running for answered: an idle timer or a refusal cut its answer off.
ORDER_HOOK = "_start_asgi_task"


def refuse_unknown_uvicorn(protocol: type[HttpToolsProtocol]) -> None:
    """A ConfigError unless this uvicorn has the hook answers are ordered by (0.45 on;
    pyproject.toml asks for 0.53, pip installs no older one, but a vendored or
    patched uvicorn may lack it)."""
    if not callable(getattr(protocol, ORDER_HOOK, None)):
        raise ConfigError(
            f"this uvicorn ({uvicorn.__version__}) is too old for the bridge: its HTTP "
            f"protocol has no {ORDER_HOOK}; install uvicorn 0.53 or later"
        )


def answers_malformed_requests(protocol: type[HttpToolsProtocol]) -> bool:
    """Whether this uvicorn's protocol answers an unparsable request through
    ``send_400_response`` (which the bridge's protocol overrides); warns when not."""
    if callable(getattr(protocol, "send_400_response", None)):
        uvicorn_log = logging.getLogger("uvicorn.error")  # what uvicorn's protocol logs to
        if not any(isinstance(f, _WithoutUvicorns400Warning) for f in uvicorn_log.filters):
            uvicorn_log.addFilter(_WithoutUvicorns400Warning())
        return True
    log.warning(
        "this uvicorn's HTTP protocol has no send_400_response: a malformed request "
        "gets uvicorn's own text/plain 400, not problem+json, and is not counted"
    )
    return False


class _Refused(httptools.HttpParserError):
    """A request the bridge refuses from a parser callback (its HTTP version, a trailer
    field): a parser error, so that the parser stops at once and uvicorn hands it to
    ``send_400_response``, which answers ``refusal``."""

    def __init__(self, refusal: BridgeError) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


def _refusal_of(error: BaseException | None) -> BridgeError | None:
    """The refusal a parser error carries, if it is a _Refused (httptools raises its
    own error, with the callback's as its context)."""
    for candidate in (error, error and error.__context__):
        if isinstance(candidate, _Refused):
            return candidate.refusal
    return None


#: What the protocol serves: llhttp also takes an HTTP/0.9 request line (no version)
#: and "HTTP/2.0", which were served as HTTP/1.1 (a review's find).
_SERVED_VERSIONS = frozenset({"1.1", "1.0"})
#: The longest URL httptools.parse_url takes, '?' included (see on_headers_complete).
_PARSED_URL_MAX = MAX_URL_BYTES_CEILING + 1


def _path_and_query_bytes(url: bytes) -> int:
    """The bytes of ``url`` the guard counts against BRIDGE_MAX_URL_BYTES: its path and
    query, without the '?' between them, nor the scheme and authority of an absolute
    form (``http://host/path``, which RFC 9112 3.2.2 has servers take): counted, they
    made a request within the limit a 414 rather than the 431 its headers earned."""
    if not url.startswith(b"/") and (scheme_end := url.find(b"://")) >= 0:
        path_at = url.find(b"/", scheme_end + 3)
        url = url[path_at:] if path_at >= 0 else b""
    return len(url) - (b"?" in url)


def _with_a_path(url: bytes) -> bytes:
    """An absolute-form target (``http://host?query``, RFC 9112 3.2.2, which servers
    must take) without a path has the path "/" (RFC 9110 4.2.3): uvicorn decoded
    httptools' None for it, and the AttributeError was a 400 "not valid HTTP/1.1 (User
    callback error)" (a review's test). Any other URL as it is."""
    scheme_end = url.find(b"://")
    if scheme_end < 0:
        return url
    authority_at = scheme_end + 3
    query_at = url.find(b"?", authority_at)
    authority_end = len(url) if query_at < 0 else query_at
    if url.find(b"/", authority_at, authority_end) >= 0:
        return url
    return url[:authority_end] + b"/" + url[authority_end:]


#: A Host field's value (RFC 9110 7.2): uri-host [":" port], uri-host an IP literal
#: in brackets or a reg-name of unreserved, percent-encoded and sub-delims characters
#: (RFC 3986 3.2.2), which may be empty. ``x y`` or ``a/b`` is no host.
_HOST_VALUE = re.compile(
    rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?"
)


def _host_refusal(headers: list[tuple[bytes, bytes]], version: str) -> BridgeError | None:
    """The 400 of a head whose Host fields are wrong (RFC 9112 3.2: a request names its
    host once at most, an HTTP/1.1 one exactly once, and a server answers 400 to an
    invalid value), else None. A proxy in front may route by one Host and log another;
    uvicorn lower-cases the names."""
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1 or (not hosts and version == "1.1"):
        return MalformedRequest("a request needs exactly one Host field (HTTP/1.0: at most one)")
    # (llhttp keeps the spaces and tabs after a value, which are not part of it)
    if hosts and _HOST_VALUE.fullmatch(hosts[0].strip(b" \t")) is None:
        return MalformedRequest(
            "the Host field is not a host name or address with an optional port"
        )
    return None


def _transfer_coding_refusal(headers: list[tuple[bytes, bytes]]) -> BridgeError | None:
    """The refusal of a head whose Transfer-Encoding ends in chunked but holds more than
    llhttp decodes, which is only one chunked: what comes before it (``gzip, chunked``)
    was ignored, and the coded bytes read as the body (a 501); so was a second chunked,
    which RFC 9112 6.1 forbids (a 400; llhttp refuses ``chunked, chunked`` but took
    ``chunked<TAB>, chunked``). One that does not end in chunked is llhttp's to refuse,
    after this: a 400 (RFC 9112 6.3, no length to find). (``identity``, from RFC 2616,
    transforms nothing.)"""
    named = [
        coding
        for name, value in headers
        if name == b"transfer-encoding"
        for part in value.split(b",")
        if (coding := part.strip().lower())
    ]
    if not named or named[-1] != b"chunked":
        return None
    if named.count(b"chunked") > 1:
        return MalformedRequest("the body is chunked more than once (RFC 9112 6.1)")
    for coding in named:
        if coding not in _DECODED_CODINGS:
            return UnsupportedTransferCoding(
                f"the transfer coding {coding.decode('latin-1')!r} is not supported: send "
                "the body as it is (chunked, or with a Content-Length)"
            )
    return None


_DECODED_CODINGS = frozenset({b"chunked", b"identity"})


#: What llhttp reads as the Connection field (a review found the second after the first
#: was refused).
_CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection"})


class _TrailerFields(list[tuple[bytes, bytes]]):
    """Where the parser's ``on_header`` puts the fields of a chunked body's trailer
    section, once the head is complete: never in the request's headers (uvicorn
    appended them to ``scope["headers"]``, and RFC 9110 6.5.1 merges none of these:
    a trailer Authorization, x-Idempotency-Key or X-Forwarded-For was taken as the
    head's), nor kept (their bytes count against the head's cap, see data_received).
    A list that stays empty: uvicorn may still look into it (for an upgrade header,
    say, in what follows a request refused in its turn)."""

    __slots__ = ()

    def append(self, field: tuple[bytes, bytes]) -> None:
        if field[0] in _CONNECTION_FIELDS:  # uvicorn lower-cases the names
            # llhttp acts on it (Content-Length and Transfer-Encoding it refuses): a
            # trailer "close" made it drop every later byte of a connection the
            # answer, decided at the head, kept open: the next request, another
            # client's behind a pooling proxy, was answered 408 after the deadline.
            raise _Refused(
                MalformedRequest(
                    "a Connection field in the trailer section: it may only be in the head"
                )
            )


#: One for every connection: it keeps nothing.
_TRAILER_FIELDS = _TrailerFields()


class OneWritePerResponse:
    """The connection's transport, with each response's head held until its body.

    ``expect_head()`` (called as each request's headers complete) arms it: the
    next write, the response's status line and headers, is kept and sent with
    the write after it. ``flush()`` sends what is held; it runs when the response
    completes and before the connection closes, so nothing stays behind (a HEAD
    answer has no body write, for instance). An interim ``100 Continue`` goes out
    at once: the client waits for it before sending the body.

    Closing while the request's body is still coming (``body_pending``: an answer
    given before it, a 413 or a 401 on a connection that closes) lingers: the answer
    and a FIN go out, and what the client still sends is read and dropped until it
    closes its side, or for LINGER_SECONDS at most. A close with unread bytes sends
    an RST instead, which can destroy the answer before the client reads it (2 of 5
    such 413s were lost). Lingering counts as closing (``is_closing``).

    A close waits for the client to read what is written, for ever if it reads
    nothing: what is still unsent ``unsent_for`` (BRIDGE_READ_TIMEOUT) after a close
    is dropped with the connection (abort). Below the write buffer's high-water mark
    no pause_writing timer runs, and a close after one began made it do nothing: a
    client that never read held its descriptor and its place at
    BRIDGE_MAX_CONNECTIONS for ever (a review's 128 such clients got every other one a
    503 until they went).
    """

    __slots__ = ("_body_pending", "_expect_head", "_held", "_linger", "_transport", "_unsent_for")

    def __init__(
        self,
        transport: asyncio.Transport,
        body_pending: Callable[[], bool],
        unsent_for: float,
    ) -> None:
        self._unsent_for = unsent_for
        self._transport = transport
        self._body_pending = body_pending
        self._expect_head = False
        self._held: bytes | None = None
        self._linger: asyncio.TimerHandle | None = None  # while lingering: its end

    def expect_head(self) -> None:
        self._expect_head = True

    def write(self, data: bytes) -> None:
        if self.is_closing():
            # Closed by the server (a refusal, a client that stopped reading), or
            # lingering after its FIN, while an app was still answering: uvloop raised
            # ("write() after write_eof()"), and the app's answer became a 500 logged
            # at ERROR. Nobody is there to read it.
            self._held = None
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        elif self._expect_head and not data.startswith(b"HTTP/1.1 1"):
            self._expect_head = False
            self._held = bytes(data)
            return
        self._transport.write(data)

    def write_response(self, data: bytes) -> None:
        """A whole response, written as it is."""
        self._expect_head = False
        if not self.is_closing():  # see write()
            self._transport.write(data)

    def flush(self) -> None:
        self._expect_head = False
        if self._held is not None:
            held, self._held = self._held, None
            if not self.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        if self._body_pending():
            self.linger()
            return
        self.flush()
        if self._linger is None and not self._transport.is_closing():
            self._close_transport()

    def linger(self) -> None:
        """Close after what is written, reading and dropping what the client still
        sends (see the class's docstring)."""
        self.flush()
        transport = self._transport
        if self._linger is not None or transport.is_closing():
            return
        if not transport.can_write_eof():
            self._close_transport()
            return
        transport.write_eof()  # after what is written: the answer, then a FIN
        transport.resume_reading()  # to drop what comes
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.end_linger)

    def hang_up(self) -> None:
        """Close without lingering: the protocol's own refusals (malformed, late; not a
        head over its cap) and deadlines, whose clients are broken or gone, on a
        connection that owes no earlier answer (see GuardedHttpToolsProtocol._refuse)."""
        self.flush()
        if self._linger is not None:
            self._linger.cancel()
        self._close_transport()

    def _close_transport(self) -> None:
        """Close; what the client has not read by ``unsent_for`` is dropped (abort)."""
        transport = self._transport
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(self._unsent_for, transport.abort)

    @property
    def lingering(self) -> bool:
        return self._linger is not None

    def end_linger(self) -> None:
        """Close now: the client closed its side, or LINGER_SECONDS passed."""
        if self._linger is not None:
            self._linger.cancel()
        self._close_transport()

    def is_closing(self) -> bool:
        return self._linger is not None or self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:  # the rest of the transport, as it is
        return getattr(self._transport, name)


def _refused_for_the_app(cycle: Any, refusal: BridgeError) -> None:
    """Tell the app of a request the protocol refused after its head (and answered,
    logged and counted): REFUSED_BY_PROTOCOL for the app to leave it alone, and the
    disconnect its read of the body hears now. On a connection lingering after the
    answer (one that answered a request before) the transport stayed open: the app
    waited for the body, holding its BRIDGE_MAX_CONCURRENCY slot for up to the linger's
    2 s, and a route that answers without the body wrote after the FIN (a review's
    tests)."""
    cycle.scope[REFUSED_BY_PROTOCOL] = refusal
    cycle.disconnected = True
    cycle.message_event.set()


def _close_if_answered_uninvited(cycle: Any) -> None:
    """Make an answer given before the body was invited (no 100 Continue sent: a 401,
    a 413) close the connection. RFC 9110 10.1.1: the client may then send the body or
    not, and the server cannot tell which bytes come next: a request on a kept
    connection was read as the body (Go's server closes too). Wraps the request's send
    (uvicorn looks it up as the app starts), which alone sees the answer begin;
    respond_whole answers only a request whose body it read."""
    send = cycle.send

    async def send_closing_if_uninvited(message: Any) -> None:
        if not cycle.response_started and cycle.waiting_for_100_continue and cycle.more_body:
            cycle.keep_alive = False  # uvicorn says "connection: close" and closes
        await send(message)

    cycle.send = send_closing_if_uninvited


def header_lines(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """Header lines (``name: value\\r\\n``) for a response head."""
    return b"".join(b"%s: %s\r\n" % pair for pair in pairs)


def close_after_answers(protocols: Iterable[object]) -> None:
    """A stop began (BRIDGE_SHUTDOWN_DELAY): the last request each connection has
    received says ``connection: close`` in its answer, and the connection closes after
    it. The check at each request's head (``draining`` below) missed those whose head
    came before the signal (a delivery waiting for Kafka in ``broker`` mode): their
    connection stayed kept alive and raced the close at the end of the delay.

    The last one, uvicorn's ``cycle``, as uvicorn's own shutdown marks it: requests
    pipelined before it are still answered, in turn, on the open connection (closed
    after the first of them, the rest were never answered).

    Called by the server's signal handler, between two bytecodes of the event loop's
    thread: only attributes are set, and the set of connections is copied first."""
    for protocol in list(protocols):
        cycle = getattr(protocol, "cycle", None)
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = False


def guarded_protocol(
    *,
    read_timeout: float,
    max_head_bytes: int,
    max_url_bytes: int,
    on_refused: Callable[[BridgeError, float], None] | None = None,
    redact: Redact = no_redaction,
    max_connections: int | None = None,
    on_idle_closed: Callable[[], None] | None = None,
    ops_port: int | None = None,
    draining: Callable[[], bool] = lambda: False,
) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits.

    While ``draining()`` (a stop signal came, BRIDGE_SHUTDOWN_DELAY runs), every answer
    says ``connection: close`` and the connection closes after it: a client's next
    delivery opens a new connection, which the load balancer sends to another replica,
    instead of racing this one's close at the end of the delay on a kept-alive one.

    ``max_url_bytes`` is the guard's URL limit (BRIDGE_MAX_URL_BYTES): a head that
    passes ``max_head_bytes`` with a URL over it is a 414, as the guard would have
    answered, not a 431. ``redact`` keeps the webhook tokens out of the log line of a
    refusal (the app's authenticator's). A connection that opens while
    ``max_connections`` are open (BRIDGE_MAX_CONNECTIONS; None: no limit) takes the
    place of the connection idle longest, if for IDLE_GRACE_SECONDS, which is closed
    (``on_idle_closed`` counts it); with none idle it is answered 503 at once and
    closed, its request unread (those refused take no place themselves). Connections
    to ``ops_port`` (BRIDGE_OPS_PORT) do not count against that limit but against
    their own, OPS_MAX_CONNECTIONS."""
    # Most bytes fed to the parser at once (see data_received): a quarter of the
    # head cap, so a pipelined head is never charged more than that on top of its
    # own bytes; at most 4 KiB, more than a whole webhook request needs.
    piece = max(512, min(4096, max_head_bytes // 4))
    refuse_unknown_uvicorn(HttpToolsProtocol)
    answers_malformed_requests(HttpToolsProtocol)
    # Each port's share of the open connections (see _PortConnections): the webhook
    # port's count against max_connections, the operations port's against
    # OPS_MAX_CONNECTIONS; neither takes nor gives the other's places.
    webhook_port = _PortConnections()
    ops = _PortConnections()
    lingering_refusals = 0  # of this server's connections (see _refuse_connection)
    idle_closes = _LoggedEverySecond(_log_idle_closes)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            # perf_counter when the head timer was started: uvloop's loop.time() ticks
            # in whole milliseconds, too coarse for the duration histogram
            self._head_awaited_since = 0.0
            self._in_head = True
            self._head_bytes = 0
            # After the head: bytes fed since the last piece with body in it, and
            # whether the parser handed over body since it was last looked at.
            self._since_body = 0
            self._body_seen = False
            self._respond_whole = self.respond_whole  # bound once per connection
            self._drop_unanswered = self.drop_unanswered
            self._feeding = b""  # the bytes being fed to the parser now
            # An upgrade request's head without the upgrade, from its headers' end
            # until the parser stops; then that head and the bytes after it, which
            # data_received parses next.
            self._upgrade_head: bytes | None = None
            self._reparse: bytes | None = None
            # The refusal of a pipelined request, held until the answers to the
            # requests before it are out (HTTP answers a connection's requests in order).
            self._refusal_after: BridgeError | None = None
            self._peer_done = False  # the client half-closed: close once it is answered
            self._message_open = False  # between a request's first byte and its end
            self._method = b""  # the method of the request being read (see on_url)
            self._write_timer: asyncio.TimerHandle | None = None  # while writing is paused
            self._running: Any = None  # the request cycle whose app was started last
            self._answered_one = False  # an answer went out on this connection
            self._refused_lingering = False  # refused for the connection limit, lingering
            self._open_counted = False  # counted in its port's open connections
            self._closed_for_room = False  # an idle one closed for a new connection
            self._refused_for_limit = False  # answered 503 for a connection limit
            # uvicorn's default headers (the date) as bytes, redone when uvicorn
            # replaces the list (once a second)
            self._defaults_of: list[tuple[bytes, bytes]] | None = None
            self._defaults = b""

        # The port this connection came to (connection_made says the operations port):
        # a class default, as uvicorn's __init__ already sets the keep-alive timer.
        _port = webhook_port

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows it too
            self._writer = OneWritePerResponse(transport, self._body_pending, read_timeout)
            super().connection_made(self._writer)  # type: ignore[arg-type]  # a transport, as uvicorn uses it
            # (uvicorn's set of open connections holds this one now, and self.server
            # the address it came to)
            if ops_port is not None and self.server is not None and self.server[1] == ops_port:
                self._port = ops
                limit: int | None = OPS_MAX_CONNECTIONS
                which = "on BRIDGE_OPS_PORT"
            else:
                limit, which = max_connections, "(BRIDGE_MAX_CONNECTIONS)"
            self._port.open += 1
            self._open_counted = True
            if limit is not None and self._port.over(limit) and not self._close_one_idle(limit):
                self._refuse_connection(limit, which)
                return
            # Idle until its first byte, as a connection between two requests is:
            # closed after BRIDGE_KEEP_ALIVE_TIMEOUT of silence (uvicorn's timer, which
            # any byte ends), and the request's deadline runs from its first byte. A
            # fresh connection closed sooner than a used one (at BRIDGE_READ_TIMEOUT)
            # raced the first request of a proxy that opened it ahead of use (Go's
            # transports keep the loser of a dial race): a 502, with the keep-alive
            # timeout set above the proxy's idle timeout, as the README advises.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        # uvicorn's keep-alive timer runs exactly while the connection is idle (it is
        # armed after an answer, and here before the first request; any byte ends it):
        # a property, so that every arming and ending, uvicorn's own included, keeps
        # `idle` up to date.
        @property
        def timeout_keep_alive_task(self) -> asyncio.TimerHandle | None:
            return self._keep_alive_timer

        @timeout_keep_alive_task.setter
        def timeout_keep_alive_task(self, timer: asyncio.TimerHandle | None) -> None:
            self._keep_alive_timer = timer
            # re-armed: idle since now, the last in line
            self._port.idle.pop(self, None)
            if timer is not None:
                self._port.idle[self] = self.loop.time()

        def _close_one_idle(self, limit: int) -> bool:
            """Close the connection idle longest to make room for this new one, as
            nginx does at its worker_connections: a proxy's pool of idle upstream
            connections (ingress-nginx keeps 320 a worker), held for
            BRIDGE_KEEP_ALIVE_TIMEOUT, took every slot, and a new connection that had
            a delivery to make was refused. The one idle longest is the one its
            client is least likely to be sending on (pools reuse the most recent);
            one being sent on now loses its request, as at the keep-alive timeout.
            False when none has been idle for IDLE_GRACE_SECONDS. Of this connection's
            port: the operations port's connections neither take the webhook port's
            places nor give theirs."""
            now = self.loop.time()
            longest = None
            for candidate, since in self._port.idle.items():
                if now - since < IDLE_GRACE_SECONDS:
                    return False  # and those after it, idle for less time still
                transport = candidate.transport
                # Not one closing (lingering after a refusal: closed, it lingers on, and
                # the limit was passed), nor one whose last answer its client has not
                # read yet (its close waits for that, the descriptor held, uncounted).
                if not transport.is_closing() and not transport.get_write_buffer_size():
                    longest = candidate
                    break
            if longest is None:
                return False
            longest._unset_keepalive_if_required()  # out of `idle`
            longest._closed_for_room = True
            longest.transport.close()
            self._port.closing_for_room += 1
            if self._port is ops:  # probes and scrapes: no proxy's pool to say
                return True
            idle_closes.log(limit)
            if on_idle_closed is not None:
                on_idle_closed()
            return True

        def _refuse_connection(self, limit: int, which: str) -> None:
            """503 before a byte is read, then a FIN, dropping what the client sends
            (its request) until it closes, LINGER_SECONDS at most: its answer must not
            be lost to the RST a close with unread bytes sends. While
            MAX_LINGERING_REFUSALS others linger, closed at once instead (the answer is
            written; a client that sends its request before reading it may get an RST)."""
            nonlocal lingering_refusals
            self._refused_for_limit = True
            self._port.refused += 1
            error = TooManyConnections(
                f"more than {limit} connections are open {which}; this one is closed",
                retry_after=1,
            )
            self._write_refusal(error)
            if lingering_refusals < MAX_LINGERING_REFUSALS:
                lingering_refusals += 1
                self._refused_lingering = True
                self._writer.linger()
            else:
                self._writer.hang_up()
            self._port.refusals.log(error)
            # Not a webhook request on the operations port: counted, it was a 5xx of
            # the deliveries, and a prober over the limit paged BridgeServerErrors.
            # The log line says it.
            if self._port is not ops and on_refused is not None:
                on_refused(error, 0.0)

        def _body_pending(self) -> bool:
            # The current request is not all read (the parser has not seen its end),
            # and was not cut short (half-close).
            return self._message_open and not self._peer_done

        def connection_lost(self, exc: Exception | None) -> None:
            nonlocal lingering_refusals
            if self._closed_for_room:
                self._closed_for_room = False
                self._port.closing_for_room -= 1
            if self._refused_for_limit:
                self._refused_for_limit = False
                self._port.refused -= 1
            if self._open_counted:
                self._open_counted = False
                self._port.open -= 1
            if self._refused_lingering:
                self._refused_lingering = False
                lingering_refusals -= 1
            if self._writer.lingering:
                self._writer.end_linger()  # its timer
            self._stop_head_timer()
            self._stop_write_timer()
            # uvicorn stops its keep-alive timer only on a clean end (exc None): one a
            # reset ended held this protocol (some 5 KB) until the timer fired, 620 s in
            # the manifests, for every connection a scanner or a TCP health check
            # resets before its first byte (a review's test: 5,000 resets, +25 MB).
            self._unset_keepalive_if_required()
            self._say_the_queued_lost()
            super().connection_lost(exc)

        def _say_the_queued_lost(self) -> None:
            """Log and count the pipelined requests the connection's end leaves
            unanswered: uvicorn tells the running request of the disconnect (its app
            counts it), and never starts a queued one; nor was a refusal waiting for
            the answers before it said. Each was neither counted nor logged (a
            review's tests)."""
            held, self._refusal_after = self._refusal_after, None
            running = self._running
            if running is not None and running.response_complete and not running.keep_alive:
                # The bridge closed, as its last answer said (`connection: close`: an
                # HTTP/1.0 request's keep-alive uvicorn does not keep, a stop under
                # way), and llhttp, which knew nothing of that, parsed on what came
                # in the same packet. Dropped unanswered, as what comes after a
                # client's own `Connection: close` is: counted, they made the
                # rejections depend on how TCP cut the bytes (a review's find).
                return
            if held is not None:
                self._log_and_count(held, self.scope)
            elif self._in_head and self._head_bytes:
                # Gone in the middle of a head (a reset; a FIN gets a 400, silence a
                # 408): a request the client began, as one cut off mid-body.
                self._log_and_count(
                    ClientDisconnected(
                        "the client disconnected before sending the whole request head"
                    ),
                    self.scope,
                )
            for cycle, _ in self.pipeline:
                gone = ClientDisconnected(
                    "the client disconnected before sending the whole body"
                    if cycle.more_body
                    else "the connection closed before this request's turn came"
                )
                self._log_and_count(gone, cycle.scope)

        def _log_and_count(self, error: BridgeError, scope: object) -> None:
            """Log a refusal with ``scope``'s request (none yet: the head was refused)
            and count it, with the time since the bridge began waiting for the head."""
            log_refusal(error, cast(Scope, scope or {}), redact)
            if on_refused is not None:
                on_refused(error, time.perf_counter() - self._head_awaited_since)

        def shutdown(self) -> None:
            # The server stops: a connection lingering after its answer (a refusal, a
            # 413) is closed now, not after LINGER_SECONDS (uvicorn waits for it).
            if self._writer.lingering:
                self._writer.end_linger()
                return
            super().shutdown()

        def pause_writing(self) -> None:
            # The client does not read its answers (the socket's buffer is full). A
            # request waiting to write its answer keeps its BRIDGE_MAX_CONCURRENCY
            # slot: a client that pipelines requests and never reads held every slot,
            # and the bridge answered 503 to everyone. It gets BRIDGE_READ_TIMEOUT to
            # read, as it got to send; then the connection is dropped.
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(read_timeout, self._not_reading)

        def resume_writing(self) -> None:
            self._stop_write_timer()
            super().resume_writing()

        def _stop_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _not_reading(self) -> None:
            self._write_timer = None
            if not self.transport.is_closing():
                self.transport.abort()  # nothing can be written: no answer, no waiting

        def data_received(self, data: bytes) -> None:
            if self._refusal_after is not None or self._writer.lingering:
                return  # a request was refused, or answered and closing: dropped
            # The parser is fed at most `piece` bytes at a time, and no more head
            # bytes than are still allowed. The bytes of a piece count towards the
            # head once the parser has seen them: a request that begins inside the
            # piece (on_message_begin resets the count) is charged the whole piece,
            # so the first packet of every head counts. That is exact for a request
            # at the start of a packet; one pipelined behind another in the same
            # packet is charged at most `piece` bytes it did not send, and no
            # pipelined head escapes the count inside a large packet.
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                # Bytes between requests (a CRLF, which starts no request, say) end
                # uvicorn's keep-alive timer: the next head's deadline runs from them,
                # or a CRLF now and then held an idle connection open for ever.
                self._await_head()
            start, end = 0, len(data)
            while start < end:
                size = piece
                if self._in_head:
                    budget = max_head_bytes - self._head_bytes
                    if budget <= 0:
                        self._refuse(self._head_too_large())
                        return
                    size = min(size, budget)
                chunk = data[start : start + size]  # the packet itself when it fits
                start += len(chunk)
                self._feeding = chunk
                super().data_received(chunk)
                if self.transport.is_closing() or self._refusal_after is not None:
                    return
                if self._reparse is not None:  # an upgrade ignored: parse it again
                    data, self._reparse = self._reparse + data[start:], None
                    start, end = 0, len(data)
                    continue
                if self._in_head and not (chunk[:1] in b"\r\n" and not chunk.strip(b"\r\n")):
                    # (empty lines before a request line are no request: RFC 9112 2.2)
                    self._head_bytes += len(chunk)
                elif self._message_open and not self._in_head:
                    # After the head, what is no body (chunk-size lines, their
                    # extensions, the trailer section) has the head's cap: the parser
                    # gathers a trailer field whole (in Python, a copy per piece) before
                    # on_header sees it, and one field of 16 MB held the event loop for
                    # 26 s, the probes of every other connection with it.
                    if self._body_seen:
                        self._body_seen = False
                        self._since_body = 0
                    else:
                        self._since_body += len(chunk)
                        if self._since_body > max_head_bytes:
                            self._refuse_message(
                                HeadersTooLarge(
                                    "the chunk lines and trailer section after the body "
                                    f"are larger than {max_head_bytes} bytes"
                                )
                            )
                            return

        def _head_too_large(self) -> BridgeError:
            # uvicorn gathers the URL as the parser hands it over (on_url), a piece
            # at a time while it is still arriving: a URL so long that the head
            # passed its cap (the cap leaves room for a URL of max_url_bytes) is
            # too long itself.
            url: bytes = getattr(self, "url", b"")  # uvicorn sets it as a request begins
            url_bytes = _path_and_query_bytes(url)
            if url_bytes > max_url_bytes:
                return url_too_long(url_bytes, max_url_bytes, at_least=True)
            return HeadersTooLarge(f"the request head is larger than {max_head_bytes} bytes")

        # The parser goes on through the piece it was given after a request was
        # refused in its turn (the pipelining cap): what it parses after that request
        # is never served, so none of it may touch this connection's state. It used to
        # re-arm the head deadline (which then closed the connection, or wrote a 408,
        # while answers were still owed), replace the refused request's scope (its log
        # line named another request) and its refusal (a 400 for a later malformed one).
        def on_message_begin(self) -> None:
            if self._refusal_after is not None:
                return
            self._message_open = True
            self._method = b""  # unknown until the request line's URL begins (on_url)
            super().on_message_begin()
            if self.timeout_keep_alive_task is not None:  # the head's deadline governs now
                self._unset_keepalive_if_required()
            self._await_head()

        # The method of the request being read, for the protocol's own refusals of it
        # (RFC 9110 9.3.2: an answer to HEAD has no content). uvicorn puts it in the
        # scope only as the headers complete, after a 431 or a 414; and the parser's
        # get_method() says the last method it read, an answered HEAD's while the
        # next request is still malformed. It is read at the URL's first piece, when
        # the parser has read this request's method (a call a request, 0.2 µs).
        def on_url(self, url: bytes) -> None:
            if not self.url and self._refusal_after is None:
                self._method = self.parser.get_method()
            super().on_url(url)

        # (on_header is left as it is: skipped, on_message_begin leaves it adding at
        # most the rest of the piece to the refused request's headers, which are never
        # used; wrapped, it costs 0.2 µs a header. on_body is called once a chunk of a
        # chunked body, once a piece else: a frame each, which the head's cap needs,
        # see data_received.)

        def on_body(self, body: bytes) -> None:
            self._body_seen = True
            super().on_body(body)

        def on_headers_complete(self) -> None:
            if self._refusal_after is not None:
                return
            if self.parser.should_upgrade():  # parsed again without it: see the docstring
                self._upgrade_head = self._head_without_upgrade()
                return
            version = self.parser.get_http_version()
            if version not in _SERVED_VERSIONS:
                raise _Refused(
                    MalformedRequest(f"HTTP/{version} is not served: this is HTTP/1.1 only")
                )
            if len(self.url) > _PARSED_URL_MAX:
                # uvicorn's parse_url (httptools) refuses it as no HTTP, a 400: it is
                # over BRIDGE_MAX_URL_BYTES (at most MAX_URL_BYTES_CEILING), a 414
                # (counted whole: an absolute form's authority makes it too long too)
                url: bytes = self.url
                raise _Refused(url_too_long(len(url) - (b"?" in url), max_url_bytes))
            if self.url[:1] != b"/":
                self.url = _with_a_path(self.url)
            if (host_refused := _host_refusal(self.headers, version)) is not None:
                raise _Refused(host_refused)
            if (coding_refused := _transfer_coding_refusal(self.headers)) is not None:
                raise _Refused(coding_refused)
            self._writer.expect_head()
            self.scope[RESPOND_WHOLE] = self._respond_whole  # type: ignore[literal-required]
            self.scope[DROP_UNANSWERED] = self._drop_unanswered  # type: ignore[literal-required]
            super().on_headers_complete()
            if draining():
                self.cycle.keep_alive = False
            # Only now: uvicorn may refuse the head itself (a URL httptools.parse_url
            # will not take, though llhttp did), and that 400 is the head's, answered in
            # its turn, not the previous request's body error (send_400_response).
            self._in_head = False  # the deadline runs on until the body is complete
            # uvicorn's on_header appends to self.headers (the scope's list, until
            # now): what comes after the body is a trailer.
            self.headers = _TRAILER_FIELDS
            self._since_body = 0
            self._body_seen = False  # (a piece may hold the end of the request before)
            if self.expect_100_continue and self.scope.get("http_version") == "1.0":
                # RFC 9110 10.1.1 and 15.2: ignored, and no 1xx to an HTTP/1.0 client,
                # which reads "100 Continue" as the final answer.
                self.cycle.waiting_for_100_continue = False
            elif self.expect_100_continue:
                _close_if_answered_uninvited(self.cycle)
            if len(self.pipeline) > MAX_PIPELINED:
                self._refuse(
                    TooManyPipelined(
                        f"more than {MAX_PIPELINED} requests sent ahead on one connection "
                        "before their answers were read",
                        retry_after=1,
                    )
                )

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this from data_received while handling the parser's
            # error, whose text (llhttp's own, never the client's bytes) says what
            # was wrong.
            error = sys.exception()
            if not self._method and isinstance(error, httptools.HttpParserInvalidURLError):
                # A URL refused in the packet that began it (before on_url): the parser
                # has read this request's method, as in a later packet (see on_url).
                self._method = self.parser.get_method()
            refusal = _refusal_of(error)
            if refusal is None:
                why = f" ({error})" if isinstance(error, httptools.HttpParserError) else ""
                refusal = MalformedRequest(f"the request is not valid HTTP/1.1{why}")
            self._refuse_message(refusal)

        def _refuse_message(self, refusal: BridgeError) -> None:
            """Refuse the request being read: its head, or its body (after the head)."""
            cycle = self.cycle
            if self._in_head or cycle is None or self._queued() is not None:
                self._refuse(refusal)  # no app runs for this request: counted here
            elif cycle.response_started:
                # Its app answered already (a 401, a 413): that answer is the one
                # counted and logged; the rest of the body is not read.
                self._stop_head_timer()
                if not self.transport.is_closing():
                    self._writer.hang_up()
            elif self._refuse(refusal):
                # Its app runs, or is about to (the head and this came in one packet):
                # it hears a disconnect, or meets a refusal of its own (a 401) whose
                # answer goes nowhere. Counted and logged here, once: the app leaves
                # a request with REFUSED_BY_PROTOCOL alone. It counted them itself,
                # and a 401 or 404 it met first took the 400's place in the metrics
                # and logged a second line (a review's test).
                _refused_for_the_app(cycle, refusal)

        def drop_unanswered(self, scope: Scope) -> None:
            """End the request of ``scope``, whose app is running, without an answer if
            none was begun, and close the connection (see ingress.DROP_UNANSWERED)."""
            cycle = self._running
            if cycle is None or cycle.scope is not scope or cycle.response_started:
                return
            cycle.disconnected = True  # uvicorn's mark of a client gone: no error, no 500
            self.transport.close()

        def respond_whole(self, scope: Scope, status: int, headers: bytes, body: bytes) -> bool:
            """Write the whole response to the request of ``scope``; False if the
            app must use ``send`` instead. ``headers`` are complete header lines
            (``name: value\\r\\n``), trusted as they are; content-length is added."""
            cycle = self.cycle
            status_line = _STATUS_LINES.get(status)
            if (
                status_line is None
                or cycle is None
                or not cycle_fits(self, cycle)
                or cycle.scope is not scope  # pipelined: a later request's cycle is current
                or cycle.response_started
                or cycle.disconnected
                or self.flow.write_paused
            ):
                return False
            cycle.response_started = True
            cycle.waiting_for_100_continue = False
            defaults = cycle.default_headers
            if defaults is not self._defaults_of:
                self._defaults = header_lines(defaults)
                self._defaults_of = defaults
            self._writer.write_response(
                b"%s%s%scontent-length: %d\r\n%s\r\n%s"
                % (
                    status_line,
                    self._defaults,
                    headers,
                    len(body),
                    b"" if cycle.keep_alive else b"connection: close\r\n",
                    body,
                )
            )
            # What uvicorn's send does once the last body part is written.
            cycle.response_complete = True
            cycle.message_event.set()
            if not cycle.keep_alive:
                self.transport.close()
            cycle.on_response()
            return True

        def on_message_complete(self) -> None:
            if self._refusal_after is not None:
                return
            if self._upgrade_head is not None:
                return  # llhttp ends an upgrade request at its head: not the request's end
            self._message_open = False
            self._method = b""  # what is refused from now on is a later request
            self._stop_head_timer()
            super().on_message_complete()
            running = self._running  # (the common case, answered after its body, first)
            if (
                (running is None or running.response_complete)
                and not self.pipeline
                and not self.transport.is_closing()
            ):
                # Answered before its body was whole (a 401, a 413): the body's bytes
                # ended the keep-alive timer uvicorn armed with the answer, and
                # nothing closed the idle connection. Idle from now, as after any.
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

        def _head_without_upgrade(self) -> bytes:
            """The request's head as received, less its upgrade: no ``Upgrade`` header
            and no ``upgrade`` among the ``Connection`` options."""
            version = self.parser.get_http_version().encode()
            lines = [b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self.url, version)]
            for name, value in self.headers:  # uvicorn's: names in lower case
                kept = value
                if name == b"upgrade":
                    continue
                if name == b"connection":
                    options = [o.strip() for o in value.split(b",")]
                    kept = b", ".join(o for o in options if o and o.lower() != b"upgrade")
                    if not kept:
                        continue
                lines.append(b"%s: %s\r\n" % (name, kept))
            lines.append(b"\r\n")
            return b"".join(lines)

        def _unsupported_upgrade_warning(self) -> None:
            # uvicorn calls this from data_received while handling the parser's
            # HttpParserUpgrade (for any upgrade: the server runs with ws="none"),
            # whose argument is where the other protocol's bytes begin in the piece
            # fed. They are the request's body: parse the request again, whole.
            stopped = sys.exception()
            head, self._upgrade_head = self._upgrade_head, None
            if self.parser.get_method() == b"CONNECT":
                self._refuse(
                    MethodNotAllowed(
                        "CONNECT is no delivery; use POST (or PUT, GET, PATCH, DELETE)"
                    )
                )
                return
            if head is None or not isinstance(stopped, httptools.HttpParserUpgrade):
                self._refuse(MalformedRequest("the request asks for a protocol upgrade"))
                return
            offset = stopped.args[0] if stopped.args else len(self._feeding)
            self.parser = httptools.HttpRequestParser(self)
            # As uvicorn makes its parser: without it, a later request with
            # 'Connection: close' and bytes behind it was a 400 after its event was
            # accepted (llhttp: "Data after Connection: close").
            with contextlib.suppress(AttributeError):  # httptools < 0.6.3
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            self._reparse = head + self._feeding[offset:]

        def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio allows a bool; uvicorn narrowed it
            # The client shut down its side (half-close): nothing more will arrive. The
            # connection stays open to answer every request it began, in order, and
            # closes after the last answer. One cut short can never be whole (RFC 9112
            # 6.3) and is refused, never accepted. It used to be dropped without a word,
            # which the client cannot tell from a connection lost on the way.
            if self._writer.lingering:  # answered, and the client is done: close
                self._writer.end_linger()
                return None
            cycle = self.cycle
            if self._refusal_after is not None:
                pass  # a refused request waits its turn: answered, then closed
            elif self._in_head and self._head_bytes:
                # A head cut short: this protocol's 400, as a late head's 408 (after the
                # answers to the requests before it).
                self._refuse(
                    IncompleteRequest(
                        "the client half-closed the connection before the whole "
                        "request head arrived"
                    )
                )
                return True
            elif cycle is not None and cycle.more_body and not cycle.response_complete:
                # A body cut short: its app answers, in its turn (a queued one runs
                # after those before it). It refuses the request as for any body, with
                # the 413 a Content-Length over the cap earns before a byte is read,
                # else read_body's 400 on seeing HALF_CLOSED; woken now, it is not left
                # waiting for bytes that never come. Not invited to send them either.
                cycle.scope[HALF_CLOSED] = True  # type: ignore[literal-required]  # our own key, for the app
                cycle.waiting_for_100_continue = False
                cycle.keep_alive = False  # its answer says the connection closes
                cycle.message_event.set()
            if self._answered_all():
                return None
            self._peer_done = True
            return True

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # uvicorn starts each request's app here, the queued ones in order
            self._running = cycle
            super()._start_asgi_task(cycle, functools.partial(self.app_or_drop, app))

        async def app_or_drop(self, app: Any, scope: Scope, receive: Any, send: Any) -> None:
            """``app`` (uvicorn's choice: the bridge's) for one request. Should uvicorn
            cancel it before its answer is out (BRIDGE_SHUTDOWN_TIMEOUT run out at a
            stop, a client reading none), the request is dropped, its connection
            closed. Raised on, the cancellation was an error in the application to
            uvicorn: an ERROR with a traceback and its text/plain 500 in place of an
            answer (or a cut one), for a /healthz, /metrics or 404 answer as much as
            for a webhook's (whose refusals drop themselves first, so as to count what
            they answered: answer_or_drop). A CancelledError not of this task's
            cancellation (a bug) stays uvicorn's ERROR."""
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                cycle = self._running
                task = asyncio.current_task()
                if (
                    cycle is None
                    or cycle.scope is not scope
                    or cycle.response_complete
                    or task is None
                    or not task.cancelling()
                ):
                    raise
                cycle.disconnected = True  # uvicorn's mark of a client gone: no ERROR
                self.transport.close()

        def _answered_all(self) -> bool:
            # The requests not started wait in self.pipeline; answers go in order.
            return not self.pipeline and (self._running is None or self._running.response_complete)

        def _queued(self) -> Any:
            """The pipeline's entry of the latest request, while it waits there."""
            for entry in self.pipeline:
                if entry[0] is self.cycle:
                    return entry
            return None

        def on_response_complete(self) -> None:
            self._answered_one = True
            self._writer.flush()
            before = self._running
            super().on_response_complete()
            started = self._running
            body_awaited = self._head_timer is not None and not self._in_head
            if started is not before and started is self.cycle and body_awaited:
                # A queued request started, its body still to come (its deadline is
                # running): uvicorn reads again from now, so the deadline runs from now.
                self._arm_head_timer()
            if self._head_timer is not None:
                # The next head began (pipelined): its deadline governs, not uvicorn's
                # keep-alive timeout, which cut it off when shorter.
                self._unset_keepalive_if_required()
            if self._answered_all():
                if self._refusal_after is not None:
                    self._refuse(self._refusal_after)
                elif self._peer_done and not self.transport.is_closing():
                    self.transport.close()
            # The next head starts with its first byte (on_message_begin);
            # uvicorn's keep-alive timeout covers the idle wait before it. A
            # pipelined request may be past its head already.

        def _await_head(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            if self._head_timer is None:
                self._head_awaited_since = time.perf_counter()
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            """The deadline, BRIDGE_READ_TIMEOUT from now (in place of a running one)."""
            self._stop_head_timer()
            self._head_timer = self.loop.call_later(read_timeout, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._in_head and self.pipeline:
                # A request queued ahead of this head stopped uvicorn reading: the
                # rest of the head waits unread in the kernel, not the client's delay
                # (it got a 408 it could not have avoided). It waits with the queue.
                self._arm_head_timer()
            elif self._in_head and self._head_bytes:
                self._refuse(
                    RequestTimeout(
                        f"the request head did not arrive within {read_timeout:g} s "
                        "(BRIDGE_READ_TIMEOUT)"
                    )
                )
            elif self._in_head:
                if not self.transport.is_closing():
                    self.transport.close()  # connected and silent: nobody to answer
            elif self._queued() is not None:
                # Its body waits behind the request before it (uvicorn reads nothing
                # more until that one is answered): not the client's delay.
                self._arm_head_timer()
            elif self.cycle is not None and not self.cycle.response_started:
                # The body is late. The app is waiting for it and will hear a
                # disconnect; counted here (see _refuse_message).
                late = RequestTimeout(
                    f"the request did not arrive within {read_timeout:g} s (BRIDGE_READ_TIMEOUT)"
                )
                if self._refuse(late):
                    _refused_for_the_app(self.cycle, late)
            elif not self.transport.is_closing():
                self._writer.hang_up()  # answered already (a 413, say): just hang up

        def _refuse(self, error: BridgeError) -> bool:
            """Answer ``error`` and hang up; log and count it, with the time since the
            bridge began waiting for this request's head (a head's 408:
            BRIDGE_READ_TIMEOUT). False if it is not answered (another refusal comes
            first, or the connection is closing)."""
            if self._refusal_after is not None and error is not self._refusal_after:
                return False  # a request behind one refused in its turn: never served
            self._stop_head_timer()
            if self.transport.is_closing():
                return False
            queued = None if self._in_head else self._queued()
            if queued is not None:
                self.pipeline.remove(queued)  # its app never runs: this is its answer
            if (self._in_head or queued is not None) and not self._answered_all():
                # A pipelined request (its head, or its body while it waits its
                # turn): answered after those before it.
                self._refusal_after = error
                self.transport.pause_reading()
                return True
            self._refusal_after = None
            self._write_refusal(error)
            self._head_bytes = 0  # a head refused is answered: none is cut short now
            if self._answered_one or isinstance(
                error, HeadersTooLarge | UrlTooLong | UnsupportedTransferCoding
            ):
                # Answers before this one may still be on their way, and the client's
                # unread bytes (the rest of a pipeline) would make the close a reset,
                # which destroys them: a 202 for a published event lost, then retried.
                # A head over its cap comes from a client still sending (its body
                # follows), which a reset left with a broken pipe instead of its 431/414;
                # so does a head with a coded body (its 501).
                self._writer.linger()
            else:
                self._writer.hang_up()
            # The current request's scope (uvicorn makes it as a request begins):
            # no method or path yet if the head was refused.
            self._log_and_count(error, self.scope)
            return True

        def _write_refusal(self, error: BridgeError) -> None:
            body = problem(error)
            content = b"" if self._method == b"HEAD" else body  # its length is said
            self.transport.write(
                b"HTTP/1.1 %d %s\r\n%s%scontent-type: application/problem+json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (
                    error.status,
                    error.title.encode(),
                    header_lines(self.server_state.default_headers),  # the date, as every answer
                    header_lines(_REFUSAL_ANSWER.headers(error)),  # Allow, Retry-After
                    len(body),
                    content,
                )
            )

    return GuardedHttpToolsProtocol


T = TypeVar("T")


class _PortConnections:
    """One listening port's connections, as its connection limit counts them."""

    __slots__ = ("closing_for_room", "idle", "open", "refusals", "refused")

    def __init__(self) -> None:
        self.open = 0
        # Refused for the limit and not gone yet (lingering, or closing): no place among
        # those the limit counts (a review: one lingering made the next connection close
        # an idle one for room, or refused it with none served).
        self.refused = 0
        # The idle connections (those whose keep-alive timer runs: between requests, or
        # before the first) -> since when (the loop's clock), the one idle longest
        # first; and how many of them were closed to make room and are not gone yet
        # (the transport's close ends the connection at the loop's next turn: until
        # then it is still open). The operations port's too: 64 connections idle there
        # (a scanner, a pooling client) held its every place for
        # BRIDGE_KEEP_ALIVE_TIMEOUT (620 s in the manifests), and the liveness probe
        # failed (a review).
        self.idle: dict[Any, float] = {}
        self.closing_for_room = 0
        # One log line a second for each port's refusals: a line's count and detail
        # are of one limit only (a review found 39 webhook refusals logged as the ops
        # port's).
        self.refusals = _LoggedEverySecond(_log_refusals)

    def over(self, limit: int) -> bool:
        """More connections hold a place than ``limit``."""
        return self.open - self.refused - self.closing_for_room > limit


class _LoggedEverySecond(Generic[T]):
    """Logs a flood of like happenings (connections refused, or idle ones closed, for
    a connection limit) at most once every CONNECTION_REFUSALS_LOG_EVERY seconds, with
    how many there were since the last line and the last one's particulars: the flood
    that reaches the limit would otherwise be a WARNING line a connection. Those after
    a line are logged when the interval ends, not only at the next one (which may come
    much later, or never)."""

    def __init__(self, write: Callable[[T, int], None]) -> None:
        self._write_line = write
        self._next_line = 0.0
        self._unlogged = 0
        self._last: T | None = None
        self._flush: asyncio.TimerHandle | None = None

    def log(self, last: T) -> None:
        self._unlogged += 1
        self._last = last
        wait = self._next_line - time.monotonic()
        if wait <= 0:
            self._write()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(wait, self._write)

    def _write(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        last, count = self._last, self._unlogged
        if last is None or not count:
            return
        self._next_line = time.monotonic() + CONNECTION_REFUSALS_LOG_EVERY
        self._unlogged = 0
        self._write_line(last, count)


def _log_refusals(error: BridgeError, refused: int) -> None:
    log.warning(
        "connection refused: %s",
        error.reason,
        extra={
            "fields": {
                "status": error.status,
                "reason": error.reason,
                "detail": error.detail,
                "refused": refused,  # since the last such line
            }
        },
    )


def _log_idle_closes(limit: int, closed: int) -> None:
    log.warning(
        "idle connections closed for new ones: BRIDGE_MAX_CONNECTIONS (%d) are open; "
        "raise it, or have the proxies in front keep fewer idle connections",
        limit,
        extra={"fields": {"closed": closed}},  # since the last such line
    )
