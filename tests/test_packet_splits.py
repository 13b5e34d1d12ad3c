"""The HTTP protocol answers a byte stream the same way however it is cut into
packets: the same statuses, 100 Continues, published keys, and counted refusals
(property-based, on test_httpprotocol's Connection harness; a review's test, which
found requests behind an answer that closes counted only when in its packet)."""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from tests.fakes import TOKEN
from tests.test_httpprotocol import ORDER, Connection

HEAD_CAP = 2048  # piece = 512: a head is charged at most 512 bytes it did not send
AUTH = b"authorization: Bearer %s\r\n" % TOKEN.encode()


def cl_webhook(
    key: str, extra: bytes = b"", version: bytes = b"1.1", auth: bytes = AUTH, body: bytes = ORDER
) -> bytes:
    host = b"host: x\r\n" if version == b"1.1" else b""
    return (
        b"POST /webhooks/geins HTTP/%s\r\n%s%sx-idempotency-key: %s\r\n"
        b"content-length: %d\r\n%s\r\n%s"
        % (version, host, auth, key.encode(), len(body), extra, body)
    )


def chunked_webhook(
    key: str, cuts: list[int], ext: bool, trailer: bytes | bool, body: bytes = ORDER
) -> bytes:
    points = sorted({c % len(body) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(c), b";e=1" if ext else b"", c) for c in chunks if c)
    if trailer is True:
        trailer = b"x-trailer: t\r\n"
    body += b"0\r\n%s\r\n" % (trailer or b"")
    return (
        b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\n%sx-idempotency-key: %s\r\n"
        b"transfer-encoding: chunked\r\n\r\n%s" % (AUTH, key.encode(), body)
    )


HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
BAD_CHUNK = (
    b"POST /webhooks/geins HTTP/1.1\r\nhost: x\r\n%sx-idempotency-key: bad\r\n"
    b"transfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n" % AUTH
)
MAX_BODY = 100  # BRIDGE_MAX_BODY_BYTES
BIG = b'{"entity":"Order","action":"create","id":"%s"}' % (b"9" * 120)
UPGRADE = b"connection: upgrade\r\nupgrade: h2c\r\n"
OVER_CAP = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: %s\r\n\r\n" % (b"a" * (HEAD_CAP * 2))


EXTRA_TERMINAL = ["http10_keep_alive", "http10_expect", "big_trailer", "big_ext"]


