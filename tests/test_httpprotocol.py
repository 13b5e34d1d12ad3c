"""The bridge's HTTP protocol: one write per response, nothing held back for long,
and the webhook answer written whole."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import weakref
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from bridge import httpprotocol
from bridge.app import create_app
from bridge.config import load_settings
from bridge.errors import BridgeError, ConfigError, PayloadTooLarge, RateLimited, Unavailable
from bridge.httpprotocol import OneWritePerResponse, close_after_answers, guarded_protocol
from bridge.ingress import RuntimeState, outcome_of
from bridge.metrics import Metrics
from bridge.routing import Destination
from tests.fakes import TOKEN, FakePublisher
from tests.polling import eventually


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof = False  # write_eof(): a FIN after what was written

    def write(self, data: bytes) -> None:
        assert not self.eof, "written after write_eof"
        self.writes.append(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    @property
    def ended(self) -> bool:
        """The client sees the connection end: closed, or a FIN after the answers
        (lingering, the client's further bytes dropped)."""
        return self.closed or self.eof

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


def writer() -> tuple[OneWritePerResponse, RecordingTransport]:
    transport = RecordingTransport()
    return OneWritePerResponse(cast(asyncio.Transport, transport), lambda: False, 10.0), transport


def test_head_and_body_go_out_in_one_write() -> None:
    out, transport = writer()
    out.expect_head()
    out.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n")
    assert transport.writes == []
    out.write(b"{}")
    out.flush()  # the response completed: nothing left to send
    assert transport.writes == [b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"]


def test_a_head_without_body_goes_out_when_the_response_completes() -> None:
    out, transport = writer()
    out.expect_head()
    out.write(b"HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\n")  # answer to HEAD
    out.flush()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\n"]


def test_100_continue_is_not_held() -> None:
    out, transport = writer()
    out.expect_head()
    out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    out.write(b"HTTP/1.1 202 Accepted\r\n\r\n")  # the real head is still held
    out.write(b"body")
    assert transport.writes[1:] == [b"HTTP/1.1 202 Accepted\r\n\r\nbody"]


def test_writes_outside_a_response_head_pass_through() -> None:
    out, transport = writer()
    out.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # not armed: the server's own refusal
    out.write(b"more")
    assert transport.writes == [b"HTTP/1.1 408 Request Timeout\r\n\r\n", b"more"]


def test_close_sends_what_is_held_first() -> None:
    out, transport = writer()
    out.expect_head()
    out.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    out.close()
    assert transport.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"]
    assert transport.closed


def test_other_transport_methods_are_the_transports() -> None:
    out, _ = writer()
    assert out.get_write_buffer_size() == 0


# --------------------------------------------------------------------------
# The whole-response shortcut (GuardedHttpToolsProtocol.respond_whole), driven
# through the real protocol class and the real webhook endpoint.

DATE = (b"date", b"Sun, 29 Nov 2026 05:00:00 GMT")
ORDER = b'{"entity":"Order","action":"create","id":"1"}'


class SocketTransport(RecordingTransport):
    """What uvicorn's protocol asks of a transport, recorded."""

    def __init__(self, port: int = 8080) -> None:
        super().__init__()
        self.reading = True
        self.port = port  # the server's, which the connection came to
        self.unsent = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", self.port), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.unsent  # what a client that reads nothing left in the buffer


def webhook(key: str, *, extra: bytes = b"", token: str = TOKEN) -> bytes:
    return (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: %s\r\ncontent-length: %d\r\n%s\r\n%s"
        % (token.encode(), key.encode(), len(ORDER), extra, ORDER)
    )


class Connection:
    """One server-side connection of the bridge's protocol, with a fake publisher."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        read_timeout: float = 5.0,
        max_head_bytes: int = 16384,
        max_url_bytes: int = 8192,
        keep_alive: float = 5,
        max_connections: int | None = None,
        like: Connection | None = None,  # another connection of the same server
        ops_port: int | None = None,  # BRIDGE_OPS_PORT
        port: int = 8080,  # the port this connection came to
        draining: Callable[[], bool] = lambda: False,  # a stop signal came
        settings: dict[str, str] | None = None,  # more BRIDGE_* settings
    ) -> None:
        self.refused: list[BridgeError] = []  # what the protocol counted itself
        self.idle_closed = 0  # idle connections it closed for new ones
        self.refused_after: list[float] = []  # and the seconds it counted them with
        self.publisher: FakePublisher
        self.metrics: Metrics  # what the app counts
        self.protocol_class: type[HttpToolsProtocol]
        if like is not None:
            # The same server: its app, protocol class (which counts in like.refused),
            # configuration and state. Not made again: a test of timing (connections
            # refused within 0.2 s) failed on a slow machine while an app was made for
            # each connection.
            self.publisher, self.metrics = like.publisher, like.metrics
            self.protocol_class = like.protocol_class
            config, state = like.config, like.state
        else:
            environ = {"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker", **(settings or {})}
            if ops_port is not None:
                environ["BRIDGE_OPS_PORT"] = str(ops_port)
            self.publisher = FakePublisher()
            app = create_app(load_settings(environ=environ), publisher=self.publisher)
            self.metrics = app.state.metrics
            self.protocol_class = guarded_protocol(
                read_timeout=read_timeout,
                max_head_bytes=max_head_bytes,
                max_url_bytes=max_url_bytes,
                on_refused=self._count,
                max_connections=max_connections,
                on_idle_closed=self._count_idle_closed,
                ops_port=ops_port,
                draining=draining,
            )
            config = uvicorn.Config(
                app,
                http=self.protocol_class,
                ws="none",
                lifespan="off",
                log_config=None,
                proxy_headers=False,
                timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # uvicorn says int; a timer's delay
            )
            state = ServerState()
            state.default_headers = [DATE]
        self.config: uvicorn.Config = config
        self.state: ServerState = state
        self.writes: list[bytes] = []  # those of the last answers()
        self.sent: list[str] = []  # ASGI messages that went through uvicorn's send
        asgi_send = RequestResponseCycle.send

        async def recording_send(cycle: RequestResponseCycle, message: Any) -> None:
            self.sent.append(message["type"])
            await asgi_send(cycle, message)

        monkeypatch.setattr(RequestResponseCycle, "send", recording_send)
        self.protocol = self.protocol_class(config=config, server_state=state, app_state={})
        self.transport = SocketTransport(port)
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def _count_idle_closed(self) -> None:
        self.idle_closed += 1

    def _count(self, error: BridgeError, seconds: float) -> None:
        self.refused.append(error)
        self.refused_after.append(seconds)

    async def answers(self, data: bytes, count: int) -> list[bytes]:
        """Feed ``data``; the ``count`` responses written to answer it (whatever the
        writes' boundaries: ``self.writes`` tells how many writes they took)."""
        first = len(self.transport.writes)
        self.protocol.data_received(data)
        for _ in range(200):
            self.writes = self.transport.writes[first:]
            responses = split_responses(b"".join(self.writes))
            if len(responses) >= count:
                return responses
            await asyncio.sleep(0.005)
        return responses

    def close(self) -> None:
        self.protocol.connection_lost(None)


@pytest.fixture
async def opened() -> AsyncIterator[list[Connection]]:
    """Connections a test opens, closed after it (in the test's event loop)."""
    connections: list[Connection] = []
    yield connections
    for each in connections:
        each.close()


@pytest.fixture
async def connection(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Connection]:
    conn = Connection(monkeypatch)  # in the test's event loop
    yield conn
    conn.close()


def kafka_waits_for(monkeypatch: pytest.MonkeyPatch, publisher: FakePublisher) -> asyncio.Event:
    """Make ``publisher`` take no record until the event returned is set."""
    taken = asyncio.Event()
    hand_over = publisher.hand_over

    async def hand_over_later(destination: Destination) -> asyncio.Future[Any]:
        await taken.wait()
        return await hand_over(destination)

    monkeypatch.setattr(publisher, "hand_over", hand_over_later)
    return taken


def refused_at_once(connection: Connection) -> bytes:
    """The 503 ``connection`` was answered as it opened (a connection limit)."""
    [answer] = split_responses(b"".join(connection.transport.writes))
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    return answer


def split_responses(data: bytes) -> list[bytes]:
    responses = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if len(rest) < length:
            break  # the rest is still to come
        responses.append(data[: len(head) + 4 + length])
        data = rest[length:]
    return responses


def split(answer: bytes) -> tuple[list[bytes], dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), orjson.loads(body)


def header_fields(answer: bytes) -> dict[str, str]:
    """The answer's header fields, by lower-case name."""
    lines = split(answer)[0][1:]
    return {
        n.decode().lower(): v.decode().strip() for n, _, v in (x.partition(b":") for x in lines)
    }


async def test_accepted_answers_are_written_whole_without_asgi_send(
    connection: Connection,
) -> None:
    for key in ("k1", "k2"):  # keep-alive: the connection serves the next request too
        [answer] = await connection.answers(webhook(key), 1)
        lines, body = split(answer)
        assert lines == [
            b"HTTP/1.1 202 Accepted",
            b"date: Sun, 29 Nov 2026 05:00:00 GMT",
            b"content-type: application/json",
            b"x-bridge-ack: broker",
            b"content-length: %d" % len(answer.partition(b"\r\n\r\n")[2]),
        ]
        assert body["key"] == key
        assert body["status"] == "accepted"
        assert len(connection.writes) == 1
    [answer] = await connection.answers(webhook("k1"), 1)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")  # a duplicate
    assert connection.sent == []  # never through uvicorn's send
    assert not connection.transport.closed
    # uvicorn's completion ran: the keep-alive timer waits for the next request
    assert connection.protocol.timeout_keep_alive_task is not None
    assert [r.key for r in connection.publisher.records] == [b"k1", b"k2"]


async def test_while_draining_every_answer_closes_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """During BRIDGE_SHUTDOWN_DELAY the bridge still serves, but a kept-alive connection
    raced its close at the end of the delay (a delivery sent as it closed is an error
    for the client). Each answer now says connection: close and closes it, so the next
    delivery opens a connection the load balancer sends elsewhere; errors alike."""
    for answer_to in (webhook("k1"), b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n"):
        state = RuntimeState()
        connection = Connection(monkeypatch, draining=lambda: state.draining)  # noqa: B023
        try:
            [answer] = await connection.answers(answer_to, 1)
            assert "connection" not in header_fields(answer)
            assert not connection.transport.closed
            state.draining = True
            [answer] = await connection.answers(answer_to.replace(b"k1", b"k2"), 1)
            assert header_fields(answer)["connection"] == "close"
            assert connection.transport.closed
        finally:
            connection.close()


@pytest.mark.parametrize("pipelined", [1, 3])
async def test_a_stop_closes_the_connections_of_requests_already_in_progress(
    monkeypatch: pytest.MonkeyPatch, pipelined: int
) -> None:
    """A delivery whose head came before the stop signal (waiting for Kafka in broker
    mode) was answered without connection: close during the delay: its connection
    stayed kept alive and raced the close at the end of the delay (a review). With
    requests pipelined behind it, each is answered, the last with connection: close:
    marking every one closed the connection after the second, and the third, received
    whole, went unanswered."""
    state = RuntimeState()
    connection = Connection(monkeypatch, draining=lambda: state.draining)
    kafka = kafka_waits_for(monkeypatch, connection.publisher)
    keys = [f"k{n}" for n in range(pipelined)]
    try:
        requests = b"".join(webhook(key) for key in keys)
        answering = asyncio.ensure_future(connection.answers(requests, pipelined))
        await asyncio.sleep(0.05)  # the first waits for Kafka, any others are queued
        state.draining = True  # what the server's signal handler does
        close_after_answers([connection.protocol])
        kafka.set()
        answers = await answering
        assert [a.split(b" ", 2)[1] for a in answers] == [b"202"] * pipelined
        closing = ["connection" in header_fields(a) for a in answers]
        assert closing == [False] * (pipelined - 1) + [True]
        assert header_fields(answers[-1])["connection"] == "close"
        assert connection.transport.closed
        assert [r.key for r in connection.publisher.records] == [k.encode() for k in keys]
    finally:
        connection.close()


def test_the_stop_signal_closes_the_connections_of_answers_not_started() -> None:
    """The server's handler for the stop signal does it (above), for every connection."""
    from bridge.server import BridgeServer  # noqa: PLC0415  # the one user

    state = RuntimeState()
    server = BridgeServer(
        uvicorn.Config(app="none:app"), state, 5, lambda: None, signals=(signal.SIGTERM,)
    )

    class Protocol:  # what close_after_answers reads of uvicorn's
        def __init__(self, started: bool) -> None:
            self.cycle = SimpleNamespace(response_started=started, keep_alive=True)
            self.pipeline = ()

    answering, answered = Protocol(started=False), Protocol(started=True)
    server.server_state.connections.update({answering, answered})  # type: ignore[arg-type]
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining
    assert not answering.cycle.keep_alive
    assert answered.cycle.keep_alive  # its head is written already


async def test_connection_close_is_honoured(connection: Connection) -> None:
    [answer] = await connection.answers(webhook("k", extra=b"connection: close\r\n"), 1)
    assert b"connection: close" in split(answer)[0]
    assert connection.transport.ended
    assert connection.sent == []


@pytest.mark.parametrize(
    ("content_length", "token", "status"),
    [(10_000_000, TOKEN, 413), (50_000, "wrong-token", 401)],
    ids=["413", "401"],
)
async def test_an_early_answer_on_a_closing_connection_lingers_for_the_body(
    monkeypatch: pytest.MonkeyPatch, content_length: int, token: str, status: int
) -> None:
    """A 413 (or 401) answered before the body, on a connection that closes: closed
    with the body's bytes unread, the kernel sent an RST, which destroyed the answer
    before the client read it (a review: 2 of 5 such answers lost). The answer and a
    FIN go out; what the client still sends is dropped until it closes its side."""
    connection = Connection(monkeypatch)
    protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
    try:
        head = (
            b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % (token.encode(), content_length)
        )
        [answer] = await connection.answers(head + b"x" * 1000, 1)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer
        assert connection.transport.eof
        assert not connection.transport.closed  # lingering
        written = len(connection.transport.writes)
        protocol.data_received(b"x" * 65536)  # dropped, not parsed
        protocol.data_received(b"GET / HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.05)
        assert connection.transport.writes[written:] == []
        assert not connection.transport.closed
        assert protocol.eof_received() is None  # the client is done: close now
        assert connection.transport.ended
        assert connection.publisher.records == []
    finally:
        connection.close()


async def test_lingering_ends_after_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that goes on sending (or never closes) is cut off after LINGER_SECONDS."""
    monkeypatch.setattr(httpprotocol, "LINGER_SECONDS", 0.1)
    connection = Connection(monkeypatch)
    try:
        head = (
            b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
            b"connection: close\r\ncontent-length: 10000000\r\n\r\n" % TOKEN.encode()
        )
        [answer] = await connection.answers(head, 1)
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert not connection.transport.closed
        connection.protocol.data_received(b"x" * 4096)
        assert await wait_closed(connection, 2) == answer
    finally:
        connection.close()


async def test_a_closing_connection_whose_body_was_read_closes_at_once(
    connection: Connection,
) -> None:
    """Nothing left to read: no lingering (the usual `connection: close`)."""
    [answer] = await connection.answers(webhook("k", extra=b"connection: close\r\n"), 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert connection.transport.ended
    assert not connection.transport.eof


async def test_errors_and_pipelined_requests_go_through_send(connection: Connection) -> None:
    """The shortcut declines what it does not cover; the answers are the same."""
    [refused] = await connection.answers(webhook("x", token="wrong"), 1)
    assert refused.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert connection.sent == ["http.response.start", "http.response.body"]
    connection.sent.clear()
    # Two requests in one packet: the first is answered while the second's cycle
    # is already the protocol's current one.
    answers = await connection.answers(webhook("p1") + webhook("p2"), 2)
    assert [split(a)[1]["key"] for a in answers] == ["p1", "p2"]
    assert all(a.startswith(b"HTTP/1.1 202 Accepted\r\n") for a in answers)
    assert "http.response.start" in connection.sent


async def test_a_paused_writer_declines_and_send_waits_for_it(connection: Connection) -> None:
    connection.protocol.flow.pause_writing()  # the client is not reading
    assert await connection.answers(webhook("slow"), 1) == []
    connection.protocol.flow.resume_writing()
    [answer] = await connection.answers(b"", 1)
    assert answer.startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert connection.sent == ["http.response.start", "http.response.body"]


async def test_a_uvicorn_without_the_cycle_attributes_answers_through_send(
    connection: Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn is not pinned: a release whose request cycle lost an attribute the
    shortcut uses must cost speed, not answers."""
    fits: dict[type, bool] = {}
    monkeypatch.setattr(httpprotocol, "_cycle_fits", fits)
    [answer] = await connection.answers(webhook("first"), 1)
    assert connection.sent == []  # the shortcut, after checking this uvicorn's cycle
    assert fits == {RequestResponseCycle: True}

    class OlderCycle:  # the same cycle without one of the attributes
        def __init__(self) -> None:
            for name in httpprotocol.CYCLE_ATTRIBUTES:
                if name != "default_headers":
                    setattr(self, name, None)

    with caplog.at_level("WARNING", logger="bridge.httpprotocol"):
        assert not httpprotocol.cycle_fits(connection.protocol, OlderCycle())
        assert not httpprotocol.cycle_fits(connection.protocol, OlderCycle())
    assert [r.getMessage() for r in caplog.records] == [
        "this uvicorn's request cycle has no default_headers: every response goes through "
        "ASGI send (correct, a few µs slower)"
    ]

    fits[RequestResponseCycle] = False  # as if this uvicorn's cycle had lost it
    [answer] = await connection.answers(webhook("k"), 1)
    assert answer.startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert connection.sent == ["http.response.start", "http.response.body"]


H2C = (
    b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
    b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


@pytest.mark.parametrize(
    "split_at", [None, -len(ORDER), -5], ids=["one packet", "body after", "split body"]
)
async def test_an_upgrade_header_is_ignored_and_the_body_read(
    connection: Connection, split_at: int | None
) -> None:
    """`curl --http2` (and Java's and Ktor's clients) ask to upgrade to h2c. llhttp
    ends such a request at its head, so the body was lost: 202, and a record built
    from the path alone (or a 422), then the body read as a new request's 400. The
    upgrade is ignored (RFC 9110 allows it) and the request served whole."""
    request = webhook("u1", extra=H2C)
    packets = [request] if split_at is None else [request[:split_at], request[split_at:]]
    for packet in packets[:-1]:
        connection.protocol.data_received(packet)
        await asyncio.sleep(0.01)
    [answer] = await connection.answers(packets[-1], 1)
    assert answer.startswith(b"HTTP/1.1 202 Accepted\r\n"), answer
    [answer] = await connection.answers(webhook("u2"), 1)  # the connection goes on
    assert answer.startswith(b"HTTP/1.1 202 Accepted\r\n"), answer
    assert [(r.key, r.value) for r in connection.publisher.records] == [
        (b"u1", ORDER),
        (b"u2", ORDER),
    ]
    assert not connection.transport.closed


async def test_after_an_ignored_upgrade_the_parser_is_as_lenient_as_uvicorns(
    connection: Connection,
) -> None:
    """The parser made for the re-parse lacked uvicorn's leniency for bytes after a
    'Connection: close' request: such a request on the same connection was a 400
    after its event had been accepted."""
    [answer] = await connection.answers(webhook("u1", extra=H2C), 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    last = webhook("u2", extra=b"connection: close\r\n") + b"GET /healthz HTTP/1.1\r\n\r\n"
    [answer] = await connection.answers(last, 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert [r.key for r in connection.publisher.records] == [b"u1", b"u2"]


@pytest.mark.parametrize("method", [b"PATCH", b"DELETE", b"PURGE"])
async def test_other_methods_the_parser_knows_are_deliveries(
    connection: Connection, method: bytes
) -> None:
    """Through the HTTP parser (llhttp), not just the app: the methods it knows are
    deliveries; one it does not know is its 400."""
    [answer] = await connection.answers(
        webhook("m-" + method.decode()).replace(b"POST", method, 1), 1
    )
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert len(connection.publisher.records) == 1


async def test_a_method_the_parser_does_not_know_is_a_400(connection: Connection) -> None:
    [answer] = await connection.answers(webhook("m-lower").replace(b"POST", b"post", 1), 1)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert connection.publisher.records == []


async def test_connect_is_a_problem_json_405(connection: Connection) -> None:
    """llhttp takes CONNECT for an upgrade too; it is refused as a method, with the
    Allow header a 405 carries (it had none)."""
    [answer] = await connection.answers(b"CONNECT example.com:443 HTTP/1.1\r\nhost: x\r\n\r\n", 1)
    assert answer.startswith(b"HTTP/1.1 405 "), answer
    assert b"application/problem+json" in answer
    assert header_fields(answer)["allow"] == "GET, POST, PUT, PATCH, DELETE"
    assert connection.transport.ended


# --------------------------------------------------------------------------
# The head's deadline and size cap (GuardedHttpToolsProtocol.data_received).


URL_CAP = 256
HEAD_CAP = 2304  # the smallest the settings allow: URL 256 + headers 1024 + 1024


async def wait_closed(connection: Connection, seconds: float, *, after: int = 0) -> bytes:
    """What the connection wrote (from its write number ``after``) by the time it
    was closed or sent its FIN (lingering), which must be within ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if connection.transport.ended:
            break
        await asyncio.sleep(0.01)
    assert connection.transport.ended
    return b"".join(connection.transport.writes[after:])


HALF_A_HEAD = b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    ("served_before", "sent"),
    [(False, HALF_A_HEAD), (True, HALF_A_HEAD), (True, b"\r\nPOS")],
    ids=["first request", "keep-alive", "a CRLF, then the head, after an answer"],
)
async def test_a_head_sent_in_one_packet_then_silence_is_408(
    monkeypatch: pytest.MonkeyPatch, served_before: bool, sent: bytes
) -> None:
    """The first packet of a head counts: a client that sends part of its head
    and goes quiet gets the 408 (counted), not a silent close. A CRLF after an
    answer starts no request, but ended uvicorn's keep-alive timer: with no head
    deadline running, one now and then kept an idle connection open for ever."""
    connection = Connection(monkeypatch, read_timeout=0.2)
    try:
        if served_before:
            [answer] = await connection.answers(webhook("k1"), 1)
            assert answer.startswith(b"HTTP/1.1 202 ")
        written = len(connection.transport.writes)
        connection.protocol.data_received(sent)
        answer = await wait_closed(connection, 2, after=written)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"application/problem+json" in answer
        assert b"\r\ndate: %s\r\n" % DATE[1] in answer  # as in every answer
        assert [e.reason for e in connection.refused] == ["request_timeout"]
        # timed as what it took: at least BRIDGE_READ_TIMEOUT, not 0 (no upper bound:
        # a busy machine may be late; the loop may fire a timer a clock tick early)
        [seconds] = connection.refused_after
        assert seconds >= 0.2 - 1e-6
    finally:
        connection.close()


async def test_empty_lines_then_silence_are_closed_without_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CRLFs after an answer are no request (RFC 9112 lets a server skip them): the
    connection is idle, and closed at the deadline without a 408. They ended
    uvicorn's keep-alive timer, and nothing closed such a connection before."""
    connection = Connection(monkeypatch, read_timeout=0.2)
    try:
        [answer] = await connection.answers(webhook("k1"), 1)
        assert answer.startswith(b"HTTP/1.1 202 ")
        written = len(connection.transport.writes)
        connection.protocol.data_received(b"\r\n\r\n")
        assert await wait_closed(connection, 2, after=written) == b""
        assert connection.refused == []
    finally:
        connection.close()


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nobody to answer: a silent connection is just closed (after the keep-alive
    timeout, as an idle one), and not counted."""
    connection = Connection(monkeypatch, read_timeout=5, keep_alive=0.1)
    try:
        assert await wait_closed(connection, 2) == b""
        assert connection.refused == []
    finally:
        connection.close()


async def test_a_fresh_connection_is_kept_as_long_as_an_idle_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A proxy may open a connection ahead of its first request (Go's transports keep
    the loser of a dial race): it was closed after BRIDGE_READ_TIMEOUT though a used
    one is kept BRIDGE_KEEP_ALIVE_TIMEOUT, which behind a load balancer is set above
    its idle timeout; the proxy's first request on it raced the close (a 502). Idle
    until its first byte now; the request's deadline runs from that byte."""
    connection = Connection(monkeypatch, read_timeout=0.2, keep_alive=5)
    try:
        await asyncio.sleep(0.5)  # past the read timeout, silent
        assert not connection.transport.ended
        (answer,) = await connection.answers(webhook("fresh"), 1)
        assert answer.startswith(b"HTTP/1.1 202 Accepted"), answer[:200]
    finally:
        connection.close()


async def test_a_connection_reset_before_its_first_byte_leaves_no_timer_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn stops its keep-alive timer only when a connection ends cleanly: one reset
    (a port scan, a TCP health check) kept its protocol alive until the timer fired,
    BRIDGE_KEEP_ALIVE_TIMEOUT later, once a fresh connection was idle under that timer
    (a review's test: 5,000 resets held 25 MB)."""
    connection = Connection(monkeypatch, keep_alive=600)
    protocol = connection.protocol
    protocol.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    task = protocol.timeout_keep_alive_task
    assert task is None or task.cancelled(), "a timer of 600 s still holds the connection"
    alive = weakref.ref(protocol)
    del connection, protocol, task
    monkeypatch.undo()  # its recorder of ASGI sends refers to the connection
    await asyncio.sleep(0)
    gc.collect()
    assert alive() is None, "the protocol outlives its connection (the loop's timer)"


@pytest.mark.parametrize(
    "packets",
    [
        pytest.param([HEAD_CAP + HEAD_CAP // 2], id="one packet of 1.5 caps"),
        pytest.param([HEAD_CAP * 2 // 3, HEAD_CAP * 2 // 3], id="two packets of 2/3 cap"),
    ],
)
async def test_a_head_over_the_cap_is_431(
    monkeypatch: pytest.MonkeyPatch, packets: list[int]
) -> None:
    """The cap holds for the whole head, its first packet included."""
    connection = Connection(monkeypatch, max_head_bytes=HEAD_CAP)
    try:
        head = b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (sum(packets))
        for size in packets:
            part, head = head[:size], head[size:]
            connection.protocol.data_received(part)
        answer = await wait_closed(connection, 1)
        assert answer.startswith(b"HTTP/1.1 431 "), answer
        assert b"headers_too_large" in answer
        assert b"\r\ndate: %s\r\n" % DATE[1] in answer
        assert [e.reason for e in connection.refused] == ["headers_too_large"]
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("head", "packets"),
    [
        pytest.param(b"GET /healthz?q=" + b"a" * HEAD_CAP * 4, 1, id="URL alone, one packet"),
        pytest.param(b"GET /healthz?q=" + b"a" * HEAD_CAP * 4, 20, id="URL alone, in pieces"),
        pytest.param(
            b"GET /webhooks/geins?q=" + b"a" * (URL_CAP + 10) + b" HTTP/1.1\r\nX-Pad: "
            + b"a" * HEAD_CAP,
            3,
            id="URL over its limit, then headers",
        ),
    ],
)  # fmt: skip
async def test_a_url_that_passes_the_head_cap_is_414(
    monkeypatch: pytest.MonkeyPatch, head: bytes, packets: int
) -> None:
    """A URL too long for the head cap is refused for its length, as the guard refuses
    a shorter one too long for BRIDGE_MAX_URL_BYTES: 414, not 431 (which it got)."""
    connection = Connection(monkeypatch, max_head_bytes=HEAD_CAP, max_url_bytes=URL_CAP)
    try:
        size = -(-len(head) // packets)
        for start in range(0, len(head), size):
            connection.protocol.data_received(head[start : start + size])
        answer = await wait_closed(connection, 1)
        lines, body = split(answer)
        assert lines[0] == b"HTTP/1.1 414 URL too long", answer
        assert b"content-type: application/problem+json" in lines
        assert b"date: %s" % DATE[1] in lines
        assert body["reason"] == "url_too_long"
        assert f"at most {URL_CAP} (BRIDGE_MAX_URL_BYTES)" in body["detail"]
        assert [e.reason for e in connection.refused] == ["url_too_long"]
    finally:
        connection.close()


async def test_a_url_within_its_limit_with_too_many_header_bytes_is_431(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The head cap leaves room for a URL of BRIDGE_MAX_URL_BYTES: one that long, with
    headers that pass the cap, is refused for its headers."""
    connection = Connection(monkeypatch, max_head_bytes=HEAD_CAP, max_url_bytes=URL_CAP)
    try:
        url = b"/webhooks/geins?q=" + b"a" * (URL_CAP + 1 - len(b"/webhooks/geins?q="))
        assert len(url) - len(b"?") == URL_CAP  # path and query, as the guard counts them
        connection.protocol.data_received(b"POST " + url + b" HTTP/1.1\r\nX-Pad: ")
        connection.protocol.data_received(b"a" * HEAD_CAP)
        answer = await wait_closed(connection, 1)
        assert answer.startswith(b"HTTP/1.1 431 "), answer
        assert [e.reason for e in connection.refused] == ["headers_too_large"]
    finally:
        connection.close()


async def test_a_head_just_under_the_cap_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap counts the head's bytes, no more: a head of the cap's size passes."""
    connection = Connection(monkeypatch, max_head_bytes=HEAD_CAP)
    try:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
        head = head.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (HEAD_CAP - len(head)))
        assert len(head) == HEAD_CAP
        for part in (head[:1000], head[1000:]):
            connection.protocol.data_received(part)
        [answer] = await connection.answers(b"", 1)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        connection.close()


async def test_many_pipelined_requests_in_one_packet_are_not_a_large_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests pipelined in one packet larger than the head cap are each their own
    head: none is refused for the bytes of the others."""
    connection = Connection(monkeypatch, max_head_bytes=HEAD_CAP)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400 + b"\r\n\r\n"
        count = 3 * HEAD_CAP // len(request)
        assert count <= httpprotocol.MAX_PIPELINED
        answers = await connection.answers(request * count, count)
        assert len(answers) == count
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
        assert connection.refused == []
    finally:
        connection.close()


async def test_requests_pipelined_past_the_cap_are_refused_and_not_parsed(
    connection: Connection,
) -> None:
    """uvicorn parsed and queued every request in the bytes received, paused or not:
    30 connections of pipelined `GET /healthz` held 700 MB. Past MAX_PIPELINED
    waiting, the next is a 429 after the answers before it, and nothing after it is
    parsed or queued."""
    cap = httpprotocol.MAX_PIPELINED
    request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    protocol: Any = connection.protocol
    answers = await connection.answers(request * 2000, cap + 2)
    assert len(protocol.pipeline) <= cap
    assert [a.split(b" ", 2)[1] for a in answers] == [b"200"] * (cap + 1) + [b"429"]
    headers = header_fields(answers[-1])
    assert headers["retry-after"] == "1"
    assert headers["connection"] == "close"
    assert connection.transport.ended
    assert [e.reason for e in connection.refused] == ["too_many_pipelined"]


PIPELINED_GET = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"


def statuses(answers: list[bytes]) -> list[bytes]:
    return [a.split(b" ", 2)[1] for a in answers]


@pytest.mark.parametrize(
    "trailer",
    [
        b"GET /hea",
        b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab",
        b"BOGUS\x01 / HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: x\r\n\r\n",
        b"DELETE /webhooks/geins/other HTTP/1.1\r\nhost: x\r\n\r\n",
    ],
    ids=["partial head", "partial body", "malformed", "connect", "another request"],
)
async def test_what_follows_a_request_refused_for_the_cap_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, trailer: bytes
) -> None:
    """The parser goes on through its piece after the refused request. What it parsed
    there re-armed the head deadline (the connection closed, or a 408 went out, while
    answers were still owed, the first request being slower than the deadline), took
    the 429's place (a 400 or 405 for a later request) and its log line's request (a
    review's finds). The answers before it, then the 429, logged and counted once."""
    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch, read_timeout=0.3)
    publish = connection.publisher.publish

    async def slow(destination: Any) -> None:  # slower than the head deadline
        await asyncio.sleep(0.6)
        await publish(destination)

    connection.publisher.publish = slow  # type: ignore[method-assign]
    cap = httpprotocol.MAX_PIPELINED
    try:
        data = webhook("k1") + PIPELINED_GET * (cap + 1) + trailer
        await connection.answers(data, cap + 2)
        await asyncio.sleep(0.8)
        answers = split_responses(b"".join(connection.transport.writes))
        assert statuses(answers) == [b"202"] + [b"200"] * cap + [b"429"]
        assert connection.transport.ended
        assert [e.reason for e in connection.refused] == ["too_many_pipelined"]
        [logged] = [
            r for r in caplog.records if r.getMessage() == "delivery refused: too_many_pipelined"
        ]
        assert logged.fields["path"] == "/healthz"  # type: ignore[attr-defined]
    finally:
        connection.close()


@pytest.mark.parametrize(
    "bad",
    [
        b"GARBAGE / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
    ],
    ids=["request line", "two content-lengths"],
)
async def test_a_refused_pipelined_request_is_answered_after_the_one_before_it(
    connection: Connection, bad: bytes
) -> None:
    """HTTP answers a connection's requests in order. The refusal of a request
    pipelined behind another went out at once and the connection closed: the client
    read it as the answer to the first request, whose event was accepted, and never
    saw that answer."""
    data = webhook("p1") + webhook("p2") + bad
    answers = await connection.answers(data, 3)
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [
        b"HTTP/1.1 202 Accepted",
        b"HTTP/1.1 202 Accepted",
        b"HTTP/1.1 400 Malformed HTTP request",
    ]
    assert [split(a)[1]["key"] for a in answers[:2]] == ["p1", "p2"]
    # A FIN after the answers, not a close: with the client's bytes unread, a close is
    # a reset, which destroyed the answers before it on their way (a review).
    assert connection.transport.eof
    assert not connection.transport.closed


#: A URL llhttp takes and uvicorn's httptools.parse_url refuses (a port out of range).
URL_PARSE_REFUSES = b"GET http://h:99999/healthz HTTP/1.1\r\nhost: x\r\n\r\n"


async def test_a_url_refused_past_the_parser_is_answered_in_its_turn(
    connection: Connection,
) -> None:
    """uvicorn refuses the URL after llhttp has read the head: that 400 was taken
    for the previous request's body error and went out at once, as the only answer,
    while the request before it was published (the client saw a 400 for it)."""
    answers = await connection.answers(webhook("p1") + URL_PARSE_REFUSES, 2)
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [
        b"HTTP/1.1 202 Accepted",
        b"HTTP/1.1 400 Malformed HTTP request",
    ]
    assert [r.key for r in connection.publisher.records] == [b"p1"]
    assert [e.reason for e in connection.refused] == ["malformed_request"]


async def test_a_url_refused_past_the_parser_on_a_kept_connection_is_a_400(
    connection: Connection,
) -> None:
    """The second request of a kept-alive connection: it got no answer at all."""
    (first,) = await connection.answers(webhook("p1"), 1)
    assert first.startswith(b"HTTP/1.1 202 Accepted")
    after = len(connection.transport.writes)
    connection.protocol.data_received(URL_PARSE_REFUSES)
    answer = await wait_closed(connection, 1, after=after)
    assert split(answer)[0][0] == b"HTTP/1.1 400 Malformed HTTP request"
    assert [e.reason for e in connection.refused] == ["malformed_request"]


async def test_a_pipelined_request_with_a_broken_body_is_refused_in_its_turn(
    connection: Connection,
) -> None:
    """Its head was whole, its chunked body broken: the 400 went out at once, ahead
    of the answer to the accepted request before it. It waits its turn now, and its
    app never runs."""
    broken = (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"transfer-encoding: chunked\r\n\r\nZZZ\r\n" % TOKEN.encode()
    )
    answers = await connection.answers(webhook("p1") + broken, 2)
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [
        b"HTTP/1.1 202 Accepted",
        b"HTTP/1.1 400 Malformed HTTP request",
    ]
    assert [r.key for r in connection.publisher.records] == [b"p1"]
    assert connection.transport.ended


@pytest.mark.parametrize(
    "codings",
    [b"gzip, chunked", b"deflate,chunked", b"gzip\r\ntransfer-encoding: chunked"],
)
async def test_a_transfer_coding_besides_chunked_is_a_501(
    connection: Connection, codings: bytes
) -> None:
    """llhttp decodes chunked alone and passed the rest of `gzip, chunked` over: the
    compressed bytes were read as the body (a misleading body_not_json, or a body
    published as sent by a coding the bridge never undid). RFC 9112 6.1: a 501, from
    the protocol, after the answer before it; nothing published."""
    body = b'{"entity":"Order","action":"create","id":"1"}'
    coded = (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: coded\r\ntransfer-encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (TOKEN.encode(), codings, len(body), body)
    )
    answers = await connection.answers(webhook("p1") + coded, 2)
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [
        b"HTTP/1.1 202 Accepted",
        b"HTTP/1.1 501 Transfer coding not supported",
    ]
    assert b'"reason":"unsupported_transfer_coding"' in answers[1]
    assert [r.key for r in connection.publisher.records] == [b"p1"]
    assert [e.reason for e in connection.refused] == ["unsupported_transfer_coding"]


@pytest.mark.parametrize("codings", [b"gzip", b"chunked, gzip", b"x", b"chunked;q=1"])
async def test_a_transfer_encoding_not_ending_in_chunked_is_a_400(
    connection: Connection, codings: bytes
) -> None:
    """RFC 9112 6.3: a request whose Transfer-Encoding does not end in chunked has no
    length to find, a 400 (llhttp's): not the 501 of a coding before chunked, whose
    check came first and made `gzip` alone a 501 that said to send it chunked (a
    review's test)."""
    connection.protocol.data_received(
        b"POST /webhooks/geins/Order/create HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: %s\r\n\r\n" % codings
    )
    answer = await wait_closed(connection, 1)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert [e.reason for e in connection.refused] == ["malformed_request"]


CHUNKED_EVENT = b'{"entity":"Order","action":"create","id":"1"}'
CHUNKED_ONCE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHUNKED_EVENT), CHUNKED_EVENT)


@pytest.mark.parametrize(
    "fields",
    [
        b"transfer-encoding: chunked, chunked\r\n",  # llhttp's own 400
        b"transfer-encoding: chunked\t, chunked\r\n",
        b"transfer-encoding: chunked\t\r\ntransfer-encoding: chunked\r\n",
    ],
    ids=["plain", "tab one line", "tab two lines"],
)
async def test_a_body_chunked_twice_is_refused_not_read_still_coded(
    connection: Connection, fields: bytes
) -> None:
    """RFC 9112 6.1: chunked is applied once at most. llhttp refuses `chunked, chunked`,
    but took `chunked<TAB>, chunked` (and the same over two lines) and undid one: the
    body was read still coded, a 400 body_not_json kept as a dead letter, as for `gzip,
    chunked` (a review's test). The protocol's 400 now, nothing kept."""
    twice = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHUNKED_ONCE), CHUNKED_ONCE)
    request = (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: twice\r\n%s\r\n%s" % (TOKEN.encode(), fields, twice)
    )
    answers = await connection.answers(webhook("p1") + request, 2)
    assert answers[0].startswith(b"HTTP/1.1 202 "), answers[0]
    assert answers[1].startswith(b"HTTP/1.1 400 "), answers[1]
    assert [e.reason for e in connection.refused] == ["malformed_request"]
    assert [(r.topic, r.key) for r in connection.publisher.records] == [
        ("geins.order.create", b"p1")
    ]


@pytest.mark.parametrize("cut", [None, 9], ids=["one packet", "cut in the URL"])
async def test_a_head_requests_400_for_its_url_has_no_content(
    connection: Connection, cut: int | None
) -> None:
    """RFC 9110 9.3.2, however TCP cut the bytes: in one packet llhttp refused the URL
    before on_url ran, the method was unknown, and the 400 had content (a review's
    test); cut inside the URL, it had none."""
    request = b"HEAD /healthz\x7f HTTP/1.1\r\nHost: x\r\n\r\n"
    for piece in [request] if cut is None else [request[:cut], request[cut:]]:
        connection.protocol.data_received(piece)
    answer = await wait_closed(connection, 1)
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"content-length: " in head
    assert content == b"", content[:200]


@pytest.mark.parametrize(
    "target", [b"http://bridge.example.com", b"http://bridge.example.com:8080?x=/y"]
)
async def test_an_absolute_form_target_without_a_path_has_the_path_slash(
    connection: Connection, target: bytes
) -> None:
    """RFC 9112 3.2.2 (servers take the absolute form) and RFC 9110 4.2.3 (no path is
    "/"): uvicorn decoded httptools' None path, and the error was a 400 "not valid
    HTTP/1.1 (User callback error)" (a review's test). "/" is no webhook route: 404."""
    (answer,) = await connection.answers(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % target, 1)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:300]


async def test_identity_before_chunked_is_read_as_chunked(connection: Connection) -> None:
    """The control: `identity` (RFC 2616's, which codes nothing) is no reason to refuse."""
    body = b'{"entity":"Order","action":"create","id":"1"}'
    plain = (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: plain\r\ntransfer-encoding: identity, chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (TOKEN.encode(), len(body), body)
    )
    (answer,) = await connection.answers(plain, 1)
    assert answer.startswith(b"HTTP/1.1 202 Accepted"), answer[:300]


def slow_kafka(connection: Connection, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Kafka takes ``seconds`` to acknowledge each record of ``connection``'s bridge."""
    hand_over = connection.publisher.hand_over

    async def slow(destination: Any) -> Any:
        await asyncio.sleep(seconds)
        return await hand_over(destination)

    monkeypatch.setattr(connection.publisher, "hand_over", slow)


async def test_a_pipelined_body_that_waits_its_turn_is_not_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn reads nothing more while a request waits behind another, so its body
    cannot come: when the first took longer than BRIDGE_READ_TIMEOUT, the second got
    a 408, ahead of the first one's answer. Its deadline now waits with it."""
    connection = Connection(monkeypatch, read_timeout=0.3)
    slow_kafka(connection, monkeypatch, 0.5)
    try:
        second = webhook("s2")
        head, body = second[: -len(ORDER)], second[-len(ORDER) :]
        connection.protocol.data_received(webhook("s1") + head)
        await asyncio.sleep(0.6)  # s1 answered at 0.5 s: s2's turn, and its deadline, then
        await connection.answers(body, 1)
        answers = split_responses(b"".join(connection.transport.writes))
        assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 202 Accepted"] * 2
        assert [split(a)[1]["key"] for a in answers] == ["s1", "s2"]
    finally:
        connection.close()


async def test_a_pipelined_head_that_waits_behind_a_queue_is_not_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request queued behind the running one stops uvicorn reading: the rest of the
    head after it stays unread in the kernel, and its deadline ran out there. It got
    a non-retriable 408 though the client sent it in time (a review). Its deadline
    waits while the queue does."""
    connection = Connection(monkeypatch, read_timeout=0.3)
    slow_kafka(connection, monkeypatch, 0.5)
    try:
        third = webhook("q3")
        connection.protocol.data_received(webhook("q1") + webhook("q2") + third[:30])
        await asyncio.sleep(0.55)  # q1 answered at 0.5 s: reading resumes, the rest comes
        connection.protocol.data_received(third[30:])
        await asyncio.sleep(1.5)  # q2 and q3 take 0.5 s each
        answers = split_responses(b"".join(connection.transport.writes))
        assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 202 Accepted"] * 3
        assert [split(a)[1]["key"] for a in answers] == ["q1", "q2", "q3"]
    finally:
        connection.close()


async def test_a_body_after_an_early_answer_does_not_keep_the_connection_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 401 goes out before the body is read; the body coming after it ended
    uvicorn's keep-alive timer, and no deadline ran: the idle connection stayed open
    for ever (a fuzzer's find). It is idle from the body's end, as after an answer."""
    connection = Connection(monkeypatch, read_timeout=5, keep_alive=0.2)
    try:
        wrong = webhook("e1", token="wrong")
        head, body = wrong[: -len(ORDER)], wrong[-len(ORDER) :]
        [answer] = await connection.answers(head, 1)
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        connection.protocol.data_received(body)
        assert await wait_closed(connection, 2, after=len(connection.transport.writes)) == b""
    finally:
        connection.close()


async def test_the_keep_alive_timeout_does_not_cut_off_a_pipelined_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request pipelined behind another, its head begun: uvicorn armed its keep-alive
    timer once the first was answered, and a keep-alive timeout shorter than
    BRIDGE_READ_TIMEOUT closed the connection inside the second one's deadline."""
    connection = Connection(monkeypatch, read_timeout=1.0, keep_alive=0.2)
    try:
        second = webhook("k2")
        [answer] = await connection.answers(webhook("k1") + second[:40], 1)
        assert answer.startswith(b"HTTP/1.1 202 ")
        await asyncio.sleep(0.5)  # past the keep-alive timeout, within the read timeout
        assert not connection.transport.closed
        [answer] = await connection.answers(second[40:], 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
    finally:
        connection.close()


async def test_a_half_close_answers_the_whole_requests_before_a_partial_one(
    connection: Connection,
) -> None:
    """A whole request, then part of one, then a half-close: the connection closed at
    once, and the whole request's event was published but never answered (its
    answer hit a closed transport: a 500 logged at ERROR). It is answered, then the
    partial one gets its 400 (it can never be whole), then the connection closes."""
    protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
    protocol.data_received(webhook("h3") + webhook("h4")[:-5])
    assert protocol.eof_received() is True
    answers = await connection.answers(b"", 2)
    assert [a[:12] for a in answers] == [b"HTTP/1.1 202", b"HTTP/1.1 400"]
    assert split(answers[0])[1]["key"] == "h3"
    assert split(answers[1])[1]["reason"] == "incomplete_request"
    await wait_closed(connection, 1)
    assert [r.key for r in connection.publisher.records] == [b"h3"]


async def test_a_client_that_half_closes_still_gets_its_answer(connection: Connection) -> None:
    """A client may shut down its sending side once its request is out. The
    connection closed then, so an accepted event's 202 never reached the client
    (which retries: a duplicate). It is answered, then the connection closes."""
    protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
    protocol.data_received(webhook("h1"))
    assert protocol.eof_received() is True  # keep the transport open
    [answer] = await connection.answers(b"", 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    await wait_closed(connection, 1)
    assert [r.key for r in connection.publisher.records] == [b"h1"]


@pytest.mark.parametrize("sent", [b"", b"\r\n"], ids=["nothing", "an empty line"])
async def test_a_half_close_without_a_request_closes_at_once(
    connection: Connection, sent: bytes
) -> None:
    """Nothing begun, nothing to answer (an empty line begins no request: RFC 9112 2.2)."""
    protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
    protocol.data_received(sent)
    assert protocol.eof_received() is None  # asyncio closes the transport
    assert connection.transport.writes == []
    assert connection.refused == []


def rejections(connection: Connection, reason: str) -> float:
    """bridge_rejections_total{reason} as the app counted it (the protocol's own
    refusals are in ``connection.refused``)."""
    series = f'bridge_rejections_total{{reason="{reason}"}} '
    [line] = [x for x in connection.metrics.exposition().decode().splitlines() if series in x]
    return float(line.removeprefix(series))


CHUNKED_HEAD = (
    b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
    b"x-idempotency-key: chunked\r\ntransfer-encoding: chunked\r\n\r\n" % TOKEN.encode()
)


@pytest.mark.parametrize(
    ("sent", "status", "reason", "by_protocol"),
    [
        pytest.param(HALF_A_HEAD, 400, "incomplete_request", True, id="half a head"),
        pytest.param(webhook("c1")[: -len(ORDER)], 400, "incomplete_request", False, id="a head"),
        pytest.param(webhook("c2")[:-5], 400, "incomplete_request", False, id="half a body"),
        pytest.param(
            webhook("c4", extra=b"expect: 100-continue\r\n")[: -len(ORDER)],
            400,  # and no 100 Continue first: the body cannot come
            "incomplete_request",
            False,
            id="a head expecting 100-continue",
        ),
        pytest.param(
            CHUNKED_HEAD + b"%x\r\n%s" % (len(ORDER), ORDER[:10]),
            400,
            "incomplete_request",
            False,
            id="half a chunk",
        ),
        pytest.param(
            CHUNKED_HEAD + b"%x\r\n%s\r\n" % (len(ORDER), ORDER),
            400,
            "incomplete_request",
            False,
            id="chunks without the last",
        ),
        pytest.param(
            webhook("c3").replace(b"content-length: %d" % len(ORDER), b"content-length: 9999999"),
            413,
            "body_too_large",
            False,
            id="content-length over the cap",
        ),
    ],
)
async def test_a_request_cut_short_by_a_half_close_is_answered_not_accepted(
    connection: Connection,
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
    status: int,
    reason: str,
    by_protocol: bool,
) -> None:
    """A client that half-closes in the middle of a request can never finish it (RFC
    9112 6.3: the message is incomplete). The connection was closed without a word,
    so the client could not tell that refusal from a lost connection. It gets a 400
    (or the 413 its Content-Length alone earns, as for a whole request), logged and
    counted once like any refusal, and nothing is published."""
    caplog.set_level(logging.INFO)
    protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
    protocol.data_received(sent)
    assert protocol.eof_received() is True  # open until the answer is out
    answer = await wait_closed(connection, 2)
    assert len(split_responses(answer)) == 1, answer
    lines, body = split(answer)
    assert lines[0].startswith(b"HTTP/1.1 %d " % status), answer
    assert b"content-type: application/problem+json" in lines
    assert b"connection: close" in lines  # the client need not wonder
    assert body["reason"] == reason
    [(level, fields)] = refusals(caplog)
    assert (level, fields["reason"], fields["status"]) == (logging.INFO, reason, status)
    counted_by_app = rejections(connection, reason)
    assert [e.reason for e in connection.refused] == ([reason] if by_protocol else [])
    assert counted_by_app == (0 if by_protocol else 1)
    assert connection.publisher.records == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    ("second", "status"),
    [
        pytest.param(HALF_A_HEAD, 400, id="half a head"),
        pytest.param(webhook("q2")[:-5], 400, id="half a body"),
        pytest.param(
            webhook("q2").replace(b"content-length: %d" % len(ORDER), b"content-length: 9999999"),
            413,
            id="content-length over the cap",
        ),
    ],
)
async def test_a_pipelined_request_cut_short_is_answered_in_its_turn(
    monkeypatch: pytest.MonkeyPatch, second: bytes, status: int
) -> None:
    """Behind a request still being served, a request cut short by the half-close
    is answered after it, in order; it was dropped without an answer."""
    connection = Connection(monkeypatch)
    hand_over = connection.publisher.hand_over

    async def slow(destination: Any) -> Any:
        await asyncio.sleep(0.2)  # Kafka, slow to acknowledge: the first is still running
        return await hand_over(destination)

    monkeypatch.setattr(connection.publisher, "hand_over", slow)
    try:
        protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
        protocol.data_received(webhook("q1") + second)
        assert protocol.eof_received() is True
        answers = split_responses(await wait_closed(connection, 2))
        assert [a[:12] for a in answers] == [
            b"HTTP/1.1 202",
            b"HTTP/1.1 %d" % status,
        ]
        assert split(answers[0])[1]["key"] == "q1"
        assert [r.key for r in connection.publisher.records] == [b"q1"]
    finally:
        connection.close()


async def test_a_half_close_after_an_early_answer_just_closes(connection: Connection) -> None:
    """A request answered before its body arrived (a 401 here) has had its answer:
    the half-close that cuts its body short adds none."""
    protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
    wrong = webhook("e2", token="wrong")
    [answer] = await connection.answers(wrong[:-5], 1)
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    written = len(connection.transport.writes)
    assert protocol.eof_received() is None  # answered all: close now
    assert connection.transport.writes[written:] == []


async def test_a_client_gone_after_a_half_close_logs_no_error(
    connection: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closed for good (a FIN looks like a half-close to the server, then
    a reset follows) before its answer: nobody to answer, nothing logged above INFO."""
    caplog.set_level(logging.INFO)
    protocol: Any = connection.protocol  # eof_received: typed by uvicorn as returning None
    protocol.data_received(webhook("g1")[:-5])
    protocol.eof_received()
    connection.transport.closed = True  # the reset: the transport is gone
    protocol.connection_lost(ConnectionResetError())
    await asyncio.sleep(0.1)  # the app hears of it
    assert connection.publisher.records == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len(refusals(caplog)) <= 1


async def test_a_large_head_pipelined_behind_a_request_is_431(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head that begins inside a packet, behind a whole request, is counted too."""
    connection = Connection(monkeypatch, max_head_bytes=HEAD_CAP)
    try:
        first = webhook("k1")
        second = b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10 * HEAD_CAP
        connection.protocol.data_received(first + second)
        answer = await wait_closed(connection, 1)
        assert b"HTTP/1.1 431 " in answer, answer
        assert [e.reason for e in connection.refused] == ["headers_too_large"]
    finally:
        connection.close()


# --------------------------------------------------------------------------
# Requests the parser cannot read (GuardedHttpToolsProtocol.send_400_response).


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (b"POST /webhooks/geins HTTP/1.1\r\nHost x\r\n\r\n", b"Invalid header token"),
        (
            b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nabcdef",
            b"Duplicate Content-Length",
        ),
    ],
    ids=["header without colon", "two content-lengths"],
)
async def test_a_malformed_request_is_a_problem_json_400(
    monkeypatch: pytest.MonkeyPatch, request_bytes: bytes, why: bytes
) -> None:
    """A request the parser refuses gets a counted problem+json 400, like every
    other error, instead of uvicorn's text/plain one."""
    connection = Connection(monkeypatch)
    try:
        connection.protocol.data_received(request_bytes)
        answer = await wait_closed(connection, 1)
        lines, body = split(answer)
        assert lines[0] == b"HTTP/1.1 400 Malformed HTTP request"
        assert b"content-type: application/problem+json" in lines
        assert b"date: %s" % DATE[1] in lines
        assert body["reason"] == "malformed_request"
        assert why.decode() in body["detail"]
        assert [e.reason for e in connection.refused] == ["malformed_request"]
        assert connection.publisher.records == []
    finally:
        connection.close()


def test_a_uvicorn_without_the_hook_answers_are_ordered_by_is_refused() -> None:
    """uvicorn before 0.45 started apps with no _start_asgi_task: the protocol took a
    running request for answered, and an idle timer or a pipelined refusal cut off its
    answer while its event was published. Such a uvicorn is refused, not half used."""
    httpprotocol.refuse_unknown_uvicorn(HttpToolsProtocol)  # the installed one: fine

    class OlderProtocol:
        pass

    with pytest.raises(ConfigError, match=r"_start_asgi_task; install uvicorn 0\.53"):
        httpprotocol.refuse_unknown_uvicorn(OlderProtocol)  # type: ignore[arg-type]  # as an older uvicorn's


def test_this_uvicorn_answers_malformed_requests_through_send_400_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The override only works while uvicorn calls send_400_response; a release
    that does not is reported at startup."""
    assert httpprotocol.answers_malformed_requests(HttpToolsProtocol)

    class OlderProtocol:
        pass

    with caplog.at_level("WARNING", logger="bridge.httpprotocol"):
        assert not httpprotocol.answers_malformed_requests(OlderProtocol)  # type: ignore[arg-type]  # a protocol without the method, as an older uvicorn's
    assert "no send_400_response" in caplog.text


# --------------------------------------------------------------------------
# One log line per refusal, whoever refuses (bridge.ingress.log_refusal).


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[int, dict[str, object]]]:
    """Level and fields of each "delivery refused" line logged."""
    return [
        (r.levelno, r.fields)  # type: ignore[attr-defined]  # set through extra=
        for r in caplog.records
        if r.getMessage().startswith("delivery refused")
    ]


@pytest.mark.parametrize(
    ("packets", "reason", "status"),
    [
        ([b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\n"], "request_timeout", 408),
        ([b"POST /webhooks/geins HTTP/1.1\r\nX: " + b"a" * 20000], "headers_too_large", 431),
        ([b"POST /webhooks/geins HTTP/1.1\r\nHost x\r\n\r\n"], "malformed_request", 400),
    ],
)
async def test_protocol_refusals_log_one_info_line(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    packets: list[bytes],
    reason: str,
    status: int,
) -> None:
    """The protocol's own 408, 431 and 400 log one line each, at INFO (a client
    must not flood the log at WARNING; uvicorn's warning for a malformed request
    is dropped for that reason), with no method or path: the head was not read."""
    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch, read_timeout=0.2)
    try:
        for packet in packets:
            connection.protocol.data_received(packet)
        await wait_closed(connection, 2)
        [(level, fields)] = refusals(caplog)
        assert level == logging.INFO
        assert (fields["reason"], fields["status"]) == (reason, status)
        assert "method" not in fields
        assert "path" not in fields
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        connection.close()


@pytest.mark.parametrize("timed_out", [True, False], ids=["late body", "client gone"])
async def test_a_body_that_never_comes_logs_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, timed_out: bool
) -> None:
    """A body that is late (408) or cut off by the client logs one line, with the
    request's method, path and key, and is counted once: the 408 by the protocol that
    answered it, a disconnect by the app that heard it."""
    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch, read_timeout=0.2)
    head = webhook("late").replace(b"content-length: %d" % len(ORDER), b"content-length: 500")
    connection.protocol.data_received(head)
    if timed_out:
        answer = await wait_closed(connection, 2)
        assert answer.startswith(b"HTTP/1.1 408 ")
    connection.close()  # the client is gone: the app hears a disconnect
    for _ in range(100):
        if refusals(caplog):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # anything logged twice would be by now
    [(level, fields)] = refusals(caplog)
    assert level == logging.INFO
    assert fields["reason"] == ("request_timeout" if timed_out else "client_disconnected")
    assert (fields["method"], fields["path"], fields["key"]) == ("POST", "/webhooks/geins", "late")
    by_protocol = [error.reason for error in connection.refused]
    assert by_protocol == (["request_timeout"] if timed_out else [])
    assert rejections(connection, "request_timeout") == 0
    assert rejections(connection, "client_disconnected") == (0 if timed_out else 1)
    assert connection.publisher.records == []


async def test_a_client_that_does_not_read_its_answers_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request whose answer cannot be written (the client pipelines and never
    reads: the socket's buffer is full) held its BRIDGE_MAX_CONCURRENCY slot for as
    long as the connection stayed open; a reviewer held all three slots of a bridge
    that way and everyone else got 503. After BRIDGE_READ_TIMEOUT the connection is
    dropped, which ends the request; a client that reads on time keeps it."""
    connection = Connection(monkeypatch, read_timeout=0.2)
    try:
        [answer] = await connection.answers(webhook("k1"), 1)  # idle now: keep-alive
        assert answer.startswith(b"HTTP/1.1 202 ")
        connection.protocol.pause_writing()
        await asyncio.sleep(0.1)
        connection.protocol.resume_writing()  # read in time
        await asyncio.sleep(0.3)
        assert not connection.transport.closed
        connection.protocol.pause_writing()
        await wait_closed(connection, 2)
        assert connection.transport.aborted
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("token", "answered_first"),
    [(TOKEN, None), ("wrong-token", 401)],
    ids=["app waiting for the body", "app answered already"],
)
async def test_a_malformed_chunked_body_is_counted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    token: str,
    answered_first: int | None,
) -> None:
    """A chunked body the parser refuses, after its head went to the app. The request
    was counted twice: by the protocol (its 400) and by the app (the disconnect it
    heard, or the 401 it had answered), with two log lines, one a phantom
    client_disconnected. Now the protocol's 400 is counted once, by the protocol (by
    the app, before: see test_a_body_refusal_in_the_heads_packet_is_counted_and_logged_once
    for why not); after the app's own answer the connection is only closed."""
    caplog.set_level(logging.INFO)
    connection = Connection(monkeypatch)
    head = CHUNKED_HEAD.replace(TOKEN.encode(), token.encode())
    lost = False
    try:
        connection.protocol.data_received(head + b'5\r\n{"a":\r\n')
        if answered_first is not None:
            [answer] = await connection.answers(b"", 1)
            assert answer.startswith(b"HTTP/1.1 %d " % answered_first)
        else:
            await asyncio.sleep(0.05)  # the app waits for the rest of the body
        connection.protocol.data_received(b"zz\r\n")
        closed = await wait_closed(connection, 1)
        reason = "malformed_request" if answered_first is None else "unauthorized"
        if answered_first is None:
            assert closed.startswith(b"HTTP/1.1 400 ")
        connection.close()  # the transport, closed, tells the protocol: the app hears it
        lost = True
        await asyncio.sleep(0.05)  # anything counted twice would be by now
        assert [fields["reason"] for _, fields in refusals(caplog)] == [reason]
        if answered_first is None:
            assert [error.reason for error in connection.refused] == [reason]
            assert rejections(connection, reason) == 0  # the app left it alone
        else:
            assert connection.refused == []  # the app's 401 is the request's answer
            assert rejections(connection, reason) == 1
        assert rejections(connection, "client_disconnected") == 0
        assert connection.publisher.records == []
    finally:
        if not lost:
            connection.close()


async def test_protocol_refusals_are_timed_finer_than_the_loops_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop's clock (loop.time) ticks in milliseconds: refusals the protocol timed
    with it went into bridge_request_duration_seconds as 0 or 0.001, whose buckets
    start at 100 µs. Timed with a clock like uvloop's here."""
    loop = asyncio.get_running_loop()
    loop_time = loop.time
    monkeypatch.setattr(loop, "time", lambda: round(loop_time(), 3))
    connection = Connection(monkeypatch)
    try:
        connection.protocol.data_received(b"POST /webhooks/geins HTTP/1.1\r\nHost x\r\n\r\n")
        await wait_closed(connection, 1)
        [seconds] = connection.refused_after
        assert 0 < seconds < 1
        assert seconds * 1000 != round(seconds * 1000)  # not whole milliseconds
    finally:
        connection.close()


def busy(connection: Connection, request: bytes = b"POST /webhooks/geins HTTP/1.1\r\n") -> bytes:
    """Make ``connection`` hold its place at BRIDGE_MAX_CONNECTIONS (an idle one gives it
    up to a new connection): send the start of ``request``; the rest is returned."""
    connection.protocol.data_received(request[:20])
    return request[20:]


async def test_a_connection_over_the_limit_is_answered_503_and_its_request_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """BRIDGE_MAX_CONNECTIONS: a connection that opens while the limit's number are open
    gets a problem+json 503 (Retry-After: 1) and a FIN at once; what it sends is read
    and dropped (never parsed, never published) until it closes its side. Without a
    limit, connections held open until the file limit made new ones fail unanswered,
    and Kafka's and the spool's files could not open either."""
    caplog.set_level(logging.INFO)
    first = Connection(monkeypatch, max_connections=2)
    rest = busy(first, webhook("k1"))
    second = Connection(monkeypatch, max_connections=2, like=first)
    busy(second)
    over = Connection(monkeypatch, max_connections=2, like=first)
    protocol: Any = over.protocol  # eof_received: typed by uvicorn as returning None
    try:
        assert over.transport.writes, "answered as it opened"
        [answer] = split_responses(b"".join(over.transport.writes))
        lines, body = split(answer)
        assert lines[0] == b"HTTP/1.1 503 Too many open connections"
        assert header_fields(answer)["retry-after"] == "1"
        assert header_fields(answer)["connection"] == "close"
        assert body["reason"] == "too_many_connections"
        assert "BRIDGE_MAX_CONNECTIONS" in body["detail"]
        assert over.transport.eof  # a FIN after the answer
        assert not over.transport.closed  # lingering: its request must not cause an RST
        assert [e.reason for e in first.refused] == ["too_many_connections"]  # its server's
        written = len(over.transport.writes)
        protocol.data_received(webhook("over"))
        await asyncio.sleep(0.05)
        assert over.transport.writes[written:] == []
        assert over.publisher.records == []
        assert protocol.eof_received() is None  # the client is done: close now
        assert over.transport.closed
        over.close()
        # those within the limit are served as ever
        [answer] = await first.answers(rest, 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        # a connection that closes makes room
        second.close()
        again = Connection(monkeypatch, max_connections=2, like=first)
        try:
            assert again.transport.writes == []
            [answer] = await again.answers(webhook("k2"), 1)
            assert answer.startswith(b"HTTP/1.1 202 "), answer
        finally:
            again.close()
        [line] = [r for r in caplog.records if r.getMessage().startswith("connection refused")]
        assert line.levelno == logging.WARNING
        assert line.fields["refused"] == 1
    finally:
        for connection in (first, second, over):
            connection.close()


async def test_the_operations_port_has_its_own_connection_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With BRIDGE_OPS_PORT, connections to it neither count against
    BRIDGE_MAX_CONNECTIONS nor are refused by it (a flood of webhook connections
    failed the liveness probe, and Kubernetes restarted a bridge under load); they have
    their own limit, OPS_MAX_CONNECTIONS, so a flood there cannot take the webhooks'
    descriptors either."""
    monkeypatch.setattr(httpprotocol, "OPS_MAX_CONNECTIONS", 2)
    held = Connection(monkeypatch, max_connections=1, ops_port=9090)
    busy(held)
    opened = [held]

    def connect(port: int = 8080) -> Connection:
        opened.append(Connection(monkeypatch, like=held, port=port))
        return opened[-1]

    def close(connection: Connection) -> None:
        opened.remove(connection)
        connection.close()

    try:
        ops = [connect(9090), connect(9090)]
        for connection in ops:  # not refused, though the webhook port is at its limit
            assert connection.transport.writes == []
            [answer] = await connection.answers(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", 1)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
        over_ops = connect(9090)
        assert b"more than 2 connections are open on BRIDGE_OPS_PORT" in refused_at_once(over_ops)
        over = connect()  # the webhook port's limit holds as ever
        assert b"more than 1 connections are open (BRIDGE_MAX_CONNECTIONS)" in refused_at_once(over)
        # each port's refusals have their log line, though within one second
        lines = [r for r in caplog.records if r.getMessage().startswith("connection refused")]
        details = [(r.fields["detail"], r.fields["refused"]) for r in lines]  # type: ignore[attr-defined]
        assert [(d.split(";")[0], n) for d, n in details] == [
            ("more than 2 connections are open on BRIDGE_OPS_PORT", 1),
            ("more than 1 connections are open (BRIDGE_MAX_CONNECTIONS)", 1),
        ]
        for connection in (*ops, over_ops, over):
            close(connection)
        assert b"(BRIDGE_MAX_CONNECTIONS)" in refused_at_once(connect()), "room on their port only"
        close(opened[-1])
        assert connect(9090).transport.writes == [], "and the operations port has room"
        close(held)
        [answer] = await connect().answers(webhook("room"), 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        # counted as webhook requests: the two on the webhook port (the operations
        # port's refusal is not one: it fed BridgeServerErrors, the deliveries' alert),
        # and the request `held` had begun when it closed
        assert [e.reason for e in held.refused] == ["too_many_connections"] * 2 + [
            "client_disconnected"
        ]
    finally:
        for connection in opened:
            connection.close()


async def test_connections_refused_over_the_limit_log_one_line_a_second(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of connections over the limit is one WARNING line a second with their
    count, not a line each; the metrics count each one. Those refused after a line are
    logged as the interval ends (they waited for the next refusal, 70 s in a review)."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(httpprotocol, "CONNECTION_REFUSALS_LOG_EVERY", 0.2)
    held = Connection(monkeypatch, max_connections=1)
    busy(held)
    refused: list[Connection] = []

    def counts() -> list[object]:
        lines = [r for r in caplog.records if r.getMessage().startswith("connection refused")]
        return [r.fields["refused"] for r in lines]  # type: ignore[attr-defined]

    try:
        refused += [Connection(monkeypatch, max_connections=1, like=held) for _ in range(5)]
        assert counts() == [1]  # the first at once
        await asyncio.sleep(0.6)
        assert counts() == [1, 4]  # the rest as the interval ended
        refused += [Connection(monkeypatch, max_connections=1, like=held) for _ in range(3)]
        assert counts() == [1, 4, 1]  # the interval is over: at once
        await asyncio.sleep(0.6)
        assert counts() == [1, 4, 1, 2]
        assert [e.reason for e in held.refused] == ["too_many_connections"] * 8
    finally:
        for connection in (held, *refused):
            connection.close()


async def test_at_most_a_few_refused_connections_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lingering connection holds a file descriptor: beyond MAX_LINGERING_REFUSALS
    a refused connection is closed once answered, or a flood of new connections took
    the descriptors kept for Kafka and the spool, and most went unanswered."""
    monkeypatch.setattr(httpprotocol, "MAX_LINGERING_REFUSALS", 2)
    held = Connection(monkeypatch, max_connections=1)
    busy(held)
    refused = [Connection(monkeypatch, max_connections=1, like=held) for _ in range(4)]
    try:
        for connection in refused:  # all answered
            refused_at_once(connection)
        assert [c.transport.closed for c in refused] == [False, False, True, True]
        assert [c.transport.eof for c in refused] == [True, True, False, False]
        refused[0].close()  # one stops lingering: room for another
        refused[2].close()
        refused.append(Connection(monkeypatch, max_connections=1, like=held))
        assert refused[-1].transport.eof
        assert not refused[-1].transport.closed
    finally:
        for connection in (held, *refused):
            connection.close()


async def test_a_new_connection_at_the_limit_takes_the_place_of_the_one_idle_longest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At BRIDGE_MAX_CONNECTIONS a new connection is not refused while one is idle: the
    one idle longest (before its first request, or since its last answer) is closed
    for it, counted and logged, as nginx reuses its connections. A proxy's pool of
    idle connections, kept for BRIDGE_KEEP_ALIVE_TIMEOUT (620 s in the manifests),
    held every place, and new connections with deliveries to make were refused."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(httpprotocol, "IDLE_GRACE_SECONDS", 0.0)
    first = Connection(monkeypatch, max_connections=2)
    second = Connection(monkeypatch, max_connections=2, like=first)
    opened = [first, second]
    try:
        [answer] = await first.answers(webhook("k1"), 1)  # idle again, since now
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        third = Connection(monkeypatch, max_connections=2, like=first)
        opened.append(third)
        assert third.transport.writes == [], "not refused"
        assert second.transport.closed, "idle longest (since it opened)"
        assert not first.transport.closed
        assert first.idle_closed == 1
        assert first.refused == []
        [line] = [r for r in caplog.records if r.getMessage().startswith("idle connections")]
        assert line.levelno == logging.WARNING
        assert line.fields == {"closed": 1}  # type: ignore[attr-defined]
        assert "BRIDGE_MAX_CONNECTIONS (2)" in line.getMessage()
        [answer] = await third.answers(webhook("k2"), 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        second.close()  # the close done
        fourth = Connection(monkeypatch, max_connections=2, like=first)
        opened.append(fourth)
        assert fourth.transport.writes == []
        assert first.transport.closed, "idle since k1's answer, before third since k2's"
        assert not third.transport.closed
        assert first.idle_closed == 2
        assert [r.key for r in first.publisher.records] == [b"k1", b"k2"]
    finally:
        for connection in opened:
            connection.close()


async def test_only_idle_connections_of_the_webhook_port_make_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection amid a request (its head begun, or awaiting its answer) keeps its
    place, and so does an idle one to BRIDGE_OPS_PORT (a prober's); the new connection
    is refused as before. One closed for room counts as open until it is gone: a place
    another connection's end frees meanwhile is not taken twice."""
    monkeypatch.setattr(httpprotocol, "IDLE_GRACE_SECONDS", 0.0)
    held = Connection(monkeypatch, max_connections=2, ops_port=9090)
    busy(held)
    ops = Connection(monkeypatch, like=held, port=9090)  # idle
    waiting = Connection(monkeypatch, like=held)
    opened = [held, ops, waiting]
    try:
        hold = kafka_waits_for(monkeypatch, held.publisher)
        waiting.protocol.data_received(webhook("waits"))
        await asyncio.sleep(0.05)
        assert waiting.transport.writes == []  # its answer not yet given
        over = Connection(monkeypatch, like=held)
        opened.append(over)
        refused_at_once(over)
        assert not ops.transport.closed
        assert not waiting.transport.closed
        assert held.idle_closed == 0
        hold.set()
        [answer] = await waiting.answers(b"", 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        # `waiting` is idle now; `over` ends
        over.close()
        newer = Connection(monkeypatch, like=held)
        opened.append(newer)
        assert newer.transport.writes == []
        assert waiting.transport.closed
        assert held.idle_closed == 1
        # answered early (a 401), its body still coming: not idle either
        early = b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n"
        [answer] = await newer.answers(early + b"{", 1)
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        refused = Connection(monkeypatch, like=held)
        opened.append(refused)
        assert refused.transport.writes, "refused: none idle"
        assert not newer.transport.closed
        refused.close()
        held.close()  # its place is free while `waiting` is still closing
        last = Connection(monkeypatch, like=held)
        opened.append(last)
        assert last.transport.writes == [], "the place held freed"
        assert held.idle_closed == 1, "no second connection closed for one place"
    finally:
        for connection in opened:
            connection.close()


async def test_a_burst_of_new_connections_does_not_close_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections accepted together (uvloop accepts every waiting one before it reads
    any) at BRIDGE_MAX_CONNECTIONS: each new one counted as idle at once, and the next
    closed it, its request sent but unread (no answer, where a 503 says to retry; a
    review's test on real sockets: 4 of 5 unanswered). A connection is closed for room
    only once idle for IDLE_GRACE_SECONDS."""
    monkeypatch.setattr(httpprotocol, "IDLE_GRACE_SECONDS", 0.05)
    first = Connection(monkeypatch, max_connections=1)
    opened = [first]
    try:
        [answer] = await first.answers(webhook("k1"), 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        burst = [Connection(monkeypatch, max_connections=1, like=first)]
        opened += burst
        assert not first.transport.closed, "answered a moment ago: its pool reuses it next"
        assert split_responses(b"".join(burst[0].transport.writes))  # a 503
        burst[0].close()
        await asyncio.sleep(0.1)
        burst = [Connection(monkeypatch, max_connections=1, like=first) for _ in range(3)]
        opened += burst
        assert first.transport.closed, "idle for longer: makes room once"
        assert not burst[0].transport.writes
        assert not burst[0].transport.closed, "just opened: not closed for the next"
        for connection in burst[1:]:
            refused_at_once(connection)
        assert first.idle_closed == 1
    finally:
        for connection in opened:
            connection.close()


@pytest.mark.parametrize("why", ["lingering", "unread answer"])
async def test_a_connection_closing_or_unread_is_not_closed_for_room(
    monkeypatch: pytest.MonkeyPatch, why: str, opened: list[Connection]
) -> None:
    """Not idle for the limit: one lingering after a pipelined request refused in its
    turn (the keep-alive timer armed with the answer before it: "closed", it lingered
    on, counted as closed, and the new connection passed the limit; a review's test),
    nor one whose last answer its client has not read (its close waits for that, its
    descriptor held and no longer counted)."""
    monkeypatch.setattr(httpprotocol, "IDLE_GRACE_SECONDS", 0.0)
    first = Connection(monkeypatch, max_connections=1)
    opened.append(first)
    if why == "lingering":
        no_host = b"POST /webhooks/geins HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        answers = await first.answers(webhook("k1") + no_host, 2)
        assert [a[:12] for a in answers] == [b"HTTP/1.1 202", b"HTTP/1.1 400"], answers
        assert first.transport.eof
    else:
        [answer] = await first.answers(webhook("k1"), 1)
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        first.transport.unsent = len(answer)
    opened.append(Connection(monkeypatch, max_connections=1, like=first))
    refused_at_once(opened[-1])
    assert first.idle_closed == 0


async def test_a_lingering_refusal_takes_no_place_of_the_served(
    monkeypatch: pytest.MonkeyPatch, opened: list[Connection]
) -> None:
    """A connection refused for BRIDGE_MAX_CONNECTIONS, while it lingers (up to
    LINGER_SECONDS, 32 at once), took a place itself: with one free among the
    connections served, a new one closed an idle one for room (a review's test)."""
    monkeypatch.setattr(httpprotocol, "IDLE_GRACE_SECONDS", 0.0)
    first = Connection(monkeypatch, max_connections=2)
    rest = busy(first, webhook("k1"))
    second = Connection(monkeypatch, max_connections=2, like=first)
    busy(second)
    opened += [first, second]
    over = Connection(monkeypatch, max_connections=2, like=first)  # both busy: 503
    opened.append(over)
    refused_at_once(over)
    assert over.transport.eof
    assert not over.transport.closed
    [answer] = await first.answers(rest, 1)  # `first` answered: idle now
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    second.close()  # done: one connection served (idle), of 2
    opened.remove(second)
    new = Connection(monkeypatch, max_connections=2, like=first)
    opened.append(new)
    assert new.transport.writes == [], "a place is free"
    assert not first.transport.closed, "no idle connection needs closing for it"
    assert first.idle_closed == 0


async def test_a_lingering_refusal_does_not_refuse_the_next_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nor is the next connection refused with none served (a review's test)."""
    first = Connection(monkeypatch, max_connections=1)
    busy(first)
    opened = [first]
    try:
        over = Connection(monkeypatch, max_connections=1, like=first)
        opened.append(over)
        assert over.transport.eof
        assert not over.transport.closed
        first.close()  # no connection served now
        opened.remove(first)
        new = Connection(monkeypatch, max_connections=1, like=over)
        opened.append(new)
        assert new.transport.writes == [], b"".join(new.transport.writes)[:60]
    finally:
        for connection in opened:
            connection.close()


async def test_shutdown_closes_lingering_connections_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn's shutdown waits for every connection to close: one lingering after its
    answer held it up to LINGER_SECONDS (3.75 s against 1.47 s in a review)."""
    held = Connection(monkeypatch, max_connections=1)
    busy(held)
    over = Connection(monkeypatch, max_connections=1, like=held)
    try:
        assert over.transport.eof
        assert not over.transport.closed
        over.protocol.shutdown()
        assert over.transport.closed
        held.protocol.shutdown()  # a head begun: closing, its rest dropped
        assert held.transport.eof or held.transport.closed
    finally:
        over.close()
        held.close()


# --- a chunked body's trailer section ---------------------------------------------------
# uvicorn appended its fields to scope["headers"], unbounded (a review's tests): RFC 9110
# 6.5.1 merges none of them, and none may be kept.

TRAILER_ORDER = b'{"entity":"Order","action":"create","id":"1"}'


def chunked(head_extra: bytes, trailer: bytes) -> bytes:
    return (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n%s\r\n"
        b"%x\r\n%s\r\n0\r\n%s\r\n" % (head_extra, len(TRAILER_ORDER), TRAILER_ORDER, trailer)
    )


async def test_a_trailer_field_does_not_replace_the_heads_idempotency_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It was a second key: 400 bad_idempotency_key, "sent twice with different values"
    (and the key of a head without one)."""
    conn = Connection(monkeypatch)
    data = chunked(
        b"authorization: Bearer %s\r\nx-idempotency-key: from-head\r\n" % TOKEN.encode(),
        b"x-idempotency-key: from-trailer\r\nx-timestamp: 2020-01-01T00:00:00Z\r\n",
    )
    [answer] = await conn.answers(data, 1)
    lines, body = split(answer)
    conn.close()
    assert lines[0] == b"HTTP/1.1 202 Accepted", body
    assert body["key"] == "from-head"
    [record] = conn.publisher.records
    assert record.key == b"from-head"
    assert b"2020-01-01" not in b"".join(value for _, value in record.headers)


async def test_a_trailer_field_is_no_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head without credentials is a 401, whatever follows the body (it was 202)."""
    conn = Connection(monkeypatch)
    data = chunked(b"x-idempotency-key: k-1\r\n", b"authorization: Bearer %s\r\n" % TOKEN.encode())
    [answer] = await conn.answers(data, 1)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert conn.publisher.records == []


async def test_a_client_cannot_pile_up_trailer_fields_after_its_401(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200,000 fields (1.2 MB, where the head may have 16 KiB) after its 401 were each
    kept, some 19 times their bytes in memory, until BRIDGE_READ_TIMEOUT: the trailer
    section has the head's cap, and the connection is closed once it is over."""
    conn = Connection(monkeypatch, max_head_bytes=16384)
    conn.protocol.data_received(
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    await eventually(lambda: bool(conn.transport.writes), what="the 401")
    assert b"".join(conn.transport.writes).startswith(b"HTTP/1.1 401 ")
    conn.protocol.data_received(b"0\r\n")
    for _ in range(20):
        if conn.transport.ended:
            break
        conn.protocol.data_received(b"a: b\r\n" * 10_000)
    ended = conn.transport.ended
    conn.close()
    assert ended
    assert len(split_responses(b"".join(conn.transport.writes))) == 1  # the 401 alone


async def test_a_trailer_section_over_the_heads_cap_is_a_431(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the app still reads the body: its answer is the 431, nothing is published."""
    conn = Connection(monkeypatch, max_head_bytes=4096)
    head = b"authorization: Bearer %s\r\nx-idempotency-key: k-431\r\n" % TOKEN.encode()
    data = chunked(head, b"a: b\r\n" * 1000)
    [answer] = await conn.answers(data, 1)
    lines, body = split(answer)
    conn.close()
    assert lines[0].startswith(b"HTTP/1.1 431 "), answer
    assert "trailer section" in body["detail"]
    assert conn.publisher.records == []


async def test_a_trailer_cannot_name_the_client_behind_a_trusted_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a proxy that passes a chunked body through with its trailer, a client
    outside BRIDGE_ALLOWED_NETWORKS added `x-forwarded-for: <an allowed address>` as a
    trailer field: the right-most hop, which the guard took for the client (202)."""
    environ = {
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": "broker",
        "BRIDGE_TRUSTED_PROXIES": "127.0.0.1",  # the proxy the connection comes from
        "BRIDGE_ALLOWED_NETWORKS": "10.9.9.0/24",
    }
    publisher = FakePublisher()
    app = create_app(load_settings(environ=environ), publisher=publisher)
    protocol_class = guarded_protocol(read_timeout=5, max_head_bytes=16384, max_url_bytes=8192)
    config = uvicorn.Config(app, http=protocol_class, ws="none", lifespan="off", log_config=None)
    state = ServerState()
    state.default_headers = [DATE]
    protocol = protocol_class(config=config, server_state=state, app_state={})
    transport = SocketTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(
        chunked(
            b"authorization: Bearer %s\r\nx-idempotency-key: k-xff\r\n"
            b"x-forwarded-for: 203.0.113.7\r\n" % TOKEN.encode(),  # the proxy's: the client
            b"x-forwarded-for: 10.9.9.9\r\n",  # the client's own trailer
        )
    )
    await eventually(lambda: bool(transport.writes), what="an answer")
    answer = b"".join(transport.writes)
    protocol.connection_lost(None)
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
    assert publisher.records == []


TRAILER_BLOCK = b"v" * 65536  # 64 KiB: what one socket read may hand the protocol


@pytest.mark.parametrize("part", ["value", "name"])
async def test_one_huge_trailer_field_after_a_401_ends_the_connection(
    monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """The parser gathers a field whole (a copy of it per piece, in Python) before
    on_header sees it: 1.25 MB of one field was kept, the connection open, and one of
    16 MB held the event loop for 26 s (a review's test)."""
    conn = Connection(monkeypatch, max_head_bytes=16384, read_timeout=60)
    conn.protocol.data_received(
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    await eventually(lambda: bool(conn.transport.writes), what="the 401")
    assert b"".join(conn.transport.writes).startswith(b"HTTP/1.1 401 ")
    conn.protocol.data_received(b"0\r\nx-a: " if part == "value" else b"0\r\nx-a")
    for _ in range(20):
        if conn.transport.ended:
            break
        conn.protocol.data_received(TRAILER_BLOCK)
    ended = conn.transport.ended
    conn.close()
    assert ended


@pytest.mark.parametrize("where", ["trailer field", "chunk extension"])
async def test_one_huge_trailer_field_or_chunk_line_is_a_431(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """While the app waits for the body, however it is split."""
    conn = Connection(monkeypatch, max_head_bytes=4096, read_timeout=60)
    tail = b"0\r\nx-a: " if where == "trailer field" else b"1;ext="
    conn.protocol.data_received(
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: k-big\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n%s" % (TOKEN.encode(), tail)
    )
    for _ in range(16):  # 1 MiB
        if conn.transport.ended:
            break
        conn.protocol.data_received(TRAILER_BLOCK)
        await asyncio.sleep(0)
    await eventually(lambda: bool(conn.transport.writes), what="an answer")
    answers = split_responses(b"".join(conn.transport.writes))
    conn.close()
    lines, body = split(answers[0])
    assert lines[0].startswith(b"HTTP/1.1 431 "), answers[0]
    assert "trailer section" in body["detail"]
    assert conn.publisher.records == []


@pytest.mark.parametrize("name", [b"connection", b"Proxy-Connection"])
async def test_a_trailer_connection_field_is_a_400(
    monkeypatch: pytest.MonkeyPatch, name: bytes
) -> None:
    """llhttp acted on a trailer `Connection: close` (dropping every later byte) while
    the answer, decided at the head, kept the connection: the next request, whole, was
    answered 408 after BRIDGE_READ_TIMEOUT (a review's test). Refused as llhttp refuses
    a trailer Content-Length or Transfer-Encoding; `Proxy-Connection` too, which llhttp
    reads as `Connection` (a second review's test)."""
    conn = Connection(monkeypatch, read_timeout=0.5)
    head = b"authorization: Bearer %s\r\nx-idempotency-key: k-1\r\n" % TOKEN.encode()
    [answer] = await conn.answers(chunked(head, name + b": close\r\n") + webhook("k-2"), 1)
    await asyncio.sleep(0.1)
    lines, body = split(answer)
    ended = conn.transport.ended
    conn.close()
    assert lines[0].startswith(b"HTTP/1.1 400 "), answer
    assert "Connection field in the trailer" in body["detail"]
    assert ended
    assert conn.publisher.records == []


async def test_an_http10_client_gets_no_100_continue(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 9110 10.1.1 and 15.2: the expectation is ignored in an HTTP/1.0 request, and
    no 1xx goes to an HTTP/1.0 client, which reads it as the final answer (a review's
    test)."""
    conn = Connection(monkeypatch)
    request = webhook("h10", extra=b"expect: 100-continue\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    conn.protocol.data_received(request)
    await eventually(lambda: b"202 Accepted" in b"".join(conn.transport.writes), what="202")
    written = b"".join(conn.transport.writes)
    conn.close()
    assert written.startswith(b"HTTP/1.1 202 "), written[:60]


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        # llhttp takes these two, and they were served as HTTP/1.1: published with a
        # generated key (a review's find). "HTTP/1.1 only", as the README says.
        (b"GET /webhooks/geins/Order/create?token=%s\r\n\r\n", "HTTP/1.1 only"),  # 0.9
        (
            b"POST /webhooks/geins/Order/create?token=%s HTTP/2.0\r\nhost: x\r\n"
            b"content-length: 2\r\n\r\n{}",
            "HTTP/1.1 only",
        ),
        # RFC 9112 3.2: a server MUST answer 400 (each was served and published;
        # HTTP/1.0's two a review's find)
        (webhook("no-host").replace(b"host: x\r\n", b""), "exactly one Host field"),
        (webhook("two-hosts", extra=b"Host: y\r\n"), "exactly one Host field"),
        (
            webhook("h10-two", extra=b"Host: y\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
            "exactly one Host field",
        ),
        # RFC 9112 3.2: a 400 to an invalid Host value too (served and published before)
        (webhook("spaced-host").replace(b"host: x\r\n", b"host: x y\r\n"), "not a host name"),
        (webhook("path-host").replace(b"host: x\r\n", b"host: x/y\r\n"), "not a host name"),
        (webhook("bad-port").replace(b"host: x\r\n", b"host: x:8a\r\n"), "not a host name"),
        (webhook("open-ip").replace(b"host: x\r\n", b"host: [::1\r\n"), "not a host name"),
    ],
    ids=[
        "HTTP/0.9",
        "HTTP/2.0",
        "no Host",
        "two Hosts",
        "HTTP/1.0 with two Hosts",
        "Host with a space",
        "Host with a slash",
        "Host with a bad port",
        "Host with an unclosed IPv6 literal",
    ],
)
async def test_a_request_of_another_version_or_without_one_host_is_a_400(
    monkeypatch: pytest.MonkeyPatch, request_bytes: bytes, why: str
) -> None:
    conn = Connection(monkeypatch)
    [answer] = await conn.answers(request_bytes.replace(b"%s", TOKEN.encode()), 1)
    lines, body = split(answer)
    conn.close()
    assert lines[0].startswith(b"HTTP/1.1 400 "), answer
    assert why in body["detail"]
    assert conn.publisher.records == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        webhook("h10-no-host").replace(b"host: x\r\n", b"").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        webhook("empty-host").replace(b"host: x\r\n", b"host:\r\n"),
        webhook("v6-host").replace(b"host: x\r\n", b"host: [::1]:8080\r\n"),
        webhook("v4-host").replace(b"host: x\r\n", b"host: 10.0.0.1:8080\r\n"),
        webhook("name-host").replace(b"host: x\r\n", b"host: bridge.example-1.svc\r\n"),
        # whitespace after a value is not part of it (RFC 9110 5.5), which llhttp keeps:
        # refused as no host name (a review's test)
        webhook("ows-host").replace(b"host: x\r\n", b"host: x \r\n"),
        webhook("tab-host").replace(b"host: x\r\n", b"host: 10.0.0.1:8080 \t\r\n"),
    ],
    ids=[
        "HTTP/1.0 without Host",
        "empty Host",
        "IPv6 Host",
        "IPv4 Host",
        "host name",
        "Host with a space after it",
        "Host with a space and a tab after it",
    ],
)
async def test_a_request_with_the_host_rfc_9112_allows_is_served(
    monkeypatch: pytest.MonkeyPatch, request_bytes: bytes
) -> None:
    """HTTP/1.0 has no Host requirement; an empty Host is valid (a target without an
    authority)."""
    conn = Connection(monkeypatch)
    [answer] = await conn.answers(request_bytes, 1)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert len(conn.publisher.records) == 1


# --- refusals after the head: counted and logged once ------------------------------


def all_rejections(connection: Connection) -> dict[str, float]:
    out = {}
    for line in connection.metrics.exposition().decode().splitlines():
        if line.startswith("bridge_rejections_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            value = float(line.rsplit(" ", 1)[1])
            if value:
                out[reason] = value
    return out


def chunked_head(path: bytes, token: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: k\r\ntransfer-encoding: chunked\r\n\r\n" % (path, token)
    )


BAD_BODIES = {
    "malformed chunk": (b'5\r\n{"a":\r\nzz\r\n', 400, "malformed_request"),
    "trailer connection": (b"2\r\n{}\r\n0\r\nconnection: close\r\n\r\n", 400, "malformed_request"),
    "trailer over cap": (b"2\r\n{}\r\n0\r\n" + b"a: b\r\n" * 1000, 431, "headers_too_large"),
}


@pytest.mark.parametrize("body", list(BAD_BODIES))
@pytest.mark.parametrize(
    ("path", "token"),
    [
        (b"/webhooks/geins", b"wrong-token"),  # the app's 401 comes before the body
        (b"/webhooks/geins/a/b/c", TOKEN.encode()),  # WebhookDispatch's 404
        (b"/healthz", TOKEN.encode()),  # not a webhook: counted by nobody
    ],
    ids=["401", "404", "healthz"],
)
async def test_a_body_refusal_in_the_heads_packet_is_counted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    body: str,
    path: bytes,
    token: bytes,
) -> None:
    """The protocol answered and logged, and left the count to the app, which answered
    for itself before it read the body (a 401, a 404) and counted and logged that
    instead, or counted nothing (a non-webhook route): now the protocol counts, and
    the app leaves a request it refused alone (a review's test)."""
    caplog.set_level(logging.INFO)
    sent, status, reason = BAD_BODIES[body]
    conn = Connection(monkeypatch, max_head_bytes=4096)
    try:
        conn.protocol.data_received(chunked_head(path, token) + sent)  # one packet
        answer = await wait_closed(conn, 1)
        lines, problem = split(answer)
        assert lines[0].startswith(b"HTTP/1.1 %d " % status), answer
        assert problem["reason"] == reason
        await asyncio.sleep(0.05)  # let the app run
    finally:
        conn.close()
    await asyncio.sleep(0.05)
    logged = [fields["reason"] for _, fields in refusals(caplog)]
    counted = all_rejections(conn)
    for error in conn.refused:
        counted[error.reason] = counted.get(error.reason, 0) + 1
    # what the client got: one line, one count, with its reason
    assert (logged, counted) == ([reason], {reason: 1})


async def test_a_pipelined_request_cut_off_by_the_client_going_away_is_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn tells the running request of the disconnect and never starts a queued
    one: it was neither counted nor logged (a review's test)."""
    caplog.set_level(logging.INFO)
    conn = Connection(monkeypatch)
    hand_over = conn.publisher.hand_over

    async def slow(destination: Any) -> Any:
        await asyncio.sleep(0.2)  # Kafka slow: the first request is still being served
        return await hand_over(destination)

    monkeypatch.setattr(conn.publisher, "hand_over", slow)
    partial = webhook("q2").replace(b"content-length: %d" % len(ORDER), b"content-length: 500")
    conn.protocol.data_received(webhook("q1") + partial)  # q2: its head, part of its body
    await asyncio.sleep(0.05)
    conn.transport.close()
    conn.close()  # the client is gone
    await asyncio.sleep(0.4)  # q1 done by now
    assert [r.key for r in conn.publisher.records] == [b"q1"]
    assert [error.reason for error in conn.refused] == ["client_disconnected"]  # by the protocol
    assert rejections(conn, "client_disconnected") == 0  # not by the app too
    assert [f["reason"] for _, f in refusals(caplog)] == ["client_disconnected"]


def inflight_requests(conn: Connection) -> float:
    for line in conn.metrics.exposition().decode().splitlines():
        if line.startswith("bridge_inflight_requests "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no bridge_inflight_requests")


async def test_a_refused_body_on_a_kept_connection_frees_the_app_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second request of a kept-alive connection: its chunked body turns out
    malformed while its app waits for it. The protocol answers 400 and lingers (an
    answer went out before), but the app, waiting in receive(), is not told: it holds
    its BRIDGE_MAX_CONCURRENCY slot (bridge_inflight_requests) until the linger ends,
    LINGER_SECONDS, or for as long as the client keeps the connection open (a
    review's test)."""
    conn = Connection(monkeypatch)
    try:
        [first] = await conn.answers(webhook("k1"), 1)
        assert first.startswith(b"HTTP/1.1 202 ")
        conn.protocol.data_received(CHUNKED_HEAD + b'5\r\n{"a":\r\n')
        await asyncio.sleep(0.05)  # the app waits for the rest of the body
        assert inflight_requests(conn) == 1
        [answer] = await conn.answers(b"zz\r\n", 1)
        assert answer.startswith(b"HTTP/1.1 400 ")
        await asyncio.sleep(0.3)
        assert inflight_requests(conn) == 0, "the refused request's app still holds its slot"
    finally:
        conn.close()


async def test_an_app_answering_after_a_lingering_refusal_writes_nothing_and_logs_no_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, with the head and the bad body in one packet, to a route whose app
    answers without reading the body (/healthz): the protocol refuses and lingers
    (write_eof), then the app runs and writes its 200 to the transport after the FIN
    (uvloop raises 'Cannot call write() after write_eof()'): an ERROR with a traceback
    that any client can cause (a review's test)."""
    caplog.set_level(logging.INFO)
    conn = Connection(monkeypatch)
    try:
        [first] = await conn.answers(webhook("k1"), 1)
        assert first.startswith(b"HTTP/1.1 202 ")
        head = CHUNKED_HEAD.replace(b"/webhooks/geins", b"/healthz")
        [answer] = await conn.answers(head + b'5\r\n{"a":\r\nzz\r\n', 1)
        assert answer.startswith(b"HTTP/1.1 400 ")
        await asyncio.sleep(0.1)  # let the app run
    finally:
        conn.close()
    await asyncio.sleep(0.05)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.mark.parametrize(
    "second",
    [CHUNKED_HEAD + b'5\r\n{"a":\r\nzz\r\n', webhook("q2")],
    ids=["refused in its turn (malformed body)", "whole, queued"],
)
async def test_a_pipelined_request_is_counted_when_the_client_goes_away(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, second: bytes
) -> None:
    """A pipelined request refused in its turn, or queued whole, whose client goes
    away before the answers before it: counted by nobody (a review's test)."""
    caplog.set_level(logging.INFO)
    conn = Connection(monkeypatch)
    slow_kafka(conn, monkeypatch, 0.2)
    conn.protocol.data_received(webhook("q1") + second)
    await asyncio.sleep(0.05)  # q1 still being served; the second waits its turn
    conn.transport.close()
    conn.close()  # the client is gone
    await asyncio.sleep(0.4)
    counted = all_rejections(conn)
    for error in conn.refused:
        counted[error.reason] = counted.get(error.reason, 0) + 1
    # q1 was published and answered into the void (counted accepted); the second
    # request, never answered, must be counted (and logged) once, as some rejection
    assert sum(counted.values()) == 1, counted
    assert len(refusals(caplog)) == 1


# --- BRIDGE_MAX_BODIES_BYTES: the bodies of the requests in progress ----------------

MIB = 1024 * 1024


def order_of(size: int) -> bytes:
    """A Geins order body of ``size`` bytes."""
    head = b'{"entity":"Order","action":"create","pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def head_of(key: str, length: int) -> bytes:
    return (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: %s\r\ncontent-length: %d\r\n\r\n"
        % (TOKEN.encode(), key.encode(), length)
    )


def bodies_held(conn: Connection) -> float:
    for line in conn.metrics.exposition().decode().splitlines():
        if line.startswith("bridge_bodies_bytes "):
            return float(line.split()[1])
    raise AssertionError("no bridge_bodies_bytes")


async def test_bodies_in_progress_past_the_budget_are_503_until_one_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BRIDGE_MAX_CONCURRENCY alone let every request in progress hold a body as large
    as BRIDGE_MAX_BODY_BYTES (~940 MB at the defaults, over the manifests' limits)."""
    first = Connection(monkeypatch, settings={"BRIDGE_MAX_BODIES_BYTES": str(MIB)})
    body = order_of(700_000)
    first.protocol.data_received(head_of("first", len(body)) + body[:1000])  # held from now
    await eventually(lambda: bodies_held(first) == len(body), what="the first body held")
    second = Connection(monkeypatch, like=first)
    [answer] = await second.answers(head_of("second", len(body)) + body, 1)
    lines, problem_body = split(answer)
    assert lines[0].startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in [line.lower() for line in lines]
    assert "BRIDGE_MAX_BODIES_BYTES=1048576" in problem_body["detail"]
    assert problem_body["reason"] == "overloaded"
    small = Connection(monkeypatch, like=first)  # what fits is served meanwhile
    [answer] = await small.answers(webhook("small"), 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    [answer] = await first.answers(body[1000:], 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    third = Connection(monkeypatch, like=first)
    [answer] = await third.answers(head_of("third", len(body)) + body, 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert [r.key for r in first.publisher.records] == [b"small", b"first", b"third"]
    await eventually(lambda: bodies_held(first) == 0, what="every body released")
    for conn in (first, second, small, third):
        conn.close()


async def test_a_lone_body_over_the_budget_is_read_and_a_growing_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One event as large as BRIDGE_MAX_BODY_BYTES can always be delivered; a chunked
    body is held as it grows, and refused when it passes the budget with others."""
    settings = {"BRIDGE_MAX_BODIES_BYTES": str(MIB), "BRIDGE_MAX_BODY_BYTES": str(4 * MIB)}
    lone = Connection(monkeypatch, settings=settings)
    big = order_of(2 * MIB)
    [answer] = await lone.answers(head_of("lone", len(big)) + big, 1)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    held = Connection(monkeypatch, like=lone)
    part = order_of(600_000)
    held.protocol.data_received(head_of("held", len(part)) + part[:10])
    await eventually(lambda: bodies_held(lone) == len(part), what="held")
    chunked = Connection(monkeypatch, like=lone)
    chunked_head = (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"x-idempotency-key: grows\r\ntransfer-encoding: chunked\r\n\r\n" % TOKEN.encode()
    )
    first_piece = b"%x\r\n%s\r\n" % (300_000, b"x" * 300_000)
    chunked.protocol.data_received(chunked_head + first_piece)
    await eventually(lambda: bodies_held(lone) == len(part) + 300_000, what="grown")
    [answer] = await chunked.answers(first_piece, 1)  # 1.2 MB held in all: refused
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    await eventually(lambda: bodies_held(lone) == len(part), what="the refused one's released")
    held.close()  # gone mid-body: released too
    await eventually(lambda: bodies_held(lone) == 0, what="the disconnected one's released")
    assert [r.key for r in lone.publisher.records] == [b"lone"]
    for conn in (lone, chunked):
        conn.close()


def refused_by_the_app(path: bytes) -> bytes:
    """A chunked head the app refuses: a wrong token at the endpoint (401), a path under
    the webhook prefix that is no route (the guards' 404)."""
    token = b"wrong-token" if path == b"/webhooks/geins" else TOKEN.encode()
    return CHUNKED_HEAD.replace(TOKEN.encode(), token).replace(b"/webhooks/geins", path)


def counted_and_logged(
    conn: Connection, caplog: pytest.LogCaptureFixture
) -> tuple[dict[str, float], list[str]]:
    """The refusals counted (by the app's metrics and the protocol), and logged."""
    counted = all_rejections(conn)
    for error in conn.refused:
        counted[error.reason] = counted.get(error.reason, 0) + 1
    return counted, [str(fields["reason"]) for _, fields in refusals(caplog)]


@pytest.mark.parametrize(
    "path", [b"/webhooks/geins", b"/webhooks/geins/a/b/c"], ids=["endpoint 401", "dispatch 404"]
)
async def test_a_refusal_during_the_apps_paused_answer_logs_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, path: bytes
) -> None:
    """A refusal the app made (checking REFUSED_BY_PROTOCOL before its answer's await),
    and the protocol's refusal of the same request during that await (a client that
    reads no answers): two log lines, and the guards' 404 two counts (a review's
    test)."""
    caplog.set_level(logging.INFO)
    conn = Connection(monkeypatch)
    try:
        conn.protocol.data_received(refused_by_the_app(path) + b'5\r\n{"a":\r\n')
        conn.protocol.pause_writing()  # the client reads no answers (socket buffer full)
        await asyncio.sleep(0.05)  # the app refused and waits to write its answer
        conn.protocol.data_received(b"zz\r\n")  # the chunk is malformed: the protocol's 400
        await asyncio.sleep(0.05)
        conn.protocol.resume_writing()
        await asyncio.sleep(0.05)
    finally:
        conn.transport.close()
        conn.close()
    await asyncio.sleep(0.05)
    # one line per request, as counted
    assert counted_and_logged(conn, caplog) == ({"malformed_request": 1}, ["malformed_request"])


@pytest.mark.parametrize(
    "path", [b"/webhooks/geins", b"/webhooks/geins/a/b/c"], ids=["endpoint 401", "dispatch 404"]
)
async def test_a_late_body_while_the_apps_answer_waits_is_counted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, path: bytes
) -> None:
    """No malformed body needed: a client that neither reads its answers nor sends its
    body. The protocol's 408 fires first (its deadline began with the head, before
    writing paused); then the client, dropped for not reading, frees the app's answer,
    which logs (and, for the guards' refusals and the 404, counts) it again."""
    caplog.set_level(logging.INFO)
    conn = Connection(monkeypatch, read_timeout=0.2)
    try:
        conn.protocol.data_received(refused_by_the_app(path) + b'5\r\n{"a":\r\n')
        # the head's deadline runs from just before the client stopped reading (its
        # socket buffer full: the app's answer waits to be written)
        conn.protocol.pause_writing()
        await asyncio.sleep(0.5)  # the 408, then the client is dropped for not reading
    finally:
        conn.transport.close()
        conn.close()
    await asyncio.sleep(0.05)
    assert counted_and_logged(conn, caplog) == ({"request_timeout": 1}, ["request_timeout"])


@pytest.mark.parametrize("before", [b"", b"served"], ids=["first request", "pipelined"])
async def test_a_client_gone_during_the_head_is_counted_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, before: bytes
) -> None:
    """A reset while the head arrives was neither counted nor logged, though a FIN there
    is a counted 400 and silence a counted 408 (README: "A client that goes away before
    its request is whole counts as rejected (reason client_disconnected)"; a review's
    test)."""
    caplog.set_level(logging.INFO)
    conn = Connection(monkeypatch)
    slow_kafka(conn, monkeypatch, 0.1)
    sent = (webhook("q1") if before else b"") + HALF_A_HEAD + b"x-idempotency-key: k2\r\n"
    conn.protocol.data_received(sent)
    await asyncio.sleep(0.02)
    conn.transport.close()
    conn.protocol.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    await asyncio.sleep(0.2)
    assert [e.reason for e in conn.refused] == ["client_disconnected"]
    assert [f["reason"] for _, f in refusals(caplog)] == ["client_disconnected"]


# --- bytes after an answer that closes the connection: dropped, never counted -------
# uvicorn answers an HTTP/1.0 request's keep-alive, and every request during a stop,
# with connection: close, which llhttp does not know of: it parsed on what came in the
# same packet, and the connection's end counted those requests as clients gone (a
# review's tests; tests/test_packet_splits.py found it).

HTTP10_KEEP_ALIVE = (
    b"POST /webhooks/geins HTTP/1.0\r\nauthorization: Bearer %s\r\n"
    b"connection: keep-alive\r\nx-idempotency-key: a\r\ncontent-length: %d\r\n\r\n%s"
    % (TOKEN.encode(), len(ORDER), ORDER)
)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"


async def statuses_and_refusals(
    monkeypatch: pytest.MonkeyPatch, packets: list[bytes]
) -> tuple[list[bytes], list[str]]:
    connection = Connection(monkeypatch)
    try:
        for packet in packets:
            if connection.transport.closed:
                break  # the event loop delivers nothing on a closed transport
            connection.protocol.data_received(packet)
            await asyncio.sleep(0.05)
        statuses = [r[:12] for r in split_responses(b"".join(connection.transport.writes))]
    finally:
        connection.close()  # connection_lost, as the loop calls it after the close
    return statuses, [e.reason for e in connection.refused]


async def test_a_request_behind_an_http10_keep_alive_one_counts_the_same_in_any_packet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one_packet = await statuses_and_refusals(monkeypatch, [HTTP10_KEEP_ALIVE + HEALTHZ])
    two_packets = await statuses_and_refusals(monkeypatch, [HTTP10_KEEP_ALIVE, HEALTHZ])
    assert two_packets == ([b"HTTP/1.1 202"], [])
    assert one_packet == two_packets


async def test_a_whole_request_the_server_closed_on_is_no_client_disconnect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    statuses, refused = await statuses_and_refusals(monkeypatch, [HTTP10_KEEP_ALIVE + HEALTHZ])
    assert statuses == [b"HTTP/1.1 202"]  # answered with connection: close
    # README: client_disconnected is "a client that goes away before its request is
    # whole"; this one is whole, the client is there, and /healthz is not counted.
    assert refused == []


async def test_while_draining_a_request_behind_the_closing_answer_is_no_client_disconnect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same with a stop in progress (every answer says connection: close): a
    delivery pipelined in the packet of the one before it is counted as a client that
    went away; in its own packet it is not."""
    webhook = HTTP10_KEEP_ALIVE.replace(b"HTTP/1.0\r\n", b"HTTP/1.1\r\nhost: x\r\n").replace(
        b"connection: keep-alive\r\n", b""
    )
    second = webhook.replace(b"key: a", b"key: b")
    results = []
    for packets in ([webhook + second], [webhook, second]):
        connection = Connection(monkeypatch, draining=lambda: True)
        try:
            for packet in packets:
                if not connection.transport.closed:
                    connection.protocol.data_received(packet)
                    await asyncio.sleep(0.05)
        finally:
            connection.close()
        results.append([e.reason for e in connection.refused])
    assert results[1] == []
    assert results[0] == results[1]


@pytest.mark.parametrize("prefix", [b"", b"http://bridge.example:8080"])
async def test_a_url_within_its_limit_with_too_many_header_bytes_is_431_in_absolute_form(
    monkeypatch: pytest.MonkeyPatch, prefix: bytes
) -> None:
    """An absolute-form request (RFC 9112 3.2.2) whose path and query are within
    BRIDGE_MAX_URL_BYTES, with headers past the head cap, is a 431 for its headers, as
    in origin form: its scheme and authority counted as URL made it a 414 (a review's
    test)."""
    connection = Connection(monkeypatch, max_head_bytes=HEAD_CAP, max_url_bytes=URL_CAP)
    try:
        path = b"/webhooks/geins?q=" + b"a" * (URL_CAP + 1 - len(b"/webhooks/geins?q="))
        assert len(path) - len(b"?") == URL_CAP  # path and query, as the guard counts them
        connection.protocol.data_received(b"POST " + prefix + path + b" HTTP/1.1\r\nX-Pad: ")
        connection.protocol.data_received(b"a" * HEAD_CAP)
        answer = await wait_closed(connection, 1)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert [e.reason for e in connection.refused] == ["headers_too_large"]
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("packets", "eof", "status", "reason"),
    [
        ([b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\n"], False, 408, "request_timeout"),
        ([webhook("cut")[:-5]], True, 400, "incomplete_request"),
    ],
    ids=["a late head's 408", "a half-closed request's 400"],
)
async def test_a_refusal_a_retry_may_mend_says_retriable_without_a_wait(
    monkeypatch: pytest.MonkeyPatch, packets: list[bytes], eof: bool, status: int, reason: str
) -> None:
    """A request too slow to arrive (408) or cut short by a half-close (400) was never
    accepted, and sent again it may be: it said "retriable": false, which told a
    client that honours the field to drop the event (noticed in earlier sessions). No
    Retry-After (429's and 503's), and counted as a client's refusal (rejected), not
    as the bridge unavailable."""
    connection = Connection(monkeypatch, read_timeout=0.2)
    try:
        for packet in packets:
            connection.protocol.data_received(packet)
        if eof:
            cast(Any, connection.protocol).eof_received()
        answer = await wait_closed(connection, 2)
        lines, body = split(answer)
        assert lines[0].startswith(b"HTTP/1.1 %d " % status), answer
        assert (body["reason"], body["retriable"]) == (reason, True)
        assert "retry-after" not in header_fields(answer)
        if connection.refused:  # the protocol answered it, before any app ran
            assert [outcome_of(error) for error in connection.refused] == ["rejected"]
        else:  # its app, which read the head, counted it
            counted = [
                line
                for line in connection.metrics.exposition().decode().splitlines()
                if line.startswith("bridge_requests_total{") and not line.endswith(" 0.0")
            ]
            assert len(counted) == 1, counted
            assert 'outcome="rejected"' in counted[0], counted
    finally:
        connection.close()


def test_outcomes_of_refusals() -> None:
    assert outcome_of(Unavailable("Kafka away")) == "unavailable"
    assert outcome_of(RateLimited("too many")) == "rate_limited"
    assert outcome_of(PayloadTooLarge("big")) == "rejected"


@pytest.mark.parametrize("paused", [False, True], ids=["below high water", "paused writing"])
async def test_a_connection_closed_with_unread_answers_is_dropped_after_the_read_timeout(
    monkeypatch: pytest.MonkeyPatch, paused: bool
) -> None:
    """Closed with bytes its client never reads (the keep-alive timeout here; a refusal
    or `connection: close` alike), a connection was only close()d, which never ends it:
    below the buffer's high-water mark no timer runs at all, and the timer armed at
    pause_writing does nothing once the transport is closing (`_not_reading`). It is
    aborted within BRIDGE_READ_TIMEOUT, as the README says (a review's test)."""
    connection = Connection(monkeypatch, read_timeout=0.2, keep_alive=0.1)
    try:
        [answer] = await connection.answers(webhook("k1"), 1)
        assert answer.startswith(b"HTTP/1.1 202 ")
        connection.transport.unsent = 20_000  # the client reads nothing
        if paused:
            connection.protocol.pause_writing()
        await eventually(lambda: connection.transport.closed, within=5, what="keep-alive close")
        await eventually(
            lambda: connection.transport.aborted,
            within=5,
            what="dropped: its close waits for a client that never reads",
        )
    finally:
        connection.close()
