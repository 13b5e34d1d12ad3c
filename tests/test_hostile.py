"""Hostile clients against the real server: slow loris, huge heads, idle and slow bodies,
and no token leaking anywhere."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from bridge.config import OPS_MAX_CONNECTIONS
from bridge.devkafka import free_ports
from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync
from tests.polling import wait_until
from tests.process import BridgeProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def connect() -> Iterator[Callable[[BridgeProcess], socket.socket]]:
    """Raw client sockets to the bridge, closed after the test."""
    opened: list[socket.socket] = []

    def open_one(bridge: BridgeProcess) -> socket.socket:
        # Generous: a socket timeout is a failure (read_all), never a verdict.
        sock = socket.create_connection(("127.0.0.1", bridge.port), timeout=30)
        opened.append(sock)
        return sock

    yield open_one
    for sock in opened:
        sock.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; fails the test if
    the server does not close it within the socket's timeout."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            received = b"".join(chunks)
            raise AssertionError(
                f"the server did not close the connection within {sock.gettimeout()} s"
                f" (received {received[:200]!r})"
            ) from None
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def bridge_env(kafka_bootstrap: str, topic_prefix: str, **settings: str) -> dict[str, str]:
    """A bridge's settings with the test's broker and topics, and ``settings`` more."""
    return {
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
        "BRIDGE_DEADLETTER_TOPIC": topic_prefix + ".deadletter",
        **settings,
    }


@pytest.fixture
def bridge(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[BridgeProcess]:
    env = {
        **bridge_env(kafka_bootstrap, topic_prefix),
        "BRIDGE_READ_TIMEOUT": "1.5",
        "BRIDGE_KEEP_ALIVE_TIMEOUT": "1",
        "BRIDGE_MAX_HEADER_BYTES": "4096",
    }
    process = BridgeProcess(env, tmp_path / "bridge.log")
    process.start()
    yield process
    process.close()


def test_slow_loris_is_cut_off_and_others_are_served(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """A client trickling its head gets 408 and is closed; others are served meanwhile."""
    slow = connect(bridge)
    slow.sendall(b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # still trickling, one header line every half second
        time.sleep(0.5)
        try:
            slow.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
        response = httpx2.get(bridge.url + "/healthz", timeout=5)
        assert response.status_code == 200
    answer = read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request_timeout" in answer


def test_head_in_one_packet_then_silence_is_408(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """A client that sends part of its head in one packet and goes quiet gets the
    408 and is counted, like one that trickles."""
    sock = connect(bridge)
    sock.sendall(b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started > 1.0  # it waited BRIDGE_READ_TIMEOUT (1.5 s)
    metrics = httpx2.get(bridge.url + "/metrics", timeout=5).text
    assert 'bridge_rejections_total{reason="request_timeout"} 1.0' in metrics


def test_malformed_request_is_a_counted_problem_json_400(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """A request the HTTP parser refuses gets problem+json like every other error."""
    sock = connect(bridge)
    sock.sendall(b"POST /webhooks/geins HTTP/1.1\r\nHost x\r\n\r\n")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"content-type: application/problem+json" in answer
    assert b'"reason":"malformed_request"' in answer
    metrics = httpx2.get(bridge.url + "/metrics", timeout=5).text
    assert 'bridge_rejections_total{reason="malformed_request"} 1.0' in metrics


def test_silent_connection_is_closed(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """A connection that never sends a byte is closed after the keep-alive timeout, as
    an idle one is."""
    silent = connect(bridge)
    started = time.monotonic()
    assert read_all(silent) == b""
    assert time.monotonic() - started > 0.5  # it waited BRIDGE_KEEP_ALIVE_TIMEOUT (1 s)


def test_huge_head_is_431_without_reading_it_all(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """A head beyond the limits is refused as soon as it passes them."""
    sock = connect(bridge)
    sock.sendall(b"POST /webhooks/geins HTTP/1.1\r\nHost: x\r\n")
    try:
        for _ in range(100):  # 1.6 MB of header, if we were allowed to send it all
            sock.sendall(b"X-Pad: " + b"a" * 16000 + b"\r\n")
    except OSError:
        pass  # closed under us: the point
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_huge_url_is_414_not_431(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """A URL so long that the head passes its cap (BRIDGE_MAX_URL_BYTES +
    BRIDGE_MAX_HEADER_BYTES + 1 KiB) is refused for its length, like a shorter one
    over BRIDGE_MAX_URL_BYTES; it used to get 431 for a head too large."""
    sock = connect(bridge)
    # One write, which the server reads whole: closing with unread bytes would reset
    # the connection, and the answer could be lost.
    sock.sendall(b"GET /metrics?q=" + b"a" * 30000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 414"), answer[:200]
    assert b"content-type: application/problem+json" in answer
    assert b"BRIDGE_MAX_URL_BYTES" in answer
    metrics = httpx2.get(bridge.url + "/metrics", timeout=5).text
    assert 'bridge_rejections_total{reason="url_too_long"} 1.0' in metrics


def test_idle_keep_alive_connection_is_closed(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """After an answer, an idle keep-alive connection is closed after its timeout."""
    sock = connect(bridge)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"alive"}'):  # head and body may come apart
        chunk = sock.recv(65536)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200")
    assert read_all(sock) == b""  # closed by the server, not by our socket timeout


def test_slow_body_is_408(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """A body that does not arrive within the read timeout is 408, and nothing is kept."""
    sock = connect(bridge)
    sock.sendall(
        b"POST /webhooks/geins/Order/create HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
        + b'Content-Length: 100\r\n\r\n{"id":'
    )
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    counted = 'bridge_rejections_total{reason="request_timeout"} 1.0'
    metrics = wait_until(  # the app counts it once it hears the disconnect
        lambda: httpx2.get(bridge.url + "/metrics", timeout=5).text,
        lambda text: counted in text,
        within=10,
        every=0.05,
    )
    assert counted in metrics
    assert 'bridge_rejections_total{reason="client_disconnected"} 0.0' in metrics


#: The start of a request: a connection that sent it is not idle, and keeps its place
#: at BRIDGE_MAX_CONNECTIONS (until BRIDGE_READ_TIMEOUT).
HEAD_BEGUN = b"POST /webhooks/geins/Order/create HTTP/1.1\r\n"


def test_connections_over_the_limit_take_an_idle_ones_place_or_are_answered_503(
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    connect: Callable[[BridgeProcess], socket.socket],
) -> None:
    """BRIDGE_MAX_CONNECTIONS against the real server: past it a connection takes the
    place of the one idle longest, which is closed; with none idle it is answered 503
    problem+json at once (its request unread, not published), then closed; once a
    connection closes there is room again. bridge_open_connections shows them."""
    env = bridge_env(
        kafka_bootstrap,
        topic_prefix,
        BRIDGE_ACK="memory",
        BRIDGE_MAX_CONNECTIONS="3",
        BRIDGE_READ_TIMEOUT="60",  # the begun heads hold their places for the test
    )
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
        idle = [connect(bridge), connect(bridge)]
        metrics = httpx2.get(bridge.url + "/metrics", timeout=5).text  # the third
        assert "bridge_open_connections 3.0" in metrics
        idle.append(connect(bridge))
        time.sleep(1.2)  # idle for IDLE_GRACE_SECONDS (1 s) at least
        newer = connect(bridge)  # the fourth: the first, idle longest, makes room
        newer.sendall(_request("/webhooks/geins/Order/create", body=b'{"id":"newer"}'))
        assert newer.recv(65536).startswith(b"HTTP/1.1 202 ")
        assert idle[0].recv(1) == b"", "closed by the bridge"
        for sock in (*idle[1:], newer):
            sock.sendall(HEAD_BEGUN)
        over = connect(bridge)
        over.sendall(_request("/webhooks/geins/Order/create", body=b'{"id":"over"}'))
        answer = read_all(over)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"retry-after: 1\r\n" in answer
        assert b'"reason":"too_many_connections"' in answer
        over.close()
        idle.pop(1).close()

        def deliver() -> int:  # a 503 until the server has seen the close
            response = httpx2.post(
                bridge.url + "/webhooks/geins/Order/create",
                content=b'{"id":"room"}',
                headers={"authorization": f"Bearer {TOKEN}"},
                timeout=5,
            )
            return response.status_code

        assert wait_until(deliver, lambda status: status == 202, within=10, every=0.1) == 202
        scraped = wait_until(  # the same: the last connection's close may not be seen yet
            lambda: httpx2.get(bridge.url + "/metrics", timeout=5),
            lambda response: response.status_code == 200,
            within=10,
            every=0.1,
        )
        metrics = scraped.text
    assert 'bridge_requests_total{action="create",entity="order",outcome="accepted"} 2.0' in (
        metrics
    )
    assert "bridge_idle_connections_closed_total 1.0" in metrics
    assert 'bridge_rejections_total{reason="too_many_connections"}' in metrics
    assert 'bridge_rejections_total{reason="too_many_connections"} 0.0' not in metrics


def test_the_operations_port_answers_while_webhook_connections_are_at_their_limit(
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    connect: Callable[[BridgeProcess], socket.socket],
) -> None:
    """BRIDGE_OPS_PORT against the real server: with the webhook port at
    BRIDGE_MAX_CONNECTIONS the probes and Prometheus still get their answers on the
    operations port (on a shared port a flood of connections failed the liveness probe:
    a restart under load); each port answers 404 for the other's paths."""
    port, ops_port = free_ports(2)
    env = bridge_env(
        kafka_bootstrap,
        topic_prefix,
        BRIDGE_ACK="memory",
        BRIDGE_MAX_CONNECTIONS="2",
        BRIDGE_OPS_PORT=str(ops_port),
        BRIDGE_READ_TIMEOUT="60",  # the begun heads hold their places for the test
    )
    auth = {"authorization": f"Bearer {TOKEN}"}
    with BridgeProcess(env, tmp_path / "bridge.log", port=port) as bridge:
        assert bridge.ops_url == f"http://127.0.0.1:{ops_port}"
        held = [connect(bridge), connect(bridge)]
        for sock in held:
            sock.sendall(HEAD_BEGUN)
        over = connect(bridge)
        over.sendall(_request("/healthz"))
        assert read_all(over).startswith(b"HTTP/1.1 503 ")
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx2.get(bridge.ops_url + path, timeout=5).status_code == 200, path
        wrong = httpx2.post(
            bridge.ops_url + "/webhooks/geins/Order/create", content=b"{}", headers=auth, timeout=5
        )
        assert wrong.status_code == 404
        assert "webhooks are served on BRIDGE_PORT" in wrong.json()["detail"]
        for sock in held:
            sock.close()

        def scrape_webhook_port() -> httpx2.Response:  # a 503 until the closes are seen
            return httpx2.get(bridge.url + "/metrics", timeout=5)

        public = wait_until(
            scrape_webhook_port, lambda r: r.status_code != 503, within=10, every=0.1
        )
        assert public.status_code == 404
        assert "BRIDGE_OPS_PORT" in public.json()["detail"]
        accepted = httpx2.post(
            bridge.url + "/webhooks/geins/Order/create",
            content=b'{"id":"1"}',
            headers=auth,
            timeout=5,
        )
        assert accepted.status_code == 202
        metrics = httpx2.get(bridge.ops_url + "/metrics", timeout=5).text
    assert 'bridge_requests_total{action="create",entity="order",outcome="accepted"} 1.0' in (
        metrics
    )
    assert "for /healthz, /readyz, /metrics and /openapi.json (BRIDGE_OPS_PORT)" in bridge.log()