@st.composite
def requests(draw: Any) -> list[bytes]:  # noqa: PLR0912  # a branch per kind of request
    out = []
    for n in range(draw(st.integers(1, 20))):
        key = f"k{n}"
        kind = draw(
            st.sampled_from(
                ["cl", "chunked", "healthz", "expect", "wrong_token", "big_cl", "big_chunked",
                 "upgrade", "crlf", "dup", "empty", "upgrade_chunked", "upgrade_get",
                 "upgrade_expect", "small_trailers"]
            )
            if draw(st.integers(0, 9))
            else st.sampled_from(
                ["bad_chunk", "over_cap", "close", "http10", "trailer_conn", "http20", "no_host",
                 *EXTRA_TERMINAL]
            )
        )  # fmt: skip
        if kind == "cl":
            out.append(cl_webhook(key))
        elif kind == "chunked":
            out.append(
                chunked_webhook(
                    key,
                    draw(st.lists(st.integers(0, 100), max_size=3)),
                    draw(st.booleans()),
                    draw(st.booleans()),
                )
            )
        elif kind == "healthz":
            out.append(HEALTHZ)
        elif kind == "bad_chunk":
            out.append(BAD_CHUNK)
        elif kind == "over_cap":
            out.append(OVER_CAP)
        elif kind == "close":
            out.append(cl_webhook(key, b"connection: close\r\n"))
        elif kind == "expect":
            out.append(cl_webhook(key, b"expect: 100-continue\r\n"))
        elif kind == "http10":
            out.append(cl_webhook(key, version=b"1.0"))
        elif kind == "http10_keep_alive":  # see test_httpprotocol's HTTP/1.0 keep-alive tests
            out.append(cl_webhook(key, b"connection: keep-alive\r\n", version=b"1.0"))
        elif kind == "http10_expect":
            out.append(cl_webhook(key, b"expect: 100-continue\r\n", version=b"1.0"))
        elif kind == "big_trailer":
            fields = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 60) for i in range(80))
            out.append(chunked_webhook(key, [], False, fields))
        elif kind == "big_ext":
            out.append(
                chunked_webhook(key, [], False, False).replace(
                    b"\r\n\r\n2d", b"\r\n\r\n2d;" + b"e" * 5000, 1
                )
            )
        elif kind == "small_trailers":
            fields = b"".join(b"x-t%d: v\r\n" % i for i in range(draw(st.integers(0, 5))))
            out.append(
                chunked_webhook(
                    key, draw(st.lists(st.integers(0, 60), max_size=4)), draw(st.booleans()), fields
                )
            )
        elif kind == "upgrade_chunked":
            out.append(
                chunked_webhook(key, [7], False, True).replace(
                    b"transfer-encoding", UPGRADE + b"transfer-encoding"
                )
            )
        elif kind == "upgrade_get":
            out.append(HEALTHZ.replace(b"host: x\r\n", b"host: x\r\n" + UPGRADE))
        elif kind == "upgrade_expect":
            out.append(cl_webhook(key, UPGRADE + b"expect: 100-continue\r\n"))
        elif kind == "empty":
            out.append(cl_webhook(key, body=b""))
        elif kind == "wrong_token":
            out.append(cl_webhook(key, auth=b"authorization: Bearer nope\r\n"))
        elif kind == "big_cl":
            out.append(cl_webhook(key, body=BIG))
        elif kind == "big_chunked":
            cuts = draw(st.lists(st.integers(0, 200), max_size=3))
            out.append(chunked_webhook(key, cuts, False, False, body=BIG))
        elif kind == "upgrade":
            out.append(cl_webhook(key, UPGRADE))
        elif kind == "trailer_conn":
            out.append(chunked_webhook(key, [], False, b"connection: close\r\n"))
        elif kind == "http20":
            out.append(cl_webhook(key).replace(b"HTTP/1.1", b"HTTP/2.0", 1))
        elif kind == "no_host":
            out.append(cl_webhook(key).replace(b"host: x\r\n", b""))
        elif kind == "crlf":
            out.append(b"\r\n")
        else:
            out.append(cl_webhook("k0"))
    return out


@dataclass
class Outcome:
    statuses: list[int]
    interim: int
    keys: list[bytes]
    refused: list[str]
    metrics: dict[str, float]


STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def parse_responses(data: bytes) -> tuple[list[int], int]:
    finals, interim = [], 0
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        m = STATUS.match(head)
        assert m, data
        status = int(m.group(1))
        if status < 200:
            interim += 1
            data = rest
            continue
        lines = head.lower().split(b"\r\n")
        length = [int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length:")]
        assert length, head
        finals.append(status)
        data = rest[length[0] :]
    return finals, interim


def counters(connection: Connection) -> dict[str, float]:
    out = {}
    for line in connection.metrics.exposition().decode().splitlines():
        if line.startswith(("bridge_requests_total", "bridge_rejections_total")):
            name, _, value = line.rpartition(" ")
            if float(value):
                out[name] = float(value)
    return out


async def settle(connection: Connection) -> None:
    """Run the loop until nothing changes (the fake publisher answers at once)."""
    transport = connection.transport
    quiet, last = 0, None
    for _ in range(2000):
        await asyncio.sleep(0)
        tasks = [t for t in connection.state.tasks if not t.done()]
        now = (
            len(transport.writes),
            transport.reading,
            transport.closed,
            transport.eof,
            len(tasks),
        )
        quiet = quiet + 1 if now == last else 0
        last = now
        if quiet > 20 and not tasks:
            return


async def run(pieces: list[bytes], eof: bool, waits: list[int | None]) -> Outcome:
    """Feed ``pieces`` as the event loop would: no data while reading is paused or once
    closed, connection_lost soon after a close; then maybe a half-close. Before each
    piece (and the half-close) the loop runs ``waits[i]`` times (None: until idle)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return await _run(monkeypatch, pieces, eof, waits)


async def _run(
    monkeypatch: pytest.MonkeyPatch, pieces: list[bytes], eof: bool, waits: list[int | None]
) -> Outcome:
    connection = Connection(
        monkeypatch,
        max_head_bytes=HEAD_CAP,
        read_timeout=60,
        keep_alive=60,
        settings={"BRIDGE_MAX_BODY_BYTES": str(MAX_BODY)},
    )
    protocol: Any = connection.protocol
    transport = connection.transport
    lost = False

    def lose() -> None:
        nonlocal lost
        if not lost:
            lost = True
            protocol.connection_lost(None)

    real_close = transport.close

    def close() -> None:
        real_close()
        asyncio.get_running_loop().call_soon(lose)  # as the event loop does

    transport.close = close  # type: ignore[method-assign]
    transport.abort = close  # type: ignore[method-assign]

    async def readable(wait: int | None) -> bool:
        if wait is None:
            await settle(connection)
        else:
            for _ in range(wait):
                await asyncio.sleep(0)
        for _ in range(3000):  # the loop reads again once resumed
            if transport.closed or transport.reading:
                break
            await asyncio.sleep(0)
        return transport.reading and not transport.closed

    try:
        events: list[bytes | None] = [*pieces, None] if eof else list(pieces)
        for i, piece in enumerate(events):
            if not await readable(waits[i % len(waits)]):
                break
            if piece is None:
                if protocol.eof_received() is None:
                    close()
            else:
                protocol.data_received(piece)
        await settle(connection)
        statuses, interim = parse_responses(b"".join(transport.writes))
    finally:
        lose()  # the client goes away at the end
        await settle(connection)
    return Outcome(
        statuses,
        interim,
        [r.key for r in connection.publisher.records],
        [e.reason for e in connection.refused],
        counters(connection),
    )


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p for p in points if 0 < p < len(stream)})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


@st.composite
def cut_points(draw: Any, stream: bytes) -> list[int]:
    """Random cuts, plus cuts inside every CRLF and around chunk-size lines, or every byte."""
    mode = draw(st.sampled_from(["random", "crlf", "bytes", "mixed"]))
    if mode == "bytes":
        return list(range(1, len(stream)))
    points: list[int] = draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=30))
    if mode in ("crlf", "mixed"):
        crlfs = [m.start() + 1 for m in re.finditer(rb"\r\n", stream)]
        points += draw(st.lists(st.sampled_from(crlfs), max_size=40)) if crlfs else []
    return points


@settings(
    max_examples=100,
    deadline=None,
    # The same examples every run: a run that lands is not turned red by a new draw
    # (raise max_examples, or drop this, to search further by hand).
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_the_answers_do_not_depend_on_how_the_stream_is_cut(data: st.DataObject) -> None:
    reqs = data.draw(requests(), label="requests")
    stream = b"".join(reqs)
    eof = data.draw(st.booleans(), label="eof")
    if eof and data.draw(st.booleans(), label="cut short"):  # the half-close cuts it short
        stream = stream[: data.draw(st.integers(1, len(stream)), label="length")]
    points = data.draw(cut_points(stream), label="cuts")
    waits = data.draw(
        st.lists(st.none() | st.integers(0, 30), min_size=1, max_size=8), label="waits"
    )

    async def both() -> tuple[Outcome, Outcome]:
        whole = await run([stream], eof, [None])
        pieces = await run(cut(stream, points), eof, waits)
        return whole, pieces

    whole, pieces = asyncio.run(both())
    # The pipelining cap (429) depends on how much arrives in one read, by design.
    assume(429 not in whole.statuses)
    note(f"whole:  {whole}")
    note(f"pieces: {pieces}")
    assert (whole.statuses, whole.keys) == (pieces.statuses, pieces.keys)
    assert whole.interim == pieces.interim
    assert whole.refused == pieces.refused
    assert whole.metrics == pieces.metrics
