"""OneWritePerResponse: one write per response, and nothing held back for long."""

from __future__ import annotations

import asyncio
from typing import cast

from bridge.httpprotocol import OneWritePerResponse


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def writer() -> tuple[OneWritePerResponse, RecordingTransport]:
    transport = RecordingTransport()
    return OneWritePerResponse(cast(asyncio.Transport, transport)), transport


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