def test_no_token_in_logs_metrics_dead_letters_or_records(
    bridge: BridgeProcess, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Tokens sent every possible way (good and bad) appear nowhere the bridge writes."""
    wrong = "wrong-token-value-123"
    with httpx2.Client(base_url=bridge.url, timeout=10) as client:
        for token in (TOKEN, wrong):
            client.post(f"/webhooks/geins/Order/create?token={token}", content=b'{"id":"1"}')
            client.post(
                "/webhooks/geins",
                content=b"{not json",
                headers={"Authorization": f"Bearer {token}"},
            )
            client.post(
                "/webhooks/geins/Order/create",
                content=b"{}",
                headers={"Authorization": f"Basic {token}", "X-Token-Copy": token},
            )
            client.get(f"/webhooks/geins?entity=Order&action=create&token={token}")
        metrics = client.get("/metrics").text
    bridge.signal(signal.SIGTERM)
    bridge.wait(30)
    records = read_all_sync(kafka_bootstrap, topic_prefix)
    assert records, "some deliveries were accepted or dead-lettered"
    written = (
        bridge.log()
        + metrics
        + "".join(
            (r.value or b"").decode(errors="replace")
            + "".join(v.decode(errors="replace") for _, v in r.headers)
            for r in records
        )
    )
    assert TOKEN not in written
    assert wrong not in written


def _request(path: str, *, method: str = "POST", body: bytes = b"", extra: bytes = b"") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
        + extra
        + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        + body
    )


class _Answers:
    """Reads whole responses off a socket, keeping what arrives early for the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def next(self, *, has_body: bool = True) -> bytes:
        while True:
            head_end = self.data.find(b"\r\n\r\n")
            if head_end >= 0:
                end = head_end + 4
                if has_body:
                    head = self.data[:head_end].lower()
                    end += int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(self.data) >= end:
                    answer, self.data = self.data[:end], self.data[end:]
                    return answer
            chunk = self.sock.recv(65536)
            assert chunk, f"closed with {self.data!r} unanswered"
            self.data += chunk


def test_responses_held_for_one_write_are_never_lost_or_late(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket]
) -> None:
    """The server holds each response's head back to send it with the body
    (bridge.httpprotocol.OneWritePerResponse): pipelined requests, HEAD answers
    (no body write) and an interim 100 Continue must all still arrive in time."""
    body = b'{"entity":"Product","action":"update","id":"1"}'
    sock = connect(bridge)
    sock.settimeout(3)
    answers = _Answers(sock)
    sock.sendall(
        _request("/healthz", method="GET")
        + _request("/webhooks/geins", body=body, extra=b"x-idempotency-key: piped\r\n")
        + _request("/healthz", method="HEAD")
        + _request("/readyz", method="GET")
    )
    assert answers.next().endswith(b'{"status":"alive"}')
    accepted = answers.next()
    assert accepted.startswith(b"HTTP/1.1 202")
    assert b'"key":"piped"' in accepted
    assert answers.next(has_body=False).startswith(b"HTTP/1.1 200")
    assert answers.next().startswith(b"HTTP/1.1 200")

    # Expect: 100-continue: the interim answer must come before the body is sent.
    head = _request("/webhooks/geins", extra=b"expect: 100-continue\r\nx-idempotency-key: c\r\n")
    sock.sendall(head.replace(b"content-length: 0", b"content-length: %d" % len(body)))
    assert answers.next(has_body=False).startswith(b"HTTP/1.1 100")
    sock.sendall(body)
    assert answers.next().startswith(b"HTTP/1.1 202")


