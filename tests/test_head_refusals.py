"""The HTTP protocol's own refusals of a head, from a real `bridge serve`: a head over
its cap (431, or 414 for a URL past it) whose body is still coming (a review's find), and
the refusals of a HEAD request, which have no content."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator

import pytest

from tests.fakes import TOKEN
from tests.process import BridgeProcess

BODY = b"{" + b" " * 600_000 + b"}"


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    tmp = tmp_path_factory.mktemp("bridge")
    env = {
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": "memory",
        "BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # never reached: nothing is accepted
        "BRIDGE_ALLOW_UNAUTHENTICATED": "false",
    }
    process = BridgeProcess(env, tmp / "bridge.log")
    process.start()
    yield process
    process.close()


def _send_whole(bridge: BridgeProcess, head: bytes) -> tuple[str | None, bytes]:
    """Send head, then the body in pieces as a network would; then read the answer.
    Returns the error a write met (None: all written) and what was read."""
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.settimeout(5)
    failed = None
    try:
        sock.sendall(head)
        time.sleep(0.1)  # the body follows a little later
        for start in range(0, len(BODY), 65536):
            sock.sendall(BODY[start : start + 65536])
    except OSError as exc:
        failed = type(exc).__name__
    return failed, _read_to_the_end(sock)


def _read_to_the_end(sock: socket.socket) -> bytes:
    """What the bridge sent until it closed (or reset) the connection; closes it."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    sock.close()
    return answer


def _content_length(head: bytes) -> int:
    return next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )


def _head(*, url_extra: bytes = b"", header: bytes = b"") -> bytes:
    return (
        b"POST /webhooks/geins/Order/create" + url_extra + b" HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer "
        + TOKEN.encode()
        + b"\r\n"
        + header
        + b"Content-Length: %d\r\n\r\n" % len(BODY)
    )


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (_head(header=b"X-Big: " + b"b" * 40_000 + b"\r\n"), b"431"),
        (_head(url_extra=b"?x=" + b"a" * 40_000), b"414"),
        (
            b"POST /webhooks/geins/Order/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"501",
        ),
    ],
    ids=["431", "414", "501"],
)
def test_a_head_refusal_is_not_lost_to_a_reset(
    bridge: BridgeProcess, head: bytes, status: bytes
) -> None:
    """The bridge closed at once with the body unread, so the kernel reset the
    connection: the client's next write failed (EPIPE) and an ordinary client
    (http.client, 4 of 8 here) never read its answer. It lingers now, as a 413 does
    (the answer, a FIN, what still comes dropped)."""
    failed, answer = _send_whole(bridge, head)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert failed is None, f"the client's body write failed ({failed}): it reads no answer"


def test_the_413_in_the_same_position_is_read(bridge: BridgeProcess) -> None:
    """The control: a body over the cap is answered early too, and lingers."""
    big = b"{" + b" " * 2_000_000 + b"}"
    connection = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=5)
    try:
        connection.request(
            "POST",
            "/webhooks/geins/Order/create",
            body=big,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert connection.getresponse().status == 413
    finally:
        connection.close()


def test_a_malformed_request_after_a_head_request_gets_its_problem_document(
    bridge: BridgeProcess,
) -> None:
    """A refusal after an answered HEAD on the same connection is no answer to HEAD: its
    content is there, as long as it says. (Leaving the content out of the protocol's
    refusals of HEAD, as asked of the parser's method, truncated this 400: the parser
    still says HEAD until the next request's method is read; a review's find.)"""
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.settimeout(5)
    sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while b"\r\n\r\n" not in first:
        first += sock.recv(65536)
    _, _, rest = first.partition(b"\r\n\r\n")
    sock.sendall(b"\x01\x02 garbage\r\n\r\n")  # the next request: not HTTP at all
    answer = rest + _read_to_the_end(sock)
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    length = _content_length(head)
    assert len(content) == length, (length, content[:200])


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000, id="431"),
        pytest.param(b"HEAD /healthz?q=" + b"q" * 40_000, id="414"),
        pytest.param(
            b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x\r\n\r\n", id="400"
        ),
    ],
)
def test_the_protocols_refusal_of_a_head_request_has_no_content(
    bridge: BridgeProcess, head: bytes
) -> None:
    """RFC 9110 9.3.2: the answer to HEAD has no content, only its length. The app's
    refusals of a HEAD request have none (uvicorn drops it); the HTTP protocol's own
    (431, 414 past the head's cap, a malformed head's 400) wrote the problem document."""
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.settimeout(5)
    sock.sendall(head)
    answer = _read_to_the_end(sock)
    status, _, content = answer.partition(b"\r\n\r\n")
    assert status.split(b" ")[1] in (b"431", b"414", b"400"), answer[:300]
    assert b"content-length: " in status.lower(), status
    assert content == b"", content[:200]


def test_a_refusal_after_pipelined_head_requests_keeps_the_method_of_its_own(
    bridge: BridgeProcess,
) -> None:
    """Two HEADs answered, then a GET whose head is over the cap: the GET's 431 carries
    its problem document (the method is the refused request's, not the last answered)."""
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.settimeout(5)
    one = b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    sock.sendall(one + one + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000)
    answer = _read_to_the_end(sock)
    last = answer[answer.rindex(b"HTTP/1.1 ") :]
    head, _, content = last.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), last[:300]
    length = _content_length(head)
    assert length > 0
    assert len(content) == length, (length, content[:200])


@pytest.mark.parametrize(
    ("authorization", "length", "status"),
    [
        (b"", 100, b"401"),
        (b"Authorization: Bearer " + TOKEN.encode() + b"\r\n", 2_000_000, b"413"),
    ],
    ids=["401", "413"],
)
def test_an_answer_before_the_body_was_invited_closes_the_connection(
    bridge: BridgeProcess, authorization: bytes, length: int, status: bytes
) -> None:
    """A request with Expect: 100-continue answered before its body was invited may be
    followed by its body or by the next request: the server cannot tell, so it says
    connection: close and closes (RFC 9110 10.1.1; Go's server does). It kept the
    connection, and read the client's next request as the unsent body."""
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.settimeout(5)
    sock.sendall(
        b"POST /webhooks/geins/Order/create HTTP/1.1\r\nHost: x\r\n"
        + authorization
        + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length
    )
    answer = _read_to_the_end(sock)  # fails (a timeout) unless the bridge closes
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" "), answer[:300]
    assert b"\r\nconnection: close" in head.lower(), head
    assert len(content) == _content_length(head), content[:200]


def test_an_invited_body_keeps_the_connection(bridge: BridgeProcess) -> None:
    """The control: the body invited (100 Continue) and sent, the connection stays."""
    body = b'{"id":'  # read, then refused: not JSON
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.settimeout(5)
    sock.sendall(
        b"POST /webhooks/geins/Order/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    interim = sock.recv(65536)
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    sock.sendall(body)
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"connection: close" not in answer.lower(), answer[:300]
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    sock.close()
