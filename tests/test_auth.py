"""auth: where tokens are read from, and what is refused."""

from __future__ import annotations

import base64
import hmac
import os
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from bridge import auth
from bridge.auth import TokenAuthenticator
from bridge.errors import Unauthorized

AUTH = TokenAuthenticator(["old-token", "new-token"])


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([(b"authorization", b"Bearer new-token")], []),
        ([(b"authorization", b"bearer   old-token ")], []),
        ([(b"Authorization", basic("geins", "new-token"))], []),
        ([], [("token", "old-token")]),
        ([(b"authorization", b"Bearer wrong")], [("token", "new-token")]),
    ],
)
def test_accepted_credentials(
    headers: list[tuple[bytes, bytes]], query: list[tuple[str, str]]
) -> None:
    """Bearer, Basic password and ?token= all work, for every configured token."""
    AUTH.check(headers, query)


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([], []),
        ([(b"authorization", b"Bearer nope")], []),
        ([(b"authorization", b"Bearer ")], []),
        ([(b"authorization", b"Token new-token")], []),
        ([(b"authorization", basic("new-token", ""))], []),
        ([(b"authorization", b"Basic !!!notbase64")], []),
        ([], [("token", "")]),
        ([], [("token", "new-token-but-longer")]),
        ([(b"x-token", b"new-token")], []),
    ],
)
def test_refused_credentials(
    headers: list[tuple[bytes, bytes]], query: list[tuple[str, str]]
) -> None:
    """Anything but a configured token in a supported place is 401."""
    with pytest.raises(Unauthorized) as info:
        AUTH.check(headers, query)
    assert info.value.status == 401


def test_unauthenticated_only_when_asked() -> None:
    """No tokens means everything is refused, unless explicitly opened."""
    with pytest.raises(Unauthorized):
        TokenAuthenticator([]).check([], [])
    TokenAuthenticator([], allow_unauthenticated=True).check([], [])


def test_every_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each presented credential is compared with every token through hmac.compare_digest,
    with no early exit on a match, so timing does not tell which token (or byte) was close."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # what bridge.auth calls
    AUTH.check([(b"authorization", b"Bearer old-token")], [("token", "nope")])
    assert len(calls) == 4  # 2 presented x 2 configured, although the first one matched
    assert {b for _, b in calls} == {b"old-token", b"new-token"}


def test_an_open_bridge_requires_a_token_once_the_file_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BRIDGE_ALLOW_UNAUTHENTICATED opens the bridge only while no token exists: a
    token written to the tokens file later is required from then on."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.0)
    tokens = tmp_path / "tokens"
    tokens.write_text("# no token yet\n")
    authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
    authenticator.check([], [])
    tokens.write_text("file-token\n")
    os.utime(tokens, (1, 1))  # a different mtime, whatever the clock's resolution
    with pytest.raises(Unauthorized):
        authenticator.check([], [])
    with pytest.raises(Unauthorized):
        authenticator.check([(b"authorization", b"Bearer wrong")], [])
    authenticator.check([(b"authorization", b"Bearer file-token")], [])


def test_a_tokens_file_caught_mid_rewrite_neither_opens_nor_closes_the_bridge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite in place (truncate, then write) read while empty keeps the tokens
    the file had; only a file found empty at two checks in a row has none. The
    rewrite is seen even when it keeps the file's mtime (one tick of the clock)."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.0)
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    os.utime(tokens, (1, 1))
    authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
    old = [(b"authorization", b"Bearer old-token")]
    authenticator.check(old, [])
    tokens.write_text("")  # truncated, and read before the new content is written
    os.utime(tokens, (1, 1))
    with pytest.raises(Unauthorized):
        authenticator.check([], [])  # not open
    authenticator.check(old, [])  # not closed to the old token either
    tokens.write_text("new-token\n")  # the rest of the rewrite, in the same tick
    os.utime(tokens, (1, 1))
    authenticator.check([(b"authorization", b"Bearer new-token")], [])
    with pytest.raises(Unauthorized):
        authenticator.check(old, [])
    tokens.write_text("# tokens removed\n")  # emptied on purpose: open at the next check
    with pytest.raises(Unauthorized):
        authenticator.check([], [])
    authenticator.check([], [])


def test_a_token_with_a_plus_pasted_raw_into_the_url_is_accepted() -> None:
    """A base64 token in ?token= without URL-encoding: its '+' arrives as a space after
    query decoding (parse_qsl), and still matches; a token with a space (one line of a
    tokens file) still matches as it is."""
    auth = TokenAuthenticator(("ab+cd/ef==",))
    query = parse_qsl("token=ab+cd/ef==", keep_blank_values=True)  # what the ingress does
    auth.check([], query)
    auth.check([], parse_qsl("token=ab%2Bcd%2Fef%3D%3D"))  # encoded, as it should be
    TokenAuthenticator(("ab cd",)).check([], parse_qsl("token=ab+cd"))