def _serious_lines_from(bridge: BridgeProcess, start: int) -> list[dict[str, object]]:
    """The bridge's log lines above INFO after its first ``start`` characters, but
    the Kafka client's (a new topic's first record makes it complain). A line that is
    not JSON, a stray traceback say, fails the test."""
    lines = (orjson.loads(line) for line in bridge.log()[start:].splitlines() if line)
    return [
        line
        for line in lines
        if line["level"] not in ("debug", "info") and not line["logger"].startswith("aiokafka")
    ]


def test_a_request_cut_short_by_a_half_close_is_answered_and_never_kept(
    bridge: BridgeProcess,
    connect: Callable[[BridgeProcess], socket.socket],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """A client that shuts down its sending side (SHUT_WR) in the middle of a request
    was disconnected without a word. It gets a 400 (incomplete_request) after the
    answers to the requests before it, or the 413 its Content-Length alone earns;
    nothing of it is published, nor kept as a dead letter."""
    head = (
        b"POST /webhooks/geins/Order/create HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
        + b"x-idempotency-key: cut\r\n"
    )
    body = b'{"id":"cut","entity":"Order","action":"create"}'
    cut_short = {
        "half a head": (head, 400),
        "half a body": (head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:9], 400),
        "half a chunk": (
            head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body[:9],
            400,
        ),
        "a content-length over the cap": (head + b"Content-Length: 99999999\r\n\r\n{", 413),
    }
    start = len(bridge.log())
    for name, (sent, status) in cut_short.items():
        sock = connect(bridge)
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 %d " % status), (name, answer)
        assert b"content-type: application/problem+json" in answer, name
        assert answer.count(b"HTTP/1.1 ") == 1, (name, answer)

    # Pipelined behind a whole request: answered in turn, after it.
    sock = connect(bridge)
    sock.sendall(
        _request("/webhooks/geins/Order/create", body=body, extra=b"x-idempotency-key: whole\r\n")
        + head
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body[:9]
    )
    sock.shutdown(socket.SHUT_WR)
    answers = _Answers(sock)
    first = answers.next()
    assert first.startswith(b"HTTP/1.1 202 "), first
    assert b'"key":"whole"' in first
    second = answers.next()
    assert second.startswith(b"HTTP/1.1 400 "), second
    assert b'"reason":"incomplete_request"' in second
    assert read_all(sock) == answers.data == b""

    metrics = httpx2.get(bridge.url + "/metrics", timeout=5).text
    assert 'bridge_rejections_total{reason="incomplete_request"} 4.0' in metrics
    assert 'bridge_rejections_total{reason="body_too_large"} 1.0' in metrics
    assert 'bridge_rejections_total{reason="client_disconnected"} 0.0' in metrics
    bridge.signal(signal.SIGTERM)
    assert bridge.wait(30) == 0
    records = read_all_sync(kafka_bootstrap, topic_prefix)
    assert [r.key for r in records] == [b"whole"]  # no other record, no dead letter
    assert _serious_lines_from(bridge, start) == []
    refused = [
        orjson.loads(line)["reason"]
        for line in bridge.log()[start:].splitlines()
        if '"delivery refused' in line
    ]
    assert sorted(refused) == ["body_too_large"] + ["incomplete_request"] * 4


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_that_closes_in_the_middle_of_a_request_logs_no_error(
    bridge: BridgeProcess, connect: Callable[[BridgeProcess], socket.socket], reset: bool
) -> None:
    """A client that closes its socket (a FIN, which the server cannot tell from a
    half-close, or a reset) part-way through a request: nothing published, nothing
    logged above INFO, and the bridge serves on."""
    head = (
        b"POST /webhooks/geins/Order/create HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
    )
    start = len(bridge.log())
    for sent in (head, head + b'Content-Length: 100\r\n\r\n{"id":'):
        sock = connect(bridge)
        sock.sendall(sent)
        time.sleep(0.1)  # the bridge has read it
        if reset:  # SO_LINGER with a zero timeout: close() sends a reset, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    time.sleep(0.5)  # answers written to the closed socket, resets received
    assert httpx2.get(bridge.url + "/healthz", timeout=5).status_code == 200
    metrics = httpx2.get(bridge.url + "/metrics", timeout=5).text
    assert 'bridge_request_duration_seconds_count{outcome="accepted"} 0.0' in metrics
    assert _serious_lines_from(bridge, start) == []


HEX = "0123456789abcdef" * 4  # a token that is also a well-formed entity name
PLUS = "plus+Secret2"  # a token with a '+', pasted raw into URLs
ROTATED = "rotated-out-token-1"  # in the tokens file at start, then rotated out
THIRD_PARTY = "third-party-credential"


def _topics(bootstrap: str) -> list[str]:
    async def listed() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return list(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(listed())


@pytest.mark.parametrize("ack", ["durable", "broker", "memory"])
def test_no_token_in_any_form_reaches_logs_records_or_topic_names(
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    connect: Callable[[BridgeProcess], socket.socket],
    ack: str,
) -> None:
    """What the review found: a token in the path (logs, dead letters, a topic named
    after it), echoed by a malformed entity or action, encoded (Basic, percent, the raw
    '+'), third-party credentials in other headers, in an idempotency key or an
    x-Timestamp, and a token rotated out of the tokens file. None of it appears in the
    log, the metrics, a record (topic, key, value, headers) or a topic name; only the
    body a sender sent is kept as it came (the dead letters keyed body-copy-*)."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{ROTATED}\n{PLUS}\n")
    env = {
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": f"{TOKEN},{HEX}",
        "BRIDGE_TOKENS_FILE": str(tokens_file),
        "BRIDGE_ACK": ack,
        "BRIDGE_ACCESS_LOG": "true",
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
        "BRIDGE_DEADLETTER_TOPIC": topic_prefix + ".deadletter",
        "BRIDGE_READ_TIMEOUT": "1.5",
    }
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    order = b'{"entity":"Order","action":"create","id":"1"}'
    basic = base64.b64encode(f"user:{HEX}".encode()).decode()
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
        with httpx2.Client(base_url=bridge.url, timeout=10) as client:
            rotated = {"Authorization": f"Bearer {ROTATED}"}
            assert client.post("/webhooks/geins", content=order, headers=rotated).status_code == 202
            tokens_file.write_text(f"{PLUS}\n")  # ROTATED is rotated out
            # a key too long: a 400 that keeps nothing while the token is accepted
            probe = {**rotated, "x-idempotency-key": "k" * 201}
            assert wait_until(
                lambda: client.post("/webhooks/geins", content=order, headers=probe).status_code,
                lambda status: status == 401,
                within=10,
                every=0.2,
            )

            def status(path: str, **kwargs: Any) -> int:
                return client.post(path, **kwargs).status_code

            # 1. a token in the path: 400 authenticated, 401 not, 404 off the routes
            assert status(f"/webhooks/geins/{HEX}", content=order, headers=bearer) == 400
            assert status(f"/webhooks/geins/Order/{HEX}", content=order, headers=bearer) == 400
            assert status(f"/webhooks/geins/{HEX}/create", content=order) == 401
            assert status(f"/webhooks/geins/Order/create/{HEX}", content=order) == 404
            # 2. a malformed entity or action shows what was sent
            assert (
                status(f"/webhooks/geins?entity=Order&action=create?token={HEX}", headers=bearer)
                == 422
            )
            body = b'{"entity":"x ' + HEX.encode() + b'","action":"create"}'
            headers = {**bearer, "x-idempotency-key": "body-copy-1"}
            assert status("/webhooks/geins", content=body, headers=headers) == 422
            # 3. encoded copies and third-party credentials in a dead letter's headers
            copies = {
                "X-Forwarded-Authorization": f"Basic {basic}",
                "X-Original-URL": "/webhooks/geins?token=plus%2BSecret2",
                "X-Auth-Token": THIRD_PARTY,
                "X-Forwarded-Access-Token": THIRD_PARTY,
                "Ocp-Apim-Subscription-Key": THIRD_PARTY,
                "X-Rotated-Copy": ROTATED,
                "x-idempotency-key": "copies-1",
            }
            path = "/webhooks/geins?token=plus+Secret2&ref=plus+Secret2"
            assert status(path, content=b"{not json", headers=copies) == 400
            # 4. a key or x-Timestamp holding a token
            for key in (f"r4-{HEX}", f"r4-{ROTATED}", "r4-plus%2BSecret2"):
                headers = {**bearer, "x-idempotency-key": key}
                assert status("/webhooks/geins/Order/create", content=order, headers=headers) == 400
            headers = {
                **bearer,
                "x-idempotency-key": "body-copy-ts",
                "x-timestamp": f"2024-01-15 {PLUS}",
            }
            body = b'{"id":"' + HEX.encode() + b'"}'  # the event's data: published as sent
            assert status("/webhooks/geins/Order/create", content=body, headers=headers) == 202
            # 5. a topic named after a token, whatever puts it there
            body = b'{"entity":"' + HEX.encode() + b'","action":"create"}'
            headers = {**bearer, "x-idempotency-key": "body-copy-2"}
            assert status("/webhooks/geins", content=body, headers=headers) == 422
            # 6. a few credentials at most
            many = "&".join([f"token={HEX}"] * 5)
            assert status(f"/webhooks/geins/Order/create?{many}", content=order) == 400
            metrics = client.get("/metrics").text
        # 7. a refusal of the HTTP protocol (a late body) on a token's path
        sock = connect(bridge)
        sock.sendall(
            f"POST /webhooks/geins/{HEX} HTTP/1.1\r\nHost: x\r\n".encode()
            + f"Authorization: Bearer {TOKEN}\r\nx-idempotency-key: r4-{HEX}\r\n".encode()
            + b'Content-Length: 100\r\n\r\n{"id":'
        )
        assert read_all(sock).startswith(b"HTTP/1.1 408")
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(30) == 0
        log = bridge.log()
    records = read_all_sync(kafka_bootstrap, topic_prefix)
    topics = _topics(kafka_bootstrap)
    reasons = sorted(dict(r.headers).get("x-bridge-reason", b"").decode() for r in records)
    assert reasons == [
        "",  # the event with a token in its x-Timestamp and its id
        "",  # the event sent with the rotated token
        "body_not_json",
        "malformed_event_type",
        "malformed_event_type",
        "malformed_event_type",
        "token_in_path",
        "token_in_path",
    ]
    [kept] = [r for r in records if r.key == b"body-copy-ts"]
    assert "x-timestamp" not in dict(kept.headers)
    assert "ce_subject" not in dict(kept.headers)
    written = "\n".join(
        [
            log,
            metrics,
            *topics,
            *(
                r.topic
                + (r.key or b"").decode(errors="replace")
                + ("" if (r.key or b"").startswith(b"body-copy") else (r.value or b"").decode())
                + "".join((v or b"").decode(errors="replace") for _, v in r.headers)
                for r in records
            ),
        ]
    )
    for secret in (TOKEN, HEX, PLUS, "plus Secret2", "plus%2BSecret2", ROTATED, basic, THIRD_PARTY):
        assert secret not in written, secret
    assert HEX[:16] not in written.lower()  # not even a part of it
    assert "/webhooks/geins/<token>" in log
    assert '"key":"r4-<token>"' in log


def test_every_head_within_the_size_limits_is_served_and_a_longer_url_is_414(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two reviews' tests. The head cap left 1 KiB for each header line's ': ' and CRLF,
    which 250 headers fill: with BRIDGE_MAX_HEADERS=500, a request within every limit
    was a 431 "larger than 25600 bytes". And the HTTP parser takes no URL over 65535
    bytes: one the setting allowed (up to 1 MiB then) was a 400, not served, and one
    over the setting a 400, not a 414."""
    env = bridge_env(kafka_bootstrap, topic_prefix, BRIDGE_MAX_HEADERS="500",
                     BRIDGE_MAX_URL_BYTES="65534")  # fmt: skip
    body = b'{"entity":"Order","action":"create","id":"1"}'

    def answer_to(port: int, url_bytes: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        path = b"/webhooks/geins?pad=" + b"p" * (url_bytes - len(b"/webhooks/geins?pad="))
        head = b"POST " + path + b" HTTP/1.1\r\n"
        fixed = [(b"host", b"x"), (b"authorization", b"Bearer " + TOKEN.encode()),
                 (b"content-length", str(len(body)).encode())]  # fmt: skip
        head += b"".join(n + b": " + v + b"\r\n" for n, v in fixed + headers) + b"\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock)

    with BridgeProcess(env, tmp_path / "bridge.log") as server:
        many = [(b"x-pad-%05d" % i, b"v" * 22) for i in range(490)]  # 16,170 bytes counted
        assert answer_to(server.port, 8190, many).startswith(b"HTTP/1.1 202")
        assert answer_to(server.port, 65535, []).startswith(
            b"HTTP/1.1 202"
        )  # 65534 without the '?'
        too_long = answer_to(server.port, 70_000, [])
        assert too_long.startswith(b"HTTP/1.1 414"), too_long[:300]
        assert b"BRIDGE_MAX_URL_BYTES" in too_long


def deliver(bridge: BridgeProcess) -> int:
    return httpx2.post(
        bridge.url + "/webhooks/geins/Order/create",
        content=b'{"id":"after"}',
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=5,
    ).status_code


def test_a_client_that_never_reads_a_small_answer_does_not_hold_its_connection_for_ever(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """README: a client that stops reading its answers gets BRIDGE_READ_TIMEOUT to read
    again, then its connection is dropped. That held only once the server's write
    buffer passed its high-water mark (64 KiB): an answer that left less unsent (here
    /openapi.json, ~98 KB, of which the kernel takes ~50 KB for a client with a small
    window) was never dropped. The keep-alive timer closed the connection, and the
    close waited for the buffer to drain, for ever: its descriptor and its place at
    BRIDGE_MAX_CONNECTIONS stayed taken, and that many such clients got every other
    client, probes included, a 503 (a review's test)."""
    env = bridge_env(
        kafka_bootstrap,
        topic_prefix,
        BRIDGE_ACK="memory",
        BRIDGE_MAX_CONNECTIONS="1",
        BRIDGE_READ_TIMEOUT="1.5",
        BRIDGE_KEEP_ALIVE_TIMEOUT="1",
    )
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge, socket.socket() as slow:
        assert deliver(bridge) == 202
        # a small window and small segments, as over a slow link
        slow.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        slow.settimeout(30)
        slow.connect(("127.0.0.1", bridge.port))
        slow.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")  # and reads nothing
        # keep-alive (1 s) and read (1.5 s) timeouts are long past within 20 s
        status = wait_until(lambda: deliver(bridge), lambda s: s == 202, within=20, every=0.5)
        assert status == 202, "a client that never read its answer holds the only place"


def test_idle_connections_to_the_operations_port_do_not_lock_out_the_probes(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The operations port's 64 connections had no idle-replacement, unlike
    BRIDGE_PORT's: 64 connections that send nothing (a scanner, a pooling client in the
    cluster; the Service exposes the port) held every place for
    BRIDGE_KEEP_ALIVE_TIMEOUT (620 s in the manifests), and the liveness probe's
    /healthz was a 503 for that long: six failures, a restart (a review's test)."""
    port, ops_port = free_ports(2)
    env = bridge_env(
        kafka_bootstrap,
        topic_prefix,
        BRIDGE_ACK="memory",
        BRIDGE_OPS_PORT=str(ops_port),
        BRIDGE_KEEP_ALIVE_TIMEOUT="620",  # as deploy/kubernetes
    )
    with (
        BridgeProcess(env, tmp_path / "bridge.log", port=port) as bridge,
        contextlib.ExitStack() as held,
    ):
        for _ in range(OPS_MAX_CONNECTIONS):
            held.enter_context(socket.create_connection(("127.0.0.1", ops_port), timeout=30))

        def probe() -> int:
            return httpx2.get(bridge.ops_url + "/healthz", timeout=5).status_code

        # every silent connection idle for IDLE_GRACE_SECONDS (1 s) well within 10 s
        assert wait_until(probe, lambda s: s == 200, within=10, every=0.5) == 200
